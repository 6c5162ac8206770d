"""Integers as torch expects them: with JAX's x64 off, int32 arguments reach torch as
int64 (the dtype JAX itself would use with x64 on), and int64 outputs come back as int32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pytorch2jax
from conftest import TRANSPORTS, tree_allclose
from pytorch2jax import py_to_jax_wrapper
from pytorch2jax_server import examples


def _function(bridge: str, clients, name: str, **options):
    if bridge == "in_process":
        return py_to_jax_wrapper(getattr(examples, name), **options)
    return clients[bridge].py_to_jax_wrapper(name, **options)


@pytest.mark.parametrize("bridge", ["in_process", *TRANSPORTS])
def test_int32_labels_reach_torch_as_int64(bridge, clients):
    assert not jax.config.jax_enable_x64
    loss = _function(bridge, clients, "cross_entropy")
    logits = jax.random.normal(jax.random.key(0), (6, 4))
    labels = jnp.array([0, 3, 1, 2, 2, 0], jnp.int32)
    t_logits = torch.from_numpy(np.array(logits)).requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(t_logits, torch.from_numpy(np.array(labels)).long())
    expected.backward()
    tree_allclose(loss(logits, labels), expected.detach().numpy())
    value, grad = jax.jit(jax.value_and_grad(loss))(logits, labels)
    tree_allclose(value, expected.detach().numpy())
    tree_allclose(grad, t_logits.grad.numpy())
    per_example = jax.vmap(jax.grad(lambda x, y: loss(x[None], y[None])))(logits, labels)
    # The gradient of one example's cross-entropy: softmax minus the one-hot label.
    one_hot = jax.nn.one_hot(labels, 4)
    tree_allclose(per_example, jax.nn.softmax(logits) - one_hot, atol=1e-6)
    # Opting out passes int32 as it is: torch then says what it wants.
    as_is = _function(bridge, clients, "cross_entropy", int32_as_int64=False)
    with pytest.raises(pytorch2jax.InvalidArgumentError, match="Long"):
        as_is(logits, labels)


@pytest.mark.parametrize("bridge", ["in_process", *TRANSPORTS])
def test_int64_outputs_come_back_as_int32(bridge, clients):
    top_class = _function(bridge, clients, "top_class")
    x = jax.random.normal(jax.random.key(1), (3, 5))
    for out in (top_class(x), jax.jit(top_class)(x), jax.vmap(top_class)(x)):
        assert out.dtype == jnp.int32
        np.testing.assert_array_equal(out, np.argmax(np.asarray(x), axis=-1))
    # Integer outputs have no tangent: float0, as JAX's own.
    _, tangent = jax.jvp(top_class, (x,), (jnp.ones_like(x),))
    assert tangent.dtype == jax.dtypes.float0
