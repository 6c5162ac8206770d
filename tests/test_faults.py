"""Faults, with real processes: a worker killed or restarted mid-call, a client killed
mid-call, deadlines and cancellation, graceful shutdown under load, and the limits that
turn overload into RESOURCE_EXHAUSTED."""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pytorch2jax
from conftest import FAST_LANE, RawSession, client_process, start_worker, wait_until, worker_stats
from pytorch2jax_protocol import pb, pb_grpc
from pytorch2jax_server import examples

MODELS = {
    "mlp": "pytorch2jax_server.examples:mlp()",
    "scale_shift": "pytorch2jax_server.examples:scale_shift",
}
#: Where each transport is tested: shared memory over the unix socket (its calls by gRPC,
#: or over the fast lane), inline over TCP.
TRANSPORTS = ("inline", "shm") + (("lane",) if FAST_LANE else ())


def _slow(folder, seconds: float = 30.0, steps: int = 300) -> tuple[str, str]:
    """Worker options serving "slow": ``steps`` pauses of ``seconds / steps`` each (by
    default 0.1 s each, 30 s in all unless the call is stopped)."""
    path = folder / "slow.toml"
    path.write_text(
        '[models.slow]\ntarget = "pytorch2jax_server.examples:slow()"\n'
        f"kwargs = {{ seconds = {seconds}, steps = {steps} }}\n"
    )
    return ("--config", str(path))


def _address(worker, transport: str) -> str:
    return worker.tcp if transport == "inline" else worker.unix


def _slow_reference(x: np.ndarray) -> np.ndarray:
    """What "slow" answers: its Linear(4, 4) of ``x``, run here."""
    with torch.no_grad():
        return examples.slow(0.0, 1)[0](torch.tensor(x)).numpy()


def _slow_request() -> pb.ForwardRequest:
    x = pb.Tensor(dtype=pb.FLOAT32, shape=[2, 4], inline_data=bytes(32))
    return pb.ForwardRequest(model="slow", arguments=pb.Arguments(args=[pb.Value(tensor=x)]))


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with start_worker(*_slow(tmp_path_factory.mktemp("slow")), models=MODELS) as w:
        yield w


def _in_thread(fn):
    """Runs ``fn`` in a thread; returns a function that joins it and gives (result or
    exception, seconds taken)."""
    out = {}

    def run():
        start = time.monotonic()
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["value"] = e
        out["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join(timeout: float = 60.0):
        thread.join(timeout)
        assert not thread.is_alive(), "the call never returned"
        return out["value"], out["seconds"]

    return join


# -- the worker killed -------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_worker_killed_mid_call_then_restarted_at_the_same_address(tmp_path, transport):
    unix = f"unix://{tmp_path}/worker.sock"
    with start_worker(*_slow(tmp_path), models=MODELS, listen=[unix, "127.0.0.1:0"]) as w:
        tcp = w.tcp
        address = _address(w, transport)
        client = pytorch2jax.connect(address, transport=transport, call_timeout=20)
        slow = client.py_to_jax_wrapper("slow")
        join = _in_thread(lambda: slow(jnp.ones((2, 4))))
        wait_until(lambda: worker_stats(address).calls_in_flight == 1)
        os.kill(w.process.pid, signal.SIGKILL)
        w.process.wait()
        error, seconds = join()
    assert isinstance(error, pytorch2jax.WorkerUnavailableError), error
    assert "is the worker running?" in str(error)
    assert seconds < 20, "raised only at the call's deadline"
    # A killed worker leaves its socket file; the restarted one replaces it.
    assert os.path.exists(f"{tmp_path}/worker.sock")
    with start_worker(*_slow(tmp_path), models=MODELS, listen=[unix, tcp]):
        # The same Client object: its channel reconnects, its session is opened anew.
        f = client.py_to_jax_wrapper("scale_shift")
        x = jnp.arange(float(1 << 14))  # 64 KiB: through shared memory on "shm"
        np.testing.assert_array_equal(np.asarray(f(x, jnp.float32(0))), 2 * np.asarray(x))
        grad = jax.jit(jax.grad(lambda x: f(x, jnp.float32(0)).sum()))
        np.testing.assert_array_equal(np.asarray(grad(x)), 2.0)
        assert client.transport == transport
        assert worker_stats(address).sessions == 1
        if transport != "inline":
            assert client.transport_info()["arenas"] == 1  # the new session's
        client.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_client_refused_a_new_session_goes_on_inline_then_gets_one(tmp_path, caplog, transport):
    """Its worker restarted, and the one session slot is taken: the client's calls go on
    inline without a session, and it has a session again (and shared memory, on "shm")
    once a slot is free."""
    unix = f"unix://{tmp_path}/w.sock"
    with start_worker(models=MODELS, listen=[unix]) as w:
        client = pytorch2jax.connect(unix, transport=transport)
        f = client.py_to_jax_wrapper("scale_shift")
        # A differentiated call keeps a residual, under the client's session: the worker
        # then checks that session (on "shm" every call does, for its memory).
        grad = jax.grad(lambda x: f(x, jnp.float32(0)).sum())
        x = jnp.arange(float(1 << 14))  # 64 KiB: through shared memory when there is a session
        np.testing.assert_array_equal(np.asarray(grad(x)), 2.0)
        os.kill(w.process.pid, signal.SIGKILL)
        w.process.wait()
    with start_worker("--max-sessions", "1", models=MODELS, listen=[unix]) as w:
        other = RawSession(unix)  # takes the only session
        try:
            for _ in range(3):
                np.testing.assert_array_equal(np.asarray(grad(x)), 2.0)
                np.testing.assert_array_equal(np.asarray(f(x, jnp.float32(0))), 2 * np.asarray(x))
            assert "no session with" in caplog.text
            stats = worker_stats(unix)
            assert (stats.sessions, stats.regions) == (1, 0)  # the other's; ours go inline
        finally:
            other.close()

        def in_a_session_again():
            """the client has a session again (with shared memory on "shm")"""
            np.testing.assert_array_equal(np.asarray(grad(x)), 2.0)
            stats = worker_stats(unix)
            return stats.sessions == 1 and (transport == "inline" or stats.regions >= 1)

        wait_until(in_a_session_again, timeout=10)  # it asks again after 1 s, then 2, 4...
        client.close()


def test_worker_gone_for_good_fails_within_the_reconnect_window(tmp_path):
    with start_worker(models=MODELS, listen=[f"unix://{tmp_path}/w.sock"]) as w:
        client = pytorch2jax.connect(w.unix, call_timeout=60, reconnect=1)
        f = client.py_to_jax_wrapper("scale_shift")
        os.kill(w.process.pid, signal.SIGKILL)
        w.process.wait()
    start = time.monotonic()
    with pytest.raises(pytorch2jax.WorkerUnavailableError, match="no answer"):
        f(jnp.ones(3), jnp.float32(0))
    assert time.monotonic() - start < 5
    client.close()


def test_a_socket_in_use_is_not_taken_over(worker):
    with pytest.raises(RuntimeError, match="another process is listening there"):
        with start_worker(models=MODELS, listen=[worker.unix]):
            pass


# -- a client killed ----------------------------------------------------------------------

_CLIENT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp
    import pytorch2jax

    client = pytorch2jax.connect(sys.argv[1], transport=sys.argv[2])
    mlp = client.py_to_jax_wrapper("mlp")
    x = jnp.ones((512, 8))  # 16 KiB: through shared memory on "shm"
    kept = [jax.vjp(mlp, x + i) for i in range(3)]  # three forwards' autograd state
    print("holding", flush=True)
    client.py_to_jax_wrapper("slow")(jnp.ones((2, 4)))  # killed in here
    """
)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_client_killed_mid_call_releases_what_it_held(worker, transport):
    address = _address(worker, transport)
    before = worker_stats(address)
    with client_process("-c", _CLIENT, address, transport) as proc:
        assert proc.stdout.readline() == "holding\n"
        wait_until(lambda: worker_stats(address).calls_in_flight == before.calls_in_flight + 1)
        held = worker_stats(address)
        assert held.residuals == before.residuals + 3
        assert held.sessions == before.sessions + 1
        if transport != "inline":
            assert held.regions > before.regions
        proc.kill()
        proc.wait()

    def released():
        """the worker released the killed client's session, regions, residuals and call"""
        now = worker_stats(address)
        return (now.sessions, now.regions, now.residuals, now.calls_in_flight) == (
            before.sessions,
            before.regions,
            before.residuals,
            before.calls_in_flight,
        )

    # The slow call had 29 s to go: it stops at its next submodule instead.
    assert wait_until(released, timeout=5) < 5
    assert worker_stats(address).calls_cancelled > before.calls_cancelled
    with pytorch2jax.connect(address, transport=transport) as c:  # and serves others
        y = c.py_to_jax_wrapper("scale_shift")(jnp.ones(3), jnp.float32(0))
        np.testing.assert_array_equal(np.asarray(y), 2.0)


# -- deadlines and cancellation --------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_call_past_its_deadline_raises_and_its_work_stops(worker, transport):
    address = _address(worker, transport)
    before = worker_stats(address)
    with pytorch2jax.connect(address, transport=transport) as client:
        client.call_timeout = 0.5  # once connected: connecting takes calls of its own
        slow = client.py_to_jax_wrapper("slow")
        start = time.monotonic()
        with pytest.raises(pytorch2jax.WorkerTimeoutError, match="raise call_timeout="):
            jax.vjp(slow, jnp.ones((2, 4)))  # a forward that would keep autograd state
        assert time.monotonic() - start < 5
        # Stopped at its next submodule, not 30 s later; no autograd state kept.
        wait_until(lambda: worker_stats(address).calls_in_flight == before.calls_in_flight, timeout=3)
        after = worker_stats(address)
        assert after.calls_cancelled == before.calls_cancelled + 1
        assert after.residuals == before.residuals
        client.call_timeout = 30
        y = client.py_to_jax_wrapper("scale_shift")(jnp.ones(3), jnp.float32(0))  # still fine
        np.testing.assert_array_equal(np.asarray(y), 2.0)


def test_cancelled_call_stops_on_the_worker(worker):
    before = worker_stats(worker.unix)
    with grpc.insecure_channel(worker.unix) as channel:
        future = pb_grpc.BridgeStub(channel).Forward.future(_slow_request(), timeout=60)
        wait_until(lambda: worker_stats(worker.unix).calls_in_flight == before.calls_in_flight + 1)
        future.cancel()
        with pytest.raises(grpc.FutureCancelledError):
            future.result()
    wait_until(lambda: worker_stats(worker.unix).calls_in_flight == before.calls_in_flight, timeout=3)
    assert worker_stats(worker.unix).calls_cancelled == before.calls_cancelled + 1


# -- graceful shutdown ------------------------------------------------------------------------


def test_sigterm_finishes_calls_in_flight_and_refuses_new_ones(tmp_path):
    # One call runs at a time: of the four, three wait for their turn when SIGTERM comes,
    # their inputs in shared memory that their sessions must keep until they are done.
    slow = (*_slow(tmp_path, 2.0, 20), "--max-workers", "1")
    with start_worker(*slow, models=MODELS, listen=[f"unix://{tmp_path}/w.sock", "127.0.0.1:0"]) as w:
        connected = grpc.insecure_channel(w.tcp)
        stub = pb_grpc.BridgeStub(connected)
        stub.ListModels(pb.ListModelsRequest(), timeout=10)  # the connection is up
        clients = [
            pytorch2jax.connect(a, call_timeout=60, transport=t)
            for a, t in ((w.unix, "shm"), (w.tcp, "shm"), (w.tcp, "inline"), (w.unix, "auto"))
        ]
        assert clients[3].transport == ("lane" if FAST_LANE else "shm")
        x = jnp.linspace(-1, 1, 4096, dtype=jnp.float32).reshape(1024, 4)  # 16 KiB
        joins = [_in_thread(lambda c=c: c.py_to_jax_wrapper("slow")(x)) for c in clients]
        wait_until(lambda: worker_stats(w.tcp).calls_in_flight == 4)
        w.process.send_signal(signal.SIGTERM)

        def refuses_new_connections():
            """the worker refuses new connections"""
            try:
                worker_stats(w.tcp)
            except grpc.RpcError as e:
                return e.code() == grpc.StatusCode.UNAVAILABLE
            return False

        wait_until(refuses_new_connections, timeout=5)  # the calls in flight take 2 s
        with pytest.raises(grpc.RpcError) as refused:  # and new calls on open ones
            stub.ListModels(pb.ListModelsRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(pytorch2jax.WorkerUnavailableError):
            pytorch2jax.connect(w.unix, timeout=1)
        want = _slow_reference(np.asarray(x))
        for join in joins:  # the calls in flight finished, with their results
            y, _ = join()
            assert not isinstance(y, BaseException), y
            np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
        assert w.process.wait(timeout=30) == 0
        for c in clients:
            c.close()
        connected.close()


# -- limits: overload is RESOURCE_EXHAUSTED, never an unbounded queue -------------------------


def test_calls_past_the_concurrency_limit_are_resource_exhausted(tmp_path):
    # Two calls admitted (one runs, one waits for its turn), the other six refused at once.
    limits = ("--max-concurrent-calls", "2", "--max-workers", "1")
    slow = _slow(tmp_path, 1.0, 10)
    with start_worker(*limits, *slow, models={}, listen=[f"unix://{tmp_path}/w.sock"]) as w:
        with grpc.insecure_channel(w.unix) as channel:
            stub = pb_grpc.BridgeStub(channel)
            futures = [stub.Forward.future(_slow_request(), timeout=30) for _ in range(8)]
            codes = []
            for f in futures:
                try:
                    f.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        error = pytorch2jax._exceptions.from_rpc_error(e, w.unix)
        assert codes.count(grpc.StatusCode.OK) == 2, codes
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 6, codes
        assert isinstance(error, pytorch2jax.ResourceExhaustedError)
        assert "--max-concurrent-calls" in str(error)
        stats = worker_stats(w.unix)
        assert (stats.calls_in_flight, stats.calls_refused) == (0, 6)


def test_a_call_waiting_for_its_turn_stops_when_cancelled(worker):
    """A call of a module another call is running waits for it; past its deadline it
    leaves at once, without waiting those 30 s for nobody."""
    before = worker_stats(worker.unix)
    with grpc.insecure_channel(worker.unix) as channel:
        stub = pb_grpc.BridgeStub(channel)
        running = stub.Forward.future(_slow_request(), timeout=60)
        wait_until(lambda: worker_stats(worker.unix).calls_in_flight == before.calls_in_flight + 1)
        with pytest.raises(grpc.RpcError) as late:
            stub.Forward(_slow_request(), timeout=1)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Gone from the worker within a slice of its wait, not after the running call.
        wait_until(
            lambda: worker_stats(worker.unix).calls_in_flight == before.calls_in_flight + 1,
            timeout=3,
        )
        assert worker_stats(worker.unix).calls_cancelled == before.calls_cancelled + 1
        running.cancel()
    wait_until(lambda: worker_stats(worker.unix).calls_in_flight == before.calls_in_flight)


def test_request_over_the_size_limit_is_resource_exhausted(tmp_path):
    with start_worker(
        "--max-message-mb", "1", models=MODELS, listen=[f"unix://{tmp_path}/w.sock"]
    ) as w:
        with pytorch2jax.connect(w.unix, transport="inline") as client:
            f = client.py_to_jax_wrapper("scale_shift")
            with pytest.raises(pytorch2jax.ResourceExhaustedError, match="larger than max"):
                f(jnp.ones(1 << 19), jnp.float32(0))  # 2 MiB
            np.testing.assert_array_equal(np.asarray(f(jnp.ones(3), jnp.float32(0))), 2.0)


def test_residual_cache_stays_within_its_bytes(tmp_path):
    with start_worker(
        "--residual-cache-mb", "1", models=MODELS, listen=[f"unix://{tmp_path}/w.sock"]
    ) as w:
        with pytorch2jax.connect(w.unix) as client:
            mlp = client.py_to_jax_wrapper("mlp")
            x = jnp.ones((1024, 8))
            kept = [jax.vjp(mlp, x * i) for i in range(12)]  # each keeps over 256 KiB
            stats = worker_stats(w.unix)
            assert 0 < stats.residual_bytes <= 1 << 20 and stats.residuals < 12
            # The evicted ones recompute: every gradient is still right.
            grads = [np.asarray(vjp(jnp.ones((1024, 1)))[0]) for _, vjp in kept]
            want = np.asarray(jax.grad(lambda x: mlp(x).sum())(x))
            np.testing.assert_allclose(grads[1], want, rtol=1e-5)
            assert all(np.isfinite(g).all() for g in grads)


def test_sessions_and_shared_memory_past_their_limits_are_resource_exhausted(tmp_path, caplog):
    limits = ("--max-sessions", "2", "--shared-memory-mb", "32")
    with start_worker(*limits, models=MODELS, listen=[f"unix://{tmp_path}/w.sock"]) as w:
        raw = RawSession(w.unix)
        try:
            raw.register(16 << 20)
            with pytest.raises(grpc.RpcError) as e:
                raw.register(17 << 20)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 33554432 bytes" in e.value.details()
            with pytorch2jax.connect(w.unix, transport="shm") as second:
                with pytest.raises(pytorch2jax.ResourceExhaustedError, match="--max-sessions"):
                    pytorch2jax.connect(w.unix, transport="shm")
                # An inline client past the limit still works, without a session: the
                # worker then frees what it keeps for it by TTL only.
                with pytorch2jax.connect(w.unix, transport="inline") as third:
                    y = third.py_to_jax_wrapper("scale_shift")(jnp.ones(3), jnp.float32(0))
                    np.testing.assert_array_equal(np.asarray(y), 2.0)
                assert "no session with" in caplog.text
                assert second.transport == "shm"
        finally:
            raw.close()


def test_expired_residuals_go_on_an_idle_worker(tmp_path):
    with start_worker(
        "--residual-ttl", "3", models=MODELS, listen=[f"unix://{tmp_path}/w.sock"]
    ) as w:
        with pytorch2jax.connect(w.unix) as client:
            kept = jax.vjp(client.py_to_jax_wrapper("mlp"), jnp.ones((4, 8)))  # noqa: F841
            assert worker_stats(w.unix).residuals == 1
            # No call comes to evict it: the worker's sweeper does, within a TTL and a bit.
            wait_until(lambda: worker_stats(w.unix).residuals == 0, timeout=10)
