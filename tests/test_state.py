"""Module state through the bridge: buffers (BatchNorm statistics) given with the
parameters are state, not weights: they get no gradient, and torch never changes the
caller's arrays nor, on a worker, the module's own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from conftest import TRANSPORTS, tree_allclose
from pytorch2jax import convert_pytnn_to_jax, convert_pytnn_to_nnx
from pytorch2jax_server import examples


def _with_buffers(bridge: str, clients, *, train: bool = False):
    """``(apply_fn, params and floating buffers, torch twin)`` of the BatchNorm example."""
    module = examples.bn_mlp().train(train)
    if bridge == "in_process":
        apply_fn, params = convert_pytnn_to_jax(examples.bn_mlp().train(train))
        buffers = {n: jnp.asarray(b.numpy()) for n, b in module.named_buffers()}
    else:
        client = clients[bridge]
        apply_fn, params = client.convert_pytnn_to_jax("bn_mlp")
        buffers = client.get_parameters("bn_mlp", include_buffers=True)
    floating = {n: v for n, v in buffers.items() if jnp.issubdtype(v.dtype, jnp.floating)}
    return apply_fn, {**params, **floating}, module


@pytest.mark.parametrize("bridge", ["in_process", *TRANSPORTS])
def test_buffers_given_as_parameters_get_no_gradient(bridge, clients):
    apply_fn, variables, module = _with_buffers(bridge, clients)
    x = jax.random.normal(jax.random.key(0), (5, 4))

    def loss(v, x):
        return (apply_fn(v, x) ** 2).sum()

    xt = torch.from_numpy(np.array(x))
    (module(xt) ** 2).sum().backward()
    for grads in (jax.grad(loss)(variables, x), jax.jit(jax.grad(loss))(variables, x)):
        for name, p in module.named_parameters():
            tree_allclose(grads[name], p.grad.numpy(), atol=1e-5)
        for name in ("1.running_mean", "1.running_var"):
            assert not np.any(grads[name]), name  # state: zero, and no torch error
    # Batched too: per-example gradients, the buffers' zero for every example.
    per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(variables, x[:, None])
    summed = jax.tree_util.tree_map(lambda g: g.sum(0), per_example)
    for name in ("1.running_mean", "1.running_var"):
        assert per_example[name].shape == (5, 6) and not np.any(per_example[name]), name
    # BatchNorm in eval mode acts per example: the per-example gradients add up to the batch's.
    for name, p in module.named_parameters():
        tree_allclose(summed[name], p.grad.numpy(), atol=1e-5)


def test_train_mode_in_process_never_changes_the_callers_arrays():
    apply_fn, variables, _ = _with_buffers("in_process", None, train=True)
    before = {n: np.array(v) for n, v in variables.items()}
    x = jax.random.normal(jax.random.key(1), (8, 4))
    for call in (apply_fn, jax.jit(apply_fn)):
        for _ in range(3):
            call(variables, x).block_until_ready()
    jax.jit(jax.grad(lambda v: apply_fn(v, x).sum()))(variables)
    for name, value in variables.items():
        assert np.array_equal(np.asarray(value), before[name]), name


def test_an_nnx_batchnorm_model_trains_with_its_batch_stats():
    model = convert_pytnn_to_nnx(examples.bn_mlp().eval())
    stats = {n: np.array(v[...]) for n, v in model.buffers.items()}
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(2), (16, 4))
    y = jnp.sin(x[:, :1])

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: ((m(x) - y) ** 2).mean())(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(20)]
    assert losses[-1] < losses[0]
    for name, value in model.buffers.items():  # eval mode: the statistics stay
        assert np.array_equal(np.asarray(value[...]), stats[name]), name
