"""The inline transport: tensor bytes inside the gRPC messages. Works across hosts."""

from __future__ import annotations

import grpc
import numpy as np

from pytorch2jax._exceptions import ResourceExhaustedError
from pytorch2jax._transports.base import Call, SessionTransport, open_session
from pytorch2jax_protocol import pb, shm, tensors


class InlineCall(Call):
    def put(self, array: np.ndarray) -> pb.Tensor:
        return tensors.to_wire(array)

    def get(self, msg: pb.Tensor) -> np.ndarray:
        # A view of the message's bytes: protobuf made the one copy off the socket.
        return tensors.from_wire(msg)


class InlineTransport(SessionTransport):
    """Bytes in the messages. Once opened (a client of one worker), it also holds a
    session, with no memory in it: its stream tells the worker when this client is gone,
    so the worker frees the autograd state it kept for us at once, not a TTL later. Not
    opened (a pool's client), it sends its calls without a session."""

    name = "inline"

    def open(self, channel: grpc.Channel, target: str, *, max_message_bytes: int) -> None:
        try:
            super().open(channel, target, max_message_bytes=max_message_bytes)
        except ResourceExhaustedError as e:  # the worker's session limit: works without
            self._without_session(e)

    def _open(self) -> None:
        if self._stub is None:
            return  # not opened: no session to start over
        self._stream, info = open_session(self._stub, self._target, [pb.INLINE])
        self._metadata = ((shm.SESSION_METADATA_KEY, info.session.hex()),)

    def call(self, request_bytes: int, reply_bytes: int) -> Call:
        if self._stream is None and self._stub is not None:
            with self._lock:
                self._reopen_if_due()
        call = InlineCall()
        call.metadata = self._metadata
        return call
