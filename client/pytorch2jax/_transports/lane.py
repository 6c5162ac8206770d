"""The client's end of a session's fast lane: Forward and Vjp over a unix socket, and
the RUNs of prepared calls (``run``; ``pytorch2jax._prepared``).

A worker on this host offers the lane in the session's answer (``SessionInfo.fast_lane``;
see ``pytorch2jax_protocol.lane`` for the framing and ``pytorch2jax_server._lane`` for the
checks). ``FastLane`` holds the session's connections: one per call running at once, up
to ``max_connections`` (a call past them goes by gRPC), each opened with the capability
the previous one was given. Failures come out as ``LaneError``, a ``grpc.RpcError`` with
the status the worker sent, so the client maps and retries them at the one place it maps
gRPC's own (``Client._send``):

- a reply with a status: that status, as over gRPC;
- the timeout passes: DEADLINE_EXCEEDED, and the connection is closed, which tells the
  worker to cancel the call;
- the connection breaks (the worker died, or ended the session): UNAVAILABLE, and the
  lane is done (``usable`` is False): the call goes again by gRPC, which reconnects to a
  restarted worker and, finding the session gone, has the transport open a new session
  and lane.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from typing import Any

import grpc

from pytorch2jax_protocol import lane, pb

_log = logging.getLogger("pytorch2jax")

#: Connections one client opens to its session's lane at most: calls past this many at
#: once go by gRPC.
DEFAULT_MAX_CONNECTIONS = 8

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_RESPONSES = {name: getattr(pb, f"{name}Response") for name in lane.METHODS.values()}


class LaneError(grpc.RpcError):
    """A call over the fast lane that failed, with its status (as gRPC's errors have)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _status(frame: lane.Frame) -> LaneError:
    code = _CODES.get(frame.code, grpc.StatusCode.UNKNOWN)
    return LaneError(code, bytes(frame.payload).decode(errors="replace"))


class FastLane:
    """The connections of one session's lane (see the module doc). Opening it connects
    once, which proves the worker can be reached this way; errors raise LaneError or
    OSError."""

    #: The methods that travel over the lane; the others go by gRPC.
    methods = frozenset(lane.METHOD_CODES)

    def __init__(
        self,
        offer: pb.FastLane,
        *,
        max_message_bytes: int,
        setup_timeout: float,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self._address = lane.socket_address(offer.address)
        self._next = offer.capability
        self._max_body = max_message_bytes
        self._setup_timeout = setup_timeout
        self._max_connections = max_connections
        self._lock = threading.Lock()
        self._free: list[socket.socket] = []
        self._open = 0
        self._broken = False
        self._free.append(self._connect())
        self._open = 1

    @property
    def usable(self) -> bool:
        """False once a connection broke or the lane was closed."""
        return not self._broken

    def _connect(self) -> socket.socket:
        """A new connection, its hello answered (under ``_lock``, or before sharing)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(self._setup_timeout)
            sock.connect(self._address)
            lane.send(sock, lane.HELLO, payload=self._next)
            frame = lane.receive(sock, max(self._max_body, 1 << 16))
            if frame.kind != lane.REPLY:
                raise lane.FrameError(f"a frame of kind {frame.kind} in answer to a hello")
            if frame.code:
                raise _status(frame)
            self._next = bytes(frame.payload)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock

    def _take(self) -> socket.socket | None:
        """A free connection, a new one if none is free, or None (at the limit, or broken)."""
        with self._lock:
            if self._broken:
                return None
            if self._free:
                return self._free.pop()
            if self._open >= self._max_connections:
                return None
            try:
                sock = self._connect()
            except (OSError, LaneError, lane.FrameError) as e:
                _log.info("no new fast-lane connection (%s); this call goes by gRPC", e)
                return None
            self._open += 1
            return sock

    def _give_back(self, sock: socket.socket) -> None:
        with self._lock:
            if self._broken:
                sock.close()
            else:
                self._free.append(sock)

    def _drop(self, sock: socket.socket, *, broken: bool) -> None:
        sock.close()
        with self._lock:
            self._open -= 1
            if broken:
                self._broken = True
                free, self._free = self._free, []
        if broken:
            for s in free:
                s.close()

    def call(
        self, method: str, request: Any, metadata: Sequence[tuple[str, str]], timeout: float
    ) -> Any | None:
        """``method``'s reply to ``request``, or None if no connection is free (send it by
        gRPC). LaneError if it failed."""
        sock = self._take()
        if sock is None:
            return None
        frame = self._exchange(
            sock,
            lane.CALL,
            lane.METHOD_CODES[method],
            request.SerializeToString(),
            metadata=lane.encode_metadata(metadata),
            timeout=timeout,
        )
        if frame.code:
            raise _status(frame)
        return _RESPONSES[method].FromString(frame.payload)

    def run(self, payload: bytes | bytearray, timeout: float) -> memoryview | None:
        """The reply's bytes to a RUN of a prepared call (``payload``: its id and inputs,
        as ``pytorch2jax_protocol.lane`` lays them out), or None if no connection is free.
        LaneError if it failed (NOT_FOUND: the session has no such prepared call)."""
        sock = self._take()
        if sock is None:
            return None
        frame = self._exchange(sock, lane.RUN, 0, payload, timeout=timeout)
        if frame.code:
            raise _status(frame)
        return frame.payload

    def register(self, fd: int, size: int) -> int:
        """Registers the memfd ``fd`` of ``size`` bytes under the session; its region id."""
        sock = self._take()
        if sock is None:
            raise LaneError(grpc.StatusCode.UNAVAILABLE, "the fast lane has no free connection")
        frame = self._exchange(
            sock,
            lane.REGISTER,
            0,
            lane.REGION_SIZE.pack(size),
            timeout=self._setup_timeout,
            fds=(fd,),
        )
        if frame.code:
            raise _status(frame)
        if len(frame.payload) != lane.REGION_ID.size:
            raise LaneError(grpc.StatusCode.INTERNAL, "the worker sent a malformed region id")
        return lane.REGION_ID.unpack(frame.payload)[0]

    def _exchange(
        self,
        sock: socket.socket,
        kind: int,
        code: int,
        payload: bytes,
        *,
        metadata: bytes = b"",
        timeout: float,
        fds: Sequence[int] = (),
    ) -> lane.Frame:
        """Sends one frame on ``sock`` and reads the reply; gives ``sock`` back, or drops it."""
        try:
            sock.settimeout(timeout)
            lane.send(sock, kind, code, payload, metadata=metadata, timeout=timeout, fds=fds)
            frame = lane.receive(sock, self._max_body)
        except TimeoutError:
            # Closing it is how the worker learns that nobody waits for the call.
            self._drop(sock, broken=False)
            raise LaneError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except (OSError, lane.LaneClosedError, lane.FrameError) as e:
            self._drop(sock, broken=True)
            raise LaneError(
                grpc.StatusCode.UNAVAILABLE, f"the worker closed the fast lane ({e})"
            ) from None
        except BaseException:  # e.g. KeyboardInterrupt mid-frame: the stream is out of step
            self._drop(sock, broken=False)
            raise
        if frame.kind != lane.REPLY:
            self._drop(sock, broken=True)
            raise LaneError(grpc.StatusCode.INTERNAL, f"the worker sent a frame of kind {frame.kind}")
        self._give_back(sock)
        return frame

    def connections(self) -> int:
        """Connections open now."""
        with self._lock:
            return self._open

    def close(self) -> None:
        with self._lock:
            self._broken = True
            free, self._free = self._free, []
        for sock in free:
            sock.close()
