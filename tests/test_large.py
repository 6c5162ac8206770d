"""Tensors far above gRPC's default 4 MiB message limit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MB64 = 64 * 2**20 // 4  # float32 elements in 64 MB


def test_64mb_input_and_output(client):
    scale_shift = client.py_to_jax_wrapper("scale_shift")
    x = jnp.arange(MB64, dtype=jnp.float32)
    shift = jnp.float32(0.0)
    y = scale_shift(x, shift, scale=0.5)
    assert y.shape == (MB64,) and y.nbytes == 64 * 2**20
    np.testing.assert_array_equal(np.asarray(y[-3:]), np.asarray(x[-3:]) * 0.5)
    g = jax.jit(jax.grad(lambda x: (scale_shift(x, shift) * x).sum()))(x)
    np.testing.assert_allclose(np.asarray(g[:4]), 4 * np.arange(4, dtype=np.float32))
    np.testing.assert_allclose(np.asarray(g[-1]), 4 * (MB64 - 1), rtol=1e-6)
