"""The CUDA IPC transport: tensor bytes in GPU pools the worker allocates, for JAX arrays on
the same GPU as a worker serving with ``--device cuda``.

The worker owns the memory: for each arena it takes a pool with ``cudaMalloc`` and sends
its IPC handle, which this client opens once (``pytorch2jax_protocol.cuda``); arenas and
leases are ``arenas``', over device addresses. Calls go by gRPC (the fast lane carries
only host memory so far). Per call:

- request arrays are copied device-to-device into a request block, in the order of the
  stream XLA runs the callback on (or after ``block_until_ready`` for eager calls), and
  that stream is synchronised before the RPC goes out (``ready``);
- the worker writes outputs and gradients into the reply block and synchronises its own
  stream before replying; reply tensors are ``cuda.DeviceView`` objects over the block,
  which ``jit`` copies into XLA's output buffers and eager calls copy into new arrays
  (``to_jax``) before the block is released.

Host (numpy) arrays of a call travel inline. Needs cuda-python on the client (the ``cuda``
extra) and a JAX with CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pytorch2jax._callbacks import HOST_IO, REPORTED, ArrayIO, buffer_callback
from pytorch2jax._exceptions import UnsupportedError, WorkerInternalError
from pytorch2jax._transports.arenas import Arena, ArenaTransport, Lease, locate
from pytorch2jax._transports.base import SETUP_TIMEOUT_S, Call
from pytorch2jax_protocol import cuda, dtypes, pb, shm, tensors

#: The first pool's size; each later one is at least twice the last.
DEFAULT_POOL_BYTES = 64 << 20
#: GPU memory one client may hold in pools on the worker's GPU.
DEFAULT_MAX_POOL_BYTES = 8 << 30

_BUFFER_CALLBACK = "jax.experimental.buffer_callback"

_stream = threading.local()


@contextlib.contextmanager
def on_stream(stream: int) -> Iterator[None]:
    """Orders this thread's transport copies on ``stream`` (XLA's, inside a callback)."""
    outer = getattr(_stream, "value", 0)
    _stream.value = stream
    try:
        yield
    finally:
        _stream.value = outer


def current_stream() -> int:
    """The stream copies go on: XLA's inside a callback, else the legacy default stream."""
    return getattr(_stream, "value", 0)


def is_device_array(x: Any) -> bool:
    """A JAX array on a GPU, an XLA GPU buffer, or a device view."""
    if isinstance(x, jax.Array):
        return x.is_fully_addressable and all(d.platform == "gpu" for d in x.devices())
    return hasattr(x, "__cuda_array_interface__")


def _pointer(x: Any) -> int:
    # jax.Array's __cuda_array_interface__ refuses bfloat16; its buffer pointer does not.
    if isinstance(x, jax.Array):
        return x.unsafe_buffer_pointer()
    return x.__cuda_array_interface__["data"][0]


def nbytes_of(x: Any) -> int:
    """The bytes of a device array (XLA's GPU buffers have no ``nbytes``)."""
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def _typestr(dtype: np.dtype) -> str:
    # The CUDA array interface has no bfloat16: its bits travel as uint16 (see to_jax).
    return "<u2" if dtype.name == "bfloat16" else dtype.str


def host_copy(x: Any) -> np.ndarray:
    """A device array's bytes as a numpy array (a device-to-host copy, synchronised)."""
    if isinstance(x, jax.Array):
        return np.asarray(x)
    out = np.empty(x.shape, np.dtype(x.dtype))
    if out.nbytes:
        cuda.copy_async(out.ctypes.data, _pointer(x), out.nbytes, current_stream())
        cuda.synchronize(current_stream())
    return out


def copy_to(buffer: Any, value: Any) -> None:
    """Copies ``value`` (a device view, or a host array) into an XLA output ``buffer`` in the
    current stream's order; the caller synchronises before the value's memory is reused.

    A value of another dtype (torch's float64 where JAX without x64 expects float32) is
    cast on the host: a device copy of its bytes would overrun the buffer."""
    want = np.dtype(buffer.dtype)
    nbytes = nbytes_of(buffer)
    if is_device_array(value) and np.dtype(value.dtype) == want and nbytes_of(value) == nbytes:
        src = _pointer(value)
    else:
        host = host_copy(value) if is_device_array(value) else value
        value = np.ascontiguousarray(host, dtype=want)
        if value.nbytes != nbytes:
            raise WorkerInternalError(
                f"a reply of shape {value.shape} does not fit an output of shape {buffer.shape}"
            )
        src = value.ctypes.data
    if nbytes:
        cuda.copy_async(_pointer(buffer), src, nbytes, current_stream())


def to_jax(value: Any) -> Any:
    """A JAX array with a copy of a device view's data; waits for the copy, so the view's
    block may be reused as soon as the view dies."""
    out = jnp.array(value, copy=True)
    if np.dtype(value.dtype).name == "bfloat16":
        out = jax.lax.bitcast_convert_type(out, jnp.bfloat16)
    return out.block_until_ready()


class DeviceIO(ArrayIO):
    """GPU memory: JAX's device arrays, or XLA's device buffers inside a callback, go to
    the transport as they are, and device views of the reply block come back."""

    def to_backend(self, array: jax.Array) -> Any:
        return array

    def to_jax(self, value: Any, struct: Any, *, owned: bool) -> jax.Array:
        out = to_jax(value) if is_device_array(value) else jnp.asarray(value)
        if struct is not None and out.dtype != struct.dtype:
            out = out.astype(struct.dtype)
        return out

    def to_bytes(self, value: Any) -> bytes:
        if isinstance(value, (np.ndarray, jax.Array)):
            return bytes(np.asarray(value))
        return bytes(host_copy(value))

    def stage(self, host: Any, results: Any, inputs: Any) -> list[Any]:
        if buffer_callback is None or jax.default_backend() != "gpu":
            return HOST_IO.stage(host, results, inputs)
        # XLA's GPU buffers go to the transport as they are: no trip through the host.
        callback = functools.partial(_into_device_buffers, host)
        return buffer_callback(callback, list(results), vmap_method="sequential")(*inputs)


def _into_device_buffers(host: Any, ctx: Any, out: Any, *inputs: Any) -> None:
    # The transport's copies go on XLA's stream (ctx.stream), after the producers of the
    # inputs; the sync at the end lets the reply block go before XLA reads ``out``.
    with on_stream(ctx.stream):
        with REPORTED:
            results = host(*inputs)
        for buf, value in zip(out, results):
            copy_to(buf, value)
        cuda.synchronize(ctx.stream)


DEVICE_IO = DeviceIO()


class DeviceLease(Lease):
    """A block of a GPU pool, with the CUDA array interface (and none numpy would read)."""

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, arena: Arena, offset: int, nbytes: int, returns: Any) -> None:
        super().__init__(arena, offset, nbytes, returns)
        self.__cuda_array_interface__ = cuda.array_interface(arena.address + offset, (nbytes,), "|u1")


class CudaIpcCall(Call):
    def __init__(self, request: DeviceLease | None, reply: DeviceLease | None, inline_below: int):
        self._request = request
        self._cursor = 0
        self._copied = False
        self._reply = reply
        self.reply_area = reply.ref() if reply is not None else None

    def put(self, array: Any) -> pb.Tensor:
        if not is_device_array(array):
            return tensors.to_wire(np.asarray(array))
        if isinstance(array, jax.Array):  # eager: its data must be there before we copy
            array.block_until_ready()
        dtype = np.dtype(array.dtype)
        nbytes = nbytes_of(array)
        start = shm.align(self._cursor)
        room = self._request
        if room is None or nbytes == 0 or start + nbytes > room.nbytes:
            return tensors.to_wire(host_copy(array))
        cuda.copy_async(room.address + start, _pointer(array), nbytes, current_stream())
        self._copied = True
        self._cursor = start + nbytes
        ref = pb.SharedMemoryRef(region=room.arena.region, offset=room.offset + start, nbytes=nbytes)
        return pb.Tensor(dtype=dtypes.from_numpy(dtype), shape=array.shape, cuda_ipc=ref)

    def ready(self) -> None:
        if self._copied:
            cuda.synchronize(current_stream())

    def get(self, msg: pb.Tensor) -> Any:
        if msg.WhichOneof("payload") != "cuda_ipc":
            return tensors.from_wire(msg)
        start = locate(self._reply, msg.cuda_ipc, msg)
        dtype = dtypes.to_numpy(msg.dtype)
        return cuda.DeviceView(
            self._reply.address + start,
            _typestr(dtype),
            dtype,
            tuple(msg.shape),
            msg.cuda_ipc.nbytes,
            self._reply,
            readonly=True,
        )

    def close(self) -> None:
        self._request = self._reply = None


class _IpcMapping:
    """A pool opened in this process; closed when the last lease over it dies."""

    def __init__(self, ordinal: int, handle: bytes) -> None:
        self.pointer = cuda.open_handle(ordinal, handle)

    def __del__(self) -> None:
        pointer, self.pointer = getattr(self, "pointer", 0), 0
        if pointer:
            cuda.close_handle(pointer)


def _jax_gpu() -> Any:
    # Calls under jit hand XLA's GPU buffers over through buffer_callback (jax >= 0.7).
    if jax.default_backend() != "gpu" or importlib.util.find_spec(_BUFFER_CALLBACK) is None:
        raise UnsupportedError(
            "the cuda_ipc transport needs a JAX (0.7 or newer) whose default backend is a "
            "GPU (pip install 'jax[cuda13]' or 'jax[cuda12]'); use 'shm' for CPU arrays"
        )
    return jax.devices("gpu")[0]


class CudaIpcTransport(ArenaTransport):
    """GPU pools of a worker on this host and GPU, under one session (see the module doc)."""

    name = "cuda_ipc"
    io = DEVICE_IO
    _memory = "CUDA IPC pools"
    _lease_type = DeviceLease
    _call_type = CudaIpcCall

    def __init__(
        self, *, max_bytes: int = DEFAULT_MAX_POOL_BYTES, pool_bytes: int = DEFAULT_POOL_BYTES
    ) -> None:
        if not cuda.available():
            raise UnsupportedError(
                "the cuda_ipc transport needs cuda-python and a GPU on this machine: "
                "pip install 'pytorch2jax[cuda]'"
            )
        device = _jax_gpu()
        self._ordinal = device.local_hardware_id
        self._uuid = cuda.device_uuid(self._ordinal)
        # A small GPU array inline would cost a device-to-host copy: none travel inline.
        super().__init__(max_bytes=max_bytes, arena_bytes=pool_bytes, inline_below=0)

    def _open(self) -> None:
        """Opens a session and has the worker make a first pool, which proves it serves
        on this GPU and can export its memory. Raises UnsupportedError if not."""
        self._open_session(pb.CUDA_IPC)
        self._first_arena()

    def _end(self) -> None:
        # Close our mappings before the worker frees the pools (which ending the session
        # makes it do): CUDA leaves freeing memory still opened elsewhere undefined. A pool
        # a live array still views stays open until that array dies.
        self._arenas = []
        super()._end()

    def _new_arena(self, size: int) -> Arena:
        assert self._stub is not None  # opened
        reply = self._stub.CreateCudaPool(
            pb.CreateCudaPoolRequest(device_uuid=self._uuid, size=size),
            metadata=self._metadata,
            timeout=SETUP_TIMEOUT_S,
        )
        mapping = _IpcMapping(self._ordinal, reply.ipc_handle)
        return Arena(reply.region, size, mapping.pointer, mapping)
