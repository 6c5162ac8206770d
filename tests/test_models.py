"""Values and gradients equal torch run directly, for both backends.

Every example model, through a real worker ("remote") and through the in-process API
("inprocess"), eagerly and under jit(value_and_grad), vmap, lax.scan and jax.checkpoint;
gradients with respect to parameters and to floating inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from torch.func import functional_call

import pytorch2jax
from conftest import GPU, TRANSPORTS, tree_allclose
from pytorch2jax_server import examples

BATCH = 3


@dataclass
class Case:
    factory: Callable[[], torch.nn.Module]
    make_args: Callable[[np.random.Generator], tuple]
    kwargs: dict = field(default_factory=dict)
    rtol: float = 1e-5
    atol: float = 1e-5


def _normal(shape, dtype=np.float32):
    return lambda rng: rng.normal(size=shape).astype(dtype)


CASES = {
    "mlp": Case(examples.mlp, lambda rng: (_normal((5, 8))(rng),)),
    "convnet": Case(examples.convnet, lambda rng: (_normal((2, 3, 12, 12))(rng),)),
    "dict_output": Case(
        examples.dict_output,
        lambda rng: (_normal((3, 4))(rng), _normal((3, 4))(rng)),
        kwargs={"scale": 2.0},
    ),
    "embedding": Case(
        examples.embedding,
        lambda rng: (rng.integers(0, 50, size=(2, 5)).astype(np.int32), _normal((2, 5))(rng)),
    ),
    "bf16_mlp": Case(
        examples.bf16_mlp, lambda rng: (_normal((3, 4), ml_dtypes.bfloat16)(rng),), rtol=2e-2, atol=2e-2
    ),
}


def _weights(shape, k: int) -> np.ndarray:
    return np.random.default_rng(100 + k).normal(size=shape).astype(np.float32)


def _jax_loss(outputs) -> jax.Array:
    leaves = [x for x in jax.tree_util.tree_leaves(outputs) if jnp.issubdtype(x.dtype, jnp.floating)]
    return sum((x.astype(jnp.float32) * _weights(x.shape, k)).sum() for k, x in enumerate(leaves))


def _torch_leaves(tree):
    if isinstance(tree, dict):
        return [t for k in sorted(tree) for t in _torch_leaves(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [t for x in tree for t in _torch_leaves(x)]
    return [tree]


def _to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _floating(a) -> bool:
    return np.issubdtype(np.asarray(a).dtype, np.floating) or np.asarray(a).dtype == ml_dtypes.bfloat16


def torch_reference(case: Case, params: dict, args: tuple):
    """Outputs, loss, parameter grads and floating-argument grads, from torch in process."""
    model = case.factory()
    t_params = {n: _to_torch(np.asarray(v)).requires_grad_(True) for n, v in params.items()}
    t_args = [_to_torch(np.asarray(a)) for a in args]
    for t in t_args:
        if t.is_floating_point():
            t.requires_grad_(True)
    out = functional_call(model, t_params, tuple(t_args), case.kwargs)
    leaves = [x for x in _torch_leaves(out) if x.is_floating_point()]
    loss = sum((x.float() * torch.from_numpy(_weights(tuple(x.shape), k))).sum() for k, x in enumerate(leaves))
    loss.backward()
    outputs = jax.tree_util.tree_map(_to_numpy, out)
    p_grads = {n: _to_numpy(t.grad) for n, t in t_params.items()}
    a_grads = tuple(_to_numpy(t.grad) for t in t_args if t.is_floating_point())
    return outputs, _to_numpy(loss), p_grads, a_grads


def _split(args: tuple):
    """(floating args, a function rebuilding all args from them)."""
    idx = [i for i, a in enumerate(args) if _floating(a)]

    def rebuild(diff):
        full = list(args)
        for i, v in zip(idx, diff):
            full[i] = v
        return tuple(full)

    return tuple(args[i] for i in idx), rebuild


#: Every transport of the shared worker (CUDA IPC on a GPU machine, its worker serving on
#: the GPU), and in process: the module on the CPU, and on a GPU machine also on the GPU.
BACKENDS = (*TRANSPORTS, "inprocess") + (("inprocess-gpu",) if GPU else ())


@pytest.fixture(params=[(b, n) for b in BACKENDS for n in sorted(CASES)], ids="-".join)
def case(request):
    backend, name = request.param
    case = CASES[name]
    if backend == "inprocess":
        apply_fn, params = pytorch2jax.convert_pytnn_to_jax(case.factory())
    elif backend == "inprocess-gpu":
        module = case.factory().cuda()
        apply_fn, params = pytorch2jax.convert_pytnn_to_jax(module)
        assert next(module.parameters()).is_cuda  # it runs where it is, and stays there
    else:
        apply_fn, params = request.getfixturevalue("clients")[backend].convert_pytnn_to_jax(name)
    if GPU and backend != "inprocess":
        # torch on the GPU against the reference on the CPU: cuDNN convolves in TF32 by
        # default, and reductions add in other orders.
        case = replace(case, rtol=max(case.rtol, 2e-3), atol=max(case.atol, 2e-3))
    args = case.make_args(np.random.default_rng(0))
    return case, apply_fn, params, args


def _loss_fn(case, apply_fn, rebuild):
    def loss(params, diff_args, rebuild=rebuild):
        return _jax_loss(apply_fn(params, *rebuild(diff_args), **case.kwargs))

    return loss


def test_params_match_worker_model(case):
    c, _, params, _ = case
    own = dict(c.factory().named_parameters())
    assert sorted(params) == sorted(own)
    tree_allclose(params, {n: _to_numpy(p) for n, p in own.items()}, rtol=0, atol=0)


def test_forward_eager(case):
    c, apply_fn, params, args = case
    expected, *_ = torch_reference(c, params, args)
    tree_allclose(apply_fn(params, *args, **c.kwargs), expected, rtol=c.rtol, atol=c.atol)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_value_and_grad(case, jit):
    c, apply_fn, params, args = case
    _, loss_ref, p_ref, a_ref = torch_reference(c, params, args)
    diff, rebuild = _split(args)
    fn = jax.value_and_grad(_loss_fn(c, apply_fn, rebuild), argnums=(0, 1))
    loss, (p_grads, a_grads) = (jax.jit(fn) if jit else fn)(params, diff)
    tree_allclose(loss, loss_ref, rtol=c.rtol, atol=c.atol)
    tree_allclose(p_grads, p_ref, rtol=c.rtol, atol=c.atol)
    tree_allclose(a_grads, a_ref, rtol=c.rtol, atol=c.atol)


def _batch(c: Case):
    rngs = [np.random.default_rng(i) for i in range(BATCH)]
    examples_ = [c.make_args(r) for r in rngs]
    stacked = tuple(np.stack(parts) for parts in zip(*examples_))
    return examples_, stacked


def test_vmap_forward_and_grad(case):
    c, apply_fn, params, _ = case
    per_example, stacked = _batch(c)
    refs = [torch_reference(c, params, a) for a in per_example]

    outs = jax.vmap(lambda *a: apply_fn(params, *a, **c.kwargs))(*stacked)
    tree_allclose(outs, jax.tree_util.tree_map(lambda *x: np.stack(x), *[r[0] for r in refs]), rtol=c.rtol, atol=c.atol)

    diff, rebuild_batched = _split(stacked)
    int_idx = [i for i, a in enumerate(stacked) if not _floating(a)]

    def per_example_grad(params, diff_args, int_args):
        def rebuild(d):
            full = list(rebuild_batched(d))
            for i, v in zip(int_idx, int_args):
                full[i] = v
            return tuple(full)

        return jax.grad(_loss_fn(c, apply_fn, rebuild), argnums=(0, 1))(params, diff_args)

    ints = tuple(stacked[i] for i in int_idx)
    p_grads, a_grads = jax.jit(jax.vmap(per_example_grad, in_axes=(None, 0, 0)))(params, diff, ints)
    stack = lambda *x: np.stack(x)  # noqa: E731
    tree_allclose(p_grads, jax.tree_util.tree_map(stack, *[r[2] for r in refs]), rtol=c.rtol, atol=c.atol)
    tree_allclose(a_grads, jax.tree_util.tree_map(stack, *[r[3] for r in refs]), rtol=c.rtol, atol=c.atol)


def test_scan_grad(case):
    c, apply_fn, params, _ = case
    per_example, stacked = _batch(c)
    refs = [torch_reference(c, params, a) for a in per_example]

    def total(params):
        def step(carry, example):
            return carry + _jax_loss(apply_fn(params, *example, **c.kwargs)), None

        return jax.lax.scan(step, jnp.float32(0), stacked)[0]

    loss, grads = jax.jit(jax.value_and_grad(total))(params)
    tree_allclose(loss, sum(r[1] for r in refs), rtol=c.rtol, atol=c.atol)
    summed = jax.tree_util.tree_map(lambda *x: np.sum(x, axis=0), *[r[2] for r in refs])
    tree_allclose(grads, summed, rtol=c.rtol, atol=3 * c.atol)


def test_checkpoint_grad(case):
    c, apply_fn, params, args = case
    _, _, p_ref, a_ref = torch_reference(c, params, args)
    diff, rebuild = _split(args)
    fn = jax.checkpoint(_loss_fn(c, apply_fn, rebuild))
    p_grads, a_grads = jax.jit(jax.grad(fn, argnums=(0, 1)))(params, diff)
    tree_allclose(p_grads, p_ref, rtol=c.rtol, atol=c.atol)
    tree_allclose(a_grads, a_ref, rtol=c.rtol, atol=c.atol)


def test_function_with_static_kwarg(client):
    scale_shift = client.py_to_jax_wrapper("scale_shift")
    x, shift = jnp.arange(4.0), jnp.linspace(0.0, 1.0, 4)
    tree_allclose(scale_shift(x, shift, scale=3.0), x * 3.0 + jnp.sin(shift))
    gx, gs = jax.jit(jax.grad(lambda x, s: scale_shift(x, s).sum(), argnums=(0, 1)))(x, shift)
    tree_allclose(gx, np.full(4, 2.0))
    tree_allclose(gs, np.cos(shift))


def test_partial_params_use_worker_values(client):
    apply_fn, params = client.convert_pytnn_to_jax("mlp")
    x = jnp.ones((2, 8))
    subset = {"net.4.bias": params["net.4.bias"] + 1.0}
    tree_allclose(apply_fn(subset, x), apply_fn(params, x) + 1.0)
    grads = jax.grad(lambda p: apply_fn(p, x).sum())(subset)
    assert sorted(grads) == ["net.4.bias"]
    tree_allclose(grads["net.4.bias"], np.array([2.0]))


def test_frozen_module_as_function(client):
    """py_to_jax_wrapper on a module uses the worker's parameters; grads reach the input."""
    _, params = client.convert_pytnn_to_jax("linear10")
    frozen = client.py_to_jax_wrapper("linear10")
    g = jax.jit(jax.grad(lambda x: frozen(x).sum()))(jnp.ones(10))
    tree_allclose(g, np.asarray(params["weight"]).sum(axis=0))
