"""Prepared calls over the fast lane: a compiled call site's calls after its first go as
an id and their tensors' bytes (``RUN`` frames), and give what the full calls give; a
RUN of an unknown or another session's id or of the wrong size is refused with a status,
one whose outputs change shape ends its prepared call, and the worker stays up."""

from __future__ import annotations

import random
import socket

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pytorch2jax
from conftest import (
    FAST_LANE,
    STATUS_CODES,
    RawSession,
    start_worker,
    tree_allclose,
    worker_stats,
)
from pytorch2jax_protocol import lane, pb, tensors
from pytorch2jax_server import examples
from pytorch2jax_server._prepared import PreparedCalls

pytestmark = pytest.mark.skipif(not FAST_LANE, reason="the fast lane is off (PYTORCH2JAX_FAST_LANE)")

MODELS = {
    "mlp": "pytorch2jax_server.examples:mlp()",
    "dict_output": "pytorch2jax_server.examples:dict_output()",
    "embedding": "pytorch2jax_server.examples:embedding()",
    "bf16_mlp": "pytorch2jax_server.examples:bf16_mlp()",
    "dropout_mlp": "pytorch2jax_server.examples:dropout_mlp()",
    "scale_shift": "pytorch2jax_server.examples:scale_shift",
    "masked_select": "pytorch2jax_server.examples:masked_select",
}


@pytest.fixture(scope="module")
def worker():
    with start_worker(models=MODELS) as w:
        yield w


def _prepared_calls(worker) -> int:
    return worker_stats(worker.unix).prepared_calls


def test_compiled_calls_after_the_first_are_prepared_and_give_torchs_values(worker):
    torch_mlp = examples.mlp()
    with pytorch2jax.connect(worker.unix, transport="lane") as client:
        apply_fn, params = client.convert_pytnn_to_jax("mlp")
        fwd = jax.jit(apply_fn)
        vag = jax.jit(jax.value_and_grad(lambda p, x: apply_fn(p, x).sum()))
        before = _prepared_calls(worker)
        for seed in range(4):
            x = jax.random.normal(jax.random.key(seed), (16, 8))
            tx = torch.from_numpy(np.array(x))
            np.testing.assert_allclose(
                fwd(params, x), torch_mlp(tx).detach().numpy(), rtol=1e-5, atol=1e-6
            )
            value, grads = vag(params, x)
            torch_mlp.zero_grad()
            loss = torch_mlp(tx).sum()
            loss.backward()
            np.testing.assert_allclose(value, loss.item(), rtol=1e-5)
            for name, p in torch_mlp.named_parameters():
                np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-4, atol=1e-5)
        # Per site, every call but the first: 3 forwards, 3 kept forwards, 3 Vjps.
        assert _prepared_calls(worker) - before == 9


def _dict_output(apply_fn):
    # A dict out (the wire's order and JAX's differ), a keyword argument, a static leaf.
    f = jax.jit(lambda p, x, y: apply_fn(p, x, y=y, scale=3.0))
    return lambda p, k: f(p, jnp.ones((3, 4)) * k, jnp.full((3, 4), 2.0))


def _embedding(apply_fn):
    f = jax.jit(apply_fn)  # int32 token ids reach torch as int64
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(3, 4) % 50
    return lambda p, k: f(p, tokens, jnp.ones((3, 4)) * k)


def _bf16_mlp(apply_fn):
    f = jax.jit(apply_fn)
    return lambda p, k: f(p, (jnp.ones((8, 4)) * k).astype(jnp.bfloat16))


def _dropout_mlp(apply_fn):
    f = jax.jit(lambda p, x: apply_fn(p, x, rng=jax.random.key(7)))  # the key: one more input
    return lambda p, k: f(p, jnp.ones((8, 4)) * k)


@pytest.mark.parametrize(
    "model, site",
    [
        ("dict_output", _dict_output),
        ("embedding", _embedding),
        ("bf16_mlp", _bf16_mlp),
        ("dropout_mlp", _dropout_mlp),
    ],
)
def test_prepared_calls_give_what_full_calls_give(worker, model, site):
    results = {}
    for transport in ("lane", "shm"):  # "shm": calls by gRPC, never prepared
        with pytorch2jax.connect(worker.unix, transport=transport) as client:
            apply_fn, params = client.convert_pytnn_to_jax(model)
            call = site(apply_fn)
            before = _prepared_calls(worker)
            results[transport] = [call(params, k) for k in (1.0, 2.0, 3.0)]
            assert _prepared_calls(worker) - before == (2 if transport == "lane" else 0)
    for ours, theirs in zip(results["lane"], results["shm"]):
        tree_allclose(ours, theirs, rtol=0, atol=0)


# -- what a RUN may carry, sent by hand ---------------------------------------------------------


def _prepare(session: RawSession, sock: socket.socket, model: str, x: np.ndarray) -> int:
    request = pb.ForwardRequest(
        model=model, arguments=pb.Arguments(args=[pb.Value(tensor=tensors.to_wire(x))]), prepare=True
    )
    if model == "scale_shift":
        request.arguments.args.append(pb.Value(tensor=tensors.to_wire(np.float32(0))))
    reply = session.lane_call(sock, "Forward", request.SerializeToString(), session.metadata)
    assert reply.code == 0, bytes(reply.payload)
    prepared = pb.ForwardResponse.FromString(reply.payload).prepared
    assert prepared
    return prepared


def _run(sock: socket.socket, plan_id: int, *inputs: np.ndarray) -> lane.Frame:
    offsets, size = lane.layout([a.nbytes for a in inputs], lane.PLAN.size)
    payload = bytearray(size)
    lane.PLAN.pack_into(payload, 0, plan_id)
    for a, at in zip(inputs, offsets):
        payload[at : at + a.nbytes] = a.tobytes()
    return _send_run(sock, payload)


def _send_run(sock: socket.socket, payload: bytes | bytearray, metadata: bytes = b"") -> lane.Frame:
    lane.send(sock, lane.RUN, 0, payload, metadata=metadata, timeout=10)
    return lane.receive(sock, 1 << 24)


def test_a_run_gives_the_outputs_bytes_and_is_refused_what_does_not_fit(worker):
    session, other = (RawSession(worker.unix, fast_lane=True) for _ in range(2))
    try:
        sock, answer = session.lane_connect()
        assert answer.code == 0
        x = np.arange(6, dtype=np.float32)
        plan_id = _prepare(session, sock, "scale_shift", x)
        reply = _run(sock, plan_id, 3 * x, np.float32(0))
        assert reply.code == 0
        np.testing.assert_array_equal(np.frombuffer(reply.payload, np.float32), 6 * x)

        # Another size than the prepared call's: refused, and the connection goes on.
        reply = _run(sock, plan_id, np.arange(9, dtype=np.float32), np.float32(0))
        assert STATUS_CODES[reply.code] == grpc.StatusCode.INVALID_ARGUMENT
        assert "carries" in bytes(reply.payload).decode()
        # No id, or one this session never had.
        for payload in (b"", b"\1", lane.PLAN.pack(plan_id + 1000)):
            reply = _send_run(sock, payload)
            assert STATUS_CODES[reply.code] == grpc.StatusCode.NOT_FOUND
            assert "prepare it again" in bytes(reply.payload).decode()

        # Another session's connection cannot run it (ids are per session).
        theirs, answer = other.lane_connect()
        assert answer.code == 0
        assert STATUS_CODES[_run(theirs, plan_id, x, np.float32(0)).code] == grpc.StatusCode.NOT_FOUND

        # Random payloads: a status each, and the worker serves on.
        rng = random.Random(0)
        for _ in range(50):
            payload = lane.PLAN.pack(rng.choice([0, plan_id, 2**32 - 1])) + rng.randbytes(
                rng.choice([0, 1, 23, 24, 25, 40, 100])
            )
            assert _send_run(sock, payload).code != 0  # none is of the right size
        assert _run(sock, plan_id, x, np.float32(0)).code == 0

        # A RUN carries no metadata: that ends the connection, with a status.
        reply = _send_run(sock, lane.PLAN.pack(plan_id), metadata=b"k\0v\0")
        assert STATUS_CODES[reply.code] == grpc.StatusCode.INVALID_ARGUMENT
        sock.close()
        theirs.close()
    finally:
        session.close()
        other.close()


def test_outputs_that_change_shape_end_the_prepared_call(worker):
    session = RawSession(worker.unix, fast_lane=True)
    try:
        sock, _ = session.lane_connect()
        x = np.array([1.0, -1.0, 2.0], np.float32)
        plan_id = _prepare(session, sock, "masked_select", x)
        assert _run(sock, plan_id, np.array([3.0, -1.0, 2.0], np.float32)).code == 0
        # Not of the prepared call's shapes: NOT_FOUND (the client sends it in full, where
        # its own check says what it expected), and the prepared call is gone.
        reply = _run(sock, plan_id, np.array([3.0, 1.0, 2.0], np.float32))
        assert STATUS_CODES[reply.code] == grpc.StatusCode.NOT_FOUND
        assert "where the call it was prepared from returned" in bytes(reply.payload).decode()
        reply = _run(sock, plan_id, np.array([3.0, -1.0, 2.0], np.float32))
        assert "no such prepared call" in bytes(reply.payload).decode()
        sock.close()
    finally:
        session.close()


def test_a_restarted_worker_has_its_calls_prepared_again(tmp_path):
    address = f"unix://{tmp_path}/w.sock"
    x = jnp.ones((4, 8))
    with start_worker(models={"mlp": MODELS["mlp"]}, listen=[address]) as first:
        client = pytorch2jax.connect(address, transport="lane")
        apply_fn, params = client.convert_pytnn_to_jax("mlp")
        fwd = jax.jit(apply_fn)
        want = [np.asarray(fwd(params, x)) for _ in range(2)][0]
        assert worker_stats(first.unix).prepared_calls == 1
    try:
        with start_worker(models={"mlp": MODELS["mlp"]}, listen=[address]) as second:
            for _ in range(3):  # the lane broke: by gRPC, a new session and lane, prepared
                np.testing.assert_allclose(fwd(params, x), want, rtol=1e-6)
            assert worker_stats(second.unix).prepared_calls >= 1
    finally:
        client.close()


def test_a_session_keeps_its_newest_prepared_calls():
    calls = PreparedCalls(max_entries=2)
    ids = [calls.add(object()) for _ in range(3)]  # type: ignore[arg-type]
    assert ids == [1, 2, 3]
    assert calls.get(ids[0]) is None  # the oldest went
    assert calls.get(ids[2]) is not None and len(calls) == 2
