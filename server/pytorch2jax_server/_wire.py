"""Torch objects <-> protobuf messages that are no transport's: specs, bytes, model info.

The engine (``pytorch2jax_server.engine``) knows torch and no protobuf; what the servicer
and the transports build from or into messages on top of it lives here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pytorch2jax_protocol import dtypes, pb
from pytorch2jax_protocol.tensors import WireFormatError, checked_nbytes
from pytorch2jax_server.engine import (
    InvalidRequestError,
    ServedModel,
    check_dense,
    torch_dtype,
    wire_dtype,
)

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


def empty_from_spec(msg: pb.TensorSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised tensor of the spec's dtype and shape (created under the caller's mode)."""
    try:
        checked_nbytes(msg.dtype, msg.shape)
    except WireFormatError as e:
        raise InvalidRequestError(str(e)) from None
    return torch.empty(tuple(msg.shape), dtype=torch_dtype(msg.dtype), device=device)


def to_spec(t: torch.Tensor) -> pb.TensorSpec:
    check_dense(t)
    return pb.TensorSpec(dtype=wire_dtype(t.dtype), shape=t.shape)


def model_info(model: ServedModel) -> pb.ModelInfo:
    """What ListModels says about ``model``."""
    kind = pb.ModelInfo.MODULE if model.is_module else pb.ModelInfo.FUNCTION
    return pb.ModelInfo(
        name=model.name,
        kind=kind,
        parameters=[pb.NamedSpec(name=n, spec=to_spec(p)) for n, p in model.parameters.items()],
        buffers=[pb.NamedSpec(name=n, spec=to_spec(b)) for n, b in model.buffers.items()],
        signature=model.plain_signature,
        doc=model.doc,
    )
