"""The inline transport: tensor bytes inside the gRPC message, on any host."""

from __future__ import annotations

import numpy as np
import torch

from pytorch2jax_protocol import dtypes, pb
from pytorch2jax_protocol.tensors import WireFormatError, inline_payload

from pytorch2jax_server._wire import from_bytes
from pytorch2jax_server.engine import InvalidRequestError, dense_cpu, wire_dtype


def decode(msg: pb.Tensor) -> torch.Tensor:
    """A fresh, writable torch tensor with the message's data.

    It is a copy rather than a view of the protobuf bytes: those are immutable, and a
    model that writes into its input must not corrupt them.
    """
    try:
        data = inline_payload(msg)
    except WireFormatError as e:
        raise InvalidRequestError(str(e)) from None
    # numpy's copy is aligned for every dtype, which protobuf's bytes need not be.
    return from_bytes(np.frombuffer(data, np.uint8).copy(), msg.dtype, msg.shape)


def encode(t: torch.Tensor) -> pb.Tensor:
    return pb.Tensor(dtype=wire_dtype(t.dtype), shape=tuple(t.shape), inline_data=tensor_bytes(t))


def tensor_bytes(t: torch.Tensor) -> bytes:
    """``t``'s values as bytes, C order, on the host (sparse layouts refused)."""
    plain = t.is_cpu and t.layout is torch.strided and t.dtype in _NUMPY_DTYPES
    if plain and not (t.is_conj() or t.is_neg()):
        # Most outputs: numpy reads their bytes at once (a third of the general path's
        # time, on every small call's reply). tobytes copies in C order whatever the strides.
        return (t.detach() if t.requires_grad else t).numpy().tobytes()
    t = dense_cpu(t).contiguous()
    # Viewing as bytes is zero-copy for every dtype torch has, bfloat16 included.
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


#: The wire's dtypes that numpy can view as they are (all but bfloat16, which it lacks).
_NUMPY_DTYPES = frozenset(getattr(torch, n) for n in dtypes.SUPPORTED_NAMES if n != "bfloat16")
