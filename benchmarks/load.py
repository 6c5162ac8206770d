"""Load on one worker: many client processes at once, over every transport, checked.

Starts its own worker (a unix socket and TCP 127.0.0.1, both loopback) serving the ``mlp``
and ``convnet`` examples, then runs ``--clients`` client processes at once (``spawn``), a
third each on the fast lane (``lane``) and on ``shm`` over the unix socket, and on
``inline`` over TCP. Each makes
``--calls`` calls, mixing eager and ``jit`` forwards and VJPs on both models, in its own
order, with its own parameters and inputs, so that one client's numbers cannot pass for
another's. Inputs are large enough to travel in shared memory on ``lane`` and ``shm`` (mlp 512x8 and
convnet 8x3x32x32 float32, over ``DEFAULT_INLINE_BELOW``).

Every result is checked: shapes and dtypes, finite, close to a pure-JAX reference of the
model, and bit for bit equal to the first result of the same call in that client. Any
exception, or a failed check, is an error, recorded by class and message.

Phases: a warm-up (every client makes every kind of call, all at once, so the worker's
threads and allocator warm up); a barrier, where the worker's RSS and its own counts
(``GetWorkerStats``: sessions, regions, residuals, calls served) are read; the measured
run; the same again, while every client still holds its session; and once more after the
clients closed. Prints one table (calls, p50, p99 per transport, model and kind),
throughput, errors, and the worker's memory and counts. Exits 1 if any call failed, the
worker's VmRSS grew by more than ``--max-rss-growth`` over the measured run, it holds a
residual after the last VJP or a session after the clients closed, a shared-memory
segment was left in /dev/shm, or the whole run took longer than ``--timeout`` seconds.
The worker, the clients and the temporary directory are cleaned up whatever happens (on
SIGKILL the worker and the clients still go, by PR_SET_PDEATHSIG; the directory stays).

The worker's RSS with glibc's default malloc arenas (8 per core): it rises by about 1% over
16 x 500 calls, and by 4-6% over 16 x 4000, most of it in the run's first seconds, as the
worker's thread pool grows past its size after the warm-up (each new thread may take a new
arena), then creeps by a few MiB; a warm-up 8 times longer did not change that. With
``--malloc-arena-max 2`` the same 16 x 4000 run stayed flat (+1%) and used ~30 MiB less.
The calls the worker counts match those made, and it holds no residual or session after:
allocator behaviour, not a leak.

    python benchmarks/load.py [--clients 16] [--calls 500] [--warmup-rounds 5]
                              [--timeout 600] [--max-rss-growth 0.10]

It needs the client and the server extras (the worker is this Python's
``pytorch2jax_server``); this process and the clients never import torch.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import functools
import multiprocessing
import math
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

READY_PREFIX = "pytorch2jax-server listening on"
MODELS = {
    "mlp": "pytorch2jax_server.examples:mlp()",
    "convnet": "pytorch2jax_server.examples:convnet()",
}
#: Inputs per model: over the shm transport's inline threshold (8 KiB), so they travel in
#: shared memory there.
INPUT_SHAPES = {"mlp": (512, 8), "convnet": (8, 3, 32, 32)}
KINDS = ("forward", "vjp", "jit forward", "jit vjp")
TRANSPORTS = ("lane", "shm", "inline")
if os.environ.get("PYTORCH2JAX_FAST_LANE", "on").lower() == "off":  # the suite's lane-off run
    TRANSPORTS = ("shm", "inline")

DEFAULT_CLIENTS = 16
DEFAULT_CALLS = 500
DEFAULT_WARMUP_ROUNDS = 5
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_RSS_GROWTH = 0.10
DEFAULT_TORCH_THREADS = 1
#: The worker's default --max-sessions (not imported: this script never imports torch);
#: more clients need more.
WORKER_MAX_SESSIONS = 64
#: Distinct errors printed; all are counted.
SHOWN_ERRORS = 10
#: Against the pure-JAX reference, relative to the largest entry of each output (torch and
#: XLA sum in different orders; a convolution's weight gradient sums thousands of terms).
RTOL, ATOL = 1e-4, 1e-6
_PR_SET_PDEATHSIG = 1
_SHM_PREFIX = "p2j-"
_POLL_S = 0.5
#: How long the worker may take to end the sessions of clients that exited.
CLOSE_SETTLE_S = 5.0


class _Abort(Exception):
    """The run cannot go on: it went past ``--timeout``, or the worker exited."""


class _CheckFailed(Exception):
    """A result was wrong: shape, dtype, not finite, far from the reference, or not
    equal to the first result of the same call."""


# -- the worker ------------------------------------------------------------------------


def _die_with_parent() -> None:
    # Linux: the worker and the clients get SIGTERM if the process that started them dies
    # without cleaning up (SIGKILL).
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _start_worker(tmp: str, args: argparse.Namespace, deadline: float, state: dict):
    cmd = [sys.executable, "-m", "pytorch2jax_server", "--torch-threads", str(args.torch_threads)]
    cmd += ["--listen", f"unix://{tmp}/w.sock", "--listen", "127.0.0.1:0"]
    for name, target in MODELS.items():
        cmd += ["--model", f"{name}={target}"]
    if args.clients > WORKER_MAX_SESSIONS:  # every client holds a session
        cmd += ["--max-sessions", str(args.clients)]
    env = dict(os.environ)
    if args.malloc_arena_max:
        env["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
    with open(os.path.join(tmp, "worker.log"), "w") as log:
        worker = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
            preexec_fn=_die_with_parent,
        )
    state["worker"] = worker  # stopped by _cleanup, whatever happens next
    # Its first line names the addresses; wait for it no longer than the time left.
    assert worker.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(worker.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Abort("past --timeout while waiting for the worker to start")
            if sel.select(min(left, _POLL_S)):
                line = worker.stdout.readline()
                if line.startswith(READY_PREFIX):
                    addresses = line[len(READY_PREFIX) :].split()
                    break
                if not line:
                    raise RuntimeError(f"the worker exited ({worker.wait()}) before serving")
    unix = next(a for a in addresses if a.startswith("unix:"))
    tcp = next(a for a in addresses if not a.startswith("unix:"))
    return worker, {"lane": unix, "shm": unix, "inline": tcp}


def _check_alive(worker: subprocess.Popen) -> None:
    if worker.poll() is not None:
        raise _Abort(f"the worker exited with code {worker.returncode}")


def _stop_worker(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    if worker.stdout is not None:
        worker.stdout.close()


def _rss(pid: int) -> dict[str, int]:
    """The process's resident memory from /proc, in bytes: VmRSS and its parts."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
            elif key == "Threads":
                out[key] = int(value)
    return out


def _worker_stats(address: str) -> dict[str, int]:
    """The worker's own counts (``GetWorkerStats``), asked with the bare stub: this
    process imports neither jax nor the client."""
    import grpc

    from pytorch2jax_protocol import pb, pb_grpc

    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.BridgeStub(channel).GetWorkerStats(pb.WorkerStatsRequest(), timeout=10)
    return {f.name: getattr(reply, f.name) for f in reply.DESCRIPTOR.fields}


def _our_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(_SHM_PREFIX)}


# -- a client process --------------------------------------------------------------------


@dataclass
class _Op:
    """One kind of call on one model, with what its result must be."""

    model: str
    kind: str
    rpcs: int  # RPCs per call: a VJP is a forward that keeps its graph, then the VJP
    run: Callable[[], Any]  # makes the call; returns its result, ready
    expected: list  # the pure-JAX reference's leaves
    first: list | None = None  # this op's first result, copied

    def check(self, result: Any) -> None:
        import jax
        import numpy as np

        leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(result)]
        if len(leaves) != len(self.expected):
            raise _CheckFailed(f"{len(leaves)} outputs, expected {len(self.expected)}")
        for i, (got, want) in enumerate(zip(leaves, self.expected)):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise _CheckFailed(
                    f"output {i}: {got.dtype}{list(got.shape)}, "
                    f"expected {want.dtype}{list(want.shape)}"
                )
            if not np.isfinite(got).all():
                raise _CheckFailed(f"output {i}: not finite")
            worst = float(np.max(np.abs(got - want), initial=0.0))
            scale = float(np.max(np.abs(want), initial=0.0))
            if worst > RTOL * scale + ATOL:
                raise _CheckFailed(
                    f"output {i}: off the reference by up to {worst:.3g} "
                    f"(largest entry {scale:.3g})"
                )
        if self.first is None:
            self.first = [x.copy() for x in leaves]  # a copy: never hold a reply slot
        elif not all(np.array_equal(a, b) for a, b in zip(leaves, self.first)):
            raise _CheckFailed("not bit for bit equal to the first result of the same call")


def _reference(model: str):
    """The served example as pure JAX, from torch's parameter names (torch's layouts)."""
    import jax
    import jax.numpy as jnp

    def linear(p, prefix, x):
        return x @ p[f"{prefix}.weight"].T + p[f"{prefix}.bias"]

    def conv(p, prefix, x, stride, pad):
        y = jax.lax.conv_general_dilated(
            x, p[f"{prefix}.weight"], (stride, stride), [(pad, pad), (pad, pad)],
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
            precision=jax.lax.Precision.HIGHEST,
        )
        return y + p[f"{prefix}.bias"][None, :, None, None]

    def mlp(p, x):
        h = jnp.tanh(linear(p, "net.0", x))
        h = jnp.tanh(linear(p, "net.2", h))
        return linear(p, "net.4", h)

    def convnet(p, x):
        h = jax.nn.relu(conv(p, "conv1", x, 1, 1))
        h = jax.nn.relu(conv(p, "conv2", h, 2, 0))
        return linear(p, "head", h.mean(axis=(2, 3)))

    return {"mlp": mlp, "convnet": convnet}[model]


def _ops(worker: Any, index: int) -> list[_Op]:
    """The client's calls: every kind on every model, with this client's own parameters
    (the worker's, scaled) and inputs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    def vjp(fn, p, x, ct):
        y, pullback = jax.vjp(fn, p, x)
        return y, pullback(ct)

    rng = np.random.default_rng(index)
    ops = []
    for model, shape in INPUT_SHAPES.items():
        apply_fn, params = worker.convert_pytnn_to_jax(model)
        scale = np.float32(1.0 + 0.01 * (index + 1))
        params = {n: jnp.asarray(np.asarray(v) * scale) for n, v in params.items()}
        x = jnp.asarray(rng.standard_normal(shape, np.float32))
        ref = _reference(model)
        ct_shape = jax.eval_shape(ref, params, x).shape
        ct = jnp.asarray(rng.standard_normal(ct_shape, np.float32))
        # Under jit: one compilation, where eager would compile every operation.
        with jax.default_matmul_precision("highest"):
            y_ref, g_ref = jax.jit(functools.partial(vjp, ref))(params, x, ct)
        fwd_expected = [np.asarray(y_ref)]
        vjp_expected = [np.asarray(a) for a in jax.tree_util.tree_leaves((y_ref, g_ref))]

        jit_fwd, jit_vjp = jax.jit(apply_fn), jax.jit(functools.partial(vjp, apply_fn))
        # Default arguments bind this model's values, not the loop's last ones.
        runs = {
            "forward": lambda f=apply_fn, p=params, x=x: f(p, x),
            "vjp": lambda f=apply_fn, p=params, x=x, ct=ct: vjp(f, p, x, ct),
            "jit forward": lambda f=jit_fwd, p=params, x=x: f(p, x),
            "jit vjp": lambda f=jit_vjp, p=params, x=x, ct=ct: f(p, x, ct),
        }
        for kind in KINDS:
            expected = vjp_expected if kind.endswith("vjp") else fwd_expected
            rpcs = 2 if kind.endswith("vjp") else 1
            ops.append(_Op(model, kind, rpcs, runs[kind], expected))
    return ops


@dataclass
class _ClientResult:
    index: int
    transport: str
    latencies: dict = field(default_factory=dict)  # (model, kind) -> [seconds]
    rpcs: dict = field(default_factory=dict)  # (model, kind) -> RPCs per call
    errors: list = field(default_factory=list)  # (phase, model, kind, class, message)
    shm: dict = field(default_factory=dict)  # the shm transport's state after the run


def _call(op: _Op, phase: str, result: _ClientResult) -> float | None:
    import jax

    try:
        t = time.perf_counter()
        out = jax.block_until_ready(op.run())
        elapsed = time.perf_counter() - t
        op.check(out)
        return elapsed
    except Exception as e:  # noqa: BLE001 - every failure is counted, by class and message
        message = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        result.errors.append((phase, op.model, op.kind, type(e).__name__, message))
        return None


def _wait(event: Any, parent: int) -> bool:
    """Waits for ``event``; False if the parent died meanwhile (it would never come)."""
    while not event.wait(_POLL_S):
        if os.getppid() != parent:
            return False
    return True


def _client_main(
    index: int, transport: str, address: str, calls: int, warmup_rounds: int,
    messages: Any, start: Any, done: Any, parent: int,
) -> None:
    began = time.monotonic()
    _die_with_parent()
    if os.getppid() != parent:
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        # Imported here: the parent process needs neither jax nor the client.
        import pytorch2jax
        from pytorch2jax._transports.shm import DEFAULT_INLINE_BELOW

        import numpy as np

        if min(4 * int(np.prod(s)) for s in INPUT_SHAPES.values()) < DEFAULT_INLINE_BELOW:
            raise RuntimeError("inputs below the shm transport's inline threshold")
        result = _ClientResult(index, transport)
        imported = time.monotonic()
        with pytorch2jax.connect(address, transport=transport) as worker:
            if worker.transport != transport:
                raise RuntimeError(f"asked for {transport}, got {worker.transport}")
            ops = _ops(worker, index)
            prepared = time.monotonic()
            for _ in range(warmup_rounds):
                for op in ops:
                    _call(op, "warm-up", result)
            phases = (imported - began, prepared - imported, time.monotonic() - prepared)
            messages.put(("ready", index, phases))
            if not _wait(start, parent):
                return
            # Every kind equally often, in an order of this client's own.
            rng = np.random.default_rng(1000 + index)
            order = [ops[i] for i in rng.permutation(np.arange(calls) % len(ops))]
            for op in ops:
                result.latencies[op.model, op.kind] = []
                result.rpcs[op.model, op.kind] = op.rpcs
            for op in order:
                elapsed = _call(op, "run", result)
                if elapsed is not None:
                    result.latencies[op.model, op.kind].append(elapsed)
            del order, ops  # and with them every reply array: the shm slots come back
            if transport in ("shm", "lane"):
                result.shm = worker.transport_info()
            messages.put(("result", index, result))
            # Hold the session until the parent has read the worker's RSS.
            _wait(done, parent)
    except BaseException:  # noqa: BLE001 - reported to the parent, which counts it
        messages.put(("failed", index, traceback.format_exc()))


# -- the parent --------------------------------------------------------------------------


def _left(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Abort(f"past --timeout while {what}")
    return left


def _collect(messages, procs, want, pending, deadline, sink, failed, worker):
    """Takes messages until every client in ``pending`` sent ``want`` or failed."""
    while pending:
        try:
            wait = _left(deadline, f"waiting for the clients' '{want}'")
            msg = messages.get(timeout=min(_POLL_S, wait))
        except queue.Empty:
            _check_alive(worker)
            for i in list(pending):
                if not procs[i].is_alive():  # died without a word: a crash
                    failed[i] = f"client {i} exited with code {procs[i].exitcode}"
                    pending.discard(i)
            continue
        kind, index, *payload = msg
        if kind == "failed":
            failed[index] = payload[0]
        elif kind == want:
            sink[index] = payload[0] if payload else None
        pending.discard(index)


def _percentile(sorted_values: list[float], q: float) -> float:
    # Nearest rank: p99 of 100 values is the 99th, of 62 values the largest.
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def _print_report(results, failed, snapshots, seconds, args) -> int:
    rows = collections.defaultdict(list)
    rpcs = {}
    errors = collections.Counter()
    for r in results.values():
        for (model, kind), lat in r.latencies.items():
            rows[r.transport, model, kind] += lat
            rpcs[r.transport, model, kind] = r.rpcs[model, kind]
        for phase, model, kind, cls, message in r.errors:
            errors[f"{r.transport} {model} {kind} ({phase}): {cls}: {message}"] += 1
    for i, tb in failed.items():
        errors[f"client {i}: {tb.strip().splitlines()[-1]}"] += 1

    print(f"\n{'transport':9} {'model':8} {'kind':12} {'calls':>6} {'RPCs':>6} "
          f"{'p50 ms':>8} {'p99 ms':>8}")
    total = total_rpcs = 0
    for key in sorted(rows, key=lambda k: (TRANSPORTS.index(k[0]), k[1], KINDS.index(k[2]))):
        lat = sorted(rows[key])
        total += len(lat)
        total_rpcs += len(lat) * rpcs[key]
        p50 = f"{_percentile(lat, 0.50) * 1e3:8.2f}" if lat else f"{'-':>8}"
        p99 = f"{_percentile(lat, 0.99) * 1e3:8.2f}" if lat else f"{'-':>8}"
        transport, model, kind = key
        n = len(lat)
        print(f"{transport:9} {model:8} {kind:12} {n:6} {n * rpcs[key]:6} {p50} {p99}")

    n_errors = sum(errors.values())
    print(f"\nclients: {args.clients} ({len(results)} finished), {args.calls} calls each, "
          f"{args.warmup_rounds} warm-up rounds of {len(KINDS) * len(MODELS)} calls")
    print(f"calls: {total} ({total_rpcs} RPCs) in {seconds:.1f} s: "
          f"{total / seconds:.0f} calls/s, {total_rpcs / seconds:.0f} RPCs/s")
    print(f"errors: {n_errors}")
    for line, count in errors.most_common(SHOWN_ERRORS):
        print(f"  {count:5}x {line}")
    if len(errors) > SHOWN_ERRORS:
        print(f"  ... and {len(errors) - SHOWN_ERRORS} more distinct errors")

    mb = 1 << 20
    print(f"\n{'worker':15} {'VmRSS':>7} {'RssAnon':>7} {'RssFile':>7} {'RssShmem':>8} "
          f"{'threads':>7} {'sessions':>8} {'regions':>7} {'residuals':>9} {'served':>7} "
          f"{'cancelled':>9}")
    for label, (r, st) in snapshots.items():
        print(f"{label:15} {r['VmRSS'] / mb:7.1f} {r['RssAnon'] / mb:7.1f} "
              f"{r['RssFile'] / mb:7.1f} {r['RssShmem'] / mb:8.1f} {r['Threads']:7} "
              f"{st['sessions']:8} {st['regions']:7} {st['residuals']:9} "
              f"{st['calls_served']:7} {st['calls_cancelled']:9}")
    print("(memory in MiB; served: Forward, Vjp and InferShapes calls since the worker started)")
    warm, run = snapshots["after warm-up"][0]["VmRSS"], snapshots["after the run"][0]["VmRSS"]
    growth = (run - warm) / warm
    print(f"RSS growth over the run: {growth:+.1%} (VmRSS {warm / mb:.1f} -> {run / mb:.1f} MiB; "
          f"at most {args.max_rss_growth:+.0%})")
    shm_states = [r.shm for r in results.values() if r.shm]
    if shm_states:
        print("shm clients after the run: "
              f"{max(s['arenas'] for s in shm_states)} arena(s) at most, "
              f"{max(s['bytes'] for s in shm_states) / mb:.0f} MiB at most, "
              f"{max(s['in_use'] for s in shm_states)} bytes still leased at most")

    status = 0
    if n_errors:
        print(f"FAILED: {n_errors} errors")
        status = 1
    if growth > args.max_rss_growth:
        print(f"FAILED: the worker's RSS grew by {growth:.1%} (> {args.max_rss_growth:.0%})")
        status = 1
    held = snapshots["after the run"][1]["residuals"]
    if held:  # every forward that kept its graph was followed by its VJP
        print(f"FAILED: the worker holds {held} residuals after every VJP was made")
        status = 1
    closed = snapshots["clients closed"][1]
    if closed["sessions"] or closed["regions"] or closed["residuals"]:
        print(f"FAILED: the worker holds {closed['sessions']} sessions, {closed['regions']} "
              f"regions and {closed['residuals']} residuals after every client closed")
        status = 1
    return status


def _run(args: argparse.Namespace, tmp: str, deadline: float, procs: list, state: dict) -> int:
    worker, addresses = _start_worker(tmp, args, deadline, state)
    print(f"worker pid {worker.pid}: {addresses['shm']} (lane, shm), {addresses['inline']} (inline)")

    def snapshot() -> tuple[dict, dict]:
        _check_alive(worker)
        return _rss(worker.pid), _worker_stats(addresses["shm"])

    ctx = multiprocessing.get_context("spawn")
    messages, start, done = ctx.Queue(), ctx.Event(), ctx.Event()
    for i in range(args.clients):
        transport = TRANSPORTS[i % len(TRANSPORTS)]
        p = ctx.Process(
            target=_client_main,
            args=(i, transport, addresses[transport], args.calls, args.warmup_rounds,
                  messages, start, done, os.getpid()),
            name=f"load-client-{i}",
            daemon=True,
        )
        p.start()
        procs.append(p)

    t0 = time.monotonic()
    ready, failed, results = {}, {}, {}
    _collect(messages, procs, "ready", set(range(args.clients)), deadline, ready, failed,
             worker)
    print(f"clients started and warmed up in {time.monotonic() - t0:.1f} s", end="")
    if ready:
        print("; per client, at most: " + ", ".join(
            f"{what} {max(p[k] for p in ready.values()):.1f} s"
            for k, what in enumerate(("imports", "connect + references", "warm-up"))))
    snapshots = {"after warm-up": snapshot()}
    start.set()
    t1 = time.monotonic()
    _collect(messages, procs, "result", set(ready), deadline, results, failed, worker)
    seconds = time.monotonic() - t1
    snapshots["after the run"] = snapshot()  # every client still holds its session
    done.set()
    for p in procs:
        p.join(timeout=_left(deadline, "waiting for the clients to exit"))
    # The worker ends a session when it sees its stream close: give it a moment.
    settle = time.monotonic() + CLOSE_SETTLE_S
    while True:
        snapshots["clients closed"] = snapshot()
        if not snapshots["clients closed"][1]["sessions"] or time.monotonic() > settle:
            break
        time.sleep(0.1)
    for i, tb in failed.items():
        print(f"\nclient {i} failed:\n{tb}", file=sys.stderr)
    return _print_report(results, failed, snapshots, max(seconds, 1e-9), args)


def _cleanup(procs: list, state: dict, tmp: str) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
    worker = state.get("worker")
    if worker is not None:
        _stop_worker(worker)
        log = os.path.join(tmp, "worker.log")
        with open(log) as f:
            lines = [x for x in f.read().splitlines() if not x.startswith("serving models:")]
        if lines:  # warnings, tracebacks: worth seeing, pass or fail
            print(f"\nworker stderr ({len(lines)} lines, last 20):", file=sys.stderr)
            print("\n".join(lines[-20:]), file=sys.stderr)
    shutil.rmtree(tmp, ignore_errors=True)


def _on_sigterm(signum, frame):
    print("FAILED: stopped by SIGTERM; stopping the clients and the worker", file=sys.stderr)
    raise SystemExit(128 + signum)  # runs the cleanup in main's finally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS,
                        help="client processes, a third each over the fast lane and shm (unix "
                             "socket), and inline (TCP)")
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS,
                        help="measured calls per client")
    parser.add_argument("--warmup-rounds", type=int, default=DEFAULT_WARMUP_ROUNDS,
                        help="rounds of every kind of call on every model, per client, before")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds for the whole run; past them it fails, cleaning up")
    parser.add_argument("--max-rss-growth", type=float, default=DEFAULT_MAX_RSS_GROWTH,
                        help="fail if the worker's VmRSS grows by more than this fraction")
    parser.add_argument("--torch-threads", type=int, default=DEFAULT_TORCH_THREADS,
                        help="the worker's torch intra-op threads")
    parser.add_argument("--malloc-arena-max", type=int, default=0,
                        help="MALLOC_ARENA_MAX for the worker (glibc); 0: glibc's default "
                        "(see the module's doc for what it changes)")
    args = parser.parse_args()
    if args.clients < 1 or args.calls < 1 or args.warmup_rounds < 0:
        parser.error("--clients and --calls must be at least 1, --warmup-rounds at least 0")

    signal.signal(signal.SIGTERM, _on_sigterm)
    began = time.monotonic()
    deadline = began + args.timeout
    segments_before = _our_segments()
    tmp = tempfile.mkdtemp(prefix="p2j-load-")
    procs: list = []
    state: dict = {}
    try:
        status = _run(args, tmp, deadline, procs, state)
    except _Abort as e:
        print(f"FAILED: {e}; stopping the clients and the worker")
        status = 1
    finally:
        _cleanup(procs, state, tmp)
    left = _our_segments() - segments_before
    if left:
        print(f"FAILED: shared-memory segments left in /dev/shm: {sorted(left)}")
        status = 1
    print(f"wall time: {time.monotonic() - began:.1f} s")
    sys.exit(status)


if __name__ == "__main__":
    main()
