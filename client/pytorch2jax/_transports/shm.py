"""The shared-memory transport: tensor bytes in shared memory, for a worker on this host.

The client owns the memory. It creates arenas (regions of 16 MiB, then doubling) and has
the worker map each one under its session. Over the worker's fast lane (``lane``) a
region is a memfd passed as a file descriptor: nothing of ours is ever named in /dev/shm,
and a crash at any moment leaks nothing. Without it (``fast_lane="off"``, a worker that
offers no lane, or one it cannot reach: another network namespace), a region is a named
POSIX segment, which the worker maps and both sides unlink at once; a client killed in the
moment between creating one and the worker mapping it leaves it in /dev/shm.

Per call, request tensors (inputs, parameters, cotangents) are copied into one block of an
arena and a second block is lent to the worker as the reply area, where it writes outputs
and gradients. Reply arrays are views of that block: ``jit`` copies them once into XLA's
output buffers, and eager calls hand them to JAX as they are. Blocks are leases
(``arenas``), never reused while an array aliases them.

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
from pytorch2jax._exceptions import InvalidArgumentError, UnsupportedError
from pytorch2jax._transports.arenas import Arena, ArenaTransport, Lease, locate
from pytorch2jax._transports.base import SETUP_TIMEOUT_S, Call
from pytorch2jax._transports.lane import FastLane
from pytorch2jax_protocol import dtypes, pb, shm, tensors
from pytorch2jax_protocol import lane as lane_frames

_log = logging.getLogger("pytorch2jax")

#: The first arena's size; each later one is at least twice the last.
DEFAULT_ARENA_BYTES = 16 << 20
#: Shared memory one client may hold in all; past it, tensors travel inline.
DEFAULT_MAX_SHARED_MEMORY_BYTES = 4 << 30

#: Arrays below this many bytes travel inline (``Transport.inline_below``); measured with
#: ``benchmarks/data_planes.py``: at 10x10 float32 a slot round trip costs ~100 us more.
DEFAULT_INLINE_BELOW = 8 << 10

#: ``ShmTransport(fast_lane=...)``: use the worker's fast lane if it offers one and it can
#: be reached, insist on it (UnsupportedError without), or never ask for it.
FAST_LANE_CHOICES = ("if_offered", "required", "off")


class HostLease(Lease):
    """A block of host shared memory. ``np.asarray(lease)`` is a uint8 array over it whose
    base is the lease, so every view of it, and every JAX array wrapping one without a
    copy, keeps the block reserved."""

    __slots__ = ("__array_interface__",)

    def __init__(self, arena: Arena, offset: int, nbytes: int, returns: collections.deque):
        super().__init__(arena, offset, nbytes, returns)
        self.__array_interface__ = {
            "data": (arena.address + offset, False),
            "shape": (nbytes,),
            "typestr": "|u1",
            "version": 3,
        }


class ShmCall(Call):
    def __init__(self, request: HostLease | None, reply: HostLease | None, inline_below: int) -> None:
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
        start = locate(reply, ref, msg)
        out = np.asarray(reply)[start : start + ref.nbytes]
        out = out.view(dtypes.to_numpy(msg.dtype)).reshape(tuple(msg.shape))
        if ref.nbytes < self._inline_below:
            return out.copy()  # a small array need not hold its (maybe larger) reply block
        out.flags.writeable = False
        return out

    def close(self) -> None:
        # The request block returns now; the reply block when its last array dies.
        self._request_bytes = self._reply = None


class ShmTransport(ArenaTransport):
    """Shared memory with a worker on this host, under one session (see the module doc).

    ``fast_lane``: ``"if_offered"`` carries the calls over the worker's fast lane when it
    offers one and it can be reached (memory then passes as file descriptors, never named
    in /dev/shm), ``"required"`` insists on it (UnsupportedError without), ``"off"`` sends
    the calls by gRPC and names the memory's segments.

    Example::

        transport = pytorch2jax.ShmTransport(arena_bytes=256 << 20, fast_lane="off")
        worker = pytorch2jax.connect("unix:///tmp/worker.sock", transport=transport)
    """

    _memory = "shared memory"
    _lease_type = HostLease
    _call_type = ShmCall

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_SHARED_MEMORY_BYTES,
        arena_bytes: int = DEFAULT_ARENA_BYTES,
        inline_below: int = DEFAULT_INLINE_BELOW,
        fast_lane: str = "if_offered",
    ) -> None:
        if fast_lane not in FAST_LANE_CHOICES:
            raise InvalidArgumentError(
                f"fast_lane must be one of {', '.join(map(repr, FAST_LANE_CHOICES))}; "
                f"got {fast_lane!r}"
            )
        super().__init__(max_bytes=max_bytes, arena_bytes=arena_bytes, inline_below=inline_below)
        self._fast_lane = fast_lane

    @property
    def name(self) -> str:
        """``"lane"`` while calls go over the fast lane, else ``"shm"``."""
        return "lane" if self.lane is not None else "shm"

    def _open(self) -> None:
        """Opens a session and registers a first arena, which proves the worker can map our
        memory (same host, same /dev/shm or lane, same user). Raises UnsupportedError if not."""
        wants_lane = self._fast_lane != "off"
        info = self._open_session(pb.SHM, fast_lane=wants_lane)
        try:
            if wants_lane:
                self.lane = self._reach_lane(info)
        except BaseException:
            self._end()
            raise
        self._first_arena()

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
                except (OSError, lane_frames.FrameError) as e:
                    why = f"cannot reach it: {e}"
                except grpc.RpcError as e:  # the worker refused the connection
                    why = f"cannot reach it: {e.details()}"
        if self._fast_lane == "required":
            raise UnsupportedError(f"no fast lane to the worker at {self._target}: {why}")
        _log.info("no fast lane to %s (%s); calls go by gRPC", self._target, why)
        return None

    def _end(self) -> None:
        if self.lane is not None:
            self.lane.close()
            self.lane = None
        super()._end()

    def _new_arena(self, size: int) -> Arena:
        """A new region of ``size`` bytes, registered with the worker: a memfd passed over
        the fast lane, or else a named segment, unlinked once the worker mapped it."""
        assert self._stub is not None  # opened
        if self.lane is not None:
            fd, mapping = shm.create_fd(size)
            try:
                region = self.lane.register(fd, size)
            finally:
                os.close(fd)  # the worker holds its own descriptor, or mapping, now
            memory = np.frombuffer(mapping, np.uint8)
            return Arena(region, size, memory.ctypes.data, memory)
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
        return Arena(reply.region, size, memory.ctypes.data, memory)

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["lane_connections"] = self.lane.connections() if self.lane is not None else 0
        return described
