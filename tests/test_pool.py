"""Two workers behind one client: calls spread round-robin, each VJP routed to the worker
that kept its forward's residual, and training goes on when one worker is killed."""

from __future__ import annotations

import contextlib
import gc

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import start_worker, wait_until, worker_stats

import pytorch2jax
from pytorch2jax_server import examples

MODELS = {"mlp": "pytorch2jax_server.examples:mlp()"}


@pytest.fixture
def two_workers():
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(start_worker(models=MODELS, listen=["127.0.0.1:0"])) for _ in range(2)]


def _torch_loss_and_grads(x: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    model = examples.mlp()
    loss = (model(torch.tensor(x)) ** 2).mean()
    loss.backward()
    return loss.item(), {n: p.grad.numpy() for n, p in model.named_parameters()}


def _check(loss, grads, x) -> None:
    want_loss, want_grads = _torch_loss_and_grads(np.asarray(x))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for name, g in want_grads.items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-4, atol=1e-6)


def test_calls_spread_and_gradients_survive_a_killed_worker(two_workers):
    a, b = two_workers
    with pytorch2jax.connect([a.tcp, b.tcp]) as c:
        assert c.transport == "inline"
        apply_fn, params = c.convert_pytnn_to_jax("mlp")
        step = jax.jit(jax.value_and_grad(lambda p, x: (apply_fn(p, x) ** 2).mean()))
        x = jnp.linspace(-1, 1, 32, dtype=jnp.float32).reshape(4, 8)
        for _ in range(10):
            loss, grads = step(params, x)
        _check(loss, grads, x)
        served = c.workers()
        assert len(served) == 2 and all(n >= 5 for n in served.values()), served
        # Every VJP went to the worker that ran its forward, and found its residual there.
        assert c._pool.routed_vjps == 10 and c._pool.lost_residuals == 0

        # A forward runs on one worker; that worker dies before the backward pass.
        out, vjp_fn = jax.vjp(lambda p: (apply_fn(p, x) ** 2).mean(), params)
        (holder,) = {c._pool._address_of[w] for w in c._pool._pins.values()}
        assert holder in served
        victim = a if holder == a.tcp else b
        victim.process.kill()
        victim.process.wait()
        (grads,) = vjp_fn(jnp.ones_like(out))
        _check(out, grads, x)  # recomputed on the survivor
        assert c._pool.lost_residuals == 1
        # Calls that may land on the dead worker first are retried on the other.
        for _ in range(4):
            assert [m.name for m in c.list_models()] == ["mlp"]
            assert apply_fn(params, x).shape == (4, 1)

        before = dict(c.workers())
        for _ in range(5):
            loss, grads = step(params, x)
        _check(loss, grads, x)
        survivor = next(p for p in before if p != holder)
        assert c.workers()[survivor] >= before[survivor] + 10  # 5 forwards, 5 VJPs


def test_unused_vjps_are_released_on_the_workers_holding_them(two_workers):
    def held() -> int:
        return sum(worker_stats(w.tcp).residuals for w in two_workers)

    with pytorch2jax.connect([w.tcp for w in two_workers]) as c:
        mlp = c.py_to_jax_wrapper("mlp")
        x = jnp.ones((4, 8), jnp.float32)
        kept = []
        while len(set(c._pool._pins.values())) < 2:  # until both workers hold some
            assert len(kept) < 20, "every forward went to one worker"
            kept.append(jax.vjp(mlp, x))
        assert held() == len(kept)
        del kept
        gc.collect()
        mlp(x)  # sends each worker its handles
        wait_until(lambda: held() == 0, timeout=5)
        assert not c._pool._pins


def test_pool_refuses_zero_copy_transports(two_workers):
    a, b = two_workers
    with pytest.raises(pytorch2jax.InvalidArgumentError, match="needs a single worker"):
        pytorch2jax.connect([a.tcp, b.tcp], transport="shm")


@pytest.mark.parametrize(
    "target, message",
    [
        ([], "at least one address"),
        (["unix:///tmp/x.sock"], "over TCP as host:port"),
        (["no-such-host.invalid:50051"], "cannot resolve"),
    ],
)
def test_bad_pool_addresses(target, message):
    with pytest.raises(pytorch2jax.InvalidArgumentError, match=message):
        pytorch2jax.connect(target, timeout=1)


def test_dns_target(two_workers):
    """A dns:/// name is a pool too (here it resolves to one worker)."""
    port = two_workers[0].tcp.rsplit(":", 1)[1]
    with pytorch2jax.connect(f"dns:///localhost:{port}") as c:
        apply_fn, params = c.convert_pytnn_to_jax("mlp")
        x = jnp.ones((2, 8), jnp.float32)
        loss, grads = jax.value_and_grad(lambda p: (apply_fn(p, x) ** 2).mean())(params)
        _check(loss, grads, x)
        assert sum(c.workers().values()) >= 2


def test_only_pool_clients_are_sent_the_worker_id(worker):
    """Naming the worker in every reply costs tens of us a call; a pool asks for it."""
    from pytorch2jax_protocol import POOL_METADATA_KEY, WORKER_ID_METADATA_KEY, pb, pb_grpc

    with grpc.insecure_channel(worker.unix) as channel:
        stub = pb_grpc.BridgeStub(channel)
        _, plain = stub.ListModels.with_call(pb.ListModelsRequest(), timeout=10)
        _, asked = stub.ListModels.with_call(
            pb.ListModelsRequest(), timeout=10, metadata=((POOL_METADATA_KEY, "1"),)
        )
    assert WORKER_ID_METADATA_KEY not in dict(plain.trailing_metadata() or ())
    assert len(dict(asked.trailing_metadata())[WORKER_ID_METADATA_KEY]) == 16
