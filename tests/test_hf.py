"""Real models: GPT-2 and BERT built from ``transformers`` configs (2 layers, 64 wide,
random weights, nothing downloaded), in process and on the shared worker.

With JAX's x64 off, int32 token ids and labels reach torch as int64, so the loss is
torch's; ``jit(value_and_grad)`` trains them with dropout keyed from JAX; GPT-2's default
``use_cache=True`` gives the same clear error in both backends.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from conftest import TRANSPORTS
from pytorch2jax import InvalidArgumentError, convert_pytnn_to_jax
from pytorch2jax_server import examples

BRIDGES = ["in_process", *TRANSPORTS]
IDS = np.array(jax.random.randint(jax.random.key(0), (2, 12), 0, 128), np.int32)
TORCH_IDS = torch.tensor(IDS, dtype=torch.int64)


def _model(name, bridge, clients):
    if bridge == "in_process":
        return convert_pytnn_to_jax(getattr(examples, name)())
    return clients[bridge].convert_pytnn_to_jax(name)


def _torch_loss(name, **kwargs) -> float:
    model = getattr(examples, name)().eval()
    with torch.no_grad():
        return float(model(**kwargs).loss)


@pytest.mark.parametrize("bridge", BRIDGES)
def test_gpt2_with_int32_labels_gives_torchs_loss_and_trains(bridge, clients):
    assert not jax.config.jax_enable_x64 and IDS.dtype == np.int32
    apply_fn, params = _model("gpt2", bridge, clients)
    ids = jnp.asarray(IDS)
    want = _torch_loss("gpt2", input_ids=TORCH_IDS, labels=TORCH_IDS, use_cache=False)
    out = apply_fn(params, ids, labels=ids, use_cache=False, train=False)
    assert sorted(out) == ["logits", "loss"] and out["logits"].shape == (2, 12, 128)
    np.testing.assert_allclose(float(out["loss"]), want, rtol=1e-5)

    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, key):
        def loss(p):
            return apply_fn(p, ids, labels=ids, use_cache=False, rng=key, train=True)["loss"]

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = optimizer.init(params)
    losses = []
    for key in jax.random.split(jax.random.key(1), 8):
        params, opt_state, value = step(params, opt_state, key)
        losses.append(float(value))
    assert losses[-1] < losses[0] - 0.5, losses
    assert np.isfinite(losses).all()


@pytest.mark.parametrize("bridge", BRIDGES)
def test_bert_with_int32_labels_gives_torchs_loss(bridge, clients):
    apply_fn, params = _model("bert", bridge, clients)
    labels = np.array([0, 2], np.int32)
    want = _torch_loss("bert", input_ids=TORCH_IDS, labels=torch.tensor([0, 2]))
    call = jax.jit(lambda p, ids, y: apply_fn(p, ids, labels=y, train=False)["loss"])
    np.testing.assert_allclose(float(call(params, IDS, labels)), want, rtol=1e-5)
    grads = jax.jit(
        jax.grad(lambda p, k: apply_fn(p, IDS, labels=labels, rng=k, train=True)["loss"])
    )(params, jax.random.key(2))
    assert set(grads) == set(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())


@pytest.mark.parametrize("bridge", BRIDGES)
def test_gpt2s_default_cache_gives_the_same_clear_error(bridge, clients):
    apply_fn, params = _model("gpt2", bridge, clients)
    ids = jnp.asarray(IDS)
    message = r"returned a DynamicCache at output\['past_key_values'\].*use_cache=False"
    with pytest.raises(InvalidArgumentError, match=message):
        apply_fn(params, ids, train=False)
    with pytest.raises(InvalidArgumentError, match=message):
        jax.jit(lambda p: apply_fn(p, ids, train=False))(params)
