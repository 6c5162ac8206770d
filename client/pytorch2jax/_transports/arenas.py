"""Arenas of a session's memory and the blocks lent out of them, for the transports whose
tensors live in memory both processes see: host shared memory (``shm``) and GPU pools
(``cuda_ipc``).

An ``ArenaTransport`` holds the session's arenas (regions of 16 MiB or more, each at least
twice the last, up to a limit) and lends blocks of them (``Lease``): per call, one block
for the request's tensors and one the worker writes its reply into. A lease returns its
block to its arena's free list only when the lease dies, and every array viewing the block
keeps it alive, so a block is never reused while an array aliases it. How a region is made
(``_new_arena``) and what a lease and a call are over it (``_lease_type``, ``_call_type``)
are the subclass's.
"""

from __future__ import annotations

import abc
import collections
import logging
from typing import Any

import grpc

from pytorch2jax._exceptions import (
    Pytorch2JaxError,
    ResourceExhaustedError,
    UnsupportedError,
    WorkerInternalError,
    from_rpc_error,
)
from pytorch2jax._transports.base import Call, SessionTransport, open_session
from pytorch2jax_protocol import cuda, pb, shm, tensors

_log = logging.getLogger("pytorch2jax")

#: What making a region may raise besides an RPC error: SharedMemoryError, no /dev/shm, a
#: CUDA error.
_ARENA_ERRORS = (OSError, cuda.CudaError)


class Arena:
    """One region of the session and the free blocks in it (first fit, coalescing)."""

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


class Lease:
    """Bytes ``[offset, offset + nbytes)`` of an arena, reserved until this object dies.
    Subclasses give it the array interface of their memory (host or device), so that
    arrays over it keep it, and with it the bytes, alive."""

    __slots__ = ("_returns", "arena", "offset", "nbytes", "__weakref__")

    def __init__(self, arena: Arena, offset: int, nbytes: int, returns: collections.deque):
        self.arena, self.offset, self.nbytes = arena, offset, nbytes
        self._returns = returns

    @property
    def address(self) -> int:
        return self.arena.address + self.offset

    def ref(self) -> pb.SharedMemoryRef:
        return pb.SharedMemoryRef(region=self.arena.region, offset=self.offset, nbytes=self.nbytes)

    def __del__(self) -> None:
        # May run in any thread, even inside the allocator (a garbage collection there):
        # hand the block back through a deque, which the allocator drains under its lock.
        self._returns.append((self.arena, self.offset, self.nbytes))


def locate(lease: Lease | None, ref: pb.SharedMemoryRef, msg: pb.Tensor) -> int:
    """Where the worker's reference ``ref`` to reply tensor ``msg`` starts in ``lease`` (the
    call's reply block), after checking that it lies inside it."""
    try:
        if lease is None or ref.region != lease.arena.region or ref.offset < lease.offset:
            raise tensors.WireFormatError("reference outside the reply area")
        start = ref.offset - lease.offset
        shm.check_ref(start, ref.nbytes, lease.nbytes, msg.dtype, msg.shape)
    except tensors.WireFormatError as e:
        raise WorkerInternalError(f"the worker sent a bad reference to its reply: {e}") from None
    return start


class ArenaTransport(SessionTransport):
    """A session whose tensors travel in arenas of memory both processes map."""

    #: What its memory is called in messages.
    _memory: str
    #: The lease and call types over the arenas.
    _lease_type: type[Lease]
    _call_type: type[Call]

    def __init__(self, *, max_bytes: int, arena_bytes: int, inline_below: int) -> None:
        super().__init__()
        self.inline_below = inline_below
        self._max_bytes = max_bytes
        self._arena_bytes = arena_bytes
        self._returns: collections.deque = collections.deque()
        self._arenas: list[Arena] = []
        self._warned = False

    @abc.abstractmethod
    def _new_arena(self, size: int) -> Arena:
        """A new region of ``size`` bytes, registered with the worker under the session."""

    def _open_session(self, offer: int, *, fast_lane: bool = False) -> pb.SessionInfo:
        """Opens a session in which the worker allows ``offer`` (UnsupportedError if it
        does not) and keeps its stream and metadata; the worker's answer."""
        assert self._stub is not None  # opened
        stream, info = open_session(self._stub, self._target, [offer], fast_lane=fast_lane)
        if offer not in info.transports:
            stream.cancel()
            raise UnsupportedError(
                f"the worker at {self._target} does not offer {self._memory} to this client: "
                f"{info.refused or 'not offered'}"
            )
        self._stream = stream
        self._metadata = ((shm.SESSION_METADATA_KEY, info.session.hex()),)
        return info

    def _first_arena(self) -> None:
        """Makes the session's first arena, which proves the worker can use our memory;
        raises (UnsupportedError if it cannot) and ends the session if not."""
        self._arenas = []
        try:
            self._arenas.append(self._make_arena(self._arena_bytes))
        except BaseException:
            self._end()
            raise

    def _end(self) -> None:
        super()._end()
        # Live leases keep their arena's mapping until they die; blocks of the old arenas
        # that come back later are dropped (_drain).
        self._arenas = []

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

    def _lease(self, nbytes: int) -> Lease | None:
        """A block of ``nbytes`` (under ``_lock``), in a new arena if none has room; None
        when no arena can be had (the tensors then travel inline)."""
        self._drain()
        returns = self._returns
        nbytes = shm.align(nbytes)
        for arena in self._arenas:
            offset = arena.allocate(nbytes)
            if offset is not None:
                return self._lease_type(arena, offset, nbytes, returns)
        if self._stream is None:
            return None  # closed, or no session for now (see SessionTransport._reopen)
        try:
            arena = self._make_arena(nbytes)
        except Pytorch2JaxError as e:
            if not self._warned:
                self._warned = True
                _log.warning("tensors that do not fit in %s travel inline: %s", self._memory, e)
            return None
        self._arenas.append(arena)
        offset = arena.allocate(nbytes)
        return None if offset is None else self._lease_type(arena, offset, nbytes, returns)

    def _make_arena(self, need: int) -> Arena:
        """A new arena of at least ``need`` bytes (twice the last one's, at least), within
        the limit; raises the Pytorch2JaxError that says why not."""
        held = sum(a.size for a in self._arenas)
        size = max(need, self._arena_bytes, 2 * self._arenas[-1].size if self._arenas else 0)
        size = min(size, self._max_bytes - held)
        if size < need:
            raise ResourceExhaustedError(
                f"the client's limit of {self._max_bytes} bytes of {self._memory} is reached"
            )
        try:
            return self._new_arena(size)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self._target) from None
        except _ARENA_ERRORS as e:
            why = getattr(e, "strerror", None) or str(e)
            raise UnsupportedError(f"cannot create {self._memory}: {why}") from None

    def describe(self) -> dict[str, Any]:
        with self._lock:
            self._drain()
            return {
                "transport": self.name,
                "arenas": len(self._arenas),
                "bytes": sum(a.size for a in self._arenas),
                "in_use": sum(a.in_use() for a in self._arenas),
            }
