import jax.numpy as jnp
import jax
import torch.nn as pnn
import flax.linen as jnn
from pytorch2jax import convert_pytnn_to_flax
from typing import Any

pyt_model = pnn.Linear(10, 10)
flax_module, params = convert_pytnn_to_flax(pyt_model)

class SampleFlaxModule(jnn.Module):
    flax_module: Any

    @jnn.compact
    def __call__(self, x):
        return self.flax_module()(x)

flax_model = SampleFlaxModule(flax_module)
params = flax_model.init(jax.random.PRNGKey(0), jnp.ones((10, 10)))
flax_model.apply(params, jnp.ones((10, 10)))
