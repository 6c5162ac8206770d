"""What the in-process backend remembers per call site (``engine.CallSite``, the
backend's ``call_site``): later calls of a signature skip the first call's checks, and
still give torch's values, gradients and refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pytorch2jax
from conftest import tree_allclose
from pytorch2jax import InvalidArgumentError, convert_pytnn_to_jax, py_to_jax_wrapper
from pytorch2jax._ad import TorchFunction
from pytorch2jax._backend import Backend, Result
from pytorch2jax_server.engine import InvalidRequestError, ServedModel, vjp_of_kept


#: How XLA reports an error raised in a compiled call's callback: a JaxRuntimeError, or
#: on some calls (jax 0.10.2, whichever bridge) a ValueError with the same text;
#: original_error reads either.
_COMPILED_CALL_ERRORS = (jax.errors.JaxRuntimeError, ValueError)


class Tied(torch.nn.Module):
    """One weight at two places, and BatchNorm statistics: what a parameter swap must
    get right."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Linear(4, 4, bias=False)
        self.head = torch.nn.Linear(4, 4)
        self.head.weight = self.embed.weight
        self.norm = torch.nn.BatchNorm1d(4).eval()
        with torch.no_grad():
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.embed(x))))


def _params(model: ServedModel, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen) for n, p in model.parameters.items()}


def test_a_call_site_gives_what_run_gives_call_after_call():
    model = ServedModel("tied", Tied())
    site = model.call_site()
    for seed in range(3):
        x, params = torch.rand(5, 4), _params(model, seed)
        expected = model.run((x,), {}, [x], params).outputs
        torch.testing.assert_close(site.run((x,), {}, [x], params).outputs, expected)


def test_a_call_site_keeps_forwards_whose_gradients_are_runs():
    model = ServedModel("tied", Tied())
    site = model.call_site()
    ct = torch.ones(5, 4)
    for seed in range(3):
        x, params = torch.rand(5, 4), _params(model, seed)
        keep = model.floating_inputs([x], params)
        ours, theirs = (f((x,), {}, [x], params, keep=keep).residual for f in (site.run, model.run))
        assert ours.nbytes == theirs.nbytes  # measured on the site's first call only
        for got, want in zip(
            vjp_of_kept(ours, [ct], (0,), keep), vjp_of_kept(theirs, [ct], (0,), keep)
        ):
            torch.testing.assert_close(got, want)


def test_a_call_site_checks_its_first_call_as_run_does():
    model = ServedModel("tied", Tied())
    x, params = torch.rand(5, 4), {"head.bias": torch.zeros(3)}
    wrong = r"parameter 'head.bias' .* is float32\(4,\); got float32\(3,\)"
    with pytest.raises(InvalidRequestError, match=wrong):
        model.call_site().run((x,), {}, [x], params)
    with pytest.raises(InvalidRequestError, match=r"takes \(x\); it cannot be called with 2"):
        model.call_site().run((x, x), {}, [x, x], {})


def test_a_call_site_widens_narrowed_parameters_on_every_call():
    # A client without x64 holds a float64 module's weights as float32.
    module = torch.nn.Linear(3, 2).double()
    model = ServedModel("f64", module)
    site = model.call_site()
    for seed in range(2):
        x = torch.rand(4, 3, dtype=torch.float64)
        params = {n: p.to(torch.float32) for n, p in _params(model, seed).items()}
        out = site.run((x,), {}, [x], params).outputs
        assert out.dtype == torch.float64
        expected = torch.nn.functional.linear(x, params["weight"].double(), params["bias"].double())
        torch.testing.assert_close(out, expected)


def test_compiled_gradients_match_torch_call_after_call():
    module = Tied()
    apply_fn, params = convert_pytnn_to_jax(module)
    vag = jax.jit(jax.value_and_grad(lambda p, x: apply_fn(p, x).sum(), argnums=(0, 1)))
    for seed in range(3):
        x = np.random.default_rng(seed).normal(size=(5, 4)).astype(np.float32)
        t_x = torch.tensor(x, requires_grad=True)
        module.zero_grad()
        expected = module(t_x).sum()
        expected.backward()
        value, (g_params, g_x) = vag(params, jnp.asarray(x))
        tree_allclose(value, expected.detach().numpy(), rtol=1e-5, atol=1e-5)
        tree_allclose(g_x, t_x.grad.numpy(), rtol=1e-5, atol=1e-5)
        tree_allclose(
            g_params,
            {n: p.grad.numpy() for n, p in module.named_parameters()},
            rtol=1e-5,
            atol=1e-5,
        )


def test_compiled_calls_with_buffers_given_never_change_them():
    module = Tied()
    apply_fn, params = convert_pytnn_to_jax(module)
    stats = {n: jnp.asarray(b.numpy()) for n, b in module.named_buffers() if b.is_floating_point()}
    given = {**params, **stats}
    before = {n: np.asarray(v).copy() for n, v in stats.items()}
    fwd = jax.jit(apply_fn, static_argnames="train")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32))
    for _ in range(3):  # training mode updates the statistics it is given, in place
        fwd(given, x, train=True).block_until_ready()
    tree_allclose(stats, before, rtol=0, atol=0)


def test_compiled_calls_learn_in_place_writes_from_their_first_call():
    @py_to_jax_wrapper(out_shapes=lambda x: x)
    def sometimes(x):
        if float(x.sum()) > 10:
            x.mul_(0)
        return x + 1

    jitted = jax.jit(sometimes)
    tree_allclose(jitted(jnp.ones(4)), np.full(4, 2.0))  # learns: it writes into nothing
    with pytest.raises(_COMPILED_CALL_ERRORS) as info:
        jitted(jnp.full(4, 5.0))
    error = pytorch2jax.original_error(info.value)
    assert isinstance(error, InvalidArgumentError)
    assert "wrote in place into input 0" in str(error)


def test_compiled_training_mode_calls_are_watched_on_every_call():
    class SometimesNoisy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            return y + torch.rand_like(y) if float(x.sum()) > 10 else y

    # Its shapes cannot be inferred (it branches on the data): declared.
    apply_fn, params = convert_pytnn_to_jax(SometimesNoisy(), out_shapes=lambda x: x)
    fwd = jax.jit(apply_fn)
    quiet = jnp.ones((2, 4))
    for _ in range(2):  # draws nothing: no key needed
        fwd(params, quiet).block_until_ready()
    before = torch.default_generator.get_state()
    with pytest.raises(_COMPILED_CALL_ERRORS) as info:
        fwd(params, quiet * 10)
    assert "no PRNG key" in str(pytorch2jax.original_error(info.value))
    assert torch.equal(torch.default_generator.get_state(), before)  # put back


class _Doubling(Backend):
    """A backend with no call sites of its own (as the remote one): ``run`` serves all."""

    description = "doubling"

    def __init__(self) -> None:
        self.runs = 0

    def infer(self, params, args, kwargs, *, int32_as_int64=False, train=None):
        return jax.ShapeDtypeStruct(args[0].shape, args[0].dtype)

    def run(self, run):
        self.runs += 1
        return Result(np.asarray(run.leaves[0]) * 2)


def test_a_backend_without_call_sites_serves_compiled_calls_with_run():
    backend = _Doubling()
    assert backend.call_site() == backend.run
    fn = jax.jit(lambda x: TorchFunction(backend)({}, (x,), {}))
    for _ in range(3):
        tree_allclose(fn(jnp.arange(3.0)), np.arange(3.0) * 2)
    assert backend.runs == 3
