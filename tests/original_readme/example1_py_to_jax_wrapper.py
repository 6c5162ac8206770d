import torch
import jax.numpy as jnp
from pytorch2jax import py_to_jax_wrapper

@py_to_jax_wrapper
def fn(x):
    return torch.rand((10,10))*x

x = jnp.ones((10,10))
output = fn(x)
print(output)
