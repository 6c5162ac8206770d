"""The data planes measured: small calls, large tensors, a training step, each beside its floor.

Prints one table; every row is measured in this run (medians of repeated calls), and each
row shows its ratio to its floor and, where the project has one, its target:

- small calls: the 10x10 Linear of the original README under ``jax.jit``, forward and
  forward + VJP, through the worker inline over TCP, inline over a unix socket, and by
  shared memory; floors: a bare gRPC echo of the same request bytes on the same socket;
- large tensors: ``2 * x`` for 1, 16, 64 and 256 MB in and out, forward and forward + VJP,
  inline and by shared memory; floors: memcpy of the same bytes, a bare gRPC echo of the
  same inline payload, and the same torch function called in process;
- a training step (JAX + optax Adam) through a served 3-layer MLP 1024 wide at batch 256,
  against the same step in plain PyTorch in process;
- Arrow's tensor IPC format against raw slots, for the slot format (see
  ``pytorch2jax._transports.shm``).

    python benchmarks/data_planes.py [--calls 500] [--sizes-mb 1 16 64 256]

It needs the client and the server extras (torch runs in this process for the floors).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pytorch2jax
from pytorch2jax_protocol import DEFAULT_MAX_MESSAGE_BYTES, channel_options, pb, tensors, values

READY = "listening on"
MB = 1 << 20
THREADS = os.cpu_count() or 1

ECHO_SERVER = """
import sys, grpc
from concurrent import futures
from pytorch2jax_protocol import channel_options, DEFAULT_MAX_MESSAGE_BYTES
handler = grpc.method_handlers_generic_handler(
    "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)}
)
server = grpc.server(futures.ThreadPoolExecutor(16), options=channel_options(DEFAULT_MAX_MESSAGE_BYTES))
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.add_insecure_port("unix://" + sys.argv[1])
server.start()
print("listening on", f"unix://{sys.argv[1]}", f"127.0.0.1:{port}", flush=True)
server.wait_for_termination()
"""

MODELS = {
    "linear10": "pytorch2jax_server.examples:linear10()",
    "double": "pytorch2jax_server.examples:double",
    "wide_mlp": "pytorch2jax_server.examples:wide_mlp()",
}


@dataclass
class Row:
    name: str
    seconds: float
    floor: str | None = None
    nbytes: int = 0  # bytes in + out, for GB/s
    target: tuple[str, float, str] | None = None  # (against row, ratio, "<=" or ">=")


def _start(cmd: list[str]) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if READY not in line:
        proc.kill()
        raise RuntimeError(f"{cmd[0]} did not start: {line!r}")
    return proc, line.split(READY, 1)[1].split()


def _median(fn: Callable[[], object], calls: int, warmup: int | None = None) -> float:
    for _ in range(warmup if warmup is not None else max(2, calls // 10)):
        fn()
    samples = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def _reps(nbytes: int) -> int:
    return max(3, min(50, (256 * MB) // max(nbytes, 1) * 3))


def _echo(address: str, payload: bytes, calls: int) -> float:
    with grpc.insecure_channel(address, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES)) as ch:
        call = ch.unary_unary("/bench.Echo/Echo")
        return _median(lambda: call(payload, timeout=600), calls)


def small_calls(rows: list[Row], worker: list[str], echo: list[str], calls: int) -> None:
    import torch

    x = jnp.ones((10, 10), jnp.float32)
    for label, w_addr, e_addr, transport in (
        ("inline, TCP", worker[1], echo[1], "inline"),
        ("inline, unix socket", worker[0], echo[0], "inline"),
        ("shm, unix socket", worker[0], echo[0], "shm"),
    ):
        with pytorch2jax.connect(w_addr, transport=transport) as client:
            apply_fn, params = client.convert_pytnn_to_jax("linear10")
            floor = f"small: bare gRPC echo, {label.split(', ')[1]}"
            if not any(r.name == floor for r in rows):
                request = pb.ForwardRequest(
                    model="linear10",
                    arguments=values.encode_arguments((np.asarray(x),), {}, tensors.to_wire),
                    parameters=[
                        pb.NamedTensor(name=n, tensor=tensors.to_wire(np.asarray(v)))
                        for n, v in params.items()
                    ],
                ).SerializeToString()
                rows.append(Row(floor, _echo(e_addr, request, calls)))
            fwd = jax.jit(apply_fn)
            target = (floor, 1.3, "<=") if transport == "shm" else None
            rows.append(
                Row(
                    f"small: jit forward, {label}",
                    _median(lambda: fwd(params, x).block_until_ready(), calls),
                    floor,
                    target=target,
                )
            )
            vg = jax.jit(jax.value_and_grad(lambda p, x: apply_fn(p, x).sum(), argnums=(0, 1)))
            rows.append(
                Row(
                    f"small: jit forward+VJP, {label}",
                    _median(lambda: jax.block_until_ready(vg(params, x)), calls),
                    floor,
                )
            )
    lin, tx = torch.nn.Linear(10, 10), torch.ones(10, 10)
    with torch.no_grad():
        rows.append(Row("small: torch Linear in process", _median(lambda: lin(tx), calls)))


def large_tensors(
    rows: list[Row], worker: list[str], echo: list[str], sizes_mb: list[int]
) -> None:
    import torch

    clients = {t: pytorch2jax.connect(worker[0], transport=t) for t in ("inline", "shm")}
    try:
        for size in sizes_mb:
            nbytes = size * MB
            reps = _reps(nbytes)
            n = nbytes // 4
            tag = f"{size} MB:"
            src = np.ones(n, np.float32)
            dst = np.empty_like(src)
            memcpy = f"{tag} memcpy"
            rows.append(Row(memcpy, _median(lambda: np.copyto(dst, src), reps), nbytes=nbytes))
            payload = tensors.to_wire(src).SerializeToString()
            echo_row = f"{tag} bare gRPC echo, inline"
            rows.append(Row(echo_row, _echo(echo[0], payload, reps), nbytes=2 * nbytes))
            tx = torch.ones(n)
            in_process = f"{tag} torch 2*x in process"
            with torch.no_grad():
                rows.append(Row(in_process, _median(lambda: tx * 2, reps), nbytes=2 * nbytes))
            tx.requires_grad_(True)
            ct = torch.ones(n)

            def torch_vjp():
                (tx * 2).backward(ct)
                tx.grad = None

            in_process_vjp = f"{tag} torch 2*x fwd+bwd in process"
            rows.append(Row(in_process_vjp, _median(torch_vjp, reps), nbytes=4 * nbytes))
            x = jnp.ones(n, jnp.float32)
            del src, dst, tx, ct
            for transport, client in clients.items():
                double = client.py_to_jax_wrapper("double")
                fwd = jax.jit(double)
                name = f"{tag} jit forward, {transport}"
                target = None
                if transport == "shm" and size == 64:
                    target = (in_process, 3.0, "<=")
                rows.append(
                    Row(
                        name,
                        _median(lambda: fwd(x).block_until_ready(), reps, warmup=1),
                        in_process,
                        nbytes=2 * nbytes,
                        target=target,
                    )
                )
                if transport == "shm" and size == 64:
                    rows.append(
                        Row(
                            f"{tag} shm forward vs inline",
                            rows[-1].seconds,
                            f"{tag} jit forward, inline",
                            target=(f"{tag} jit forward, inline", 1 / 25, "<="),
                        )
                    )
                # The forward keeps its residual on the worker; the VJP uses it.
                fwd_vjp = jax.jit(lambda x: jax.vjp(double, x)[1](x))
                rows.append(
                    Row(
                        f"{tag} jit forward+VJP, {transport}",
                        _median(lambda: jax.block_until_ready(fwd_vjp(x)), reps, warmup=1),
                        in_process_vjp,
                        nbytes=4 * nbytes,
                    )
                )
    finally:
        for c in clients.values():
            c.close()


def training_step(rows: list[Row], worker: list[str], steps: int) -> None:
    import torch

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((256, 1024), np.float32)
    yb = rng.standard_normal((256, 1024), np.float32)

    from pytorch2jax_server.examples import wide_mlp

    model = wide_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    tx_, ty_ = torch.from_numpy(xb), torch.from_numpy(yb)

    def torch_step():
        opt.zero_grad(set_to_none=True)
        loss = ((model(tx_) - ty_) ** 2).mean()
        loss.backward()
        opt.step()

    floor = "train: PyTorch step in process"
    rows.append(Row(floor, _median(torch_step, steps)))
    x, y = jnp.asarray(xb), jnp.asarray(yb)
    for transport in ("inline", "shm"):
        with pytorch2jax.connect(worker[0], transport=transport) as client:
            apply_fn, params = client.convert_pytnn_to_jax("wide_mlp")
            optimizer = optax.adam(1e-4)
            state = optimizer.init(params)

            @jax.jit
            def step(params, state, x, y):
                loss, grads = jax.value_and_grad(
                    lambda p: jnp.mean((apply_fn(p, x) - y) ** 2)
                )(params)
                updates, state = optimizer.update(grads, state, params)
                return optax.apply_updates(params, updates), state, loss

            carry = [params, state]

            def jax_step():
                carry[0], carry[1], loss = step(carry[0], carry[1], x, y)
                loss.block_until_ready()

            target = (floor, 1.5, "<=") if transport == "shm" else None
            rows.append(Row(f"train: JAX+optax step, {transport}", _median(jax_step, steps), floor, target=target))


def arrow_vs_raw(rows: list[Row], size_mb: int, reps: int) -> None:
    try:
        import pyarrow as pa
    except ImportError:
        return
    src = np.ones(size_mb * MB // 4, np.float32)
    slot = np.empty(size_mb * MB + 4096, np.uint8)  # room for Arrow's header
    raw_row = f"slot format: raw write+read, {size_mb} MB"

    def raw():
        np.copyto(slot[: src.nbytes].view(np.float32), src)
        return slot[: src.nbytes].view(np.float32)

    def arrow():
        sink = pa.FixedSizeBufferWriter(pa.py_buffer(slot))
        pa.ipc.write_tensor(pa.Tensor.from_numpy(src), sink)
        return pa.ipc.read_tensor(pa.py_buffer(slot)).to_numpy()

    rows.append(Row(raw_row, _median(raw, reps), nbytes=src.nbytes))
    rows.append(Row(f"slot format: Arrow tensor IPC, {size_mb} MB", _median(arrow, reps), raw_row, nbytes=src.nbytes))


def print_table(rows: list[Row]) -> None:
    by_name = {r.name: r for r in rows}
    print(f"\n{'row':46} {'p50 ms':>9} {'GB/s':>6}  {'vs floor':>8}  {'target':>18}")
    for r in rows:
        gbs = f"{r.nbytes / r.seconds / 1e9:6.2f}" if r.nbytes else " " * 6
        ratio = f"{r.seconds / by_name[r.floor].seconds:7.2f}x" if r.floor else " (floor)"
        target = ""
        if r.target:
            against, want, op = r.target
            got = r.seconds / by_name[against].seconds
            met = got <= want if op == "<=" else got >= want
            if want < 1:
                target = f"{1 / got:5.1f}x faster, want >= {1 / want:.0f}x {'met' if met else 'MISSED'}"
            else:
                target = f"{got:5.2f}x, want <= {want}x {'met' if met else 'MISSED'}"
        print(f"{r.name:46} {r.seconds * 1e3:9.3f} {gbs}  {ratio:>8}  {target}")
    print("\nfloors: '(floor)' rows; ratios are p50 / the floor's p50 (small calls: the echo on "
          "the same socket; large: torch in process; training: the PyTorch step).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per small-call row")
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--steps", type=int, default=30, help="training steps per row")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(THREADS)
    tmp = tempfile.mkdtemp(prefix="p2j-bench-")
    cmd = [sys.executable, "-m", "pytorch2jax_server", "--torch-threads", str(THREADS)]
    cmd += ["--listen", f"unix://{tmp}/w.sock", "--listen", "127.0.0.1:0"]
    for name, target in MODELS.items():
        cmd += ["--model", f"{name}={target}"]
    worker, worker_addrs = _start(cmd)
    echo, echo_addrs = _start([sys.executable, "-c", ECHO_SERVER, f"{tmp}/echo.sock"])
    rows: list[Row] = []
    try:
        small_calls(rows, worker_addrs, echo_addrs, args.calls)
        large_tensors(rows, worker_addrs, echo_addrs, args.sizes_mb)
        training_step(rows, worker_addrs, args.steps)
        arrow_vs_raw(rows, 64, 10)
    finally:
        for proc in (worker, echo):
            proc.terminate()
            proc.wait()
    print(f"\n{THREADS} CPU threads for torch, worker and in process alike; jax {jax.__version__}, "
          f"torch {torch.__version__}")
    print_table(rows)


if __name__ == "__main__":
    main()
