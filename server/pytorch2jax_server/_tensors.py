"""Torch dtypes and specs <-> their wire form; the transports build on these."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pytorch2jax_protocol import dtypes, pb
from pytorch2jax_protocol.tensors import WireFormatError, checked_nbytes

from pytorch2jax_server._errors import InvalidRequest

_TORCH_DTYPES = {name: getattr(torch, name) for name in dtypes.SUPPORTED_NAMES}
_TORCH_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}


def torch_dtype(code: int) -> torch.dtype:
    try:
        return _TORCH_DTYPES[dtypes.name_of(code)]
    except dtypes.UnsupportedDTypeError as e:
        raise InvalidRequest(str(e)) from None


# numpy has no bfloat16: its bits are viewed as uint16 there, then as bfloat16 by torch.
_NUMPY_VIEWS = {
    dtypes.code_of(name): np.dtype("uint16" if name == "bfloat16" else name)
    for name in dtypes.SUPPORTED_NAMES
}


def from_bytes(raw: np.ndarray, dtype: int, shape: Sequence[int]) -> torch.Tensor:
    """The uint8 array ``raw`` as a tensor of ``dtype`` and ``shape``, sharing its memory.

    The caller has checked that ``raw`` holds exactly dtype x shape bytes, aligned for the
    dtype. Cutting with numpy and wrapping with ``torch.from_numpy`` is several times
    cheaper per tensor than doing the same with torch's own views.
    """
    view = raw.view(_NUMPY_VIEWS[dtype]).reshape(tuple(shape))
    t = torch.from_numpy(view)
    return t.view(torch.bfloat16) if dtype == pb.BFLOAT16 else t


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


def empty_from_spec(msg: pb.TensorSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised tensor of the spec's dtype and shape (created under the caller's mode)."""
    try:
        checked_nbytes(msg.dtype, msg.shape)
    except WireFormatError as e:
        raise InvalidRequest(str(e)) from None
    return torch.empty(tuple(msg.shape), dtype=torch_dtype(msg.dtype), device=device)


def _check_dense(t: torch.Tensor) -> None:
    if t.layout != torch.strided:
        raise InvalidRequest(
            f"a {t.layout} tensor cannot cross the bridge; return dense tensors (.to_dense())"
        )


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, with its conjugation resolved; refuses sparse layouts."""
    _check_dense(t)
    t = t.detach()
    return t.resolve_conj() if t.is_conj() else t


def dense_cpu(t: torch.Tensor) -> torch.Tensor:
    """``dense(t)``, on the CPU."""
    t = dense(t)
    return t if t.device.type == "cpu" else t.cpu()


def to_spec(t: torch.Tensor) -> pb.TensorSpec:
    _check_dense(t)
    return pb.TensorSpec(dtype=wire_dtype(t.dtype), shape=t.shape)


def shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"
