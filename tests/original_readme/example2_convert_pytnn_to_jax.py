import jax.numpy as jnp
import jax
import torch.nn as pnn
from pytorch2jax import convert_pytnn_to_jax

pyt_model = pnn.Linear(10, 10)
jax_fn, params = convert_pytnn_to_jax(pyt_model)
def fx(x):
    return jax_fn(params, x).sum()
grad_fx = jax.grad(fx)
x = jnp.ones((10,))
print(grad_fx(x))
