"""Randomness from JAX keys: a call is a function of its parameters, inputs and key.

The ``dropout_mlp`` example (Linear, ReLU, Dropout(0.5), Linear) is called in training
mode (``train=True``: a worker serves modules in eval mode unless configured otherwise),
in process and on the shared worker over every transport: the same key gives the
same outputs and gradients, eagerly and under ``jit``, on any worker of a pool, under an
eager ``jax.checkpoint`` and after a lost residual; other keys give other masks; a call
without a key is refused with the way out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import GPU, TRANSPORTS, start_worker, tree_allclose
from jax.test_util import check_grads

import pytorch2jax
from pytorch2jax import InvalidArgumentError, convert_pytnn_to_jax, py_to_jax_wrapper
from pytorch2jax_server import examples

BRIDGES = ["in_process", *TRANSPORTS]
X = np.asarray(jax.random.normal(jax.random.key(0), (32, 4)))
MODELS = {"dropout_mlp": "pytorch2jax_server.examples:dropout_mlp()"}


def _dropout_mlp(bridge, clients):
    """``(apply_fn, params)``, apply_fn calling it in training mode."""
    if bridge == "in_process":
        # On a GPU machine the shared worker draws from CUDA's generator: so does this.
        module = examples.dropout_mlp()
        apply_fn, params = convert_pytnn_to_jax(module.cuda() if GPU else module)
    else:
        apply_fn, params = clients[bridge].convert_pytnn_to_jax("dropout_mlp")
    return functools.partial(apply_fn, train=True), params


def _loss(apply_fn):
    def loss(params, x, key):
        return (apply_fn(params, x, rng=key) ** 2).mean()

    return loss


@pytest.mark.parametrize("bridge", BRIDGES)
def test_the_same_key_gives_the_same_outputs_and_gradients(bridge, clients):
    apply_fn, params = _dropout_mlp(bridge, clients)
    key = jax.random.key(1)
    first = np.asarray(apply_fn(params, X, rng=key))
    for call in (apply_fn, jax.jit(apply_fn)):
        for _ in range(2):
            np.testing.assert_array_equal(np.asarray(call(params, X, rng=key)), first)
    # Half of the hidden units are dropped: outputs differ with the key, and often.
    others = [np.asarray(apply_fn(params, X, rng=jax.random.key(k))) for k in (2, 3)]
    for other in others:
        assert np.mean(other != first) > 0.5
    assert np.mean(others[0] != others[1]) > 0.5
    # A raw key (jax.random.PRNGKey) works as its typed twin does.
    raw = jax.random.key_data(key)
    np.testing.assert_array_equal(np.asarray(apply_fn(params, X, rng=raw)), first)

    loss = _loss(apply_fn)
    grads = jax.grad(loss)(params, X, key)
    for again in (jax.grad(loss)(params, X, key), jax.jit(jax.grad(loss))(params, X, key)):
        tree_allclose(again, grads, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bridge", BRIDGES)
def test_the_backward_sees_the_forwards_mask(bridge, clients):
    """With the key fixed the model is piecewise linear: finite differences agree with
    the bridge's gradients only if the backward used the forward's mask."""
    apply_fn, params = _dropout_mlp(bridge, clients)
    key = jax.random.key(4)
    with jax.enable_x64(False):
        check_grads(
            lambda x: apply_fn(params, x, rng=key), (X[:4],), order=1, modes=["rev"], eps=1e-3
        )
    loss = _loss(apply_fn)
    plain = jax.grad(loss)(params, X, key)
    # An eager jax.checkpoint re-runs the forward for the backward: the same mask.
    remat = jax.grad(jax.checkpoint(loss))(params, X, key)
    tree_allclose(remat, plain, rtol=1e-6, atol=1e-7)
    tree_allclose(jax.jit(jax.grad(jax.checkpoint(loss)))(params, X, key), plain, atol=1e-6)


def test_a_lost_residual_recomputes_with_the_forwards_mask(clients):
    """A worker that keeps no residual (cache of 0 entries) recomputes every backward
    from the inputs and key: the gradients are those of the worker that kept them."""
    apply_fn, params = _dropout_mlp("inline", clients)
    key = jax.random.key(5)
    kept = jax.grad(_loss(apply_fn))(params, X, key)
    on_gpu = ["--device", "cuda"] if GPU else []  # draws as the shared worker does
    with start_worker("--residual-cache-entries", "0", *on_gpu, models=MODELS) as w:
        with pytorch2jax.connect(w.unix) as forgetful:
            apply_lost, _ = forgetful.convert_pytnn_to_jax("dropout_mlp")
            apply_lost = functools.partial(apply_lost, train=True)
            for grad in (jax.grad(_loss(apply_lost)), jax.jit(jax.grad(_loss(apply_lost)))):
                tree_allclose(grad(params, X, key), kept, rtol=1e-6, atol=1e-7)


def test_two_workers_of_a_pool_draw_alike():
    with start_worker(models=MODELS, listen=["127.0.0.1:0"]) as a:
        with start_worker(models=MODELS, listen=["127.0.0.1:0"]) as b:
            with pytorch2jax.connect([a.tcp, b.tcp]) as pool:
                apply_fn, params = pool.convert_pytnn_to_jax("dropout_mlp")
                apply_fn = functools.partial(apply_fn, train=True)
                key = jax.random.key(6)
                # Round robin: consecutive calls go to the two workers in turn.
                outputs = [np.asarray(apply_fn(params, X, rng=key)) for _ in range(4)]
                grads = [jax.jit(jax.grad(_loss(apply_fn)))(params, X, key) for _ in range(4)]
            served = {}
            for w in (a, b):
                with pytorch2jax.connect(w.tcp) as alone:
                    served[w.tcp] = np.asarray(
                        alone.convert_pytnn_to_jax("dropout_mlp")[0](
                            params, X, rng=key, train=True
                        )
                    )
    for out in outputs[1:]:
        np.testing.assert_array_equal(out, outputs[0])
    for g in grads[1:]:
        tree_allclose(g, grads[0], rtol=0, atol=0)
    np.testing.assert_array_equal(served[a.tcp], served[b.tcp])
    np.testing.assert_array_equal(served[a.tcp], outputs[0])


def test_in_process_and_worker_draw_alike(clients):
    key = jax.random.key(7)
    local, params = _dropout_mlp("in_process", clients)
    served, _ = _dropout_mlp("inline", clients)
    np.testing.assert_array_equal(
        np.asarray(local(params, X, rng=key)), np.asarray(served(params, X, rng=key))
    )


@pytest.mark.parametrize("bridge", BRIDGES)
def test_a_training_call_without_a_key_is_refused_with_the_way_out(bridge, clients):
    apply_fn, params = _dropout_mlp(bridge, clients)
    with pytest.raises(InvalidArgumentError, match=r"no PRNG key.*rng=key.*train=False"):
        apply_fn(params, X)
    # Under jit, XLA reports the callback's error as its own; original_error gives ours.
    with pytest.raises(jax.errors.JaxRuntimeError) as info:
        jax.jit(apply_fn)(params, X)
    assert isinstance(pytorch2jax.original_error(info.value), InvalidArgumentError)
    # Eval mode draws nothing: no key needed, and dropout is off (no zeroed units).
    evaluated = np.asarray(apply_fn(params, X, train=False))
    eval_jit = jax.jit(apply_fn, static_argnames="train")
    np.testing.assert_array_equal(np.asarray(eval_jit(params, X, train=False)), evaluated)
    np.testing.assert_array_equal(
        np.asarray(apply_fn(params, X, rng=jax.random.key(1), train=False)), evaluated
    )
    # A worker's (or module's) own generator does not move with a keyed call, and the
    # module stays in training mode: the next call without a key is refused again.
    with pytest.raises(InvalidArgumentError, match="no PRNG key"):
        apply_fn(params, X)


@pytest.mark.parametrize("bridge", BRIDGES)
def test_under_vmap_each_example_draws_its_own(bridge, clients):
    apply_fn, params = _dropout_mlp(bridge, clients)
    key = jax.random.key(8)
    same = jnp.broadcast_to(jnp.asarray(X[:1]), (16, 1, 4))
    batched = np.asarray(jax.vmap(lambda x: apply_fn(params, x, rng=key))(same))
    assert len({row.tobytes() for row in batched}) > 8  # one input, other masks
    again = np.asarray(jax.jit(jax.vmap(lambda x: apply_fn(params, x, rng=key)))(same))
    np.testing.assert_array_equal(again, batched)
    # A key per example (vmap over split keys): deterministic in the keys.
    keys = jax.random.split(key, 16)
    by_key = jax.vmap(lambda x, k: apply_fn(params, x, rng=k))
    first = np.asarray(by_key(same, keys))
    np.testing.assert_array_equal(np.asarray(jax.jit(by_key)(same, keys)), first)
    assert len({row.tobytes() for row in first}) > 8
    # Per-example gradients: the backward draws what the batched forward drew.
    def per_example_loss(p, x):
        return (apply_fn(p, x, rng=key) ** 2).mean()

    grads = jax.jit(jax.vmap(jax.grad(per_example_loss), in_axes=(None, 0)))(params, same)
    again = jax.jit(jax.vmap(jax.grad(per_example_loss), in_axes=(None, 0)))(params, same)
    tree_allclose(again, grads, rtol=0, atol=0)


def test_a_function_that_draws_takes_a_key():
    @py_to_jax_wrapper
    def noisy(x):
        return x * torch.rand(x.shape, device=x.device)

    x = jnp.ones(64)
    key = jax.random.key(9)
    first = np.asarray(noisy(x, rng=key))
    np.testing.assert_array_equal(np.asarray(jax.jit(noisy)(x, rng=key)), first)
    assert not np.array_equal(np.asarray(noisy(x, rng=jax.random.key(10))), first)


def test_bad_keys_and_modes_are_refused(clients):
    apply_fn, params = _dropout_mlp("in_process", clients)
    with pytest.raises(InvalidArgumentError, match="rng= takes a JAX PRNG key"):
        apply_fn(params, X, rng=3)
    with pytest.raises(InvalidArgumentError, match="rng= takes a JAX PRNG key"):
        apply_fn(params, X, rng=jnp.ones(2))
    with pytest.raises(InvalidArgumentError, match="train= takes True, False or None"):
        apply_fn(params, X, train="yes")
    served = clients["inline"].py_to_jax_wrapper("scale_shift")
    with pytest.raises(InvalidArgumentError, match="is a function; it has no training mode"):
        served(jnp.ones(3), jnp.ones(3), train=True)
