"""Shared fixtures: real worker subprocesses, and helpers to compare with torch."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import jax
import numpy as np
import pytest

from pytorch2jax_protocol import DEFAULT_MAX_MESSAGE_BYTES, channel_options, lane, pb, pb_grpc, shm

jax.config.update("jax_numpy_rank_promotion", "raise")

# Tests set what they need: the PYTORCH2JAX_* settings (token, TLS, target) of whoever runs
# them would change what workers and clients do.
for _name in [n for n in os.environ if n.startswith("PYTORCH2JAX_")]:
    del os.environ[_name]

READY_PREFIX = "pytorch2jax-server listening on"
STARTUP_TIMEOUT_S = 60.0

#: The example models every test worker serves, by name.
EXAMPLE_MODELS = {
    "mlp": "pytorch2jax_server.examples:mlp()",
    "convnet": "pytorch2jax_server.examples:convnet()",
    "dict_output": "pytorch2jax_server.examples:dict_output()",
    "embedding": "pytorch2jax_server.examples:embedding()",
    "bf16_mlp": "pytorch2jax_server.examples:bf16_mlp()",
    "linear10": "pytorch2jax_server.examples:linear10()",
    "scale_shift": "pytorch2jax_server.examples:scale_shift",
    "noisy_scale": "pytorch2jax_server.examples:noisy_scale",
    "masked_select": "pytorch2jax_server.examples:masked_select",
    "long_error": "pytorch2jax_server.examples:long_error",
    "error_with_traceback": "pytorch2jax_server.examples:error_with_traceback",
    "attention": "pytorch2jax_server.examples:attention()",
    "lstm": "pytorch2jax_server.examples:lstm()",
    "counted": "pytorch2jax_server.examples:counted",
    "calls_of_counted": "pytorch2jax_server.examples:calls_of_counted",
    "unbatchable": "pytorch2jax_server.examples:unbatchable",
    "bn_mlp": "pytorch2jax_server.examples:bn_mlp()",
    "dropout_mlp": "pytorch2jax_server.examples:dropout_mlp()",
    "gpt2": "pytorch2jax_server.examples:gpt2()",
    "bert": "pytorch2jax_server.examples:bert()",
    "cross_entropy": "pytorch2jax_server.examples:cross_entropy",
    "top_class": "pytorch2jax_server.examples:top_class",
    "with_cache": "pytorch2jax_server.examples:with_cache",
    "flagged": "pytorch2jax_server.examples:flagged",
}


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    addresses: list[str]
    stderr_path: str

    @property
    def unix(self) -> str:
        return next(a for a in self.addresses if a.startswith("unix:"))

    @property
    def tcp(self) -> str:
        return next(a for a in self.addresses if not a.startswith("unix:"))

    def stderr(self) -> str:
        with open(self.stderr_path) as f:
            return f.read()


def _wait_ready(process: subprocess.Popen, stderr_path: str) -> list[str]:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    assert process.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            line = process.stdout.readline()
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX) :].split()
        if process.poll() is not None:
            break
    process.kill()
    with open(stderr_path) as f:
        raise RuntimeError(f"worker did not start:\n{f.read()}")


@contextlib.contextmanager
def start_worker(
    *extra: str,
    models: dict[str, str] | None = None,
    listen: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[WorkerProcess]:
    """Runs ``pytorch2jax-server`` as a subprocess; yields once it printed its addresses.
    ``env`` adds to the environment it inherits."""
    models = EXAMPLE_MODELS if models is None else models
    with tempfile.TemporaryDirectory(prefix="p2j-test-") as tmp:
        if listen is None:
            listen = [f"unix://{tmp}/worker.sock", "127.0.0.1:0"]
        cmd = [sys.executable, "-m", "pytorch2jax_server", "--torch-threads", "1"]
        for address in listen:
            cmd += ["--listen", address]
        for name, target in models.items():
            cmd += ["--model", f"{name}={target}"]
        cmd += list(extra)
        stderr_path = os.path.join(tmp, "stderr.log")
        with open(stderr_path, "w") as err:
            process = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env={**os.environ, **env} if env else None,
            )
        try:
            yield WorkerProcess(process, _wait_ready(process, stderr_path), stderr_path)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stdout is not None:
                process.stdout.close()


def varint(n: int) -> bytes:
    """``n`` as a protobuf varint, for requests built as bytes."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def our_segments() -> set[str]:
    """The names of our shared-memory segments in /dev/shm."""
    return {n for n in os.listdir("/dev/shm") if n.startswith("p2j-")}


def worker_stats(address: str) -> pb.WorkerStats:
    """The worker's stats, asked over a channel of its own (no session)."""
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.BridgeStub(channel).GetWorkerStats(pb.WorkerStatsRequest(), timeout=10)


def wait_until(condition, timeout: float = 10.0) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {condition.__doc__ or condition}")
        time.sleep(0.02)
    return time.monotonic() - start


@contextlib.contextmanager
def client_process(*args: str) -> Iterator[subprocess.Popen]:
    """``python *args`` with its stdout piped, killed (if still running) on exit."""
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left():
    """After the whole suite, /dev/shm holds no segment of ours that was not there before."""
    before = our_segments()
    yield
    left = our_segments() - before
    assert not left, f"shared-memory segments left behind: {sorted(left)}"


@pytest.fixture(scope="session")
def worker() -> Iterator[WorkerProcess]:
    """One worker serving every example model, shared by the session."""
    with start_worker(*(["--device", "cuda"] if GPU else [])) as w:
        yield w


def _gpu() -> bool:
    import torch

    from pytorch2jax_protocol import cuda

    return jax.default_backend() == "gpu" and torch.cuda.is_available() and cuda.available()


#: A GPU machine with CUDA torch, JAX and cuda-python: the shared worker then serves on the
#: GPU, and every worker test also runs over CUDA IPC.
GPU = _gpu()
if GPU:
    # References are float32 maths: no TF32 in JAX's own matrix products on the GPU.
    jax.config.update("jax_default_matmul_precision", "highest")

#: Whether the workers tests start offer the fast lane: the suite also runs with it off
#: everywhere (PYTORCH2JAX_FAST_LANE=off, which the workers read as --fast-lane off).
FAST_LANE = os.environ.get("PYTORCH2JAX_FAST_LANE", "on").lower() != "off"
#: gRPC's status codes by number: what a fast-lane REPLY's code means.
STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}

#: The transports every worker test runs over: "shm" is shared memory with its calls by
#: gRPC, "lane" the same over the fast lane (memory passed as descriptors).
TRANSPORTS = ("inline", "shm") + (("lane",) if FAST_LANE else ()) + (("cuda_ipc",) if GPU else ())


@pytest.fixture(scope="session")
def clients(worker) -> Iterator[dict]:
    """One client per transport, to the shared worker, by transport name."""
    import pytorch2jax

    # Small arrays would travel inline; the tests' arrays are small, and should not.
    chosen = {
        "shm": pytorch2jax.ShmTransport(inline_below=0, fast_lane="off"),
        "lane": pytorch2jax.ShmTransport(inline_below=0, fast_lane="required"),
    }
    opened = {t: pytorch2jax.connect(worker.unix, transport=chosen.get(t, t)) for t in TRANSPORTS}
    try:
        yield opened
    finally:
        for c in opened.values():
            c.close()


@pytest.fixture(scope="session", params=TRANSPORTS)
def client(request, clients):
    """A client to the shared worker; tests that use it run once per transport."""
    c = clients[request.param]
    assert c.transport == request.param
    return c


class RawSession:
    """A session opened by hand, to send what the client library never would; its
    ``forward`` calls the ``scale_shift`` example on one tensor."""

    def __init__(
        self,
        target: str,
        transports: tuple[int, ...] = (pb.SHM,),
        *,
        fast_lane: bool = False,
        pid: int | None = None,
    ) -> None:
        self.channel = grpc.insecure_channel(
            target, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES)
        )
        self.stub = pb_grpc.BridgeStub(self.channel)
        request = pb.OpenSessionRequest(
            transports=list(transports), fast_lane=fast_lane, pid=os.getpid() if pid is None else pid
        )
        self.stream = self.stub.OpenSession(request)
        self.info = next(self.stream)
        self.metadata = (("p2j-session", self.info.session.hex()),)
        #: The capability for the next fast-lane connection.
        self.capability = self.info.fast_lane.capability

    def lane_connect(self, capability: bytes | None = None) -> tuple[socket.socket, lane.Frame]:
        """A raw connection to the session's fast lane, and the worker's answer to its
        hello (a spent or refused capability gets a status); the next capability is kept."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(lane.socket_address(self.info.fast_lane.address))
        lane.send(sock, lane.HELLO, payload=self.capability if capability is None else capability)
        answer = lane.receive(sock, 1 << 16)
        if answer.code == 0 and capability is None:
            self.capability = bytes(answer.payload)
        return sock, answer

    @staticmethod
    def lane_call(
        sock: socket.socket, method: str, request: bytes, metadata: tuple = (), timeout: float = 10
    ) -> lane.Frame:
        """One call over a raw lane connection: its reply frame (code 0, or a status)."""
        lane.send(
            sock,
            lane.CALL,
            lane.METHOD_CODES[method],
            request,
            metadata=lane.encode_metadata(metadata),
            timeout=timeout,
        )
        return lane.receive(sock, DEFAULT_MAX_MESSAGE_BYTES)

    def register(self, size: int = 1 << 20) -> tuple[int, np.ndarray]:
        name, mapping = shm.create(size)
        try:
            reply = self.stub.RegisterRegion(
                pb.RegisterRegionRequest(name=name, size=size), metadata=self.metadata
            )
        finally:
            shm.unlink(name)
        return reply.region, np.frombuffer(mapping, np.uint8)

    def forward(self, x: pb.Tensor, *, reply_area=None, metadata=None) -> pb.ForwardResponse:
        shift = pb.Value(tensor=pb.Tensor(dtype=pb.FLOAT32, inline_data=b"\0\0\0\0"))
        request = pb.ForwardRequest(
            model="scale_shift",
            arguments=pb.Arguments(args=[pb.Value(tensor=x), shift]),
            reply_area=reply_area,
        )
        return self.stub.Forward(request, metadata=self.metadata if metadata is None else metadata)

    def close(self) -> None:
        self.stream.cancel()
        self.channel.close()


def tree_allclose(actual, expected, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Asserts two pytrees have the same structure and close leaves."""
    a_leaves, a_def = jax.tree_util.tree_flatten(actual)
    e_leaves, e_def = jax.tree_util.tree_flatten(expected)
    assert a_def == e_def, f"structure {a_def} != {e_def}"
    for a, e in zip(a_leaves, e_leaves):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
        np.testing.assert_allclose(
            a.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol
        )


def jax_matches_torch_loss(apply_fn, params, x, model, *, jit: bool) -> None:
    """``apply_fn`` (a module's function form, on ``params`` and the array ``x``) gives the
    value and gradients of ``sum(out ** 2)`` that ``model`` gives in torch, on the device
    ``model`` is on; the gradients stay on ``x``'s device."""
    import torch

    def loss(p, x):
        return (apply_fn(p, x) ** 2).sum()

    value_and_grad = jax.value_and_grad(loss, argnums=(0, 1))
    if jit:
        value_and_grad = jax.jit(value_and_grad)
    value, (p_grads, x_grad) = value_and_grad(params, x)
    assert x_grad.devices() == x.devices()

    device = next(model.parameters()).device
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.as_tensor(np.asarray(params[name])))
    tx = torch.as_tensor(np.asarray(x), device=device).requires_grad_(True)
    torch_loss = (model(tx) ** 2).sum()
    torch_loss.backward()
    tree_allclose(value, torch_loss.detach().cpu().numpy(), rtol=1e-4)
    tree_allclose(x_grad, tx.grad.cpu().numpy(), rtol=1e-4, atol=1e-5)
    for name, p in model.named_parameters():
        tree_allclose(p_grads[name], p.grad.cpu().numpy(), rtol=1e-4, atol=1e-5)
