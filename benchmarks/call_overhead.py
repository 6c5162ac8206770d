"""Per-call overhead of a small model through the worker, beside its floors.

Prints one table, all rows measured in this run (medians of repeated calls):

- floors: a bare gRPC echo of the same request bytes (a Python gRPC server with the
  worker's settings, same transport), a jitted ``buffer_callback`` identity, and the same
  torch Linear called in process;
- the 10x10 Linear of the original README under ``jax.jit``: forward, and forward + VJP
  (``value_and_grad``), through the worker over a unix socket and over TCP, and in process.

    python benchmarks/call_overhead.py [--calls 500]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import grpc
import jax
import jax.numpy as jnp
import numpy as np

import pytorch2jax
from pytorch2jax_protocol import DEFAULT_MAX_MESSAGE_BYTES, channel_options, pb, tensors, values

READY = "listening on"

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


def _start(cmd: list[str]) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if READY not in line:
        proc.kill()
        raise RuntimeError(f"{cmd[0]} did not start: {line!r}")
    return proc, line.split(READY, 1)[1].split()


def _time(fn: Callable[[], object], calls: int) -> list[float]:
    for _ in range(max(10, calls // 10)):
        fn()
    samples = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="p2j-bench-")
    worker, worker_addrs = _start(
        [sys.executable, "-m", "pytorch2jax_server", "--listen", f"unix://{tmp}/w.sock",
         "--listen", "127.0.0.1:0", "--model", "linear10=pytorch2jax_server.examples:linear10()"]
    )
    echo, echo_addrs = _start([sys.executable, "-c", ECHO_SERVER, f"{tmp}/echo.sock"])
    rows: list[tuple[str, list[float], str | None]] = []
    try:
        x = jnp.ones((10, 10), jnp.float32)
        for transport, w_addr, e_addr in zip(("unix socket", "TCP"), worker_addrs, echo_addrs):
            with pytorch2jax.connect(w_addr) as client:
                apply_fn, params = client.convert_pytnn_to_jax("linear10")
                request = pb.ForwardRequest(
                    model="linear10",
                    arguments=values.encode_arguments((np.asarray(x),), {}, tensors.to_wire),
                    parameters=[pb.NamedTensor(name=n, tensor=tensors.to_wire(np.asarray(v))) for n, v in params.items()],
                ).SerializeToString()
                with grpc.insecure_channel(e_addr, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES)) as ch:
                    call = ch.unary_unary("/bench.Echo/Echo")
                    floor = f"echo {transport}"
                    rows.append((floor, _time(lambda: call(request, timeout=10), args.calls), None))
                fwd = jax.jit(apply_fn)
                rows.append((f"jit forward, {transport}", _time(lambda: fwd(params, x).block_until_ready(), args.calls), floor))
                vg = jax.jit(jax.value_and_grad(lambda p, x: apply_fn(p, x).sum(), argnums=(0, 1)))
                rows.append((f"jit forward+VJP, {transport}", _time(lambda: jax.block_until_ready(vg(params, x)), args.calls), floor))

        from jax.experimental.buffer_callback import buffer_callback

        def identity(ctx, out, a):
            np.asarray(out)[...] = np.asarray(a)

        ident = jax.jit(buffer_callback(identity, jax.ShapeDtypeStruct(x.shape, x.dtype)))
        rows.append(("jit buffer_callback identity", _time(lambda: ident(x).block_until_ready(), args.calls), None))
        try:
            import torch
        except ImportError:  # a client-only environment: no in-process rows
            pass
        else:
            torch.set_num_threads(1)
            lin, tx = torch.nn.Linear(10, 10), torch.ones(10, 10)
            with torch.no_grad():
                rows.append(("torch Linear in process", _time(lambda: lin(tx), args.calls), None))
            local_fn, local_params = pytorch2jax.convert_pytnn_to_jax(lin)
            floor = "jit buffer_callback identity"
            local = jax.jit(local_fn)
            rows.append(("jit forward, in process", _time(lambda: local(local_params, x).block_until_ready(), args.calls), floor))
            local_vg = jax.jit(jax.value_and_grad(lambda p, x: local_fn(p, x).sum(), argnums=(0, 1)))
            rows.append(("jit forward+VJP, in process", _time(lambda: jax.block_until_ready(local_vg(local_params, x)), args.calls), floor))
    finally:
        for proc in (worker, echo):
            proc.terminate()
            proc.wait()

    medians = {name: statistics.median(s) for name, s, _ in rows}
    print(f"\n10x10 float32 Linear, {args.calls} calls each; times in microseconds\n")
    print(f"{'row':34} {'p50':>8} {'p90':>8}  {'vs floor':>18}")
    for name, samples, floor in rows:
        p50, p90 = medians[name], statistics.quantiles(samples, n=10)[-1]
        ratio = f"{p50 / medians[floor]:.2f}x {floor}" if floor else "(floor)"
        print(f"{name:34} {p50 * 1e6:8.0f} {p90 * 1e6:8.0f}  {ratio}")


if __name__ == "__main__":
    main()
