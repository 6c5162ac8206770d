"""Wire tensors <-> torch tensors (inline payloads)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from pytorch2jax_protocol import dtypes, pb
from pytorch2jax_protocol.tensors import WireFormatError, checked_nbytes, inline_payload

from pytorch2jax_server._errors import InvalidRequest

_TORCH_DTYPES = {name: getattr(torch, name) for name in dtypes.SUPPORTED_NAMES}
_TORCH_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}


def torch_dtype(code: int) -> torch.dtype:
    try:
        return _TORCH_DTYPES[dtypes.name_of(code)]
    except dtypes.UnsupportedDTypeError as e:
        raise InvalidRequest(str(e)) from None


def wire_dtype(dtype: torch.dtype) -> int:
    try:
        return dtypes.code_of(_TORCH_NAMES[dtype])
    except KeyError:
        raise dtypes.UnsupportedDTypeError(
            f"torch dtype {dtype} cannot cross the bridge; supported: "
            f"{', '.join(dtypes.SUPPORTED_NAMES)}"
        ) from None


def is_differentiable(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def from_wire(msg: pb.Tensor) -> torch.Tensor:
    """A fresh, writable torch tensor with the message's data.

    It is a copy rather than a view of the protobuf bytes: those are immutable, and a
    model that writes into its input must not corrupt them.
    """
    try:
        data = inline_payload(msg)
    except WireFormatError as e:
        raise InvalidRequest(str(e)) from None
    out = torch.empty(tuple(msg.shape), dtype=torch_dtype(msg.dtype))
    if data:
        with warnings.catch_warnings():  # read-only source: we only read from it
            warnings.simplefilter("ignore", UserWarning)
            src = torch.frombuffer(data, dtype=torch.uint8)
        out.view(-1).view(torch.uint8).copy_(src)
    return out


def empty_from_spec(msg: pb.TensorSpec) -> torch.Tensor:
    """An uninitialised tensor of the spec's dtype and shape (created under the caller's mode)."""
    try:
        checked_nbytes(msg.dtype, msg.shape)
    except WireFormatError as e:
        raise InvalidRequest(str(e)) from None
    return torch.empty(tuple(msg.shape), dtype=torch_dtype(msg.dtype))


def to_wire(t: torch.Tensor) -> pb.Tensor:
    if t.layout != torch.strided:
        raise InvalidRequest(
            f"a {t.layout} tensor cannot cross the bridge; return dense tensors (.to_dense())"
        )
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.is_conj():
        t = t.resolve_conj()
    # Viewing as bytes is zero-copy for every dtype torch has, bfloat16 included.
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(dtype=wire_dtype(t.dtype), shape=t.shape, inline_data=data)


def to_spec(t: torch.Tensor) -> pb.TensorSpec:
    if t.layout != torch.strided:
        raise InvalidRequest(
            f"a {t.layout} tensor cannot cross the bridge; return dense tensors (.to_dense())"
        )
    return pb.TensorSpec(dtype=wire_dtype(t.dtype), shape=t.shape)


def shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"
