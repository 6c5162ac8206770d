"""Torch dtypes <-> wire dtype codes, and the checks a tensor passes before it crosses.

The codes are the protocol's (``pytorch2jax_protocol.dtypes``, shared with the client);
turning tensors into protobuf messages is the worker's ``_wire`` and ``_dataplane``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pytorch2jax_protocol import dtypes
from pytorch2jax_server.engine._errors import InvalidRequestError

_TORCH_DTYPES = {name: getattr(torch, name) for name in dtypes.SUPPORTED_NAMES}
_TORCH_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}


def torch_dtype(code: int) -> torch.dtype:
    """The torch dtype of a wire dtype code; InvalidRequestError for one it cannot carry.

    Example::

        torch_dtype(dtypes.code_of("float32"))  # torch.float32
    """
    try:
        return _TORCH_DTYPES[dtypes.name_of(code)]
    except dtypes.UnsupportedDTypeError as e:
        raise InvalidRequestError(str(e)) from None


def wire_dtype(dtype: torch.dtype) -> int:
    """The wire dtype code of a torch dtype; ``dtypes.UnsupportedDTypeError`` for one the
    bridge cannot carry.

    Example::

        dtypes.name_of(wire_dtype(torch.bfloat16))  # "bfloat16"
    """
    try:
        return dtypes.code_of(_TORCH_NAMES[dtype])
    except KeyError:
        raise dtypes.UnsupportedDTypeError(
            f"torch dtype {dtype} cannot cross the bridge; supported: "
            f"{', '.join(dtypes.SUPPORTED_NAMES)}"
        ) from None


def is_differentiable(dtype: torch.dtype) -> bool:
    """Whether tensors of ``dtype`` carry gradients (floating or complex)."""
    return dtype.is_floating_point or dtype.is_complex


def check_dense(t: torch.Tensor) -> None:
    """InvalidRequestError unless ``t`` is strided: sparse layouts cannot cross."""
    if t.layout != torch.strided:
        raise InvalidRequestError(
            f"a {t.layout} tensor cannot cross the bridge; return dense tensors (.to_dense())"
        )


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, with its conjugation resolved; refuses sparse layouts."""
    check_dense(t)
    t = t.detach()
    return t.resolve_conj() if t.is_conj() else t


def dense_cpu(t: torch.Tensor) -> torch.Tensor:
    """``dense(t)``, on the CPU."""
    t = dense(t)
    return t if t.device.type == "cpu" else t.cpu()


def shape_str(shape: Sequence[int]) -> str:
    """A shape as Python writes a tuple, for messages: ``shape_str([3]) == "(3,)"``."""
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"
