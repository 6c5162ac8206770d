"""The fast lane on the worker: a session's Forward and Vjp calls over a unix socket.

gRPC stays the control plane. A client on this host that asked for a lane when it
opened its session (``OpenSessionRequest.fast_lane``) is given its address and a one-time
capability (``SessionInfo.fast_lane``); over connections opened with it, it sends the
same request messages the Bridge service takes, framed as ``pytorch2jax_protocol.lane``
says, and registers shared memory by passing a memfd instead of a name. The handlers are
the servicer's own, so a call is decoded, admitted (``Calls``), run, reported (status,
metrics) and encoded exactly as over gRPC; only the framing differs.

Who may use it:
- The socket is in Linux's abstract namespace: nothing on disk to leak or to guard, and
  only processes in this network namespace can reach it.
- A connection is served only if its peer (``SO_PEERCRED``) is the user the worker runs
  as, and it first presents a capability the worker issued to a session, which is then
  spent. The capability is accepted only from the process that opened that session (the
  pid it gave, checked against the socket's): a second process given a stolen capability
  is refused. Each accepted connection is given the capability for the next one.
- A connection belongs to one session: a call naming another session is ABORTED.

Semantics as over gRPC:
- Deadlines: a call carries its timeout; past it the call is cancelled, and so is a call
  whose client closes the connection (gave up, or died): bytes or EOF on a connection
  while its call runs mean nobody waits for it any more (``_Watch``).
- Concurrency: one call per connection at a time, admitted by the same ``Calls``; a
  session has at most ``max_connections`` connections.
- Stopping: ``stop_calls`` answers new calls UNAVAILABLE (the client then goes to gRPC,
  which sees the worker stopping too), ``drain`` waits for the calls in flight, and
  ``close`` ends every connection. A session's connections end with the session.

Prepared calls (``_prepared``): a call over the lane may leave its form with the worker
(``prepare``); its session's later calls of that form come as ``RUN`` frames, which the
servicer's ``run_prepared`` serves with the same admission, limits, deadlines and
metrics. A session's prepared calls end with it.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from pytorch2jax_protocol import lane, pb, shm
from pytorch2jax_server._dataplane import shm as shm_plane
from pytorch2jax_server._prepared import PreparedCalls
from pytorch2jax_server._sessions import Session, Sessions
from pytorch2jax_server._status import status_of
from pytorch2jax_server.engine import InvalidRequestError

_log = logging.getLogger("pytorch2jax_server")

#: Connections one session may hold: one per call it runs at once.
DEFAULT_MAX_CONNECTIONS = 16
#: Connections that have not presented a capability yet: each holds a thread, for at
#: most HELLO_TIMEOUT_S.
MAX_HANDSHAKES = 16
HELLO_TIMEOUT_S = 5.0
#: How often deadlines are looked at: a call is cancelled at most this late.
_WATCH_SLICE_S = 0.05


def unavailable_reason() -> str:
    """Why this system cannot have a lane (no abstract sockets, memfd or SO_PEERCRED),
    or ``""``."""
    if not (hasattr(socket, "SO_PEERCRED") and shm.HAS_MEMFD and hasattr(socket, "send_fds")):
        return "the fast lane needs Linux (abstract unix sockets, SO_PEERCRED, memfd)"
    return ""


class _Abort(Exception):
    """A status to answer with: what ``context.abort`` raises on the lane, and a refused
    connection's reason."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details


class _Context:
    """What the servicer's handlers use of a ``grpc.ServicerContext``, for a lane call;
    and ``prepared``, the session's prepared calls (which a gRPC context lacks: a call
    over gRPC prepares nothing)."""

    __slots__ = ("_metadata", "_peer", "_callbacks", "_ended", "_lock", "prepared")

    def __init__(
        self, metadata: tuple[tuple[str, str], ...], peer: str, prepared: PreparedCalls
    ) -> None:
        self._metadata = metadata
        self._peer = peer
        self.prepared = prepared
        self._callbacks: list[Callable[[], object]] = []
        self._ended = False
        self._lock = threading.Lock()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass  # only pool clients ask for it, and they do not use lanes

    def abort(self, code: grpc.StatusCode, details: str):
        raise _Abort(code, details)

    def add_callback(self, callback: Callable[[], object]) -> bool:
        with self._lock:
            if self._ended:
                return False
            self._callbacks.append(callback)
            return True

    def end(self) -> None:
        """The call is over for its client (deadline passed, connection closed)."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class _Watch:
    """Cancels lane calls whose deadline passes or whose connection becomes readable (the
    client closed it, died, or broke the one-call-at-a-time rule), from one thread."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[float, Callable[[], None]]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="p2j-lane-watch", daemon=True)
        self._thread.start()

    def watch(self, fd: int, deadline: float, end: Callable[[], None]) -> None:
        with self._lock:
            self._watched[fd] = (deadline, end)
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)

    def unwatch(self, fd: int) -> None:
        with self._lock:
            if self._watched.pop(fd, None) is None:
                return  # fired, and unregistered then
        self._unregister(fd)

    def _unregister(self, fd: int) -> None:
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def _run(self) -> None:
        while not self._closed:
            try:
                events = self._epoll.poll(_WATCH_SLICE_S)
            except (OSError, ValueError):  # closed
                return
            now = time.monotonic()
            due: list[Callable[[], None]] = []
            with self._lock:
                ready = {fd for fd, _ in events}
                for fd in [f for f, (d, _) in self._watched.items() if f in ready or now >= d]:
                    due.append(self._watched.pop(fd)[1])
                    self._unregister(fd)
            for end in due:
                end()

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self._epoll.close()


class Lane:
    """The worker's fast lane: its socket, the capabilities it issued, its connections."""

    def __init__(
        self,
        sessions: Sessions,
        *,
        max_message_bytes: int,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self._sessions = sessions
        self._max_body = max_message_bytes
        self._max_connections = max_connections
        self.address = f"@pytorch2jax-lane-{secrets.token_hex(16)}"
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._capabilities: dict[bytes, tuple[Session, int]] = {}
        self._connections: dict[bytes, set[socket.socket]] = {}  # by session id
        self._prepared: dict[bytes, PreparedCalls] = {}  # by session id, while it has a lane
        self._prepared_calls = 0
        self._handshakes = 0
        self._in_flight = 0
        self._calls = 0
        self._stopping = False
        self._handlers: dict[int, tuple[Any, Callable[..., Any]]] = {}
        # The last metadata decoded, as (bytes, pairs): shared by the connection threads,
        # replaced whole (one assignment), so any thread sees a consistent pair.
        self._last_metadata: tuple[bytes, tuple[tuple[str, str], ...]] = (b"", ())
        self._watch: _Watch | None = None
        sessions.on_close.append(self._session_closed)
        self._acceptor: threading.Thread | None = None

    def start(self, servicer: Any) -> None:
        """Listens, and serves the lane with ``servicer``'s handlers (the Bridge servicer's)."""
        self._handlers = {
            code: (getattr(pb, f"{name}Request"), getattr(servicer, name))
            for code, name in lane.METHODS.items()
        }
        self._run_prepared = servicer.run_prepared
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(lane.socket_address(self.address))
        listener.listen(64)
        self._listener = listener
        self._watch = _Watch()
        self._acceptor = threading.Thread(target=self._accept, name="p2j-lane", daemon=True)
        self._acceptor.start()

    def offer(self, session: Session, pid: int) -> pb.FastLane:
        """The lane for ``session``, whose client says it is process ``pid``."""
        return pb.FastLane(address=self.address, capability=self._issue(session, pid))

    def _issue(self, session: Session, pid: int) -> bytes:
        capability = secrets.token_bytes(lane.CAPABILITY_BYTES)
        with self._lock:
            # One outstanding capability a session: each new one replaces the last.
            for old in [c for c, (s, _) in self._capabilities.items() if s is session]:
                del self._capabilities[old]
            self._capabilities[capability] = (session, pid)
        return capability

    def held(self) -> tuple[int, int, int]:
        """Open connections, the calls served over the lane, and those of them that ran
        as prepared calls, for stats."""
        with self._lock:
            connections = sum(len(c) for c in self._connections.values())
            return connections, self._calls, self._prepared_calls

    # -- connections -----------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                refuse = self._stopping or self._handshakes >= MAX_HANDSHAKES
                if not refuse:
                    self._handshakes += 1
            if refuse:
                conn.close()
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="p2j-lane-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        session = None
        try:
            session, pid = self._hello(conn)
            lane.send(conn, lane.REPLY, 0, self._issue(session, pid))
            while True:
                frame = lane.receive(conn, self._max_body, with_fds=True)
                if frame.kind == lane.RUN:
                    self._run(conn, session, pid, frame)
                elif frame.kind == lane.CALL:
                    self._call(conn, session, pid, frame)
                elif frame.kind == lane.REGISTER:
                    self._register(conn, session, frame)
                else:
                    for fd in frame.fds:
                        os.close(fd)
                    raise lane.FrameError(f"a frame of kind {frame.kind} where a call belongs")
        except lane.FrameError as e:
            _refuse(conn, grpc.StatusCode.INVALID_ARGUMENT, f"not a fast-lane frame: {e}")
        except _Abort as e:
            _refuse(conn, e.code, e.details)
        except (lane.LaneClosedError, OSError):
            pass  # the client left, or its session ended
        finally:
            with self._lock:
                if session is None:
                    self._handshakes -= 1
                else:
                    self._connections.get(session.id, set()).discard(conn)
            conn.close()

    def _hello(self, conn: socket.socket) -> tuple[Session, int]:
        """Checks a new connection's peer and capability; returns its session and pid."""
        pid, uid, _ = lane.peer_credentials(conn)
        if uid != os.getuid():
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "the fast lane serves only the user the worker runs as",
            )
        conn.settimeout(HELLO_TIMEOUT_S)
        try:
            frame = lane.receive(conn, lane.CAPABILITY_BYTES)
        except TimeoutError:
            raise lane.LaneClosedError("no hello") from None
        conn.settimeout(None)
        if frame.kind != lane.HELLO:
            raise lane.FrameError("a connection starts with a hello")
        code = grpc.StatusCode.PERMISSION_DENIED
        with self._lock:
            issued = self._capabilities.pop(bytes(frame.payload), None)
            if issued is not None and issued[1] != pid:
                # Spent all the same: whoever leaked it must not get a second try.
                issued = None
                why = "this capability was issued to another process"
            else:
                why = "unknown or spent capability"
            if issued is not None:
                session = issued[0]
                # A closed session's connections were ended: no entry may be made for it.
                held = self._connections.get(session.id, set())
                if session.closed.is_set():
                    issued, why = None, "the session has ended"
                elif len(held) >= self._max_connections:
                    code = grpc.StatusCode.RESOURCE_EXHAUSTED
                    issued, why = None, (
                        f"the session has {self._max_connections} fast-lane connections, "
                        "its limit; its other calls go by gRPC"
                    )
                else:
                    self._connections[session.id] = held
                    held.add(conn)
                    self._prepared.setdefault(session.id, PreparedCalls())
                    self._handshakes -= 1
        if issued is None:
            raise _Abort(code, f"fast lane refused: {why}")
        return issued

    def _call(self, conn: socket.socket, session: Session, pid: int, frame: lane.Frame) -> None:
        for fd in frame.fds:  # a call passes no descriptors
            os.close(fd)
        entry = self._handlers.get(frame.code)
        if entry is None:
            raise lane.FrameError(f"unknown method {frame.code}")
        request_type, handler = entry
        metadata = self._metadata_of(frame.metadata)
        try:
            request = request_type.FromString(frame.payload)
        except Exception:  # noqa: BLE001 - DecodeError, RecursionError, UnicodeError...
            status = (
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {lane.METHODS[frame.code]} request message; are "
                "the client's and the worker's pytorch2jax versions the same?",
            )
        else:
            status = self._refusal(session, metadata)
        if status is not None:
            lane.send(conn, lane.REPLY, status[0].value[0], status[1].encode())
            return
        self._serve_call(
            conn,
            _Context(metadata, f"lane:pid={pid}", self._prepared_of(session)),
            frame.timeout,
            lambda context: handler(request, context).SerializeToString(),
        )

    def _run(self, conn: socket.socket, session: Session, pid: int, frame: lane.Frame) -> None:
        """A RUN: one of the session's prepared calls (the servicer's ``run_prepared``)."""
        for fd in frame.fds:
            os.close(fd)
        if frame.metadata:
            raise lane.FrameError("a RUN frame carries no metadata")
        status = self._refusal(session, ())
        if status is not None:
            lane.send(conn, lane.REPLY, status[0].value[0], status[1].encode())
            return
        prepared = self._prepared_of(session)
        payload = frame.payload
        self._serve_call(
            conn,
            _Context((), f"lane:pid={pid}", prepared),
            frame.timeout,
            lambda context: self._run_prepared(session, prepared, payload, context),
            prepared=True,
        )

    def _prepared_of(self, session: Session) -> PreparedCalls:
        # A closed session's entry is gone: its last calls prepare into a store of their
        # own. (Not `get(...) or ...`: an empty store is falsy, it has a length.)
        found = self._prepared.get(session.id)
        return found if found is not None else PreparedCalls(max_entries=0)

    def _serve_call(
        self,
        conn: socket.socket,
        context: _Context,
        timeout: float,
        work: Callable[[_Context], bytes | bytearray],
        *,
        prepared: bool = False,
    ) -> None:
        """Runs one admitted call (``_refusal`` counted it in flight) under its deadline
        and cancellation, and sends its reply or status."""
        deadline = time.monotonic() + timeout if timeout > 0 else math.inf
        fd = conn.fileno()
        watch = self._watch
        assert watch is not None  # started
        watch.watch(fd, deadline, context.end)
        code = -1  # an exception other than a status leaves the connection
        try:
            payload = work(context)
            code = 0
        except _Abort as e:
            code, payload = e.code.value[0], e.details.encode()
        finally:
            watch.unwatch(fd)
            with self._lock:
                self._in_flight -= 1
                self._calls += 1
                self._prepared_calls += prepared and code == 0
                self._idle.notify_all()
        lane.send(conn, lane.REPLY, code, payload)

    def _metadata_of(self, raw: bytes) -> tuple[tuple[str, str], ...]:
        # A client sends the same metadata (its session) on every call: decode it once.
        cached = self._last_metadata
        if cached[0] == raw:
            return cached[1]
        metadata = lane.decode_metadata(bytes(raw))
        self._last_metadata = (bytes(raw), metadata)
        return metadata

    def _refusal(self, session: Session, metadata) -> tuple[grpc.StatusCode, str] | None:
        """Why a call cannot run now (the worker stops, another session), or None; counts it
        in flight otherwise."""
        named = None
        for key, value in metadata:
            if key == shm.SESSION_METADATA_KEY:
                named = value
        if named is not None and named != session.hex_id:
            return (
                grpc.StatusCode.ABORTED,
                "this fast-lane connection belongs to another session; send the call on "
                "its own session's lane",
            )
        with self._lock:
            if self._stopping:
                return grpc.StatusCode.UNAVAILABLE, "the worker is stopping"
            self._in_flight += 1
        return None

    def _register(self, conn: socket.socket, session: Session, frame: lane.Frame) -> None:
        fds = frame.fds
        try:
            if len(fds) != 1 or len(frame.payload) != lane.REGION_SIZE.size:
                raise InvalidRequestError(
                    "registering a region passes one descriptor and the region's size"
                )
            (size,) = lane.REGION_SIZE.unpack(frame.payload)
            region = shm_plane.map_descriptor(session, fds.pop(), size)
        except Exception as e:  # noqa: BLE001 - mapped at the boundary, as a handler's
            code, details = status_of(e)
            lane.send(conn, lane.REPLY, code.value[0], details.encode())
        else:
            lane.send(conn, lane.REPLY, 0, lane.REGION_ID.pack(region))
        finally:
            for fd in fds:
                os.close(fd)

    # -- ending ----------------------------------------------------------------------------

    def _session_closed(self, session_id: bytes) -> None:
        with self._lock:
            for c in [c for c, (s, _) in self._capabilities.items() if s.id == session_id]:
                del self._capabilities[c]
            connections = self._connections.pop(session_id, set())
            self._prepared.pop(session_id, None)
        for conn in connections:
            _shut(conn)

    def stop_calls(self) -> None:
        """New calls get UNAVAILABLE, new connections are refused; calls in flight go on."""
        with self._lock:
            self._stopping = True

    def drain(self, timeout: float | None) -> None:
        """Waits up to ``timeout`` seconds (None: for ever) for the calls in flight."""
        with self._lock:
            self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def close(self) -> None:
        """Ends every connection and the socket."""
        self.stop_calls()
        if self._listener is None:
            return  # never started
        _shut(self._listener)
        self._listener.close()
        if self._acceptor is not None:
            self._acceptor.join()
        with self._lock:
            connections = [c for held in self._connections.values() for c in held]
            self._connections.clear()
            self._capabilities.clear()
            self._prepared.clear()
        for conn in connections:
            _shut(conn)
        if self._watch is not None:
            self._watch.close()


def _refuse(conn: socket.socket, code: grpc.StatusCode, details: str) -> None:
    """Tells the peer why its connection ends, if it still listens."""
    try:
        conn.settimeout(1.0)
        lane.send(conn, lane.REPLY, code.value[0], details.encode())
    except OSError:
        pass


def _shut(sock: socket.socket) -> None:
    """Wakes the thread blocked on ``sock`` (its recv returns EOF) and ends the connection."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
