"""The few CUDA runtime calls the CUDA IPC transport makes, on both sides, through cuda-python.

Neither torch's nor JAX's allocator is used for the shared memory: the worker takes each
pool with a plain ``cudaMalloc``, whose memory legacy CUDA IPC can export (memory from
``cudaMallocAsync`` or the virtual-memory APIs cannot be), and the client opens its handle
once. GPUs are named by their 16-byte UUID, because ordinals differ between processes that
see different ``CUDA_VISIBLE_DEVICES``.

``cuda.bindings`` (the ``cuda-bindings`` package, an optional extra on both sides) is
imported on first use; without it, or without a driver, ``available()`` is False.
"""

from __future__ import annotations

import ctypes
from typing import Any

#: The size of a cudaIpcMemHandle_t.
IPC_HANDLE_BYTES = 64
UUID_BYTES = 16


class CudaError(RuntimeError):
    """A CUDA runtime call failed, or cuda-python is missing."""


def _runtime() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError:
        raise CudaError(
            "CUDA IPC needs cuda-python on both sides: pip install 'cuda-bindings>=12.9,<14' "
            "(the 'cuda' extra of pytorch2jax)"
        ) from None
    return runtime


def _check(result: tuple, what: str) -> Any:
    rt = _runtime()
    err = result[0]
    if err != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(err)
        raise CudaError(f"{what} failed: {name.decode() if isinstance(name, bytes) else err}")
    return result[1] if len(result) == 2 else result[1:] or None


def available() -> bool:
    """Whether cuda-python is installed and a driver sees at least one GPU."""
    try:
        return _check(_runtime().cudaGetDeviceCount(), "cudaGetDeviceCount") > 0
    except Exception:  # noqa: BLE001 - no bindings, no driver library, no device: all "no"
        return False


def device_uuid(ordinal: int) -> bytes:
    """The 16-byte UUID of the GPU this process calls ``ordinal``."""
    props = _check(_runtime().cudaGetDeviceProperties(ordinal), "cudaGetDeviceProperties")
    return bytes(props.uuid.bytes)[:UUID_BYTES]


def ordinal_of(uuid: bytes) -> int | None:
    """This process's ordinal of the GPU with ``uuid``, or None if it does not see it."""
    count = _check(_runtime().cudaGetDeviceCount(), "cudaGetDeviceCount")
    for i in range(count):
        if device_uuid(i) == uuid:
            return i
    return None


def malloc(ordinal: int, nbytes: int) -> int:
    rt = _runtime()
    _check(rt.cudaSetDevice(ordinal), "cudaSetDevice")
    return int(_check(rt.cudaMalloc(nbytes), f"cudaMalloc of {nbytes} bytes"))


def free(pointer: int) -> None:
    _check(_runtime().cudaFree(pointer), "cudaFree")


def export(pointer: int) -> bytes:
    """The IPC handle of the allocation that starts at ``pointer``, as bytes."""
    handle = _check(_runtime().cudaIpcGetMemHandle(pointer), "cudaIpcGetMemHandle")
    # cuda-bindings 13 exposes the handle's bytes only through its address.
    return ctypes.string_at(handle.getPtr(), IPC_HANDLE_BYTES)


def open_handle(ordinal: int, handle: bytes) -> int:
    """Maps another process's allocation into this one; returns its device pointer."""
    if len(handle) != IPC_HANDLE_BYTES:
        raise CudaError(f"a CUDA IPC handle has {IPC_HANDLE_BYTES} bytes; got {len(handle)}")
    rt = _runtime()
    _check(rt.cudaSetDevice(ordinal), "cudaSetDevice")
    h = rt.cudaIpcMemHandle_t()
    ctypes.memmove(h.getPtr(), handle, IPC_HANDLE_BYTES)
    return int(
        _check(
            rt.cudaIpcOpenMemHandle(h, rt.cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle"
        )
    )


def close_handle(pointer: int) -> None:
    _check(_runtime().cudaIpcCloseMemHandle(pointer), "cudaIpcCloseMemHandle")


def copy_async(dst: int, src: int, nbytes: int, stream: int) -> None:
    """Copies ``nbytes`` between two device pointers (or host ones: the kind is inferred
    from unified addressing) in ``stream``'s order."""
    rt = _runtime()
    kind = rt.cudaMemcpyKind.cudaMemcpyDefault
    _check(rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync")


def synchronize(stream: int) -> None:
    _check(_runtime().cudaStreamSynchronize(stream), "cudaStreamSynchronize")


def array_interface(pointer: int, shape: tuple, typestr: str, *, readonly: bool = False) -> dict:
    """A ``__cuda_array_interface__`` for C-contiguous device memory at ``pointer``."""
    return {
        "data": (pointer, readonly),
        "shape": tuple(shape),
        "typestr": typestr,
        "strides": None,
        "version": 3,
        "stream": None,  # callers order their own copies (see the transports)
    }


class DeviceView:
    """``nbytes`` of device memory at ``pointer`` as an array of ``dtype``/``shape`` that
    torch, JAX and CuPy accept through ``__cuda_array_interface__``; ``owner`` is kept
    alive as long as the view is."""

    __slots__ = ("__cuda_array_interface__", "dtype", "shape", "nbytes", "owner")

    def __init__(self, pointer: int, typestr: str, dtype: Any, shape: tuple, nbytes: int,
                 owner: Any, *, readonly: bool = False) -> None:
        self.dtype, self.shape, self.nbytes, self.owner = dtype, tuple(shape), nbytes, owner
        self.__cuda_array_interface__ = array_interface(pointer, shape, typestr, readonly=readonly)
