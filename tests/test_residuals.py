"""The residual cache is bounded, and gradients never depend on it."""

from __future__ import annotations

import gc
import time
import weakref

import grpc
import jax
import jax.numpy as jnp
import pytest
import torch

import pytorch2jax
from conftest import start_worker, tree_allclose, wait_until, worker_stats
from pytorch2jax_protocol import pb, pb_grpc
from pytorch2jax_server.engine import Residual, ResidualCache


def _residual(nbytes: int) -> Residual:
    return Residual("m", [], [], {}, nbytes)


def test_cache_evicts_least_recently_used_by_count():
    cache = ResidualCache(max_entries=2, max_bytes=1 << 20, ttl_s=60)
    a, b = cache.put(_residual(1)), cache.put(_residual(1))
    assert cache.take(a, keep=True) is not None  # a is now the most recent
    c = cache.put(_residual(1))
    assert cache.take(b) is None and cache.take(a) is not None and cache.take(c) is not None
    assert len(cache) == 0 and cache.nbytes == 0


def test_cache_bounded_by_bytes_and_refuses_oversized():
    cache = ResidualCache(max_entries=100, max_bytes=100, ttl_s=60)
    handles = [cache.put(_residual(40)) for _ in range(3)]
    assert cache.nbytes == 80 and cache.take(handles[0]) is None
    assert cache.put(_residual(101)) == b""


def test_cache_expires_after_ttl():
    cache = ResidualCache(max_entries=10, max_bytes=100, ttl_s=0.05)
    h = cache.put(_residual(1))
    time.sleep(0.1)
    assert cache.take(h) is None and cache.nbytes == 0


def test_take_consumes_and_release_frees():
    cache = ResidualCache()
    h1, h2 = cache.put(_residual(8)), cache.put(_residual(8))
    assert cache.take(h1) is not None and cache.take(h1) is None
    assert cache.release([h2, b"unknown"]) == 1 and len(cache) == 0


def test_expire_drops_old_residuals_behind_recent_ones():
    cache = ResidualCache(ttl_s=0.2)
    old = cache.put(_residual(8))
    time.sleep(0.1)
    recent = cache.put(_residual(8))
    cache.take(old, keep=True)  # used: now behind `recent` in LRU order, still as old
    time.sleep(0.15)  # old is past the TTL, recent is not
    # put/take look at the front only (recent); the sweeper's expire() looks at all.
    assert cache.expire() == 1 and cache.nbytes == 8
    assert cache.take(old) is None and cache.take(recent) is not None


def test_release_owner_drops_only_that_sessions_residuals():
    cache = ResidualCache()
    mine = [cache.put(_residual(8), owner=b"a") for _ in range(3)]
    theirs = cache.put(_residual(8), owner=b"b")
    assert cache.release_owner(b"a") == 3 and cache.nbytes == 8
    assert all(cache.take(h) is None for h in mine) and cache.take(theirs) is not None


MODELS = {"mlp": "pytorch2jax_server.examples:mlp()"}


def _reference_grad(params, x):
    from pytorch2jax_server import examples

    model = examples.mlp()
    t_x = torch.tensor(x.tolist(), requires_grad=True)
    model(t_x).sum().backward()
    return {n: p.grad.numpy() for n, p in model.named_parameters()}, t_x.grad.numpy()


def test_gradients_correct_when_residuals_are_evicted():
    """A cache of one entry: the first forward's state is evicted by the second's, so its
    backward gets FAILED_PRECONDITION and the client recomputes from the inputs."""
    with start_worker("--residual-cache-entries", "1", models=MODELS) as w:
        with pytorch2jax.connect(w.unix) as client:
            apply_fn, params = client.convert_pytnn_to_jax("mlp")
            f = lambda p, x: apply_fn(p, x).sum()  # noqa: E731
            x1, x2 = jnp.ones((2, 8)), jnp.full((3, 8), 0.5)
            _, vjp1 = jax.vjp(f, params, x1)
            _, vjp2 = jax.vjp(f, params, x2)
            for vjp_fn, x in ((vjp1, x1), (vjp2, x2), (vjp1, x1)):  # vjp1 twice: consumed too
                p_grads, x_grads = vjp_fn(jnp.float32(1.0))
                p_ref, x_ref = _reference_grad(params, x)
                tree_allclose(p_grads, p_ref)
                tree_allclose(x_grads, x_ref)


def test_gradients_correct_without_any_cache():
    with start_worker("--residual-cache-mb", "0", models=MODELS) as w:
        with pytorch2jax.connect(w.unix) as client:
            apply_fn, params = client.convert_pytnn_to_jax("mlp")
            x = jnp.ones((2, 8))
            p_grads = jax.jit(jax.grad(lambda p: apply_fn(p, x).sum()))(params)
            tree_allclose(p_grads, _reference_grad(params, x)[0])


def test_lost_handle_without_inputs_is_failed_precondition(worker):
    with grpc.insecure_channel(worker.unix) as channel:
        stub = pb_grpc.BridgeStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Vjp(pb.VjpRequest(model="mlp", residual=b"\0" * 15 + b"\1"), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "send the arguments again to recompute" in info.value.details()


@pytest.mark.parametrize("transport", ["inline", "shm"])
def test_an_unused_eager_vjp_frees_its_residual(transport, monkeypatch):
    """A forward whose backward never runs (``jax.vjp`` dropped unused) frees its autograd
    state on the worker once JAX drops its handle, not at the TTL or the session's end."""
    with start_worker(models=MODELS) as w:
        with pytorch2jax.connect(w.unix, transport=transport) as client:
            sent: list[bytes] = []
            release = client._release_residuals

            def counting(handles):
                sent.extend(handles)
                release(handles)

            monkeypatch.setattr(client, "_release_residuals", counting)
            mlp = client.py_to_jax_wrapper("mlp")
            x = jnp.ones((4, 8))
            kept = [jax.vjp(mlp, x * i) for i in range(3)]
            assert worker_stats(w.unix).residuals == 3
            _, used = kept.pop()
            used(jnp.ones((4, 1)))  # its backward took it
            assert worker_stats(w.unix).residuals == 2
            del kept, used
            gc.collect()
            mlp(x)  # the next forward tells the worker, without waiting for it
            wait_until(lambda: worker_stats(w.unix).residuals == 0, timeout=5)
            assert len(sent) == 2  # the two unused ones, not the one its backward took
            # Eager gradients, whose backward takes the residual at once: nothing to send.
            grad = jax.grad(lambda x: mlp(x).sum())
            _, x_ref = _reference_grad(None, x)
            for _ in range(3):
                tree_allclose(grad(x), x_ref)
            gc.collect()
            mlp(x)
            assert len(sent) == 2 and worker_stats(w.unix).residuals == 0


def test_an_unused_eager_vjp_frees_its_residual_in_process():
    class Recording(torch.nn.Module):
        """A Linear that remembers (weakly) every output it made."""

        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 2)
            self.outputs: list[weakref.ref] = []

        def forward(self, x):
            y = self.linear(x)
            self.outputs.append(weakref.ref(y))
            return y

    module = Recording()
    apply_fn, params = pytorch2jax.convert_pytnn_to_jax(module)
    _, vjp_fn = jax.vjp(apply_fn, params, jnp.ones((5, 3)))
    kept = module.outputs[-1]  # (before it, the fake output of shape inference)
    gc.collect()
    assert kept() is not None  # the residual holds the output and its graph
    del vjp_fn
    gc.collect()
    apply_fn(params, jnp.ones((5, 3)))  # frees what the dropped vjp held
    gc.collect()
    assert kept() is None


def test_no_transformation_leaves_autograd_state_behind():
    """Forward mode frees what its primal kept, jit drops what no backward takes (DCE),
    eager drops are released: after three steps of each, the worker holds nothing."""
    with start_worker(models=MODELS) as w:
        with pytorch2jax.connect(w.unix, transport="shm") as client:
            apply_fn, params = client.convert_pytnn_to_jax("mlp")
            x = jnp.ones((4, 8))

            def f(x):
                return apply_fn(params, x)

            def loss(x):
                return (f(x) ** 2).sum()

            cases = {
                "jit jvp": jax.jit(lambda x: jax.jvp(f, (x,), (x,))),
                "jit hessian": jax.jit(lambda x: jax.hessian(lambda v: loss(v[None]))(x[0])),
                "jit hvp": jax.jit(lambda x: jax.jvp(jax.grad(loss), (x,), (x,))),
                "jit grad": jax.jit(jax.grad(loss)),
                "jit vmap grad": jax.jit(jax.vmap(jax.grad(loss))),
                "jit grad has_aux": jax.jit(jax.grad(lambda x: (x.sum(), f(x)), has_aux=True)),
                "eager jvp": lambda x: jax.jvp(f, (x,), (x,)),
                "eager hvp": lambda x: jax.jvp(jax.grad(loss), (x,), (x,)),
                "eager grad checkpoint": jax.grad(jax.checkpoint(loss)),
                "jit grad checkpoint": jax.jit(jax.grad(jax.checkpoint(loss))),
                "eager vjp unused": lambda x: jax.vjp(f, x)[0],
            }
            for name, fn in cases.items():
                for _ in range(3):
                    jax.block_until_ready(fn(x))
                gc.collect()
                f(x)  # the next call releases what eager code dropped
                try:
                    wait_until(lambda: worker_stats(w.unix).residuals == 0, timeout=5)
                except AssertionError:
                    left = worker_stats(w.unix).residuals
                    raise AssertionError(f"{name} left {left} residuals on the worker") from None
