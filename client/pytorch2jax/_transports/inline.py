"""The inline transport: tensor bytes inside the gRPC messages. Works across hosts."""

from __future__ import annotations

import numpy as np

from pytorch2jax._transports.base import Call, Transport
from pytorch2jax_protocol import pb, tensors


class InlineCall(Call):
    def put(self, array: np.ndarray) -> pb.Tensor:
        return tensors.to_wire(array)

    def get(self, msg: pb.Tensor) -> np.ndarray:
        # A view of the message's bytes: protobuf made the one copy off the socket.
        return tensors.from_wire(msg)


class InlineTransport(Transport):
    name = "inline"

    def call(self, request_bytes: int, reply_bytes: int) -> Call:
        return InlineCall()
