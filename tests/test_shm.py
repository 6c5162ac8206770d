"""The shared-memory transport: hostile references refused, memory and sessions cleaned up.

Hostile requests go over the raw gRPC stub, since the client never sends them. Whether the
worker still maps a client's memory is read from /proc/<pid>/maps, where its mappings of
our (unlinked) segments show as "/dev/shm/p2j-... (deleted)".
"""

from __future__ import annotations

import os
import signal
import textwrap

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pytorch2jax
from conftest import RawSession, client_process, our_segments, start_worker, wait_until
from pytorch2jax_protocol import pb, shm

MODELS = {"scale_shift": "pytorch2jax_server.examples:scale_shift"}


def _mapped_segments(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [line.split()[-2] for line in f if "/dev/shm/p2j-" in line]


def _ref_tensor(region: int, offset: int, nbytes: int, shape=(4,)) -> pb.Tensor:
    return pb.Tensor(
        dtype=pb.FLOAT32,
        shape=shape,
        shm=pb.SharedMemoryRef(region=region, offset=offset, nbytes=nbytes),
    )


@pytest.fixture(scope="module")
def shm_worker():
    with start_worker(models=MODELS) as w:
        yield w


@pytest.fixture
def raw(shm_worker):
    session = RawSession(shm_worker.unix)
    yield session
    session.close()


def test_handshake_offers_shm_to_a_local_peer(raw):
    assert list(raw.info.transports) == [pb.INLINE, pb.SHM]
    assert len(raw.info.session) == 16 and raw.info.refused == ""


def test_valid_reference_round_trip(raw):
    region, memory = raw.register()
    memory[:16].view(np.float32)[:] = [1, 2, 3, 4]
    area = pb.SharedMemoryRef(region=region, offset=4096, nbytes=4096)
    reply = raw.forward(_ref_tensor(region, 0, 16), reply_area=area)
    out = reply.outputs.tensor
    assert out.WhichOneof("payload") == "shm" and out.shm.offset == 4096
    np.testing.assert_array_equal(memory[4096 : 4096 + 16].view(np.float32), [2, 4, 6, 8])


HOSTILE = {
    "unknown region": (lambda r: _ref_tensor(r + 7, 0, 16), "unknown shared-memory region"),
    "offset past the end": (lambda r: _ref_tensor(r, 1 << 20, 16), "outside its region"),
    "end past the end": (lambda r: _ref_tensor(r, (1 << 20) - 64, 128, (32,)), "outside"),
    "offset + nbytes overflows 64 bits": (
        lambda r: _ref_tensor(r, (1 << 64) - 64, 128, (32,)),
        "outside its region",
    ),
    "nbytes is not dtype x shape": (lambda r: _ref_tensor(r, 0, 64), "needs 16"),
    "unaligned offset": (lambda r: _ref_tensor(r, 4, 16), "multiples of 64"),
    "absurd shape": (lambda r: _ref_tensor(r, 0, 16, (1 << 40, 1 << 40)), "too large"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_reference_is_refused(raw, case):
    region, _ = raw.register()
    make, match = HOSTILE[case]
    with pytest.raises(grpc.RpcError) as e:
        raw.forward(make(region))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in e.value.details()
    assert "/p2j-" not in e.value.details() and "/dev/shm" not in e.value.details()
    # ... and the worker goes on serving.
    memory_ok = raw.forward(pb.Tensor(dtype=pb.FLOAT32, shape=[1], inline_data=b"\0\0\x80?"))
    assert memory_ok.outputs.tensor.inline_data == np.float32(2).tobytes()


def test_hostile_reply_area_is_refused(raw):
    region, _ = raw.register()
    x = pb.Tensor(dtype=pb.FLOAT32, shape=[1], inline_data=b"\0\0\x80?")
    area = pb.SharedMemoryRef(region=region, offset=(1 << 20) - 64, nbytes=4096)
    with pytest.raises(grpc.RpcError) as e:
        raw.forward(x, reply_area=area)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_region_of_another_client_is_refused(shm_worker):
    a, b = RawSession(shm_worker.unix), RawSession(shm_worker.unix)
    try:
        a.register()
        b.register()
        b_region, _ = b.register()  # a holds one region, b two: b's second is unknown to a
        with pytest.raises(grpc.RpcError) as e:
            a.forward(_ref_tensor(b_region, 0, 16))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown shared-memory region" in e.value.details()
    finally:
        a.close()
        b.close()


def test_reference_without_a_session_is_refused(raw):
    region, _ = raw.register()
    with pytest.raises(grpc.RpcError) as e:
        raw.forward(_ref_tensor(region, 0, 16), metadata=())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        raw.forward(_ref_tensor(region, 0, 16), metadata=(("p2j-session", "00" * 16),))
    assert e.value.code() == grpc.StatusCode.ABORTED  # the client re-opens a session


@pytest.mark.parametrize(
    "name, match",
    [
        ("/etc/passwd", "not a pytorch2jax"),
        ("/p2j-../../x", "not a pytorch2jax"),
        ("/p2j-" + "0" * 32, "cannot see"),
    ],
)
def test_register_refuses_foreign_segments(raw, name, match):
    with pytest.raises(grpc.RpcError) as e:
        raw.stub.RegisterRegion(pb.RegisterRegionRequest(name=name, size=4096), metadata=raw.metadata)
    assert match in e.value.details()


def test_register_refuses_a_segment_others_can_open(raw):
    name, _ = shm.create(4096)
    try:
        os.chmod(f"/dev/shm{name}", 0o644)
        with pytest.raises(grpc.RpcError) as e:
            raw.stub.RegisterRegion(
                pb.RegisterRegionRequest(name=name, size=4096), metadata=raw.metadata
            )
        assert "mode 0600" in e.value.details()
    finally:
        shm.unlink(name)


def test_register_refuses_a_size_beyond_the_segment(raw):
    name, _ = shm.create(4096)
    try:
        with pytest.raises(grpc.RpcError) as e:
            raw.stub.RegisterRegion(
                pb.RegisterRegionRequest(name=name, size=1 << 20), metadata=raw.metadata
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        shm.unlink(name)


def test_segments_are_private_and_unlinked_once_mapped(shm_worker):
    before = our_segments()
    with pytorch2jax.connect(shm_worker.unix, transport="shm") as c:
        assert c.transport == "shm"
        assert our_segments() == before
        assert len(_mapped_segments(shm_worker.process.pid)) >= 1
    wait_until(lambda: not _mapped_segments(shm_worker.process.pid))


def test_close_unmaps_in_the_worker_and_arrays_stay_valid(shm_worker):
    c = pytorch2jax.connect(shm_worker.unix, transport="shm")
    f = c.py_to_jax_wrapper("scale_shift")
    y = f(jnp.arange(1 << 16, dtype=jnp.float32), jnp.float32(0))
    c.close()
    wait_until(lambda: not _mapped_segments(shm_worker.process.pid))
    np.testing.assert_array_equal(np.asarray(y[:3]), [0, 2, 4])


def test_small_arrays_travel_inline_and_large_ones_in_slots(shm_worker):
    with pytorch2jax.connect(shm_worker.unix, transport="shm") as c:
        f = c.py_to_jax_wrapper("scale_shift")
        small = f(jnp.ones(16), jnp.float32(0))
        assert c.transport_info()["in_use"] == 0
        large = f(jnp.ones(1 << 16), jnp.float32(0))  # 256 KiB
        assert c.transport_info()["in_use"] > 0  # the eager output holds its slot
        np.testing.assert_array_equal(np.asarray(small), 2.0)
        np.testing.assert_array_equal(np.asarray(large), 2.0)


def test_slots_are_not_reused_while_an_eager_output_lives(clients):
    client = clients["shm"]
    f = client.py_to_jax_wrapper("scale_shift")
    first = f(jnp.ones(1024), jnp.float32(0))
    others = [f(jnp.full(1024, float(i)), jnp.float32(0)) for i in range(20)]
    np.testing.assert_array_equal(np.asarray(first), 2.0)
    for i, y in enumerate(others):
        np.testing.assert_array_equal(np.asarray(y), 2.0 * i)
    in_use = client.transport_info()["in_use"]
    del first, others, y

    def returned() -> bool:
        # JAX lets go of the host memory it wrapped a little later, not in `del`.
        jnp.zeros(1).block_until_ready()
        return client.transport_info()["in_use"] < in_use

    wait_until(returned)


def test_auto_falls_back_to_inline_when_shm_is_off():
    with start_worker("--shared-memory", "off", models=MODELS) as w:
        with pytorch2jax.connect(w.unix) as c:
            assert c.transport == "inline"
            np.testing.assert_array_equal(
                np.asarray(c.py_to_jax_wrapper("scale_shift")(jnp.ones(2), jnp.float32(0))), 2.0
            )
        with pytest.raises(pytorch2jax.UnsupportedError, match="shared memory is off"):
            pytorch2jax.connect(w.unix, transport="shm")


def test_unknown_transport_is_refused(shm_worker):
    with pytest.raises(pytorch2jax.InvalidArgumentError, match="transport must be one of"):
        pytorch2jax.connect(shm_worker.unix, transport="carrier-pigeon")
    with pytest.raises(pytorch2jax.UnsupportedError, match="cuda_ipc"):
        pytorch2jax.connect(shm_worker.unix, transport="cuda_ipc")


def test_a_transport_object_brings_its_own_options(shm_worker):
    transport = pytorch2jax.ShmTransport(arena_bytes=4 << 20, inline_below=0, fast_lane="off")
    with pytorch2jax.connect(shm_worker.unix, transport=transport) as c:
        assert c.transport == "shm"
        y = c.py_to_jax_wrapper("scale_shift")(jnp.ones(4), jnp.float32(0))
        np.testing.assert_array_equal(y, 2.0)
        assert c.transport_info()["bytes"] == 4 << 20
        with pytest.raises(pytorch2jax.InvalidArgumentError, match="already belongs to a client"):
            pytorch2jax.connect(shm_worker.unix, transport=transport)
    with pytest.raises(pytorch2jax.InvalidArgumentError, match="fast_lane must be one of"):
        pytorch2jax.ShmTransport(fast_lane="sometimes")


def test_worker_restart_opens_a_new_session(tmp_path):
    socket = f"unix://{tmp_path}/w.sock"
    x = jnp.arange(float(1 << 14))  # 64 KiB: through shared memory, not inline
    with start_worker(models=MODELS, listen=[socket]):
        c = pytorch2jax.connect(socket, transport="shm")
        f = c.py_to_jax_wrapper("scale_shift")
        g = jax.jit(jax.grad(lambda x: f(x, jnp.float32(0)).sum()))
        np.testing.assert_array_equal(np.asarray(g(x)), 2.0)
    with start_worker(models=MODELS, listen=[socket]):
        c.wait_ready(30)
        np.testing.assert_array_equal(np.asarray(g(x)), 2.0)
        np.testing.assert_array_equal(np.asarray(f(x, jnp.float32(0))), 2 * np.asarray(x))
        assert c.transport_info()["arenas"] == 1  # the new session's
        assert c.transport == "shm"
    c.close()


_KILLED_CLIENT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp
    import pytorch2jax

    c = pytorch2jax.connect(sys.argv[1], transport="shm")
    f = jax.jit(c.py_to_jax_wrapper("scale_shift"))
    x = jnp.ones(8 << 20, jnp.float32)  # 32 MB: each call takes a while
    while True:
        print("calling", flush=True)
        f(x, jnp.float32(0)).block_until_ready()
    """
)


def test_client_killed_mid_call_leaves_nothing(shm_worker):
    before = our_segments()
    with client_process("-c", _KILLED_CLIENT, shm_worker.unix) as proc:
        for _ in range(3):  # a few calls in: memory registered, a call in flight
            assert proc.stdout.readline() == "calling\n"
        assert _mapped_segments(shm_worker.process.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert our_segments() == before
    # The connection drops, the session ends, and the worker unmaps the client's memory.
    wait_until(lambda: not _mapped_segments(shm_worker.process.pid))
    with pytorch2jax.connect(shm_worker.unix) as c:
        y = c.py_to_jax_wrapper("scale_shift")(jnp.ones(3), jnp.float32(0))
        np.testing.assert_array_equal(np.asarray(y), 2.0)


def test_a_reset_during_a_call_never_mixes_sessions(shm_worker):
    """Another thread resets the session (as after a worker restart) between a call taking
    its slots and sending them: the call must not name the new session with the old
    session's references (region ids repeat across sessions: wrong numbers, silently)."""
    transport = pytorch2jax.ShmTransport(inline_below=0, fast_lane="off")
    client = pytorch2jax.connect(shm_worker.unix, transport=transport)
    f = client.py_to_jax_wrapper("scale_shift")
    x = jnp.arange(1.0, 1025.0)
    np.testing.assert_array_equal(np.asarray(f(x, jnp.float32(0))), 2 * np.asarray(x))
    resets = []
    take_slots = transport.call

    def take_slots_then_reset(request_bytes, reply_bytes):
        call = take_slots(request_bytes, reply_bytes)
        if not resets:
            resets.append(call.metadata)
            transport.reset(call.metadata)  # what the other thread did meanwhile
        return call

    transport.call = take_slots_then_reset
    x2 = x + 1000.0
    np.testing.assert_array_equal(np.asarray(f(x2, jnp.float32(0))), 2 * np.asarray(x2))
    assert resets and client.transport_info()["arenas"] == 1
    client.close()
