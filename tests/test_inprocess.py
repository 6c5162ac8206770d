"""The original pytorch2jax API, in process: its README examples, zero-copy inputs,
immutable JAX arrays, modules with buffers, and training through linen and NNX."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import pytorch2jax
from conftest import GPU, jax_matches_torch_loss, tree_allclose
from pytorch2jax import convert_pytnn_to_flax, convert_pytnn_to_jax, convert_pytnn_to_nnx, py_to_jax_wrapper
from pytorch2jax_server import examples

ORIGINAL = sorted((pathlib.Path(__file__).parent / "original_readme").glob("example*.py"))


@pytest.mark.parametrize("program", ORIGINAL, ids=lambda p: p.stem)
def test_original_readme_examples_run_unchanged(program):
    # Example 1 multiplies its input by torch.rand((10,10)), a CPU tensor: where JAX runs on
    # a GPU its input is a CUDA tensor (as with pytorch2jax 0.1.0), so the examples run as
    # the CPU programs they are.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"} if GPU else None
    result = subprocess.run(
        [sys.executable, "-W", "error", str(program)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_example2_gradient_is_the_weight_column_sums():
    pyt_model = torch.nn.Linear(10, 10)
    jax_fn, params = convert_pytnn_to_jax(pyt_model)
    grad = jax.grad(lambda x: jax_fn(params, x).sum())(jnp.ones((10,)))
    expected = pyt_model.weight.detach().numpy().sum(axis=0)
    tree_allclose(grad, expected)
    tree_allclose(jax.jit(jax.grad(lambda x: jax_fn(params, x).sum()))(jnp.ones((10,))), expected)


def test_example1_under_jit_and_vmap():
    @py_to_jax_wrapper
    def fn(x):
        return torch.rand((10, 10)) * x

    out = jax.jit(fn)(jnp.ones((10, 10)))
    assert out.shape == (10, 10) and bool(((out >= 0) & (out < 1)).all())
    batched = jax.vmap(fn)(jnp.ones((3, 10, 10)))
    assert batched.shape == (3, 10, 10) and not np.allclose(batched[0], batched[1])


def test_jitted_call_does_not_copy_inputs():
    seen = []

    # Shapes declared (the output is like the input): data_ptr() has no meaning on the
    # fake tensors that shape inference would run this function on.
    @py_to_jax_wrapper(out_shapes=lambda x: x)
    def double(x):
        seen.append(x.data_ptr())
        return x * 2

    x = jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64)
    jitted = jax.jit(double)
    for _ in range(2):  # the first call per signature runs on a copy (see test below)
        tree_allclose(jitted(x), 2 * np.asarray(x))
    assert seen[-1] == x.unsafe_buffer_pointer()
    double(x)
    assert seen[-1] == x.unsafe_buffer_pointer()  # eagerly too


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_in_place_writes_never_change_jax_arrays(jit):
    @py_to_jax_wrapper
    def bump(x):
        x.add_(1.0)
        return x * 2

    fn = jax.jit(bump) if jit else bump
    x = jnp.ones(4)
    for _ in range(3):
        tree_allclose(fn(x), np.full(4, 4.0))
    tree_allclose(x, np.ones(4))


def test_data_dependent_in_place_write_is_refused():
    @py_to_jax_wrapper
    def sometimes(x):
        if float(x.sum()) > 10:
            x.mul_(0)
        return x + 1

    sometimes(jnp.ones(4))  # learns: no writes for this signature
    with pytest.raises(pytorch2jax.InvalidArgumentError, match=r"wrote in place into input 0 .*x = x.clone\(\)"):
        sometimes(jnp.full(4, 5.0))


def test_data_dependent_shapes_under_jit_need_declaring():
    @py_to_jax_wrapper
    def positive(x):
        return x[x > 0]

    x = jnp.array([1.0, -1.0, 2.0])
    tree_allclose(positive(x), np.array([1.0, 2.0]))
    with pytest.raises(pytorch2jax.UnsupportedError, match=r"declare them on the client with out_shapes="):
        jax.jit(positive)(x)
    declared = py_to_jax_wrapper(positive.__wrapped__, out_shapes=jax.ShapeDtypeStruct((2,), jnp.float32))
    tree_allclose(jax.jit(declared)(x), np.array([1.0, 2.0]))


def _bn_model() -> torch.nn.Module:
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh())
    model.train()
    with torch.no_grad():  # give the running statistics non-trivial values
        for _ in range(3):
            model(torch.randn(16, 4) * 3 + 1)
    return model.eval()


def test_module_with_buffers_in_eval_mode_and_keyword_arguments():
    model = _bn_model()
    apply_fn, params = convert_pytnn_to_jax(model)
    assert sorted(params) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    t_x = torch.tensor(x, requires_grad=True)
    out = model(t_x)
    out.sum().backward()
    tree_allclose(jax.jit(apply_fn)(params, input=jnp.asarray(x)), out.detach().numpy())
    tree_allclose(jax.jit(jax.grad(lambda x: apply_fn(params, x).sum()))(jnp.asarray(x)), t_x.grad.numpy())

    nnx_model = convert_pytnn_to_nnx(model)
    stats = nnx.state(nnx_model, nnx.BatchStat)
    assert sorted(stats["buffers"]) == ["1.running_mean", "1.running_var"]
    tree_allclose(nnx_model(jnp.asarray(x)), out.detach().numpy())


# -- training ------------------------------------------------------------------------------


def _regression_data():
    key = jax.random.key(0)
    x = jax.random.normal(key, (128, 8))
    y = jnp.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]
    return x, y


def _train_linen(module_cls, variables, steps=200):
    x, y = _regression_data()
    model = module_cls()
    params = variables["params"]
    opt = optax.adam(1e-2)
    state = opt.init(params)

    def loss_fn(p):
        return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    first = float(loss_fn(params))
    for _ in range(steps):
        params, state, _ = step(params, state)
    return first, float(loss_fn(params))


def _train_nnx(model, steps=200):
    x, y = _regression_data()
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def step(m, o):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        o.update(m, grads)
        return loss

    first = float(loss_fn(model))
    for _ in range(steps):
        step(model, optimizer)
    return first, float(loss_fn(model))


def test_linen_training_in_process():
    first, last = _train_linen(*convert_pytnn_to_flax(examples.mlp()))
    assert last < first / 10, (first, last)


def test_nnx_training_in_process():
    first, last = _train_nnx(convert_pytnn_to_nnx(examples.mlp()))
    assert last < first / 10, (first, last)


def test_linen_training_against_worker(client):
    first, last = _train_linen(*client.convert_pytnn_to_flax("mlp"))
    assert last < first / 10, (first, last)


def test_nnx_training_against_worker(client):
    model = client.convert_pytnn_to_nnx("mlp")
    assert isinstance(model, pytorch2jax.TorchModule)
    first, last = _train_nnx(model)
    assert last < first / 10, (first, last)


def test_import_does_not_import_torch_until_called():
    code = (
        "import sys, pytorch2jax\n"
        "assert 'torch' not in sys.modules\n"
        "import jax.numpy as jnp\n"
        "f = pytorch2jax.py_to_jax_wrapper(lambda x: x * 2)\n"
        "assert 'torch' in sys.modules\n"
        "print(f(jnp.ones(2)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# -- on a GPU (tests marked gpu; scripts/gpu-check.sh runs them on a GPU machine) ----------

needs_gpu = pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU, CUDA torch and a GPU JAX")


@pytest.mark.gpu
@needs_gpu
def test_on_the_gpu_calls_take_jax_arrays_without_copies_and_stay_there():
    seen = []

    @py_to_jax_wrapper(out_shapes=lambda x: x)
    def double(x):
        seen.append((x.device.type, x.data_ptr()))
        return x * 2

    x = jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64)
    assert x.devices().pop().platform == "gpu"
    jitted = jax.jit(double)
    for _ in range(2):  # the first call per signature runs on a copy
        out = jitted(x)
    assert seen[-1] == ("cuda", x.unsafe_buffer_pointer())
    assert out.devices().pop().platform == "gpu"
    tree_allclose(out, 2 * np.asarray(x))
    out = double(x)
    assert seen[-1] == ("cuda", x.unsafe_buffer_pointer())  # eagerly too
    assert out.devices().pop().platform == "gpu"
    # Under jit nothing reaches the host: JAX would refuse a transfer it makes, and
    # torch's copies are device to device (its tensors are CUDA tensors, above).
    with jax.transfer_guard("disallow"):
        jitted(x).block_until_ready()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_module_on_the_gpu_runs_there_and_matches_torch(jit):
    model = examples.mlp().cuda()
    apply_fn, params = convert_pytnn_to_jax(model)
    assert next(model.parameters()).is_cuda  # not moved
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8), jnp.float32)
    jax_matches_torch_loss(apply_fn, params, x, model, jit=jit)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_the_device_path_with_jax_on_the_host_matches_the_host_path(monkeypatch, jit):
    # A module on a GPU with JAX's arrays on the CPU takes TorchDeviceIO's host fallback;
    # here the CPU stands in for the GPU, so that CI runs that code (dtypes, bfloat16
    # outputs, handles, gradients) too.
    from pytorch2jax import _inprocess

    x = jax.random.normal(jax.random.PRNGKey(0), (5, 8), jnp.float32)
    host_fn, params = convert_pytnn_to_jax(examples.mlp())
    monkeypatch.setattr(_inprocess, "serving_device", lambda obj, device: torch.device("cpu"))
    device_fn, _ = convert_pytnn_to_jax(examples.mlp())
    halved = py_to_jax_wrapper(lambda t: (t / 2).to(torch.bfloat16))

    def loss(fn):
        def f(p, x):
            return (fn(p, x) ** 2).sum() + halved(x).astype(jnp.float32).sum()

        value_and_grad = jax.value_and_grad(f, argnums=(0, 1))
        return jax.jit(value_and_grad) if jit else value_and_grad

    assert halved(x).dtype == jnp.bfloat16
    tree_allclose(loss(device_fn)(params, x), loss(host_fn)(params, x), rtol=1e-6)


def test_a_device_that_torch_does_not_have_is_refused_with_what_to_write():
    with pytest.raises(pytorch2jax.InvalidArgumentError, match="no torch device: use 'cpu'"):
        py_to_jax_wrapper(lambda x: x, device="tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(pytorch2jax.InvalidArgumentError, match="use device='cpu'"):
            py_to_jax_wrapper(lambda x: x, device="cuda")
    on_host = py_to_jax_wrapper(lambda x: x * 2, device="cpu")
    tree_allclose(jax.jit(on_host)(jnp.ones(3)), np.full(3, 2.0))
