"""The inline transport: tensor bytes inside the gRPC messages. Works across hosts."""

from __future__ import annotations

import logging
import threading
from typing import Any

import grpc
import numpy as np

from pytorch2jax._exceptions import ResourceExhaustedError
from pytorch2jax._transports.base import Call, Transport, open_session
from pytorch2jax_protocol import pb, pb_grpc, shm, tensors

_log = logging.getLogger("pytorch2jax")


class InlineCall(Call):
    def put(self, array: np.ndarray) -> pb.Tensor:
        return tensors.to_wire(array)

    def get(self, msg: pb.Tensor) -> np.ndarray:
        # A view of the message's bytes: protobuf made the one copy off the socket.
        return tensors.from_wire(msg)


class InlineTransport(Transport):
    """Bytes in the messages. Given a ``channel`` (a client of one worker), it also holds a
    session, with no memory in it: its stream tells the worker when this client is gone,
    so the worker frees the autograd state it kept for us at once, not a TTL later."""

    name = "inline"

    def __init__(self, channel: grpc.Channel | None = None, target: str = "") -> None:
        self._stub = pb_grpc.BridgeStub(channel) if channel is not None else None
        self._target = target
        self._lock = threading.Lock()
        self._stream: Any = None
        self._closed = False
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._open()

    def _open(self) -> None:
        if self._stub is None:
            return
        try:
            self._stream, info = open_session(self._stub, self._target, [pb.INLINE])
        except ResourceExhaustedError as e:  # the worker's session limit
            self._metadata = ()
            _log.warning(
                "no session with %s (%s); the worker frees what it keeps for this client "
                "only after its TTL",
                self._target,
                e,
            )
            return
        self._metadata = ((shm.SESSION_METADATA_KEY, info.session.hex()),)

    def _end(self) -> None:
        # The metadata stays: until a new session opens, calls name the old one and the
        # worker answers ABORTED, which makes the client try again (``reset``).
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    def call(self, request_bytes: int, reply_bytes: int) -> Call:
        call = InlineCall()
        call.metadata = self._metadata
        return call

    def reset(self, failed: tuple[tuple[str, str], ...]) -> None:
        with self._lock:
            if self._closed or failed != self._metadata:
                return
            self._end()
            self._open()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._end()
