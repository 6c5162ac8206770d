"""The interface every transport implements: how one call's tensor bytes travel.

A ``Transport`` is made with its options only, and ``open`` ties it to one Client's
channel (``connect(transport=...)`` does; a name there makes the transport of that name);
it then belongs to that Client and lasts as long as it. For each RPC the remote
backend opens a ``Call`` (a context manager), turns request arrays into wire tensors with
``put``, sends ``reply_area`` for the worker to write into, reads reply tensors with
``get``, and closes the call. What ``get`` returns may alias transport memory; such memory
stays reserved for as long as any array viewing it lives.

Transports of a client to one worker hold a session (``open_session``): an OpenSession
stream that lives as long as the transport. When it ends (closed, or this process died)
the worker drops what it held for the client: shared-memory regions, autograd state.
"""

from __future__ import annotations

import abc
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from pytorch2jax._callbacks import HOST_IO, ArrayIO
from pytorch2jax._exceptions import (
    InvalidArgumentError,
    Pytorch2JaxError,
    WorkerUnavailableError,
    from_rpc_error,
)
from pytorch2jax._transports.lane import FastLane
from pytorch2jax_protocol import pb, pb_grpc

_log = logging.getLogger("pytorch2jax")

#: How long opening a session, or registering memory in it, may take: a worker that
#: accepts connections but does not answer must not hold a call past its deadline.
SETUP_TIMEOUT_S = 30.0
#: A transport whose worker gave it no new session (at its --max-sessions, restarting)
#: sends its calls without one, inline, and asks again after this long, then twice as
#: long after each refusal, up to REOPEN_AT_MOST_S.
REOPEN_AFTER_S = 1.0
REOPEN_AT_MOST_S = 30.0


def open_session(
    stub: pb_grpc.BridgeStub, target: str, offers: Sequence[int], *, fast_lane: bool = False
) -> tuple[Any, pb.SessionInfo]:
    """A new session offering ``offers`` (transports), asking for a fast lane if
    ``fast_lane``: its stream (cancel it to end the session) and the worker's answer, which
    says the transports it allows and the lane it gives."""
    request = pb.OpenSessionRequest(transports=list(offers), fast_lane=fast_lane, pid=os.getpid())
    stream = stub.OpenSession(request)
    # The stream lives as long as the session, so it takes no deadline: only its first
    # message does.
    timer = threading.Timer(SETUP_TIMEOUT_S, stream.cancel)
    timer.start()
    try:
        return stream, next(stream)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED:
            raise WorkerUnavailableError(
                f"the worker at {target} did not open a session within {SETUP_TIMEOUT_S:g} s"
            ) from None
        raise from_rpc_error(e, target) from None
    finally:
        timer.cancel()


class Call(abc.ABC):
    """The tensors of one RPC."""

    #: Where the worker should write the reply's tensors, or None to receive them inline.
    reply_area: pb.SharedMemoryRef | None = None

    #: gRPC metadata the call carries: the session its memory belongs to, taken with that
    #: memory (a session reset between the two would send the old session's references
    #: under the new one's id, and region ids repeat across sessions).
    metadata: tuple[tuple[str, str], ...] = ()

    @abc.abstractmethod
    def put(self, array: np.ndarray) -> pb.Tensor:
        """A wire tensor with ``array``'s data (copied: the caller may reuse ``array``)."""

    def ready(self) -> None:
        """Called once the request is built, before it is sent: the data ``put`` copied
        must have landed by then (a GPU transport waits for its copies here)."""

    @abc.abstractmethod
    def get(self, msg: pb.Tensor) -> np.ndarray:
        """The array a reply tensor holds; read-only, possibly a view of transport memory."""

    def close(self) -> None:
        """Releases what the request used; reply arrays stay valid."""

    def __enter__(self) -> Call:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transport(abc.ABC):
    """A way for tensor bytes to travel between this client and its worker."""

    #: "inline", "shm", "lane" or "cuda_ipc": what ``connect(transport=...)`` names it.
    name: str

    #: How calls take and give arrays: numpy arrays, unless the transport works in GPU
    #: memory (objects with the CUDA array interface).
    io: ArrayIO = HOST_IO

    #: Arrays smaller than this travel inline even when the transport could carry them:
    #: for a few kilobytes, a slot costs more Python than the bytes cost protobuf.
    inline_below: int = sys.maxsize

    #: The session's fast lane while it is usable (``_transports.lane``): the client sends
    #: the calls it carries that way instead of by gRPC.
    lane: FastLane | None = None

    def open(self, channel: grpc.Channel, target: str, *, max_message_bytes: int) -> None:
        """Ties the transport to the worker at ``target`` over ``channel``: opens what it
        holds there (a session, memory). Raises UnsupportedError if the worker does not
        offer it to this client."""

    @abc.abstractmethod
    def call(self, request_bytes: int, reply_bytes: int) -> Call:
        """A Call able to carry ``request_bytes`` of request tensors and ``reply_bytes`` of
        reply tensors (sizes before alignment; larger tensors still travel, inline)."""

    def reset(self, failed: tuple[tuple[str, str], ...]) -> None:
        """Starts over after the worker lost this transport's state (it restarted), unless
        ``failed`` (the ``Call.metadata`` of the call that found it lost) is no longer
        current: then a concurrent call already did, and a second reset would end its new
        session."""

    def close(self) -> None:
        """Frees what the transport holds; arrays still viewing its memory stay valid."""

    def describe(self) -> dict[str, Any]:
        """What the transport holds, for ``Client.transport_info()`` and tests."""
        return {"transport": self.name}


class SessionTransport(Transport):
    """A transport that holds a session with its worker (``open_session``): the stream, the
    metadata that names it on every call, and starting over when the worker lost it.
    Subclasses open the session in ``_open`` (setting ``_stream`` and ``_metadata``) and
    free what they hold besides the stream in ``_end``."""

    def __init__(self) -> None:
        self._stub: pb_grpc.BridgeStub | None = None  # until open()
        self._target = ""
        self._max_message_bytes = 0
        self._lock = threading.Lock()
        self._stream: Any = None
        self._closed = False
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._reopen_at = math.inf  # when to ask again for a session the worker refused
        self._reopen_after = REOPEN_AFTER_S
        self._warned_no_session = False

    def open(self, channel: grpc.Channel, target: str, *, max_message_bytes: int) -> None:
        if self._stub is not None:
            raise InvalidArgumentError(
                "this transport already belongs to a client; give each connect() a transport "
                "of its own"
            )
        self._stub = pb_grpc.BridgeStub(channel)
        self._target = target
        self._max_message_bytes = max_message_bytes
        self._open()

    @abc.abstractmethod
    def _open(self) -> None:
        """Opens a session (under ``_lock``, or before the transport is shared)."""

    def _end(self) -> None:
        # The metadata stays: until a new session opens, calls name the old one and the
        # worker answers ABORTED, which makes the client try again (``reset``).
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    def reset(self, failed: tuple[tuple[str, str], ...]) -> None:
        with self._lock:
            if self._closed or failed != self._metadata:
                return
            self._end()
            self._reopen()

    def _reopen(self) -> None:
        """Opens a new session (under ``_lock``); if the worker gives none now, goes on
        without one, so that calls still work (inline), and asks again later."""
        try:
            self._open()
        except Pytorch2JaxError as e:
            self._end()
            self._without_session(e)
        else:
            self._reopen_after = REOPEN_AFTER_S

    def _without_session(self, why: Pytorch2JaxError) -> None:
        # Calls name no session: the worker keeps nothing for this client past a TTL.
        self._metadata = ()
        delay = self._reopen_after
        self._reopen_at = time.monotonic() + delay
        self._reopen_after = min(2 * delay, REOPEN_AT_MOST_S)
        if not self._warned_no_session:
            self._warned_no_session = True
            _log.warning(
                "no session with %s (%s); calls go inline without one, and the worker frees "
                "what it keeps for this client only after its TTL; asking again in %g s",
                self._target,
                why,
                delay,
            )

    def _reopen_if_due(self) -> None:
        """Under ``_lock``: a session again, if the last one was lost and it is time."""
        if self._stream is None and not self._closed and time.monotonic() >= self._reopen_at:
            self._reopen()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._end()
