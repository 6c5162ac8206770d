"""The wire dtypes: one table from the protobuf enum to names, item sizes and numpy dtypes.

Names are the ones numpy, JAX and torch share (``torch.float32`` is ``"float32"``), so each
side maps a name to its own dtype object without this module importing torch or jax.
"""

from __future__ import annotations

import numpy as np

from pytorch2jax_protocol import pb

_TABLE: dict[int, tuple[str, int]] = {
    pb.BOOL: ("bool", 1),
    pb.UINT8: ("uint8", 1),
    pb.INT8: ("int8", 1),
    pb.INT16: ("int16", 2),
    pb.INT32: ("int32", 4),
    pb.INT64: ("int64", 8),
    pb.FLOAT16: ("float16", 2),
    pb.BFLOAT16: ("bfloat16", 2),
    pb.FLOAT32: ("float32", 4),
    pb.FLOAT64: ("float64", 8),
    pb.COMPLEX64: ("complex64", 8),
    pb.COMPLEX128: ("complex128", 16),
}
_BY_NAME = {name: code for code, (name, _) in _TABLE.items()}

#: Dtype names whose tensors carry gradients.
DIFFERENTIABLE = frozenset({"float16", "bfloat16", "float32", "float64", "complex64", "complex128"})
SUPPORTED_NAMES = tuple(_BY_NAME)


class UnsupportedDTypeError(ValueError):
    """A dtype that the wire contract cannot carry."""


def name_of(code: int) -> str:
    """The dtype name of a wire enum value; raises UnsupportedDTypeError for unknown values."""
    try:
        return _TABLE[code][0]
    except KeyError:
        raise UnsupportedDTypeError(
            f"unknown wire dtype {code}; supported: {', '.join(SUPPORTED_NAMES)}"
        ) from None


def itemsize(code: int) -> int:
    name_of(code)
    return _TABLE[code][1]


def code_of(name: str) -> int:
    """The wire enum value of a dtype name such as ``"float32"``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnsupportedDTypeError(
            f"dtype {name!r} cannot cross the bridge; supported: {', '.join(SUPPORTED_NAMES)}"
        ) from None


# Both conversions run for every tensor of every call: their answers are kept.
_TO_NUMPY: dict[int, np.dtype] = {}
_FROM_NUMPY: dict[np.dtype, int] = {}


def to_numpy(code: int) -> np.dtype:
    dtype = _TO_NUMPY.get(code)
    if dtype is None:
        name = name_of(code)
        if name == "bfloat16":
            import ml_dtypes  # ships with jax; only the client side needs numpy bfloat16

            dtype = np.dtype(ml_dtypes.bfloat16)
        else:
            dtype = np.dtype(name)
        _TO_NUMPY[code] = dtype
    return dtype


def from_numpy(dtype: np.dtype) -> int:
    code = _FROM_NUMPY.get(dtype)
    if code is None:
        code = code_of(np.dtype(dtype).name)
        _FROM_NUMPY[dtype] = code  # only supported dtypes get here: the dict stays small
    return code
