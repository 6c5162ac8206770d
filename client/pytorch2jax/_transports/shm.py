"""The shared-memory transport: tensor bytes in POSIX shared memory, for a worker on this host.

The client owns the memory. It creates arenas (segments of 16 MiB, then doubling), has the
worker map each one under its session, and unlinks the name at once; the segments hold
nothing in /dev/shm from then on and vanish when both processes unmap them, crash or not.

Per call, request tensors (inputs, parameters, cotangents) are copied into one block of an
arena and a second block is lent to the worker as the reply area, where it writes outputs
and gradients. Reply arrays are views of that block: ``jit`` copies them once into XLA's
output buffers, and eager calls hand them to JAX as they are. A block is a ``_Lease``:
numpy arrays made from it keep it alive, and it returns to its arena's free list only when
the last of them dies, so a slot is never reused while an array aliases it.

Why raw slots and not Arrow's tensor IPC format (pyarrow): the tensor's dtype and shape
already travel in the gRPC message, so Arrow's flatbuffer header would only repeat them;
Arrow tensors have no bfloat16 or complex types, which we must carry; and a raw slot is
read with no parsing at all. ``benchmarks/data_planes.py`` measures both.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Any

import grpc
import numpy as np

from pytorch2jax._copy import copy_into
from pytorch2jax._exceptions import UnsupportedError, WorkerInternalError, from_rpc_error
from pytorch2jax._transports.base import SETUP_TIMEOUT_S, Call, SessionTransport, open_session
from pytorch2jax._transports.lane import FastLane
from pytorch2jax_protocol import DEFAULT_MAX_MESSAGE_BYTES, cuda, dtypes, pb, shm, tensors
from pytorch2jax_protocol import lane as lane_frames

_log = logging.getLogger("pytorch2jax")

_ARENA_ERRORS = (OSError, cuda.CudaError)

#: The first arena's size; each later one is at least twice the last.
DEFAULT_ARENA_BYTES = 16 << 20
#: Shared memory one client may hold in all; past it, tensors travel inline.
DEFAULT_MAX_SHARED_MEMORY_BYTES = 4 << 30

#: Arrays below this many bytes travel inline (``Transport.inline_below``); measured with
#: ``benchmarks/data_planes.py``: at 10x10 float32 a slot round trip costs ~100 us more.
DEFAULT_INLINE_BELOW = 8 << 10


class _Arena:
    """One region of the session (a host segment, or a GPU pool for ``cuda_ipc``) and the
    free blocks in it (first fit, coalescing)."""

    def __init__(self, region: int, size: int, address: int, owner: Any) -> None:
        self.region = region
        self.size = size
        self.address = address
        self.owner = owner  # keeps the memory mapped
        self._free = [(0, size)]  # (offset, size), sorted by offset

    def allocate(self, n: int) -> int | None:
        for i, (offset, size) in enumerate(self._free):
            if size >= n:
                if size == n:
                    del self._free[i]
                else:
                    self._free[i] = (offset + n, size - n)
                return offset
        return None

    def release(self, offset: int, n: int) -> None:
        free = self._free
        i = 0
        while i < len(free) and free[i][0] < offset:
            i += 1
        free.insert(i, (offset, n))
        if i + 1 < len(free) and offset + n == free[i + 1][0]:  # merge with the next
            free[i] = (offset, n + free.pop(i + 1)[1])
        if i > 0 and free[i - 1][0] + free[i - 1][1] == offset:  # and with the previous
            free[i - 1] = (free[i - 1][0], free[i - 1][1] + free.pop(i)[1])

    def in_use(self) -> int:
        return self.size - sum(n for _, n in self._free)


class _Lease:
    """Bytes ``[offset, offset + nbytes)`` of an arena, reserved until this object dies.

    ``np.asarray(lease)`` is a uint8 array over them whose base is the lease, so every view
    of it, and every JAX array wrapping one without a copy, keeps the bytes reserved.
    """

    __slots__ = ("__array_interface__", "_returns", "arena", "offset", "nbytes", "__weakref__")

    def __init__(self, arena: _Arena, offset: int, nbytes: int, returns: collections.deque):
        self.arena, self.offset, self.nbytes = arena, offset, nbytes
        self._returns = returns
        self.__array_interface__ = {
            "data": (arena.address + offset, False),
            "shape": (nbytes,),
            "typestr": "|u1",
            "version": 3,
        }

    @staticmethod
    def locate(lease: _Lease | None, ref: pb.SharedMemoryRef, msg: pb.Tensor) -> int:
        """Where the worker's reference ``ref`` to reply tensor ``msg`` starts in ``lease``
        (the call's reply block), after checking that it lies inside it."""
        try:
            if lease is None or ref.region != lease.arena.region or ref.offset < lease.offset:
                raise tensors.WireFormatError("reference outside the reply area")
            start = ref.offset - lease.offset
            shm.check_ref(start, ref.nbytes, lease.nbytes, msg.dtype, msg.shape)
        except tensors.WireFormatError as e:
            raise WorkerInternalError(f"the worker sent a bad reference to its reply: {e}") from None
        return start

    def ref(self) -> pb.SharedMemoryRef:
        return pb.SharedMemoryRef(region=self.arena.region, offset=self.offset, nbytes=self.nbytes)

    def __del__(self) -> None:
        # May run in any thread, even inside the allocator (a garbage collection there):
        # hand the block back through a deque, which the allocator drains under its lock.
        self._returns.append((self.arena, self.offset, self.nbytes))


class ShmCall(Call):
    def __init__(self, request: _Lease | None, reply: _Lease | None, inline_below: int) -> None:
        self._inline_below = inline_below
        # A view whose base is the lease: it keeps the request block reserved until close().
        self._request_bytes = np.asarray(request) if request is not None else None
        self._request_ref = request.ref() if request is not None else None
        self._cursor = 0
        self._reply = reply
        self.reply_area = reply.ref() if reply is not None else None

    def put(self, array: np.ndarray) -> pb.Tensor:
        nbytes = array.nbytes
        start = shm.align(self._cursor)
        room = self._request_bytes
        if room is None or nbytes < self._inline_below or nbytes == 0 or start + nbytes > room.size:
            return tensors.to_wire(array)
        code = dtypes.from_numpy(array.dtype)
        slot = room[start : start + nbytes].view(array.dtype).reshape(array.shape)
        copy_into(slot, np.asarray(array))
        self._cursor = start + nbytes
        base = self._request_ref
        ref = pb.SharedMemoryRef(region=base.region, offset=base.offset + start, nbytes=nbytes)
        return pb.Tensor(dtype=code, shape=array.shape, shm=ref)

    def get(self, msg: pb.Tensor) -> np.ndarray:
        if msg.WhichOneof("payload") != "shm":
            return tensors.from_wire(msg)
        reply, ref = self._reply, msg.shm
        start = _Lease.locate(reply, ref, msg)
        out = np.asarray(reply)[start : start + ref.nbytes]
        out = out.view(dtypes.to_numpy(msg.dtype)).reshape(tuple(msg.shape))
        if ref.nbytes < self._inline_below:
            return out.copy()  # a small array need not hold its (maybe larger) reply block
        out.flags.writeable = False
        return out

    def close(self) -> None:
        # The request block returns now; the reply block when its last array dies.
        self._request_bytes = self._reply = None


#: ``ShmTransport(fast_lane=...)``: use the worker's fast lane if it offers one and it can
#: be reached, insist on it (UnsupportedError without), or never ask for it.
FAST_LANE_CHOICES = ("if_offered", "required", "off")


class ShmTransport(SessionTransport):
    """Shared memory with a worker on this host, under one session (see the module doc)."""

    @property
    def name(self) -> str:
        """``"lane"`` while calls go over the fast lane, else ``"shm"``."""
        return "lane" if self._fast_lane != "off" and self.lane is not None else "shm"

    # What a subclass for other memory changes (``cuda_ipc``): the transport it asks the
    # worker for, and the lease and call types over its arenas.
    _offer = pb.SHM
    _memory = "shared memory"
    _lease_type: type = _Lease
    _call_type: type = ShmCall

    def __init__(
        self,
        channel: grpc.Channel,
        target: str,
        *,
        max_bytes: int = DEFAULT_MAX_SHARED_MEMORY_BYTES,
        arena_bytes: int = DEFAULT_ARENA_BYTES,
        inline_below: int = DEFAULT_INLINE_BELOW,
        fast_lane: str = "off",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(channel, target)
        if fast_lane not in FAST_LANE_CHOICES:
            raise ValueError(f"fast_lane must be one of {FAST_LANE_CHOICES}; got {fast_lane!r}")
        self._fast_lane = fast_lane
        self._max_message_bytes = max_message_bytes
        self.inline_below = inline_below
        self._max_bytes = max_bytes
        self._arena_bytes = arena_bytes
        self._returns: collections.deque = collections.deque()
        self._arenas: list[_Arena] = []
        self._warned = False
        self._open()

    # -- session -------------------------------------------------------------------------

    def _open(self) -> None:
        """Opens a session and registers a first arena, which proves the worker can map our
        segments (same host, same /dev/shm, same user). Raises UnsupportedError if not."""
        wants_lane = self._fast_lane != "off"
        stream, info = open_session(
            self._stub, self._target, [self._offer], fast_lane=wants_lane
        )
        if self._offer not in info.transports:
            stream.cancel()
            raise UnsupportedError(
                f"the worker at {self._target} does not offer the {self.name} transport to "
                f"this client: {info.refused or 'not offered'}"
            )
        self._stream = stream
        self._metadata = ((shm.SESSION_METADATA_KEY, info.session.hex()),)
        self._arenas = []
        try:
            if wants_lane:
                self.lane = self._reach_lane(info)
            self._grow(self._arena_bytes, strict=True)
        except BaseException:
            self._end()
            raise

    def _reach_lane(self, info: pb.SessionInfo) -> FastLane | None:
        """The session's fast lane, connected; None (or UnsupportedError, if required)
        when the worker gives none or it cannot be reached (another network namespace,
        another process id space: a container)."""
        why = info.refused or "the worker is too old to offer one"
        if info.HasField("fast_lane"):
            if not shm.HAS_MEMFD:
                why = "this system cannot pass memory as a file descriptor (memfd)"
            else:
                try:
                    return FastLane(
                        info.fast_lane,
                        max_message_bytes=self._max_message_bytes,
                        setup_timeout=SETUP_TIMEOUT_S,
                    )
                except (OSError, grpc.RpcError, lane_frames.FrameError) as e:
                    why = f"cannot reach it: {getattr(e, 'details', lambda: e)()}"
        if self._fast_lane == "required":
            raise UnsupportedError(f"no fast lane to the worker at {self._target}: {why}")
        _log.info("no fast lane to %s (%s); calls go by gRPC", self._target, why)
        return None

    def _end(self) -> None:
        super()._end()
        if self.lane is not None:
            self.lane.close()
            self.lane = None
        # Live leases keep their arena's mapping until they die; blocks of the old arenas
        # that come back later are dropped (_drain).
        self._arenas = []

    # -- memory --------------------------------------------------------------------------

    def call(self, request_bytes: int, reply_bytes: int) -> Call:
        with self._lock:
            self._reopen_if_due()
            request = self._lease(request_bytes) if request_bytes else None
            reply = self._lease(reply_bytes) if reply_bytes >= max(self.inline_below, 1) else None
            call = self._call_type(request, reply, self.inline_below)
            call.metadata = self._metadata  # the session of these leases
        return call

    def _drain(self) -> None:
        returns = self._returns
        while returns:
            arena, offset, n = returns.popleft()
            if any(a is arena for a in self._arenas):
                arena.release(offset, n)

    def _lease(self, nbytes: int) -> _Lease | None:
        self._drain()
        returns = self._returns
        nbytes = shm.align(nbytes)
        for arena in self._arenas:
            offset = arena.allocate(nbytes)
            if offset is not None:
                return self._lease_type(arena, offset, nbytes, returns)
        arena = self._grow(nbytes)
        if arena is None:
            return None
        offset = arena.allocate(nbytes)
        return None if offset is None else self._lease_type(arena, offset, nbytes, returns)

    def _grow(self, need: int, *, strict: bool = False) -> _Arena | None:
        if self._stream is None:
            return None  # closed, or no session for now (see SessionTransport._reopen)
        held = sum(a.size for a in self._arenas)
        size = max(need, self._arena_bytes, 2 * self._arenas[-1].size if self._arenas else 0)
        size = min(size, self._max_bytes - held)
        if size < need:
            self._warn(f"the client's shared-memory limit of {self._max_bytes} bytes is reached")
            return None
        try:
            arena = self._new_arena(size)
        except grpc.RpcError as e:
            if strict:
                raise from_rpc_error(e, self._target) from None
            self._warn(str(from_rpc_error(e, self._target)))
            return None
        except _ARENA_ERRORS as e:  # SharedMemoryError, no /dev/shm, a CUDA error
            why = getattr(e, "strerror", None) or str(e)
            if strict:
                raise UnsupportedError(f"cannot create {self._memory}: {why}") from None
            self._warn(why)
            return None
        self._arenas.append(arena)
        return arena

    def _new_arena(self, size: int) -> _Arena:
        """A new region of ``size`` bytes, registered with the worker: a memfd passed over
        the fast lane, or else a named segment, unlinked once the worker mapped it."""
        if self.lane is not None:
            fd, mapping = shm.create_fd(size)
            try:
                region = self.lane.register(fd, size)
            finally:
                os.close(fd)  # the worker holds its own descriptor, or mapping, now
            memory = np.frombuffer(mapping, np.uint8)
            return _Arena(region, size, memory.ctypes.data, memory)
        name, mapping = shm.create(size)
        try:
            reply = self._stub.RegisterRegion(
                pb.RegisterRegionRequest(name=name, size=size),
                metadata=self._metadata,
                timeout=SETUP_TIMEOUT_S,
            )
        finally:
            shm.unlink(name)  # the worker unlinked it too, unless it failed to map it
        memory = np.frombuffer(mapping, np.uint8)
        return _Arena(reply.region, size, memory.ctypes.data, memory)

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            _log.warning("tensors that do not fit in shared memory travel inline: %s", why)

    def describe(self) -> dict[str, Any]:
        with self._lock:
            self._drain()
            return {
                "transport": self.name,
                "lane_connections": self.lane.connections() if self.lane is not None else 0,
                "arenas": len(self._arenas),
                "bytes": sum(a.size for a in self._arenas),
                "in_use": sum(a.in_use() for a in self._arenas),
            }
