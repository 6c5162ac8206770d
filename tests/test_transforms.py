"""Every JAX transformation over real torch kernels, in process and through a worker over
every transport: forward mode, any-order derivatives and batched vmap, each compared with
``torch.func`` run in this process on the same model (rtol 1e-5 for float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pytorch2jax
from conftest import GPU, TRANSPORTS, tree_allclose
from pytorch2jax import convert_pytnn_to_jax, py_to_jax_wrapper
from pytorch2jax_protocol import pb, pb_grpc, tensors
from pytorch2jax_server import examples

BACKENDS = ("in_process", *TRANSPORTS)


class Bridge:
    """One way of running the example models: in this process, or on the shared worker."""

    def __init__(self, kind: str, client: pytorch2jax.Client | None) -> None:
        self.kind = kind
        self.client = client

    def module(self, name: str, **options):
        """``(apply_fn, params, torch_module)`` of an example module."""
        torch_module = getattr(examples, name)()
        if self.client is None:
            apply_fn, params = convert_pytnn_to_jax(getattr(examples, name)(), **options)
        else:
            apply_fn, params = self.client.convert_pytnn_to_jax(name, **options)
        return apply_fn, params, torch_module

    def function(self, name: str, **options):
        if self.client is None:
            return py_to_jax_wrapper(getattr(examples, name), **options)
        return self.client.py_to_jax_wrapper(name, **options)


@pytest.fixture(params=BACKENDS)
def bridge(request) -> Bridge:
    if request.param == "in_process":
        return Bridge("in_process", None)
    return Bridge(request.param, request.getfixturevalue("clients")[request.param])


def t(x) -> torch.Tensor:
    """A JAX array as a torch tensor (a copy)."""
    x = np.asarray(x)
    if x.dtype == jnp.bfloat16:
        return torch.from_numpy(x.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def j(x):
    """A torch pytree as JAX arrays."""

    def leaf(v):
        v = v.detach()
        if v.dtype == torch.bfloat16:
            return jnp.asarray(v.view(torch.int16).numpy().view(jnp.bfloat16))
        return jnp.asarray(v.numpy())

    return jax.tree_util.tree_map(leaf, x, is_leaf=lambda v: isinstance(v, torch.Tensor))


def functional(module: torch.nn.Module):
    """``f(params, *args, **kwargs)`` of the torch module, params by name."""
    return lambda p, *a, **k: torch.func.functional_call(module, p, a, k)


def tp(params):
    return {n: t(v) for n, v in params.items()}


def rand(key: int, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, dtype)


# -- forward mode ---------------------------------------------------------------------------


def test_jvp_wrt_inputs_and_params_equals_torch_func_jvp(bridge):
    apply_fn, params, module = bridge.module("mlp")
    x = rand(0, (4, 8))
    tangent_p = {n: rand(1, v.shape) for n, v in params.items()}
    tangent_x = rand(2, x.shape)
    expected = torch.func.jvp(functional(module), (tp(params), t(x)), (tp(tangent_p), t(tangent_x)))
    for jvp in (jax.jvp, jax.jit(jax.jvp, static_argnums=0)):
        out, tangent = jvp(apply_fn, (params, x), (tangent_p, tangent_x))
        tree_allclose(out, j(expected[0]))
        tree_allclose(tangent, j(expected[1]), atol=1e-5)
    # Tangents on the inputs alone: parameters are then constants.
    _, tangent_x_only = jax.jit(lambda x, v: jax.jvp(lambda x: apply_fn(params, x), (x,), (v,)))(
        x, tangent_x
    )
    _, expected_x = torch.func.jvp(
        lambda x: functional(module)(tp(params), x), (t(x),), (t(tangent_x),)
    )
    tree_allclose(tangent_x_only, j(expected_x), atol=1e-5)


def test_linearize_applied_twice_equals_torch_func_jvp(bridge):
    apply_fn, params, module = bridge.module("mlp")
    x = rand(0, (4, 8))
    out, lin = jax.linearize(lambda x: apply_fn(params, x), x)

    def reference(v):
        return torch.func.jvp(lambda x: functional(module)(tp(params), x), (t(x),), (t(v),))

    tree_allclose(out, j(reference(x)[0]))
    for key in (1, 2):
        v = rand(key, x.shape)
        tree_allclose(lin(v), j(reference(v)[1]), atol=1e-5)


# -- higher order ---------------------------------------------------------------------------


def test_jacobians_and_hessians_equal_torch_func(bridge):
    apply_fn, params, module = bridge.module("mlp")
    x = rand(0, (8,))
    f = lambda x: apply_fn(params, x)  # noqa: E731
    tf = lambda x: functional(module)(tp(params), x)  # noqa: E731
    loss = lambda x: (apply_fn(params, x) ** 2).sum()  # noqa: E731
    tloss = lambda x: (tf(x) ** 2).sum()  # noqa: E731
    tree_allclose(jax.jacfwd(f)(x), j(torch.func.jacfwd(tf)(t(x))), atol=1e-5)
    tree_allclose(jax.jacrev(f)(x), j(torch.func.jacrev(tf)(t(x))), atol=1e-5)
    hessian = j(torch.func.hessian(tloss)(t(x)))
    tree_allclose(jax.hessian(loss)(x), hessian, atol=1e-5)
    tree_allclose(jax.jit(jax.hessian(loss))(x), hessian, atol=1e-5)
    tree_allclose(jax.jit(jax.jacfwd(jax.jacrev(loss)))(x), hessian, atol=1e-5)
    v = rand(1, (8,))
    hvp = jax.jit(lambda x, v: jax.jvp(jax.grad(loss), (x,), (v,))[1])
    tree_allclose(hvp(x, v), hessian @ v, atol=1e-5)


def test_grad_of_grad_equals_the_closed_form(bridge):
    # scale_shift(x, shift) = 2 x + sin(shift): d/dshift = cos(shift), d2/dshift2 = -sin(shift)
    scale_shift = bridge.function("scale_shift")
    x, shift = rand(0, (5,)), rand(1, (5,))
    first = lambda s: jax.grad(lambda s: scale_shift(x, s).sum())(s)  # noqa: E731
    tree_allclose(first(shift), jnp.cos(shift))
    tree_allclose(jax.grad(lambda s: first(s).sum())(shift), -jnp.sin(shift))
    tree_allclose(jax.jit(jax.grad(lambda s: first(s).sum()))(shift), -jnp.sin(shift))
    third = jax.grad(lambda s: jax.grad(lambda s: first(s).sum())(s).sum())
    tree_allclose(third(shift), -jnp.cos(shift))


def test_reverse_over_forward_and_third_order_equal_torch_func(bridge):
    apply_fn, params, module = bridge.module("mlp")
    x, v = rand(0, (8,)), rand(1, (8,))

    def loss(x):
        return (apply_fn(params, x) ** 2).sum()

    def tloss(x):
        return (functional(module)(tp(params), x) ** 2).sum()

    # grad of a jvp: the tangent's gradient is the Hessian times v.
    grad_of_jvp = jax.jit(jax.grad(lambda x: jax.jvp(loss, (x,), (v,))[1]))
    expected = torch.func.grad(lambda x: torch.func.jvp(tloss, (x,), (t(v),))[1])(t(x))
    tree_allclose(grad_of_jvp(x), j(expected), atol=1e-5)
    f = lambda x: apply_fn(params, x)  # noqa: E731
    tf = lambda x: functional(module)(tp(params), x)  # noqa: E731
    tree_allclose(
        jax.jacrev(jax.jacfwd(f))(x), j(torch.func.jacrev(torch.func.jacfwd(tf))(t(x))), atol=1e-5
    )
    third = jax.grad(lambda x: jnp.sum(jax.hessian(loss)(x)))(x)
    expected = torch.func.grad(lambda x: torch.func.hessian(tloss)(x).sum())(t(x))
    tree_allclose(third, j(expected), atol=1e-4)
    # A derivative that is zero (the tangent of x * y along y does not depend on x):
    # torch hands back a ZeroTensor, which must arrive as zeros.
    scale_shift = bridge.function("scale_shift")
    shift = rand(2, (8,))
    zero = jax.grad(lambda x: jax.jvp(lambda s: scale_shift(x, s), (shift,), (v,))[1].sum())
    tree_allclose(zero(x), jnp.zeros(8))
    tree_allclose(jax.vmap(zero)(jnp.stack([x, v])), jnp.zeros((2, 8)))


# -- batching -------------------------------------------------------------------------------


def test_per_example_gradients_equal_torch_func_vmap_grad(bridge):
    apply_fn, params, module = bridge.module("mlp")
    xs, ys = rand(0, (16, 8)), rand(1, (16, 1))

    def loss(p, x, y):
        return ((apply_fn(p, x) - y) ** 2).sum()

    def tloss(p, x, y):
        return ((functional(module)(p, x) - y) ** 2).sum()

    expected = j(
        torch.func.vmap(torch.func.grad(tloss), in_dims=(None, 0, 0))(tp(params), t(xs), t(ys))
    )
    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))
    tree_allclose(per_example(params, xs, ys), expected, atol=1e-5)
    tree_allclose(jax.jit(per_example)(params, xs, ys), expected, atol=1e-5)


def test_vmap_of_vmap_in_axes_none_and_out_axes(bridge):
    apply_fn, params, module = bridge.module("mlp")
    xs = rand(0, (4, 3, 8))
    expected = functional(module)(tp(params), t(xs)).detach()
    tree_allclose(
        jax.vmap(jax.vmap(apply_fn, in_axes=(None, 0)), in_axes=(None, 0))(params, xs), j(expected)
    )
    tree_allclose(
        jax.jit(jax.vmap(apply_fn, in_axes=(None, 1), out_axes=1))(params, xs), j(expected)
    )
    # Batched parameters too: an ensemble of two MLPs, each on its own batch.
    ensemble = jax.tree_util.tree_map(lambda v: jnp.stack([v, 2 * v]), params)
    ensembled = jax.vmap(apply_fn)(ensemble, xs[:2])
    for k in range(2):
        one = {n: t(v[k]) for n, v in ensemble.items()}
        tree_allclose(ensembled[k], j(functional(module)(one, t(xs[k]))), atol=1e-5)


def test_transforms_compose_inside_scan_and_checkpoint(bridge):
    apply_fn, params, module = bridge.module("mlp")
    x = rand(0, (8,))
    loss = lambda x: (apply_fn(params, x) ** 2).sum()  # noqa: E731
    tloss = lambda x: (functional(module)(tp(params), x) ** 2).sum()  # noqa: E731

    def newton_like(x, _):  # a step of x - 0.1 * H g, through scan
        g = jax.grad(loss)(x)
        return x - 0.1 * jax.jvp(jax.grad(loss), (x,), (g,))[1], loss(x)

    xt = t(x)
    losses = []
    for _ in range(3):
        g = torch.func.grad(tloss)(xt)
        losses.append(tloss(xt).detach())
        xt = xt - 0.1 * torch.func.jvp(torch.func.grad(tloss), (xt,), (g,))[1]
    end, scanned = jax.jit(lambda x: jax.lax.scan(newton_like, x, None, length=3))(x)
    tree_allclose(end, j(xt), atol=1e-5)
    tree_allclose(scanned, j(torch.stack(losses)), atol=1e-5)
    grad = j(torch.func.grad(tloss)(t(x)))
    tree_allclose(jax.grad(jax.checkpoint(loss))(x), grad, atol=1e-5)
    tree_allclose(jax.jit(jax.grad(jax.checkpoint(loss)))(x), grad, atol=1e-5)
    hessian = j(torch.func.hessian(tloss)(t(x)))
    tree_allclose(jax.jit(jax.hessian(jax.checkpoint(loss)))(x), hessian, atol=1e-5)
    v = rand(1, (8,))
    tangent = jax.jit(lambda x, v: jax.jvp(jax.checkpoint(loss), (x,), (v,))[1])(x, v)
    tree_allclose(tangent, j(torch.func.jvp(tloss, (t(x),), (t(v),))[1]), atol=1e-5)

    # Per-example gradients of the parameters at every step of a scan (a running sum).
    xs = rand(2, (3, 4, 8))

    def per_example(p, x):
        return jax.vmap(jax.grad(lambda p, x: (apply_fn(p, x) ** 2).sum()), in_axes=(None, 0))(
            p, x
        )

    def accumulate(total, x):
        grads = per_example(params, x)
        return jax.tree_util.tree_map(lambda a, g: a + g.sum(0), total, grads), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    summed, _ = jax.jit(lambda xs: jax.lax.scan(accumulate, zeros, xs))(xs)
    expected = torch.func.grad(lambda p, x: (functional(module)(p, x) ** 2).sum())(
        tp(params), t(xs.reshape(12, 8))
    )
    tree_allclose(summed, j(expected), atol=1e-5)


# -- the model set --------------------------------------------------------------------------

#: Per example model: its (args, kwargs) builder for a seed, and the tolerance. Tangents go
#: to the floating arguments.
MODELS = {
    "convnet": (lambda k: ((rand(k, (2, 3, 8, 8)),), {}), 1e-5),
    "dict_output": (lambda k: ((rand(k, (3, 4)), rand(k + 1, (3, 4))), {"scale": 0.5}), 1e-5),
    "embedding": (
        lambda k: ((jax.random.randint(jax.random.key(k), (3, 5), 0, 50), rand(k, (3, 5))), {}),
        1e-5,
    ),
    "bf16_mlp": (lambda k: ((rand(k, (3, 4), jnp.bfloat16),), {}), 5e-2),
    "attention": (lambda k: ((rand(k, (2, 5, 8)),), {}), 1e-4),
    "lstm": (lambda k: ((rand(k, (2, 6, 4)),), {}), 1e-5),
}


def _float_args(args):
    return [i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating)]


def _sum_outputs(out):
    return sum(jnp.sum(v.astype(jnp.float32) ** 2) for v in jax.tree_util.tree_leaves(out))


def _tsum_outputs(out):
    leaves = jax.tree_util.tree_leaves(out, is_leaf=lambda v: isinstance(v, torch.Tensor))
    return sum((v.float() ** 2).sum() for v in leaves)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_example_model_under_jit_jvp_and_per_example_grads(bridge, name):
    build, tol = MODELS[name]
    if GPU and bridge.client is not None:
        tol = max(tol, 2e-3)  # the worker on the GPU: cuDNN convolves in TF32 by default
    apply_fn, params, module = bridge.module(name)
    args, kwargs = build(0)
    floats = _float_args(args)
    tangents = [rand(10 + i, args[i].shape, args[i].dtype) for i in floats]

    def with_floats(fn, base, values):
        full = list(base)
        for i, v in zip(floats, values):
            full[i] = v
        return fn(*full)

    if name == "lstm":
        # torch 2.13's LSTM kernel on CPU (mkldnn_rnn_layer) has no forward-mode AD: the
        # error says so, naming the model.
        with pytest.raises(Exception, match=r"lstm|LSTMRegressor.*forward AD|mkldnn_rnn_layer"):
            jax.jvp(
                lambda *f: with_floats(lambda *a: apply_fn(params, *a, **kwargs), args, f),
                [args[i] for i in floats],
                tangents,
            )
    else:
        out, tangent = jax.jit(
            lambda *f: jax.jvp(
                lambda *v: with_floats(lambda *a: apply_fn(params, *a, **kwargs), args, v),
                f[: len(floats)],
                f[len(floats) :],
            )
        )(*[args[i] for i in floats], *tangents)
        expected = torch.func.jvp(
            lambda *v: with_floats(
                lambda *a: functional(module)(tp(params), *a, **kwargs), [t(a) for a in args], v
            ),
            tuple(t(args[i]) for i in floats),
            tuple(t(v) for v in tangents),
        )
        tree_allclose(out, j(expected[0]), rtol=tol, atol=tol)
        tree_allclose(tangent, j(expected[1]), rtol=tol, atol=tol)

    # Per-example gradients of the parameters: a batch of 3 calls of one example each.
    batched_args = [jnp.stack([build(k)[0][i] for k in range(3)]) for i in range(len(args))]
    loss = lambda p, *a: _sum_outputs(apply_fn(p, *a, **kwargs))  # noqa: E731
    tloss = lambda p, *a: _tsum_outputs(functional(module)(p, *a, **kwargs))  # noqa: E731
    per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, *[0] * len(args))))
    expected = torch.func.vmap(torch.func.grad(tloss), in_dims=(None, *[0] * len(args)))(
        tp(params), *[t(a) for a in batched_args]
    )
    if name == "lstm":  # torch.func.vmap has no batching rule for aten::lstm: a loop
        with pytest.warns(pytorch2jax.VmapFallbackWarning, match="lstm"):
            got = per_example(params, *batched_args)
    else:
        got = per_example(params, *batched_args)
    tree_allclose(got, j(expected), rtol=tol, atol=tol)


# -- call counting, fallbacks, old requests ---------------------------------------------------


class _Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torch._subclasses.fake_tensor import is_fake

        if not is_fake(x):
            self.calls += 1
        return torch.sin(x) * x


def test_a_vmap_is_one_torch_call_and_jit_vmap_grad_at_most_two(bridge):
    if bridge.client is None:
        counter = _Counter()
        counted = py_to_jax_wrapper(counter)
        calls = lambda: counter.calls  # noqa: E731
    else:
        counted = bridge.function("counted")
        how_many = bridge.function("calls_of_counted")
        calls = lambda: int(how_many(jnp.zeros(())))  # noqa: E731
    xs = rand(0, (32, 5))
    before = calls()
    tree_allclose(jax.vmap(counted)(xs), jnp.sin(xs) * xs)
    assert calls() - before == 1
    grads = jax.jit(jax.vmap(jax.grad(lambda x: counted(x).sum())))
    grads(xs).block_until_ready()  # compiled, and run once
    before = calls()
    tree_allclose(grads(xs), jnp.cos(xs) * xs + jnp.sin(xs), atol=1e-5)
    assert calls() - before <= 2


def test_a_model_torch_cannot_batch_falls_back_to_a_loop_or_says_why(bridge):
    xs = rand(0, (4, 3))
    auto = bridge.function("unbatchable")
    with pytest.warns(
        pytorch2jax.VmapFallbackWarning, match=r"cannot batch it .*vmap_method='sequential'"
    ):
        tree_allclose(jax.vmap(auto)(xs), 2 * xs)
    tree_allclose(jax.jit(jax.vmap(auto))(xs), 2 * xs)  # remembered: no second warning
    tree_allclose(jax.vmap(bridge.function("unbatchable", vmap_method="sequential"))(xs), 2 * xs)
    forced = bridge.function("unbatchable", vmap_method="batched")
    with pytest.raises(
        pytorch2jax.InvalidArgumentError,
        match=r"torch.func.vmap cannot batch model 'unbatchable' .*broadcast shape",
    ):
        jax.vmap(forced)(xs)
    with pytest.raises(pytorch2jax.InvalidArgumentError, match=r"vmap_method must be one of"):
        bridge.function("unbatchable", vmap_method="parallel")


def test_requests_without_a_program_still_mean_what_they_meant(worker):
    import grpc

    from pytorch2jax_protocol import DEFAULT_MAX_MESSAGE_BYTES, channel_options

    module = examples.mlp()
    x = np.array(rand(0, (4, 8)))
    with grpc.insecure_channel(
        worker.unix, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES)
    ) as channel:
        stub = pb_grpc.BridgeStub(channel)
        arguments = pb.Arguments(args=[pb.Value(tensor=tensors.to_wire(x))])
        reply = stub.Forward(
            pb.ForwardRequest(model="mlp", arguments=arguments, keep_residual=True)
        )
        expected = module(torch.from_numpy(x)).detach().numpy()
        tree_allclose(tensors.from_wire(reply.outputs.tensor), expected)
        ct = np.ones((4, 1), np.float32)
        grads = stub.Vjp(
            pb.VjpRequest(model="mlp", residual=reply.residual, cotangents=[tensors.to_wire(ct)])
        )
        xt = torch.from_numpy(x).requires_grad_(True)
        module(xt).backward(torch.from_numpy(ct))
        tree_allclose(tensors.from_wire(grads.argument_grads[0]), xt.grad.numpy())
        assert not grads.parameter_grads and not grads.grads  # it was called as it is
