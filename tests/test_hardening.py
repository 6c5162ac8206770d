"""Hardening, second round: what a failure may send back, and what a request may cost.

Error details keep their status at any length (gRPC turns details over its 8 KiB soft
limit into RESOURCE_EXHAUSTED, at random between 8 and 16 KiB); tracebacks inside a
model's message stay in the worker's log.
"""

from __future__ import annotations

import threading
import time

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TRANSPORTS, start_worker, varint

import pytorch2jax
from pytorch2jax_protocol import SERVICE_NAME, channel_options, pb, tensors


@pytest.mark.parametrize("length", [12 * 1024, 200 * 1024])
def test_long_error_messages_keep_their_status(clients, length):
    client = clients["inline"]
    fails = client.py_to_jax_wrapper("long_error")
    x = jnp.ones(3)
    for _ in range(20):
        with pytest.raises(pytorch2jax.InvalidArgumentError) as info:
            fails(x, length=length)
        message = str(info.value)
        assert "START" in message and message.rstrip().endswith("END"), message[-200:]
        assert f"characters cut; the worker's log has them all" in message
        assert len(message.encode()) < 5 * 1024
    # Under jit, shape inference fails the same way.
    with pytest.raises(pytorch2jax.InvalidArgumentError, match="characters cut"):
        jax.jit(lambda x: fails(x, length=length))(x)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_traceback_inside_a_models_message_stays_in_the_workers_log(transport, clients):
    fails = clients[transport].py_to_jax_wrapper("error_with_traceback")
    with pytest.raises(pytorch2jax.InvalidArgumentError) as info:
        fails(jnp.ones(3))
    message = str(info.value)
    assert "Traceback" not in message and "File " not in message and "dataset[idx]" not in message
    assert "Caught ValueError in DataLoader worker process 0." in message
    assert message.rstrip().endswith("ValueError: sample 7 is corrupt")


def test_the_workers_log_keeps_the_whole_message():
    models = {"error_with_traceback": "pytorch2jax_server.examples:error_with_traceback"}
    with start_worker("--log-level", "INFO", models=models) as w:
        with pytorch2jax.connect(w.unix) as client:
            with pytest.raises(pytorch2jax.InvalidArgumentError):
                client.py_to_jax_wrapper("error_with_traceback")(jnp.ones(3))
        log = w.stderr()
    assert "Original Traceback (most recent call last)" in log and "dataset[idx]" in log


def _peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _many_tiny_tensors_request(n: int) -> bytes:
    """A ForwardRequest of ``scale_shift`` with ``n`` one-element tensors as its
    arguments, built as bytes (building n messages in Python would take minutes)."""
    tiny = pb.Value(tensor=tensors.to_wire(np.ones(1, np.float32))).SerializeToString()
    entry = b"\x0a" + varint(len(tiny)) + tiny  # Arguments.args (field 1)
    arguments = entry * n
    model = b"scale_shift"
    return (
        b"\x0a" + varint(len(model)) + model  # ForwardRequest.model (1)
        + b"\x12" + varint(len(arguments)) + arguments  # ForwardRequest.arguments (2)
    )


def test_a_request_of_a_million_tiny_tensors_is_refused_before_it_is_decoded():
    """The value count is checked from the containers' lengths before decoding: the
    worker's memory stays proportional to the bytes received (it was ~1 KB per tensor)."""
    models = {"scale_shift": "pytorch2jax_server.examples:scale_shift"}
    request = _many_tiny_tensors_request(1_000_000)
    with start_worker(models=models) as w:
        with pytorch2jax.connect(w.unix) as client:  # warm: one good call
            client.py_to_jax_wrapper("scale_shift")(jnp.ones(3), jnp.ones(3))
        before = _peak_rss_mib(w.process.pid)
        channel = grpc.insecure_channel(w.unix, options=channel_options(1 << 30))
        forward = channel.unary_unary(
            f"/{SERVICE_NAME}/Forward",
            request_serializer=lambda b: b,
            response_deserializer=pb.ForwardResponse.FromString,
        )
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            forward(request, timeout=60)
        seconds = time.monotonic() - start
        channel.close()
        after = _peak_rss_mib(w.process.pid)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than 65536 values" in info.value.details()
    print(
        f"\n1,000,000 tiny tensors ({len(request) / 2**20:.0f} MiB): refused in {seconds:.2f} s; "
        f"worker peak RSS {before:.0f} -> {after:.0f} MiB (+{after - before:.0f})"
    )
    assert after - before < 300, (before, after)


def test_unauthenticated_requests_are_refused_before_they_are_read(tmp_path):
    """The token is checked from the metadata, and a refused request is never read: four
    concurrent 100 MiB requests without a token leave the worker's peak RSS where it was
    (it rose by ~600 MiB when gRPC read each one whole first)."""
    token = tmp_path / "token"
    token.write_text("a-secret")
    token.chmod(0o600)
    models = {"scale_shift": "pytorch2jax_server.examples:scale_shift"}
    body = b"\x00" * (100 << 20)
    request = b"\x0a\x0bscale_shift\x12" + varint(len(body)) + body
    codes = []

    with start_worker("--token-file", str(token), models=models, listen=["127.0.0.1:0"]) as w:
        before = _peak_rss_mib(w.process.pid)

        def send():
            with grpc.insecure_channel(w.tcp, options=channel_options(1 << 30)) as channel:
                forward = channel.unary_unary(
                    f"/{SERVICE_NAME}/Forward",
                    request_serializer=lambda b: b,
                    response_deserializer=pb.ForwardResponse.FromString,
                )
                try:
                    forward(request, timeout=60)
                except grpc.RpcError as e:
                    codes.append(e.code())

        threads = [threading.Thread(target=send) for _ in range(4)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - start
        after = _peak_rss_mib(w.process.pid)
    print(
        f"\n4 x 100 MiB unauthenticated: refused in {seconds:.1f} s; worker peak RSS "
        f"{before:.0f} -> {after:.0f} MiB"
    )
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 4
    assert after - before < 100, (before, after)


def test_too_many_parameters_are_refused_before_they_are_decoded(worker):
    named = pb.NamedTensor(name="w", tensor=tensors.to_wire(np.ones(1, np.float32)))
    entry = named.SerializeToString()
    model = b"mlp"
    request = b"\x0a" + varint(len(model)) + model + (b"\x1a" + varint(len(entry)) + entry) * 70_000
    with grpc.insecure_channel(worker.unix, options=channel_options(1 << 30)) as channel:
        forward = channel.unary_unary(
            f"/{SERVICE_NAME}/Forward",
            request_serializer=lambda b: b,
            response_deserializer=pb.ForwardResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            forward(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "carries 70000 parameters, more than 65536" in info.value.details()
