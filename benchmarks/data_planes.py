"""The data planes measured: small calls, large tensors, a training step, each beside its floor.

Prints one table; every row is measured in this run (medians of repeated calls), and each
row shows its ratio to its floor and, where the project has one, its target:

- small calls: the 10x10 Linear of the original README under ``jax.jit``, forward and
  forward + VJP, through the worker inline over TCP, inline over a unix socket, and by
  shared memory; floors: a bare gRPC echo of the same request bytes on the same socket;
- small calls in process (``convert_pytnn_to_jax``): the same Linear, and a BatchNorm
  model with its statistics the module's own or given (and so copied); floor: torch;
- large tensors: ``2 * x`` for 1, 16, 64 and 256 MB in and out, forward and forward + VJP,
  inline and by shared memory, and in process (also ``x.mul_(2)``, whose input is then
  copied); floors: memcpy of the same bytes, a bare gRPC echo of the
  same inline payload, and the same torch function called in process;
- a training step (JAX + optax Adam) through a served 3-layer MLP 1024 wide at batch 256,
  against the same step in plain PyTorch in process;
- JAX transformations: ``vmap`` at B=32 against B=1 on the 10x10 Linear; per-example
  gradients (``jit(vmap(grad))``) of the example MLP at B=64 against
  ``torch.func.vmap(torch.func.grad)`` in process; ``jvp`` and a Hessian-vector product
  against ``torch.func`` in process; in process and through the worker by shared memory;
- Arrow's tensor IPC format against raw slots, for the slot format (see
  ``pytorch2jax._transports.shm``).

- on a GPU (``--sections gpu``, which ``scripts/gpu-check.sh`` runs there): a worker
  serving on the GPU through CUDA IPC and the in-process API on GPU arrays, small calls,
  1/64/256 MB ``2 * x`` forward and forward + VJP (GB/s), and the training step; floors:
  device-to-device copies of the same bytes, torch on the GPU, the gRPC echo and the
  PyTorch step on the GPU (``--gpu-dry-run`` runs those rows on the CPU, to try them).

    python benchmarks/data_planes.py [--calls 500] [--sizes-mb 1 16 64 256]
        [--sections small large train transforms arrow gpu] [--gpu-sizes-mb 1 64 256]
        [--gpu-dry-run] [--json PATH]

It needs the client and the server extras (torch runs in this process for the floors).
"""

from __future__ import annotations

import argparse
import contextlib
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
    "mlp": "pytorch2jax_server.examples:mlp()",
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


def _forward_request(model: str, params: dict, x: jax.Array) -> bytes:
    """The bytes of an inline Forward request for ``model(x)``: what a bare echo sends."""
    return pb.ForwardRequest(
        model=model,
        arguments=values.encode_arguments((np.asarray(x),), {}, tensors.to_wire),
        parameters=[
            pb.NamedTensor(name=n, tensor=tensors.to_wire(np.asarray(v))) for n, v in params.items()
        ],
    ).SerializeToString()


def small_calls(rows: list[Row], worker: list[str], echo: list[str], calls: int) -> None:
    import torch

    x = jnp.ones((10, 10), jnp.float32)
    for label, w_addr, e_addr, transport in (
        ("inline, TCP", worker[1], echo[1], "inline"),
        ("inline, unix socket", worker[0], echo[0], "inline"),
        ("shm, unix socket", worker[0], echo[0], "shm"),
        ("fast lane, unix socket", worker[0], echo[0], "lane"),
    ):
        with pytorch2jax.connect(w_addr, transport=transport) as client:
            apply_fn, params = client.convert_pytnn_to_jax("linear10")
            floor = f"small: bare gRPC echo, {label.split(', ')[1]}"
            if not any(r.name == floor for r in rows):
                request = _forward_request("linear10", params, x)
                rows.append(Row(floor, _echo(e_addr, request, calls)))
                echo_bytes = len(request)
            fwd = jax.jit(apply_fn)
            # The fast lane's targets (issue 17): below gRPC's floor on one host.
            lane = transport == "lane"
            rows.append(
                Row(
                    f"small: jit forward, {label}",
                    _median(lambda: fwd(params, x).block_until_ready(), calls),
                    floor,
                    target=(floor, 0.35, "<=") if lane else None,
                )
            )
            vg = jax.jit(jax.value_and_grad(lambda p, x: apply_fn(p, x).sum(), argnums=(0, 1)))
            rows.append(
                Row(
                    f"small: jit forward+VJP, {label}",
                    _median(lambda: jax.block_until_ready(vg(params, x)), calls),
                    floor,
                    target=(floor, 0.8, "<=") if lane else None,
                )
            )
    lin, tx = torch.nn.Linear(10, 10), torch.ones(10, 10)
    with torch.no_grad():
        rows.append(Row("small: torch Linear in process", _median(lambda: lin(tx), calls)))
    # Floors below gRPC: a raw unix-socket round trip of the echo's bytes, and a bare
    # buffer_callback (what any in-process bridge under jit pays at the least).
    rows.append(
        Row(f"small: raw unix-socket ping-pong, {echo_bytes} B", _ping_pong(echo_bytes, calls))
    )
    identity = jax.jit(_bare_buffer_callback)
    rows.append(
        Row(
            "small: bare buffer_callback identity",
            _median(lambda: identity(x).block_until_ready(), calls),
        )
    )
    peer = _wrap_torch2jax_rows(rows, x, calls)
    # The in-process API: the weights reach torch zero-copy; buffers given with them
    # (BatchNorm statistics, which torch may update in place) always run on copies.
    floor = "small: torch Linear in process"
    apply_fn, params = pytorch2jax.convert_pytnn_to_jax(torch.nn.Linear(10, 10))
    fwd = jax.jit(apply_fn)
    rows.append(
        Row(
            "small: jit forward, pytorch2jax in process",
            _median(lambda: fwd(params, x).block_until_ready(), calls),
            peer[0] or floor,
            target=(peer[0], 1.0, "<=") if peer[0] else None,
        )
    )
    vag = jax.jit(jax.value_and_grad(lambda p, x: apply_fn(p, x).sum(), argnums=(0, 1)))
    rows.append(
        Row(
            "small: jit forward+VJP, pytorch2jax in process",
            _median(lambda: jax.block_until_ready(vag(params, x)), calls),
            peer[1] or floor,
            target=(peer[1], 1.0, "<=") if peer[1] else None,
        )
    )
    bn = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.BatchNorm1d(10)).eval()
    bn_apply, bn_params = pytorch2jax.convert_pytnn_to_jax(bn)
    stats = {n: jnp.asarray(b.numpy()) for n, b in bn.named_buffers() if b.is_floating_point()}
    bn_fwd = jax.jit(bn_apply)
    for label, given in (("module's own", bn_params), ("given, copied", {**bn_params, **stats})):
        rows.append(
            Row(
                f"small: jit forward, in process, BatchNorm stats {label}",
                _median(lambda given=given: bn_fwd(given, x).block_until_ready(), calls),
                floor,
            )
        )


def _ping_pong(nbytes: int, calls: int) -> float:
    """A round trip of ``nbytes`` over a unix socket pair, to a thread that echoes."""
    import socket
    import threading

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    payload = b"x" * nbytes

    def echo() -> None:
        while data := theirs.recv(1 << 16):
            theirs.sendall(data)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()

    def once() -> None:
        ours.sendall(payload)
        got = 0
        while got < nbytes:
            got += len(ours.recv(1 << 16))

    try:
        return _median(once, calls)
    finally:
        ours.close()
        thread.join(timeout=5)
        theirs.close()


def _bare_buffer_callback(x: jax.Array) -> jax.Array:
    from jax.experimental.buffer_callback import buffer_callback

    def copy(ctx, out, x) -> None:
        np.copyto(np.asarray(out), np.asarray(x))

    return buffer_callback(copy, jax.ShapeDtypeStruct(x.shape, x.dtype))(x)


def _wrap_torch2jax_rows(rows: list[Row], x: jax.Array, calls: int) -> tuple[str | None, str | None]:
    """The lightest in-process peer, rdyro/torch2jax (``wrap-torch2jax``, the dev extra),
    on the same Linear: its rows' names, or (None, None) where it is not installed. Its
    first use compiles a C++ extension (minutes on 2 cores; cached after)."""
    try:
        import torch
        from wrap_torch2jax import torch2jax
    except ImportError:
        print("wrap-torch2jax is not installed: no peer rows (pip install wrap-torch2jax)")
        return None, None
    lin = torch.nn.Linear(10, 10)
    w, b = lin.weight.detach(), lin.bias.detach()
    fn = torch2jax(lambda w, b, x: torch.nn.functional.linear(x, w, b), w, b, torch.ones(10, 10))
    jw, jb = jnp.asarray(w.numpy()), jnp.asarray(b.numpy())
    fwd = jax.jit(fn)
    vag = jax.jit(jax.value_and_grad(lambda w, b, x: fn(w, b, x).sum(), argnums=(0, 1, 2)))
    names = ("small: jit forward, wrap-torch2jax in process", "small: jit forward+VJP, wrap-torch2jax in process")
    rows.append(Row(names[0], _median(lambda: fwd(jw, jb, x).block_until_ready(), calls)))
    rows.append(Row(names[1], _median(lambda: jax.block_until_ready(vag(jw, jb, x)), calls)))
    return names


def large_tensors(
    rows: list[Row], worker: list[str], echo: list[str], sizes_mb: list[int]
) -> None:
    import torch

    clients = {t: pytorch2jax.connect(worker[0], transport=t) for t in ("inline", "shm", "lane")}
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
            # In process: zero-copy in, one copy out; an input torch writes into is
            # copied before every call (JAX arrays never change).
            local = jax.jit(pytorch2jax.py_to_jax_wrapper(lambda t: t * 2))
            rows.append(
                Row(
                    f"{tag} jit forward, pytorch2jax in process",
                    _median(lambda: local(x).block_until_ready(), reps, warmup=1),
                    in_process,
                    nbytes=2 * nbytes,
                )
            )
            writing = jax.jit(pytorch2jax.py_to_jax_wrapper(lambda t: t.mul_(2)))
            rows.append(
                Row(
                    f"{tag} jit forward, in process, written in place (copied)",
                    _median(lambda: writing(x).block_until_ready(), reps, warmup=1),
                    in_process,
                    nbytes=2 * nbytes,
                )
            )
            for transport, client in clients.items():
                double = client.py_to_jax_wrapper("double")
                fwd = jax.jit(double)
                name = f"{tag} jit forward, {transport}"
                target = None
                if transport == "lane" and size == 64:  # issue 17: near the in-process call
                    target = (f"{tag} jit forward, pytorch2jax in process", 1.15, "<=")
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


def _train_batch() -> tuple[np.ndarray, np.ndarray]:
    """The training step's batch: 256 examples of 1024 in and 1024 out."""
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((256, 1024), np.float32),
        rng.standard_normal((256, 1024), np.float32),
    )


def _torch_train_step(model, xb: np.ndarray, yb: np.ndarray) -> Callable[[], None]:
    """One PyTorch + Adam step of ``model`` on (xb, yb), on the model's device."""
    import torch

    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    tx, ty = torch.from_numpy(xb).to(device), torch.from_numpy(yb).to(device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = ((model(tx) - ty) ** 2).mean()
        loss.backward()
        opt.step()

    return step


def _jax_train_step(apply_fn, params, x: jax.Array, y: jax.Array) -> Callable[[], None]:
    """One jitted JAX + optax Adam step of ``apply_fn`` on (x, y), waited for; each call
    trains on from the last."""
    optimizer = optax.adam(1e-4)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((apply_fn(p, x) - y) ** 2))(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    carry = [params, optimizer.init(params)]

    def once() -> None:
        carry[0], carry[1], loss = step(carry[0], carry[1], x, y)
        loss.block_until_ready()

    return once


def training_step(rows: list[Row], worker: list[str], steps: int) -> None:
    from pytorch2jax_server.examples import wide_mlp

    xb, yb = _train_batch()

    floor = "train: PyTorch step in process"
    rows.append(Row(floor, _median(_torch_train_step(wide_mlp(), xb, yb), steps)))
    x, y = jnp.asarray(xb), jnp.asarray(yb)
    for transport in ("inline", "shm", "lane", "in process"):
        if transport == "in process":
            apply_fn, params = pytorch2jax.convert_pytnn_to_jax(wide_mlp())
            client = contextlib.nullcontext()
        else:
            client = pytorch2jax.connect(worker[0], transport=transport)
            apply_fn, params = client.convert_pytnn_to_jax("wide_mlp")
        with client:
            jax_step = _jax_train_step(apply_fn, params, x, y)
            # Issue 17's targets: through the worker within 1.3x of PyTorch, in process 1.15x.
            want = {"lane": 1.3, "in process": 1.15}.get(transport)
            target = (floor, want, "<=") if want else None
            rows.append(Row(f"train: JAX+optax step, {transport}", _median(jax_step, steps), floor, target=target))


def transforms(rows: list[Row], worker: list[str], calls: int) -> None:
    import torch

    from pytorch2jax_server import examples

    mlp = examples.mlp()
    tm = {n: p.detach() for n, p in mlp.named_parameters()}
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((64, 8), np.float32)
    ys = rng.standard_normal((64, 1), np.float32)
    v = rng.standard_normal((64, 8), np.float32)

    def tloss(p, x, y):
        return ((torch.func.functional_call(mlp, p, (x,)) - y) ** 2).sum()

    per_example_floor = "transforms: torch.func.vmap(grad) MLP B=64"
    per_example = torch.func.vmap(torch.func.grad(tloss), in_dims=(None, 0, 0))
    txs, tys, tv = torch.from_numpy(xs), torch.from_numpy(ys), torch.from_numpy(v)
    rows.append(Row(per_example_floor, _median(lambda: per_example(tm, txs, tys), calls)))
    tf = lambda x: torch.func.functional_call(mlp, tm, (x,))  # noqa: E731
    jvp_floor = "transforms: torch.func.jvp MLP B=64"
    rows.append(Row(jvp_floor, _median(lambda: torch.func.jvp(tf, (txs,), (tv,)), calls)))
    tsum = lambda x: (tf(x) ** 2).sum()  # noqa: E731
    hvp_floor = "transforms: torch.func hvp MLP B=64"
    rows.append(
        Row(hvp_floor, _median(lambda: torch.func.jvp(torch.func.grad(tsum), (txs,), (tv,)), calls))
    )
    clients = {"in process": None, "worker shm": pytorch2jax.connect(worker[0], transport="shm")}
    try:
        for where, client in clients.items():
            if client is None:
                lin_fn, lin_p = pytorch2jax.convert_pytnn_to_jax(examples.linear10())
                mlp_fn, mlp_p = pytorch2jax.convert_pytnn_to_jax(examples.mlp())
            else:
                lin_fn, lin_p = client.convert_pytnn_to_jax("linear10")
                mlp_fn, mlp_p = client.convert_pytnn_to_jax("mlp")
            batched = jax.jit(jax.vmap(lin_fn, in_axes=(None, 0)))
            one = f"transforms: jit vmap Linear10 B=1, {where}"
            x1, x32 = jnp.ones((1, 10)), jnp.ones((32, 10))
            rows.append(Row(one, _median(lambda: batched(lin_p, x1).block_until_ready(), calls)))
            rows.append(
                Row(
                    f"transforms: jit vmap Linear10 B=32, {where}",
                    _median(lambda: batched(lin_p, x32).block_until_ready(), calls),
                    one,
                    target=(one, 2.0, "<="),
                )
            )

            def loss(p, x, y):
                return ((mlp_fn(p, x) - y) ** 2).sum()

            grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))
            jx, jy, jv = jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(v)
            rows.append(
                Row(
                    f"transforms: jit(vmap(grad)) MLP B=64, {where}",
                    _median(lambda: jax.block_until_ready(grads(mlp_p, jx, jy)), calls),
                    per_example_floor,
                    target=(per_example_floor, 3.0, "<="),
                )
            )
            f = lambda x: mlp_fn(mlp_p, x)  # noqa: E731
            jvp = jax.jit(lambda x, v: jax.jvp(f, (x,), (v,)))
            rows.append(
                Row(
                    f"transforms: jit jvp MLP B=64, {where}",
                    _median(lambda: jax.block_until_ready(jvp(jx, jv)), calls),
                    jvp_floor,
                )
            )
            total = lambda x: (f(x) ** 2).sum()  # noqa: E731
            hvp = jax.jit(lambda x, v: jax.jvp(jax.grad(total), (x,), (v,))[1])
            rows.append(
                Row(
                    f"transforms: jit hvp MLP B=64, {where}",
                    _median(lambda: jax.block_until_ready(hvp(jx, jv)), calls),
                    hvp_floor,
                )
            )
    finally:
        for client in clients.values():
            if client is not None:
                client.close()


def gpu_rows(
    rows: list[Row], echo: list[str], sizes_mb: list[int], calls: int, steps: int, *, dry_run: bool
) -> None:
    """Issue 18's rows: a worker serving on the GPU, reached by CUDA IPC from JAX arrays on
    the same GPU, and the in-process API on GPU arrays; floors: device-to-device copies of
    the same bytes, torch on the GPU in process, a bare gRPC echo (CUDA IPC calls go by
    gRPC), and the PyTorch training step on the GPU.

    ``dry_run`` runs the same rows on the CPU (torch on the CPU, shared memory for CUDA
    IPC), to try this code where there is no GPU; its figures mean nothing for the GPU."""
    import torch

    from pytorch2jax_server.examples import linear10, wide_mlp

    device = "cpu" if dry_run else "cuda"
    transport = "shm" if dry_run else "cuda_ipc"
    head = "gpu (dry run on the CPU)" if dry_run else "gpu"
    if not dry_run and not (torch.cuda.is_available() and jax.default_backend() == "gpu"):
        print("no gpu rows: they need CUDA torch and a JAX whose default backend is a GPU")
        return

    def sync() -> None:
        if not dry_run:
            torch.cuda.synchronize()

    def timed(fn: Callable[[], object]) -> Callable[[], None]:
        return lambda: (fn(), sync())

    def add(row: Row) -> None:
        # Printed as measured too: a run cut short on the GPU machine still says something.
        rows.append(row)
        print(f"{row.name}: {row.seconds * 1e3:.3f} ms", flush=True)

    tmp = tempfile.mkdtemp(prefix="p2j-bench-gpu-")
    cmd = [sys.executable, "-m", "pytorch2jax_server", "--device", device, "--torch-threads",
           str(THREADS), "--listen", f"unix://{tmp}/w.sock"]  # fmt: skip
    for name in ("linear10", "double", "wide_mlp"):
        cmd += ["--model", f"{name}={MODELS[name]}"]
    worker, addresses = _start(cmd)
    client = pytorch2jax.connect(addresses[0], transport=transport)
    try:
        # Small calls: through the worker, and in process on GPU arrays.
        x = jnp.ones((10, 10), jnp.float32)
        apply_fn, params = client.convert_pytnn_to_jax("linear10")
        echo_row = f"{head} small: bare gRPC echo, unix socket"
        add(Row(echo_row, _echo(echo[0], _forward_request("linear10", params, x), calls)))
        fwd = jax.jit(apply_fn)
        add(
            Row(
                f"{head} small: jit forward, {transport}",
                _median(lambda: fwd(params, x).block_until_ready(), calls),
                echo_row,
            )
        )
        lin, tx = linear10().to(device), torch.ones(10, 10, device=device)
        torch_row = f"{head} small: torch Linear in process"
        with torch.no_grad():
            add(Row(torch_row, _median(timed(lambda: lin(tx)), calls)))
        local_fn, local_params = pytorch2jax.convert_pytnn_to_jax(linear10().to(device))
        local = jax.jit(local_fn)
        add(
            Row(
                f"{head} small: jit forward, in process",
                _median(lambda: local(local_params, x).block_until_ready(), calls),
                torch_row,
            )
        )
        vag = jax.jit(jax.value_and_grad(lambda p, x: local_fn(p, x).sum(), argnums=(0, 1)))
        add(
            Row(
                f"{head} small: jit forward+VJP, in process",
                _median(lambda: jax.block_until_ready(vag(local_params, x)), calls),
                torch_row,
            )
        )

        # Large tensors: 2 * x in and out; GB/s counts the bytes in plus the bytes out.
        double = client.py_to_jax_wrapper("double")
        local_double = jax.jit(pytorch2jax.py_to_jax_wrapper(lambda t: t * 2))
        for size in sizes_mb:
            nbytes, tag = size * MB, f"{head} {size} MB:"
            reps = _reps(nbytes)
            n = nbytes // 4
            src = [torch.ones(n, device=device) for _ in range(4)]
            dst = [torch.empty(n, device=device) for _ in range(4)]
            copies = {}
            for k in (2, 4):  # in + out; and in + out + cotangent + gradient
                copies[k] = f"{tag} device-to-device copy, {k} x {size} MB"
                copy = lambda k=k: [d.copy_(s) for d, s in zip(dst[:k], src[:k])]  # noqa: E731
                add(Row(copies[k], _median(timed(copy), reps), nbytes=k * nbytes))
            torch_fwd = f"{tag} torch 2*x in process"
            with torch.no_grad():
                add(Row(torch_fwd, _median(timed(lambda: src[0] * 2), reps), nbytes=2 * nbytes))
            del src, dst
            xs = jnp.ones(n, jnp.float32)
            # Issue 18: 256 MB in + out through CUDA IPC at half the copy's bandwidth or more.
            target = (copies[2], 0.5, "bw>=") if size == 256 else None
            fwd = jax.jit(double)
            add(
                Row(
                    f"{tag} jit forward, {transport}",
                    _median(lambda: fwd(xs).block_until_ready(), reps, warmup=1),
                    copies[2],
                    nbytes=2 * nbytes,
                    target=target,
                )
            )
            fwd_vjp = jax.jit(lambda x: jax.vjp(double, x)[1](x))
            add(
                Row(
                    f"{tag} jit forward+VJP, {transport}",
                    _median(lambda: jax.block_until_ready(fwd_vjp(xs)), reps, warmup=1),
                    copies[4],
                    nbytes=4 * nbytes,
                )
            )
            add(
                Row(
                    f"{tag} jit forward, in process",
                    _median(lambda: local_double(xs).block_until_ready(), reps, warmup=1),
                    torch_fwd,
                    nbytes=2 * nbytes,
                )
            )
            del xs

        # The training step, through the worker and in process, against PyTorch's.
        xb, yb = _train_batch()
        floor = f"{head} train: PyTorch step"
        add(Row(floor, _median(timed(_torch_train_step(wide_mlp().to(device), xb, yb)), steps)))
        x, y = jnp.asarray(xb), jnp.asarray(yb)
        served = client.convert_pytnn_to_jax("wide_mlp")
        in_process = pytorch2jax.convert_pytnn_to_jax(wide_mlp().to(device))
        for where, (fn, params) in ((transport, served), ("in process", in_process)):
            jax_step = _jax_train_step(fn, params, x, y)
            # Issue 18: through the worker on the GPU within 1.3x of PyTorch on the GPU.
            target = (floor, 1.3, "<=") if where == transport else None
            add(Row(f"{head} train: JAX+optax step, {where}", _median(jax_step, steps), floor, target=target))
    finally:
        client.close()
        worker.terminate()
        worker.wait()


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


def _against_target(r: Row, by_name: dict[str, Row]) -> tuple[float, bool]:
    """A row's figure as its target states it, and whether it meets it: a ratio of times
    ("<=", ">="), or a fraction of the other row's bandwidth ("bw>=")."""
    assert r.target is not None
    against, want, op = r.target
    other = by_name[against]
    if op == "bw>=":
        got = (r.nbytes / r.seconds) / (other.nbytes / other.seconds)
        return got, got >= want
    got = r.seconds / other.seconds
    return got, (got <= want if op == "<=" else got >= want)


def write_json(rows: list[Row], path: str) -> None:
    """The rows as JSON (for scripts/gpu-check.sh): each with its p50, GB/s, floor and
    ratio to it, and its target and whether it was met."""
    import json

    by_name = {r.name: r for r in rows}
    out = []
    for r in rows:
        entry = {"row": r.name, "p50_s": r.seconds, "floor": r.floor}
        if r.nbytes:
            entry["gb_per_s"] = r.nbytes / r.seconds / 1e9
        if r.floor:
            entry["vs_floor"] = r.seconds / by_name[r.floor].seconds
        if r.target:
            got, met = _against_target(r, by_name)
            entry["target"] = {"against": r.target[0], "want": f"{r.target[2]} {r.target[1]}", "got": got, "met": met}
        out.append(entry)
    with open(path, "w") as f:
        json.dump({"jax": jax.__version__, "rows": out}, f, indent=1)


def print_table(rows: list[Row]) -> None:
    by_name = {r.name: r for r in rows}
    print(f"\n{'row':64} {'p50 ms':>9} {'GB/s':>6}  {'vs floor':>8}  {'target':>18}")
    for r in rows:
        gbs = f"{r.nbytes / r.seconds / 1e9:6.2f}" if r.nbytes else " " * 6
        ratio = f"{r.seconds / by_name[r.floor].seconds:7.2f}x" if r.floor else " (floor)"
        target = ""
        if r.target:
            got, met = _against_target(r, by_name)
            _, want, op = r.target
            if op == "bw>=":
                target = f"{got:5.2f} of its GB/s, want >= {want} {'met' if met else 'MISSED'}"
            else:
                # The ratio as the target states it; below 1 also as a speed-up, which reads easier.
                faster = f" ({1 / got:.1f}x faster)" if want < 1 else ""
                target = f"{got:5.2f}x{faster}, want {op} {want}x {'met' if met else 'MISSED'}"
        print(f"{r.name:64} {r.seconds * 1e3:9.3f} {gbs}  {ratio:>8}  {target}")
    print("\nfloors: '(floor)' rows; ratios are p50 / the floor's p50 (small calls: the echo on "
          "the same socket; large: torch in process; training: the PyTorch step).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per small-call row")
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--gpu-sizes-mb", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--steps", type=int, default=30, help="training steps per row")
    # "gpu" needs a GPU (scripts/gpu-check.sh runs it there): it is not in the default run.
    sections = ("small", "large", "train", "transforms", "arrow", "gpu")
    parser.add_argument("--sections", nargs="+", choices=sections, default=list(sections[:-1]))
    parser.add_argument(
        "--gpu-dry-run",
        action="store_true",
        help="run the gpu section's rows on the CPU (to try them where there is no GPU)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows to PATH as JSON")
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
        if "small" in args.sections:
            small_calls(rows, worker_addrs, echo_addrs, args.calls)
        if "large" in args.sections:
            large_tensors(rows, worker_addrs, echo_addrs, args.sizes_mb)
        if "train" in args.sections:
            training_step(rows, worker_addrs, args.steps)
        if "transforms" in args.sections:
            transforms(rows, worker_addrs, args.calls)
        if "arrow" in args.sections:
            arrow_vs_raw(rows, 64, 10)
        if "gpu" in args.sections:
            gpu_rows(rows, echo_addrs, args.gpu_sizes_mb, args.calls, args.steps, dry_run=args.gpu_dry_run)
    finally:
        for proc in (worker, echo):
            proc.terminate()
            proc.wait()
    print(f"\n{THREADS} CPU threads for torch, worker and in process alike; jax {jax.__version__}, "
          f"torch {torch.__version__}")
    print_table(rows)
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()
