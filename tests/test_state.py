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
import pytorch2jax
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


# -- BatchNorm in training: the running statistics as values ------------------------------

STATS = ("1.running_mean", "1.running_var")


def _torch_steps(module, batches, lr):
    """``module`` trained by torch itself: SGD on the mean squared output, in training
    mode; its parameters and buffers after the steps."""
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    for x in batches:
        optimizer.zero_grad()
        (module(torch.from_numpy(np.asarray(x))) ** 2).mean().backward()
        optimizer.step()
    return {n: t.detach().numpy() for n, t in [*module.named_parameters(), *module.named_buffers()]}


BATCHES = [jax.random.normal(jax.random.key(10 + i), (16, 4)) * 2 + 1 for i in range(5)]


@pytest.mark.parametrize("bridge", ["in_process", *TRANSPORTS])
def test_five_optax_steps_return_torchs_running_statistics(bridge, clients):
    apply_fn, variables, module = _with_buffers(bridge, clients)
    params = {n: v for n, v in variables.items() if n not in STATS}
    stats = {n: variables[n] for n in STATS}
    optimizer = optax.sgd(0.05)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, stats, opt_state, x):
        def loss(p):
            y, new = apply_fn({**p, **stats}, x, train=True, mutable=True)
            return (y**2).mean(), new

        (_, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), new_stats, opt_state

    for x in BATCHES:
        params, stats, opt_state = step(params, stats, opt_state, x)
    want = _torch_steps(module, BATCHES, 0.05)
    for name in STATS:
        np.testing.assert_allclose(stats[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for name, value in params.items():
        np.testing.assert_allclose(value, want[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("bridge", ["in_process", *TRANSPORTS])
def test_an_nnx_batchnorm_model_updates_its_batch_stats_as_torch_does(bridge, clients):
    if bridge == "in_process":
        model = convert_pytnn_to_nnx(examples.bn_mlp())
    else:
        model = clients[bridge].convert_pytnn_to_nnx("bn_mlp")
    model.train()  # as for nnx.BatchNorm: the statistics move
    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m: (m(x) ** 2).mean())(model)
        optimizer.update(model, grads)
        return loss

    for x in BATCHES:
        step(model, optimizer, x)
    want = _torch_steps(examples.bn_mlp(), BATCHES, 0.05)
    for name in STATS:
        got = np.asarray(model.buffers[name][...])
        np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    for name, value in model.params.items():
        np.testing.assert_allclose(value[...], want[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # In eval mode the statistics are used, not changed.
    model.eval()
    frozen = {n: np.array(v[...]) for n, v in model.buffers.items()}
    step(model, optimizer, BATCHES[0])
    for name, value in model.buffers.items():
        assert np.array_equal(np.asarray(value[...]), frozen[name]), name


@pytest.mark.parametrize("bridge", ["in_process", *TRANSPORTS])
def test_linen_updates_batch_stats_when_mutable(bridge, clients):
    if bridge == "in_process":
        from pytorch2jax import convert_pytnn_to_flax

        TorchBN, variables = convert_pytnn_to_flax(examples.bn_mlp())
    else:
        TorchBN, variables = clients[bridge].convert_pytnn_to_flax("bn_mlp")
    assert sorted(variables["batch_stats"]) == sorted(STATS)
    x = BATCHES[0]
    module = examples.bn_mlp().train()
    want = module(torch.from_numpy(np.asarray(x))).detach().numpy()
    y, updates = TorchBN().apply(variables, x, train=True, mutable=["batch_stats"])
    tree_allclose(y, want, atol=1e-5)
    for name in STATS:
        tree_allclose(updates["batch_stats"][name], getattr(module[1], name[2:]).numpy(), atol=1e-6)
    # Not mutable, or eval mode: the statistics are read, not written.
    tree_allclose(TorchBN().apply(variables, x, train=True), want, atol=1e-5)
    module.eval()
    y_eval = TorchBN().apply(variables, x, deterministic=True)
    tree_allclose(y_eval, examples.bn_mlp().eval()(torch.from_numpy(np.asarray(x))).detach().numpy(), atol=1e-5)


def test_train_mode_calls_never_change_the_workers_buffers(clients):
    client = clients["inline"]
    before = {n: np.array(v) for n, v in client.get_parameters("bn_mlp", include_buffers=True).items()}
    apply_fn, params = client.convert_pytnn_to_jax("bn_mlp")
    stats = {n: before[n] for n in STATS}
    x = BATCHES[1]
    for call in (apply_fn, jax.jit(apply_fn, static_argnames=("train", "mutable"))):
        call(params, x, train=True)  # the worker's own statistics, on copies
        call({**params, **stats}, x, train=True, mutable=True)
        call(params, x, train=True, mutable=("1.running_mean",))
    jax.grad(lambda p: apply_fn(p, x, train=True).sum())(params)
    after = client.get_parameters("bn_mlp", include_buffers=True)
    for name, value in before.items():
        assert np.asarray(after[name]).tobytes() == value.tobytes(), name
    # What is not given starts from the module's own: the same update as torch's.
    _, new = apply_fn(params, x, train=True, mutable=["1.running_mean"])
    module = examples.bn_mlp().train()
    module(torch.from_numpy(np.asarray(x)))
    tree_allclose(new["1.running_mean"], module[1].running_mean.numpy(), atol=1e-6)


def test_in_process_the_callers_arrays_never_change():
    apply_fn, variables, _ = _with_buffers("in_process", None, train=True)
    before = {n: np.asarray(v).tobytes() for n, v in variables.items()}
    x = BATCHES[2]
    x_before = np.asarray(x).tobytes()
    jitted = jax.jit(apply_fn, static_argnames=("train", "mutable"))
    for call in (apply_fn, jitted):
        for _ in range(2):
            call(variables, x)
            call(variables, x, train=True, mutable=True)
            call(variables, x, train=False)
    jax.grad(lambda v: apply_fn(v, x, train=True, mutable=True)[0].sum())(variables)
    # (torch.func.vmap cannot batch BatchNorm updating unbatched statistics: a loop.)
    with pytest.warns(pytorch2jax.VmapFallbackWarning):
        jax.jit(jax.vmap(lambda v, x: apply_fn(v, x, train=True), in_axes=(None, 0)))(
            variables, x.reshape(4, 4, 4)
        )
    for name, value in variables.items():
        assert np.asarray(value).tobytes() == before[name], name
    assert np.asarray(x).tobytes() == x_before


def test_mutable_names_are_checked(clients):
    apply_fn, variables, _ = _with_buffers("in_process", None)
    with pytest.raises(pytorch2jax.InvalidArgumentError, match="no buffer '0.weight'"):
        apply_fn(variables, BATCHES[0], mutable=["0.weight"])
    with pytest.raises(pytorch2jax.InvalidArgumentError, match="mutable= takes True"):
        apply_fn(variables, BATCHES[0], mutable="batch_stats")
    # No buffer given: nothing to return.
    params = {n: v for n, v in variables.items() if n not in STATS}
    y, new = apply_fn(params, BATCHES[0], mutable=True)
    assert new == {} and y.shape == (16, 1)
    assert apply_fn(variables, BATCHES[0], mutable=None).shape == (16, 1)  # as False


def test_the_readmes_state_and_randomness_example_runs():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("Dropout and BatchNorm, in the three APIs")[1]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["y_eval"].shape == (32, 1) and np.isfinite(float(scope["value"]))
