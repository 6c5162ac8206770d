"""Validating and encoding tensors on the wire (inline payloads), with numpy only.

Every size the peer sends is checked before anything is allocated: a known dtype, at most
``MAX_RANK`` non-negative dimensions, a byte size that 64-bit strides can index and that does
not pass ``max_bytes``, and a payload of exactly that many bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pytorch2jax_protocol import dtypes, pb

MAX_RANK = 64
#: Largest byte size of a tensor's non-zero dimensions. numpy and torch index with signed
#: 64-bit byte strides, and numpy refuses even an empty array whose other dimensions pass it.
MAX_INDEXABLE_BYTES = 1 << 62


class WireFormatError(ValueError):
    """A tensor message that is malformed: bad dtype, shape or payload size."""


def checked_nbytes(dtype: int, shape: Sequence[int], *, max_bytes: int | None = None) -> int:
    """The byte size of a ``dtype`` x ``shape`` tensor, after checking that it is sane."""
    try:
        size = dtypes.itemsize(dtype)
    except dtypes.UnsupportedDTypeError as e:
        raise WireFormatError(str(e)) from None
    if len(shape) > MAX_RANK:
        raise WireFormatError(f"tensor has rank {len(shape)}; at most {MAX_RANK} is supported")
    # Python ints: no overflow; everything is compared before anything is allocated.
    elements, empty = 1, False
    for d in shape:
        if d < 0:
            raise WireFormatError(f"tensor shape {tuple(shape)} has a negative dimension")
        if d:
            elements *= d
        else:
            empty = True
    if size * elements > MAX_INDEXABLE_BYTES:
        # Even with a zero dimension (0 bytes), strides of such a shape overflow 64 bits.
        raise WireFormatError(f"tensor shape {tuple(shape)} is too large to index")
    nbytes = 0 if empty else size * elements
    if max_bytes is not None and nbytes > max_bytes:
        raise WireFormatError(
            f"tensor of shape {tuple(shape)} needs {nbytes} bytes, over the limit of {max_bytes}"
        )
    return nbytes


def spec_of(dtype: np.dtype, shape: Sequence[int]) -> pb.TensorSpec:
    return pb.TensorSpec(dtype=dtypes.from_numpy(dtype), shape=[int(d) for d in shape])


def to_wire(array: np.ndarray) -> pb.Tensor:
    """An inline Tensor message holding a copy of ``array``'s bytes (C order, little-endian)."""
    array = np.asarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return pb.Tensor(
        dtype=dtypes.from_numpy(array.dtype),
        shape=array.shape,
        inline_data=np.ascontiguousarray(array).tobytes(),
    )


def inline_payload(tensor: pb.Tensor, *, max_bytes: int | None = None) -> bytes:
    """The validated inline bytes of ``tensor``."""
    nbytes = checked_nbytes(tensor.dtype, tensor.shape, max_bytes=max_bytes)
    if tensor.WhichOneof("payload") != "inline_data":
        raise WireFormatError("tensor has no payload; send its bytes in inline_data")
    data = tensor.inline_data
    if len(data) != nbytes:
        raise WireFormatError(
            f"tensor payload has {len(data)} bytes but dtype {dtypes.name_of(tensor.dtype)} "
            f"x shape {tuple(tensor.shape)} needs {nbytes}"
        )
    return data


def from_wire(tensor: pb.Tensor, *, max_bytes: int | None = None) -> np.ndarray:
    """A read-only numpy view of ``tensor``'s inline bytes (no copy beyond protobuf's)."""
    data = inline_payload(tensor, max_bytes=max_bytes)
    return np.frombuffer(data, dtype=dtypes.to_numpy(tensor.dtype)).reshape(tuple(tensor.shape))
