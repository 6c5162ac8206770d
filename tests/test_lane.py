"""The fast lane: calls over a unix socket beside gRPC, memory passed as descriptors, who may
use it, its framing fuzzed, and clients killed at any moment leaving nothing behind.

The rest of the suite runs over the lane too: "lane" is one of the transports every worker
test is parametrized over (conftest.TRANSPORTS), and of the fault tests' (test_faults).
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import socket
import struct
import subprocess
import sys
import textwrap
import time

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import pytorch2jax
from conftest import (
    FAST_LANE,
    STATUS_CODES,
    RawSession,
    client_process,
    our_segments,
    start_worker,
    wait_until,
    worker_stats,
)
from pytorch2jax_protocol import lane, pb, shm, tensors
from pytorch2jax_server import examples

pytestmark = pytest.mark.skipif(not FAST_LANE, reason="the fast lane is off (PYTORCH2JAX_FAST_LANE)")

MODELS = {
    "mlp": "pytorch2jax_server.examples:mlp()",
    "scale_shift": "pytorch2jax_server.examples:scale_shift",
}


@pytest.fixture(scope="module")
def worker():
    with start_worker(models=MODELS) as w:
        yield w


def _scale_shift(x: np.ndarray) -> bytes:
    """A ForwardRequest for ``scale_shift(x, 0.0)`` (which is ``2 * x``), serialized."""
    args = [pb.Value(tensor=tensors.to_wire(x)), pb.Value(tensor=tensors.to_wire(np.float32(0)))]
    request = pb.ForwardRequest(model="scale_shift", arguments=pb.Arguments(args=args))
    return request.SerializeToString()


def _status(frame: lane.Frame) -> tuple[grpc.StatusCode, str]:
    return STATUS_CODES[frame.code], bytes(frame.payload).decode()


def _serves(session: RawSession) -> None:
    """A good call over a new connection of ``session``'s lane gets the right numbers."""
    sock, answer = session.lane_connect()
    try:
        assert answer.code == 0, _status(answer)
        x = np.arange(5, dtype=np.float32)
        reply = session.lane_call(sock, "Forward", _scale_shift(x), session.metadata)
        assert reply.code == 0, _status(reply)
        out = pb.ForwardResponse.FromString(reply.payload).outputs.tensor
        np.testing.assert_array_equal(tensors.from_wire(out), 2 * x)
    finally:
        sock.close()


# -- what it carries --------------------------------------------------------------------------


def test_calls_go_over_the_lane_and_no_memory_is_named(worker):
    named_before = our_segments()
    before = worker_stats(worker.unix)
    with pytorch2jax.connect(worker.unix, transport="lane") as client:
        assert client.transport == "lane"
        apply_fn, params = client.convert_pytnn_to_jax("mlp")
        x = jnp.linspace(-1, 1, 64 * 8, dtype=jnp.float32).reshape(64, 8)  # 2 KiB
        big = jnp.arange(float(1 << 14))  # 64 KiB: in shared memory
        torch_mlp = examples.mlp()
        want = torch_mlp(torch.from_numpy(np.array(x))).detach().numpy()
        np.testing.assert_allclose(jax.jit(apply_fn)(params, x), want, rtol=1e-5, atol=1e-6)
        loss = jax.jit(jax.grad(lambda p, x: apply_fn(p, x).sum()))
        grads = loss(params, x)
        torch_mlp(torch.from_numpy(np.array(x))).sum().backward()
        for name, p in torch_mlp.named_parameters():
            np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-5, atol=1e-5)
        f = client.py_to_jax_wrapper("scale_shift")
        np.testing.assert_array_equal(f(big, jnp.float32(0)), 2 * np.asarray(big))
        during = worker_stats(worker.unix)
        assert client.transport_info()["arenas"] >= 1
        assert our_segments() == named_before  # memfds: nothing in /dev/shm, ever
    # 1 forward, 1 forward + 1 vjp, 1 forward: all over the lane.
    assert during.lane_calls - before.lane_calls == 4
    assert during.calls_served - before.calls_served >= 4
    assert during.lane_connections == before.lane_connections + 1
    assert during.regions > before.regions

    def released():
        """the client's session, regions and lane connection are gone"""
        now = worker_stats(worker.unix)
        return (now.sessions, now.regions, now.lane_connections) == (
            before.sessions,
            before.regions,
            before.lane_connections,
        )

    wait_until(released, timeout=5)


def test_auto_takes_the_lane_and_shm_refuses_it(worker):
    with pytorch2jax.connect(worker.unix) as auto:
        assert auto.transport == "lane"
    before = worker_stats(worker.unix)
    with pytorch2jax.connect(worker.unix, transport="shm") as plain:
        assert plain.transport == "shm"
        y = plain.py_to_jax_wrapper("scale_shift")(jnp.ones(4), jnp.float32(0))
        np.testing.assert_array_equal(y, 2.0)
        after = worker_stats(worker.unix)
    assert after.lane_calls == before.lane_calls
    assert after.lane_connections == before.lane_connections


def test_calls_at_once_use_connections_of_their_own(worker):
    with pytorch2jax.connect(worker.unix, transport="lane") as client:
        f = client.py_to_jax_wrapper("scale_shift")
        x = jnp.arange(4.0)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: np.asarray(f(x + i, jnp.float32(0))), range(40)))
        for i, y in enumerate(results):
            np.testing.assert_array_equal(y, 2 * (np.asarray(x) + i))
        assert 1 <= client.transport_info()["lane_connections"] <= 4


def test_a_worker_with_the_lane_off_serves_shared_memory_by_grpc(tmp_path):
    with start_worker("--fast-lane", "off", models=MODELS) as w:
        with pytorch2jax.connect(w.unix) as auto:
            assert auto.transport == "shm"
        with pytest.raises(pytorch2jax.UnsupportedError, match="fast lane is off"):
            pytorch2jax.connect(w.unix, transport="lane")


def test_a_loopback_tcp_client_gets_the_lane_too(worker):
    """Over TCP the worker takes the client for local only on loopback; it then offers the
    lane too (the socket is reachable from this host's network namespace)."""
    with pytorch2jax.connect(worker.tcp) as c:
        assert c.transport == "lane"


# -- who may use it ---------------------------------------------------------------------------

_THIEF = textwrap.dedent(
    """
    import os, socket, sys
    from pytorch2jax_protocol import lane
    if len(sys.argv) > 3:  # another user, once the imports are done
        os.setuid(int(sys.argv[3]))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(lane.socket_address(sys.argv[1]))
    lane.send(sock, lane.HELLO, payload=bytes.fromhex(sys.argv[2]))
    answer = lane.receive(sock, 1 << 16)
    print(answer.code, bytes(answer.payload).decode(errors="replace"), flush=True)
    """
)


def _thief(address: str, capability: bytes, *user: str) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, "-c", _THIEF, address, capability.hex(), *user],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    code, details = out.strip().split(" ", 1)
    return int(code), details


def test_a_stolen_capability_is_refused_and_spent(worker):
    session = RawSession(worker.unix, fast_lane=True)
    try:
        stolen = session.capability
        code, details = _thief(session.info.fast_lane.address, stolen)
        assert STATUS_CODES[code] == grpc.StatusCode.PERMISSION_DENIED
        assert "issued to another process" in details
        # Spent by the attempt: not even the session's own process may use it now.
        sock, answer = session.lane_connect(stolen)
        sock.close()
        assert _status(answer) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "fast lane refused: unknown or spent capability",
        )
    finally:
        session.close()


def test_a_capability_opens_one_connection(worker):
    session = RawSession(worker.unix, fast_lane=True)
    try:
        first = session.capability
        _serves(session)  # spends it, and keeps the next one
        sock, answer = session.lane_connect(first)
        sock.close()
        assert STATUS_CODES[answer.code] == grpc.StatusCode.PERMISSION_DENIED
        _serves(session)  # the chain goes on
    finally:
        session.close()


def test_a_session_claiming_another_process_gets_no_connection(worker):
    session = RawSession(worker.unix, fast_lane=True, pid=1)
    try:
        sock, answer = session.lane_connect()
        sock.close()
        assert _status(answer)[0] == grpc.StatusCode.PERMISSION_DENIED
    finally:
        session.close()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as another user")
def test_another_user_is_refused(worker):
    session = RawSession(worker.unix, fast_lane=True)
    try:
        code, details = _thief(session.info.fast_lane.address, session.capability, "65534")
        assert STATUS_CODES[code] == grpc.StatusCode.PERMISSION_DENIED
        assert "only the user the worker runs as" in details
        _serves(session)  # refused before its capability was looked at: still good
    finally:
        session.close()


def test_a_call_naming_another_session_is_aborted(worker):
    ours, theirs = RawSession(worker.unix, fast_lane=True), RawSession(worker.unix)
    try:
        sock, answer = ours.lane_connect()
        assert answer.code == 0
        reply = ours.lane_call(sock, "Forward", _scale_shift(np.ones(2, np.float32)), theirs.metadata)
        assert STATUS_CODES[reply.code] == grpc.StatusCode.ABORTED
        assert "belongs to another session" in bytes(reply.payload).decode()
        sock.close()
    finally:
        ours.close()
        theirs.close()


def test_connections_end_with_their_session(worker):
    session = RawSession(worker.unix, fast_lane=True)
    sock, answer = session.lane_connect()
    assert answer.code == 0
    session.close()
    sock.settimeout(5)
    assert sock.recv(1) == b""  # the worker closed it
    sock.close()


# -- the framing, fuzzed ----------------------------------------------------------------------


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _descriptor(kind: str) -> int:
    """A descriptor to pass: memfds right and wrong, and things that are no memory."""
    if kind == "good memfd":
        fd, mapping = shm.create_fd(4096)
        mapping.close()
        return fd
    if kind in ("unsealed memfd", "small memfd"):
        fd = os.memfd_create("fuzz", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 4096 if kind == "unsealed memfd" else 16)
        return fd
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    return os.open("/dev/null", os.O_RDONLY)


@st.composite
def frames(draw) -> tuple[bytes, list[str], bool]:
    """Bytes to send after a good hello (or instead of one), descriptors to pass with them,
    and whether the connection is closed mid-way."""
    kind = draw(st.sampled_from([lane.CALL, lane.CALL, lane.REGISTER, lane.HELLO, lane.REPLY, 0, 9]))
    code = draw(st.sampled_from([1, 2, 0, 3, 255]))
    meta = draw(
        st.one_of(
            st.just(b""),
            st.just(b"p2j-session\0" + b"00" * 16 + b"\0"),
            st.binary(max_size=40),
        )
    )
    payload = draw(
        st.one_of(
            st.binary(max_size=300),
            st.just(_scale_shift(np.ones(3, np.float32))),
            st.just(lane.REGION_SIZE.pack(4096)),
            st.just(lane.REGION_SIZE.pack(1 << 62)),
        )
    )
    body = meta + payload
    length = draw(st.one_of(st.just(len(body)), st.integers(0, 1 << 32 - 1)))
    meta_len = draw(st.one_of(st.just(len(meta)), st.integers(0, 65535)))
    timeout = draw(st.sampled_from([0.0, 5.0, -1.0, float("nan"), float("inf"), 1e-9]))
    data = struct.pack("<IBBHd", length & 0xFFFFFFFF, kind, code, meta_len, timeout) + body
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    if cut is not None:
        data = data[:cut]
    fds = draw(
        st.lists(
            st.sampled_from(["good memfd", "unsealed memfd", "small memfd", "pipe", "devnull"]),
            max_size=2,
        )
    )
    return data, fds, draw(st.booleans())


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=frames(), after_hello=st.booleans())
def test_fuzzed_frames_never_hurt_the_worker(fuzz_session, case, after_hello):
    session, pid, baseline = fuzz_session
    data, fd_kinds, close_early = case
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(lane.socket_address(session.info.fast_lane.address))
    fds = [_descriptor(k) for k in fd_kinds]
    try:
        if after_hello:
            lane.send(sock, lane.HELLO, payload=session.capability)
            answer = lane.receive(sock, 1 << 16)
            assert answer.code == 0, _status(answer)
            session.capability = bytes(answer.payload)
        try:
            if fds:
                socket.send_fds(sock, [data or b"\0"], fds)
            else:
                sock.sendall(data)
            if close_early:
                sock.shutdown(socket.SHUT_WR)
            sock.settimeout(0.3)
            while sock.recv(1 << 16):  # answers, then (for a broken frame) EOF
                pass
        except (TimeoutError, OSError):
            pass  # it waits for the rest of a frame, or closed on us
    finally:
        sock.close()
        for fd in fds:
            os.close(fd)
    assert worker_process_alive(pid)
    _serves(session)


def worker_process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def fuzz_session(worker):
    session = RawSession(worker.unix, fast_lane=True)
    pid = worker.process.pid
    baseline = _open_fds(pid)
    try:
        yield session, pid, baseline
    finally:
        session.close()

    def no_descriptors_left():
        """the worker holds no descriptor more than before the fuzzing"""
        return _open_fds(pid) <= baseline

    # Passed descriptors are closed (or kept as regions of the session, gone with it).
    wait_until(no_descriptors_left, timeout=10)
    assert worker_stats(worker.unix).lane_connections == 0


# -- clients killed at any moment -------------------------------------------------------------

#: A client that stops (SIGSTOP itself) at a named step of opening its session, registering
#: memory or calling, so that the test can kill it exactly there; "" runs freely, to be killed
#: at a random moment.
_VICTIM = textwrap.dedent(
    """
    import os, signal, sys
    import jax, jax.numpy as jnp
    from pytorch2jax._transports import arenas, base, lane
    from pytorch2jax_protocol import shm

    target, transport, stop_at = sys.argv[1:4]

    def pausing(step, fn):
        def wrapped(*args, **kwargs):
            if step + ":before" == stop_at:
                print(stop_at, flush=True); os.kill(os.getpid(), signal.SIGSTOP)
            out = fn(*args, **kwargs)
            if step + ":after" == stop_at:
                print(stop_at, flush=True); os.kill(os.getpid(), signal.SIGSTOP)
            return out
        return wrapped

    arenas.open_session = pausing("open_session", base.open_session)
    shm.create_fd = pausing("create_fd", shm.create_fd)
    shm.create = pausing("create", shm.create)
    lane.FastLane.register = pausing("register", lane.FastLane.register)
    lane.FastLane.__init__ = pausing("lane", lane.FastLane.__init__)

    import pytorch2jax
    client = pytorch2jax.connect(target, transport=transport)
    f = client.py_to_jax_wrapper("scale_shift")
    grad = jax.jit(jax.grad(lambda x: f(x, jnp.float32(0)).sum()))
    x = jnp.arange(float(1 << 16))  # 256 KiB: in shared memory
    print("calling", flush=True)
    while True:
        grad(x)
        jax.vjp(f, x, jnp.float32(0))  # keeps a residual until it is released
    """
)

_STEPS = [
    f"{step}:{when}"
    for step in ("open_session", "lane", "create_fd", "register")
    for when in ("before", "after")
]


def test_clients_killed_at_any_moment_leave_nothing(worker):
    """20 clients SIGKILLed: at each step of opening a session and registering memory,
    and at random moments while calling; afterwards /dev/shm holds nothing of ours and
    the worker holds no session, region, residual or lane connection of theirs."""
    rng = random.Random(17)
    named_before = our_segments()
    before = worker_stats(worker.unix)
    plan = [("lane", step) for step in _STEPS]
    plan += [("lane", "")] * (20 - len(plan))
    killed = []
    for transport, stop_at in plan:
        with client_process("-c", _VICTIM, worker.unix, transport, stop_at or "-") as proc:
            if stop_at:
                line = proc.stdout.readline().strip()
                assert line == stop_at, f"the client did not reach {stop_at}: {line!r}"
            else:
                assert proc.stdout.readline().strip() == "calling"
                time.sleep(rng.uniform(0.0, 0.5))
            proc.kill()
            proc.wait()
            killed.append(stop_at or "while calling")
    assert len(killed) == 20

    def released():
        """the killed clients' sessions, regions, residuals and lane connections are gone"""
        now = worker_stats(worker.unix)
        return (now.sessions, now.regions, now.residuals, now.lane_connections) == (
            before.sessions,
            before.regions,
            before.residuals,
            before.lane_connections,
        )

    wait_until(released, timeout=15)
    assert our_segments() == named_before
    with pytorch2jax.connect(worker.unix) as c:  # and it serves others
        np.testing.assert_array_equal(
            c.py_to_jax_wrapper("scale_shift")(jnp.ones(3), jnp.float32(0)), 2.0
        )
