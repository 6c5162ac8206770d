"""Building the gRPC server: the Bridge service, health, reflection, bound addresses, and
the metrics listener beside them."""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import stat
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pytorch2jax_protocol import DEFAULT_MAX_MESSAGE_BYTES, SERVICE_NAME, channel_options, pb_grpc
from pytorch2jax_server._calls import Calls
from pytorch2jax_server._dataplane import cuda_ipc
from pytorch2jax_server._lane import Lane
from pytorch2jax_server._lane import unavailable_reason as lane_unavailable_reason
from pytorch2jax_server._metrics import Metrics
from pytorch2jax_server._security import Security
from pytorch2jax_server._servicer import BridgeServicer
from pytorch2jax_server._sessions import SessionPolicy, Sessions
from pytorch2jax_server._status import RefuseUndecodable
from pytorch2jax_server.engine import Registry, ResidualCache

DEFAULT_LISTEN = ("localhost:50051",)
#: Calls (Forward, Vjp, InferShapes) that run at once; other admitted ones wait their turn.
DEFAULT_MAX_WORKERS = 16
#: Calls past this many at once (running or waiting their turn) are refused with
#: RESOURCE_EXHAUSTED instead of queueing.
DEFAULT_MAX_CONCURRENT_CALLS = 64
#: Threads for the quick RPCs beside the calls and the sessions' streams: ListModels,
#: health checks, stats, registering memory, releasing residuals.
_CONTROL_RPCS = 8

_PORT = re.compile(r":(\d+)$")

#: The worker pings every connection that is quiet for 30 s and drops it after 10 s more
#: without an answer: a client whose host or network went away sends no FIN, and its
#: session (a thread, a --max-sessions slot, its memory and residuals) would stay forever.
_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
_log = logging.getLogger("pytorch2jax_server")


@dataclass
class Worker:
    """A running gRPC server and what it serves; ``stop()`` shuts it down gracefully."""

    server: grpc.Server
    addresses: list[str]
    health: health.HealthServicer
    residuals: ResidualCache
    sessions: Sessions
    calls: Calls
    _unix_paths: list[str] = field(default_factory=list)
    #: Its Prometheus metrics; ``metrics.url`` is where they are served, if anywhere.
    metrics: Metrics | None = None
    #: The fast lane beside gRPC for same-host sessions, if on (``_lane``).
    lane: Lane | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _sweeper: threading.Thread | None = None

    def _start_sweeping(self) -> None:
        """Residuals past their TTL go even when no call comes to evict them."""
        period = min(max(self.residuals.ttl_s / 4, 0.05), 5.0)

        def sweep() -> None:
            while not self._stopping.wait(period):
                self.residuals.expire()

        self._sweeper = threading.Thread(target=sweep, name="p2j-residual-sweeper", daemon=True)
        self._sweeper.start()

    def stop(self, grace: float | None = 30.0) -> None:
        """Refuses new calls (UNAVAILABLE; health NOT_SERVING), lets the calls in flight
        finish for up to ``grace`` seconds, then ends sessions and removes sockets."""
        self.health.enter_graceful_shutdown()
        started = time.monotonic()
        stopped = self.server.stop(grace)
        if self.lane is not None:
            self.lane.stop_calls()
        # Session streams never finish by themselves, and would hold stop for the whole
        # grace: end them now, but keep the sessions (their memory, their residuals) for
        # the calls in flight, and drop them once those are done.
        self.sessions.end_streams()
        stopped.wait()
        if self.lane is not None:
            left = None if grace is None else max(grace - (time.monotonic() - started), 0.0)
            self.lane.drain(left)
        self.sessions.close_all()
        if self.lane is not None:
            self.lane.close()
        self._stopping.set()
        if self._sweeper is not None:
            self._sweeper.join()
        self.residuals.clear()
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if self.metrics is not None:  # last: scrapes go on through the grace period
            self.metrics.close()


def _unix_path(address: str) -> str | None:
    if address.startswith("unix://"):
        return address[len("unix://") :]
    if address.startswith("unix:"):
        return address[len("unix:") :]
    return None


def _claim_socket_path(address: str, path: str) -> None:
    """Removes a socket file that a killed worker left behind, so that a restarted one can
    listen at the same path; refuses a path something else uses."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise OSError(f"cannot listen on {address}: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError as e:
            if e.errno != errno.ECONNREFUSED:
                raise OSError(f"cannot listen on {address}: {path}: {e.strerror}") from None
        else:
            raise OSError(f"cannot listen on {address}: another process is listening there")
    _log.warning("removing %s, a socket that no process listens on (a worker killed earlier)", path)
    os.unlink(path)


def create_server(
    registry: Registry,
    listen: list[str] | tuple[str, ...] = DEFAULT_LISTEN,
    *,
    residuals: ResidualCache | None = None,
    sessions: SessionPolicy | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
    max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    security: Security | None = None,
    metrics_listen: str | None = None,
    fast_lane: bool = True,
) -> Worker:
    """Binds a server that serves ``registry`` on every address of ``listen``, and starts it.

    TCP addresses may use port 0; the returned ``Worker.addresses`` hold the bound ports.
    Unix sockets (``unix:///path``) are created with mode 0600; a stale socket file that
    no process listens on (a killed worker's) is replaced. ``security`` adds TLS to
    the TCP addresses and a bearer-token check to every call. ``sessions`` says who may
    share memory and how much (``SessionPolicy``). ``metrics_listen``
    (``HOST:PORT``, port 0 for any free one) serves Prometheus metrics over plain HTTP at
    ``Worker.metrics.url``; they are counted either way (``Worker.metrics.registry``).
    ``fast_lane`` offers clients that may use shared memory a unix socket beside gRPC for
    their calls (``_lane``), where the system allows it (Linux).
    """
    # Not `residuals or ...`: an empty cache is falsy (it has a length), and the worker's
    # --residual-cache-* settings were once dropped that way.
    residuals = ResidualCache() if residuals is None else residuals
    sessions = Sessions(
        SessionPolicy() if sessions is None else sessions,
        cuda_ipc_unavailable=cuda_ipc.unavailable_reason(registry.device),
        on_close=[residuals.release_owner],
    )
    security = security or Security()
    calls = Calls(max_calls=max_concurrent_calls, max_running=max_workers)
    metrics = Metrics(calls, residuals, sessions)
    # Every RPC gRPC admits gets a thread at once: a call never waits unseen in the
    # executor's queue (where no limit, deadline or cancellation reaches it). Calls are
    # limited by ``calls`` itself; each open session holds a thread (its stream) for its
    # lifetime; gRPC's own limit only bounds the total.
    threads = max_concurrent_calls + sessions.max_sessions + _CONTROL_RPCS
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="p2j-worker"),
        # gRPC sets SO_REUSEPORT by default: a second worker on a busy TCP port would
        # start without error and take half of the first one's clients.
        options=[*channel_options(max_message_bytes), *_KEEPALIVE_OPTIONS, ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=threads,
        # The token is checked first: a refused request is never parsed.
        interceptors=[*security.interceptors(), RefuseUndecodable()],
    )
    lane = None
    if fast_lane:
        why_not = lane_unavailable_reason()
        if why_not:
            _log.info("no fast lane: %s", why_not)
        else:
            lane = Lane(sessions, max_message_bytes=max_message_bytes)
    servicer = BridgeServicer(registry, residuals, sessions, calls, metrics, lane=lane)
    pb_grpc.add_BridgeServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    bound, unix_paths = [], []
    for address in listen:
        path = _unix_path(address)
        if path is not None:
            _claim_socket_path(address, path)
            # A socket file takes its mode from the umask at bind time: 0600 from the start.
            old = os.umask(0o177)
            try:
                ok = server.add_insecure_port(address)
            finally:
                os.umask(old)
            unix_paths.append(path)
            bound.append(address)
        else:
            security.warn_if_exposed(address)
            try:
                if security.tls is not None:
                    ok = server.add_secure_port(address, security.tls)
                else:
                    ok = server.add_insecure_port(address)
            except RuntimeError:  # grpcio raises it for an address it cannot bind
                ok = 0
            if not ok:
                raise OSError(
                    f"cannot listen on {address}: the port is in use (another worker?) or "
                    "the address is not this machine's; choose another port, or port 0 "
                    "for any free one (the worker prints the port it got)"
                )
            bound.append(_PORT.sub(f":{ok}", address))
        if not ok:
            raise OSError(f"cannot listen on {address}")
    if metrics_listen is not None:
        try:
            metrics.serve(metrics_listen)
        except BaseException:
            server.stop(None)  # let go of the addresses bound above
            raise
    server.start()
    if lane is not None:
        lane.start(servicer)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    worker = Worker(
        server,
        bound,
        health_servicer,
        residuals,
        sessions,
        calls,
        unix_paths,
        metrics=metrics,
        lane=lane,
    )
    worker._start_sweeping()
    return worker
