"""The shared-memory transport on the worker: sessions, the regions clients register under
them (host segments; GPU pools of ``cuda_ipc`` share the numbering), and validated tensor
views of those regions.

A session lives as long as its client's OpenSession stream; when the stream ends (the
client closed it, died, or the worker stops) the session and its regions are dropped, and
so is what others keep for it (``Sessions.on_close``: its residuals). Clients of every
transport open one, inline ones too: the stream is how the worker learns that a client
is gone.
Dropping only forgets them: a mapping goes away when the last tensor viewing it does, so
a call still using a region finishes safely (what Triton calls deferring the unregister).

Every reference is checked before use (``shm.check_ref``): the region must be one of the
caller's session, ``offset + nbytes`` must lie inside it (with an overflow guard) and
``nbytes`` must equal dtype x shape. Messages never name a segment or a path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pytorch2jax_protocol import cuda, pb, shm
from pytorch2jax_protocol.tensors import WireFormatError

from pytorch2jax_server._dataplane import cuda_ipc
from pytorch2jax_server._wire import from_bytes
from pytorch2jax_server.engine import (
    InvalidRequestError,
    LimitExceededError,
    SessionLostError,
    ShuttingDownError,
    UnsupportedError,
    torch_dtype,
)

_log = logging.getLogger("pytorch2jax_server")

#: Who may use shared memory: "local" (unix sockets and loopback TCP), "any" peer (e.g.
#: containers that share /dev/shm over a Docker network), or nobody ("off").
SHARED_MEMORY_POLICIES = ("local", "any", "off")
#: Every client of one worker holds one (inline ones too), and a thread of the worker.
DEFAULT_MAX_SESSIONS = 64
DEFAULT_MAX_REGIONS_PER_SESSION = 64
DEFAULT_MAX_SESSION_BYTES = 8 << 30
_LOCAL_PEERS = ("unix:", "ipv4:127.", "ipv6:[::1]", "ipv6:%5B::1%5D")


def is_local_peer(peer: str) -> bool:
    """Whether a gRPC peer string (``context.peer()``) is this host by construction."""
    return peer.startswith(_LOCAL_PEERS)


@dataclass(eq=False)
class Region:
    """A client's segment as mapped into the worker, as a byte array over all of it.

    Every tensor viewing it (``_wire.from_bytes``) keeps the mapping alive, so it is
    unmapped only after the last one dies.
    """

    size: int
    bytes: np.ndarray  # uint8


@dataclass(eq=False)
class Session:
    """One client's handshake state and registered regions."""

    id: bytes
    peer: str
    transports: list[int]
    max_regions: int
    max_bytes: int
    #: Set when its stream is to end: the client went away, or the worker is stopping.
    ended: threading.Event = field(default_factory=threading.Event)
    #: Set once it is dropped: its regions are forgotten, its residuals released.
    closed: threading.Event = field(default_factory=threading.Event)
    _regions: dict[int, Region | cuda_ipc.DevicePool] = field(default_factory=dict)
    _next_id: int = 1  # 0 stays invalid: it is proto3's default
    #: Regions being mapped or allocated, and their bytes: counted against the limits
    #: from the check until they are added, so concurrent registrations cannot pass them.
    _pending: int = 0
    _pending_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, name: str, size: int) -> int:
        """Maps the client's named segment ``name`` (RegisterRegion); its region id."""
        return self._map(lambda: shm.attach(name, size), size, "segment")

    def register_fd(self, fd: int, size: int) -> int:
        """Maps a region the client passed as a descriptor (the fast lane), and closes the
        descriptor; its region id."""
        owned = [fd]  # attach_fd closes it; a refusal before it ran must close it too

        def attach() -> mmap.mmap:
            return shm.attach_fd(owned.pop(), size)

        try:
            return self._map(attach, size, "region")
        finally:
            for left in owned:
                os.close(left)

    def _map(self, attach: Callable[[], mmap.mmap], size: int, what: str) -> int:
        if pb.SHM not in self.transports:
            raise UnsupportedError(
                "this worker does not accept shared memory from this client "
                f"(peer {self.peer}); use transport='inline', or start the worker with "
                "--shared-memory any if the peer is on this host"
            )
        with self._room(size):
            try:
                mapping = attach()
            except shm.SharedMemoryError as e:
                if e.errno in (errno.ENOENT, errno.EPERM):
                    # Another host or container, or another user: the client should go inline.
                    raise UnsupportedError(str(e.strerror)) from None
                raise InvalidRequestError(
                    f"cannot use this shared-memory {what}: {e.strerror}"
                ) from None
        return self._add(Region(size, np.frombuffer(mapping, np.uint8)))

    def create_pool(self, device: torch.device, uuid: bytes, size: int) -> tuple[int, bytes]:
        """A new GPU pool of ``size`` bytes: its region id and CUDA IPC handle."""
        if pb.CUDA_IPC not in self.transports:
            raise UnsupportedError(
                f"this worker does not offer CUDA IPC to this client (peer {self.peer}); use "
                "transport='shm' or 'inline'"
            )
        device = cuda_ipc.serving_device(device, uuid)
        if size <= 0:
            raise InvalidRequestError(f"a CUDA pool needs a positive size; got {size}")
        with self._room(size):
            try:
                pool = cuda_ipc.DevicePool(device, size)
            except (cuda.CudaError, torch.OutOfMemoryError) as e:
                raise LimitExceededError(
                    f"cannot allocate {size} bytes on the worker's GPU: {e}"
                ) from None
        return self._add(pool), pool.handle

    @contextlib.contextmanager
    def _room(self, size: int) -> Iterator[None]:
        """Counts a region of ``size`` bytes against the limits while it is mapped or
        allocated (LimitExceededError if it does not fit), until ``_add`` takes it over; given
        back if making it fails."""
        self._reserve(size)
        try:
            yield
        except BaseException:
            self._unreserve(size)
            raise

    def _reserve(self, size: int) -> None:
        with self._lock:
            if len(self._regions) + self._pending >= self.max_regions:
                raise LimitExceededError(
                    f"a session may hold at most {self.max_regions} regions (pytorch2jax's "
                    "client needs a few: its arenas double in size as they fill)"
                )
            held = sum(r.size for r in self._regions.values()) + self._pending_bytes
            if size > self.max_bytes - held:
                raise LimitExceededError(
                    f"{size} more bytes of shared or GPU memory would pass this session's "
                    f"limit of {self.max_bytes} bytes; start the worker with a larger "
                    "--shared-memory-mb"
                )
            self._pending += 1
            self._pending_bytes += size

    def _unreserve(self, size: int) -> None:
        with self._lock:
            self._pending -= 1
            self._pending_bytes -= size

    def _add(self, region: Region | cuda_ipc.DevicePool) -> int:
        """Adds a region that ``_reserve`` counted (by ``region.size``)."""
        with self._lock:
            self._pending -= 1
            self._pending_bytes -= region.size
            if self.closed.is_set():
                raise SessionLostError("this session was closed; open a new one with OpenSession")
            region_id, self._next_id = self._next_id, self._next_id + 1
            self._regions[region_id] = region
        return region_id

    def view(
        self, ref: pb.SharedMemoryRef, dtype: int, shape: Sequence[int], *, gpu: bool = False
    ) -> torch.Tensor:
        """The validated bytes of ``ref`` as a tensor of ``dtype`` and ``shape`` (no copy),
        in a host region, or with ``gpu`` in a GPU pool."""
        region = self._region(ref.region)
        if isinstance(region, cuda_ipc.DevicePool) != gpu:
            raise InvalidRequestError(
                f"region {ref.region} is {'a GPU pool' if not gpu else 'host memory'}; "
                f"reference it as {'cuda_ipc' if not gpu else 'shm'}"
            )
        if ref.offset % shm.ALIGNMENT:
            # Also what makes the dtype view below valid for every itemsize.
            raise InvalidRequestError(
                f"shared-memory offsets must be multiples of {shm.ALIGNMENT}; got {ref.offset}"
            )
        try:
            shm.check_ref(ref.offset, ref.nbytes, region.size, dtype, shape)
        except WireFormatError as e:
            raise InvalidRequestError(str(e)) from None
        if gpu:
            raw = region.bytes[ref.offset : ref.offset + ref.nbytes]
            return raw.view(torch_dtype(dtype)).view(tuple(shape))
        return from_bytes(region.bytes[ref.offset : ref.offset + ref.nbytes], dtype, shape)

    def area(self, ref: pb.SharedMemoryRef) -> torch.Tensor:
        """The validated bytes of a reply area, as a uint8 tensor (no copy), host or GPU."""
        gpu = isinstance(self._region(ref.region), cuda_ipc.DevicePool)
        return self.view(ref, pb.UINT8, [ref.nbytes], gpu=gpu)

    def _region(self, region_id: int) -> Region | cuda_ipc.DevicePool:
        with self._lock:
            region = self._regions.get(region_id)
        if region is None:
            raise InvalidRequestError(
                f"unknown shared-memory region {region_id} for this session; register it first"
            )
        return region

    def held(self) -> tuple[int, int]:
        """How many regions the session holds, and their bytes."""
        with self._lock:
            return len(self._regions), sum(r.size for r in self._regions.values())

    def drop(self) -> None:
        with self._lock:
            self.closed.set()
            self._regions.clear()


class Sessions:
    """The open sessions, by id."""

    def __init__(
        self,
        *,
        shared_memory: str = "local",
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_regions: int = DEFAULT_MAX_REGIONS_PER_SESSION,
        max_bytes: int = DEFAULT_MAX_SESSION_BYTES,
        device: torch.device | str = "cpu",
    ) -> None:
        if shared_memory not in SHARED_MEMORY_POLICIES:
            raise ValueError(
                f"shared_memory must be one of {SHARED_MEMORY_POLICIES}, not {shared_memory!r}"
            )
        self.policy = shared_memory
        self.max_sessions = max_sessions
        self._max_regions = max_regions
        self._max_bytes = max_bytes
        #: Where models run: tensors are decoded onto it, and GPU pools are made on it.
        self.device = torch.device(device)
        self._no_cuda_ipc = cuda_ipc.unavailable_reason(self.device)  # or "" if offered
        self._sessions: dict[bytes, Session] = {}
        self._lock = threading.Lock()
        self._stopping = False
        #: Called with a session's id once it is closed, after it is marked closed (the
        #: servicer relies on that order to never keep a residual for a closed session).
        self.on_close: list[Callable[[bytes], object]] = []

    def open(self, peer: str, wanted: Sequence[int]) -> tuple[Session, str]:
        """A new session for ``peer``, with the transports it may use of ``wanted``, and why
        any were refused."""
        allowed, refused = [pb.INLINE], []
        # CUDA IPC, like shared memory, needs a peer on this host (and the same GPU).
        same_host = ""
        if self.policy == "off":
            same_host = "shared memory is off on this worker"
        elif self.policy == "local" and not is_local_peer(peer):
            same_host = f"shared memory is only for local peers, and this one is {peer}"
        for transport, why_not in ((pb.SHM, ""), (pb.CUDA_IPC, self._no_cuda_ipc)):
            if transport in wanted:
                why_not = same_host or why_not
                if why_not:
                    refused.append(why_not)
                else:
                    allowed.append(transport)
        refused = "; ".join(dict.fromkeys(refused))  # each reason once
        session = Session(secrets.token_bytes(16), peer, allowed, self._max_regions, self._max_bytes)
        with self._lock:
            if self._stopping:
                # Its stream would hold the stopping server for its whole grace.
                raise ShuttingDownError(
                    "the worker is stopping; connect to it again once restarted"
                )
            if len(self._sessions) >= self.max_sessions:
                raise LimitExceededError(
                    f"the worker has {self.max_sessions} sessions open, its limit; close unused "
                    "clients or start it with a larger --max-sessions"
                )
            self._sessions[session.id] = session
        _log.debug("session opened for %s: transports %s", peer, allowed)
        return session, refused

    def close(self, session: Session) -> None:
        """Drops ``session`` (its stream ended); while the worker stops, ``close_all`` does."""
        with self._lock:
            if self._stopping:
                return
            self._sessions.pop(session.id, None)
        self._drop(session)

    def end_streams(self) -> None:
        """Ends every session's stream, which would otherwise hold a stopping server for
        its whole grace, but keeps the sessions: the calls still in flight use their
        memory and residuals. ``close_all`` drops them once those calls are done."""
        with self._lock:
            self._stopping = True
            sessions = list(self._sessions.values())
        for s in sessions:
            s.ended.set()

    def close_all(self) -> None:
        self.end_streams()
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            self._drop(s)

    def _drop(self, session: Session) -> None:
        session.drop()
        for listener in self.on_close:
            listener(session.id)
        _log.debug("session closed for %s", session.peer)

    def get(self, session_id: bytes) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise SessionLostError(
                "the worker has no such session (it restarted, or the session "
                "was closed); open a new one"
            )
        return session

    def held(self) -> tuple[int, int, int]:
        """How many sessions are open, and the regions and bytes they hold (for stats)."""
        with self._lock:
            sessions = list(self._sessions.values())
        held = [s.held() for s in sessions]
        return len(sessions), sum(n for n, _ in held), sum(b for _, b in held)
