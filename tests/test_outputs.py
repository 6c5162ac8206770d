"""What a model may return, the same in process and served: tensors (and None) in tuples,
lists and dicts; a dict subclass (a Hugging Face ModelOutput) as a plain dict; anything
else refused by type and place with the way out. And a Python flag that jax.jit traced
is told apart from data-dependent shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import pytorch2jax
from conftest import TRANSPORTS, tree_allclose
from pytorch2jax import py_to_jax_wrapper
from pytorch2jax_server import examples

BRIDGES = ["in_process", *TRANSPORTS]


def _function(bridge: str, clients, name: str):
    if bridge == "in_process":
        return py_to_jax_wrapper(getattr(examples, name))
    return clients[bridge].py_to_jax_wrapper(name)


@pytest.mark.parametrize("bridge", BRIDGES)
def test_a_non_tensor_output_is_refused_alike_eagerly_and_under_jit(bridge, clients):
    with_cache = _function(bridge, clients, "with_cache")
    x = jnp.arange(3.0)
    tree_allclose(with_cache(x, use_cache=False), {"logits": 2 * x})
    tree_allclose(jax.jit(lambda x: with_cache(x, use_cache=False))(x), {"logits": 2 * x})
    message = r"returned a DynamicCache at output\['past_key_values'\].*use_cache=False"
    with pytest.raises(pytorch2jax.InvalidArgumentError, match=message):
        with_cache(x)
    with pytest.raises(pytorch2jax.InvalidArgumentError, match=message):
        jax.jit(with_cache)(x)


@pytest.mark.parametrize("bridge", BRIDGES)
def test_a_traced_flag_is_told_apart_from_data_dependent_shapes(bridge, clients):
    flagged = _function(bridge, clients, "flagged")
    x = jnp.arange(3.0)
    with pytest.raises(
        pytorch2jax.UnsupportedError, match=r"if argument 1 is a Python flag .*static_argnames"
    ):
        jax.jit(flagged)(x, True)
    tree_allclose(jax.jit(flagged, static_argnums=1)(x, True), 2 * x)
    tree_allclose(jax.jit(lambda x: flagged(x, False))(x), x[:1])
