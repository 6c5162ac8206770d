"""Sessions: one per client, whatever its transport, and the regions it holds.

A session lives as long as its client's OpenSession stream; when the stream ends (the
client closed it, died, or the worker stops) the session and its regions are dropped, and
so is what others keep for it (``Sessions.on_close``: its residuals, its fast-lane
connections). Clients of every transport open one, inline ones too: the stream is how
the worker learns that a client is gone.

A session's regions are what its data plane made for it: host memory the client shared
(``_dataplane.shm``) or GPU pools the worker allocated (``_dataplane.cuda_ipc``), in one
numbering, within the session's limits. Dropping only forgets them: a mapping goes away
when the last tensor viewing it does, so a call still using a region finishes safely
(what Triton calls deferring the unregister).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pytorch2jax_protocol import pb

from pytorch2jax_server.engine import (
    InvalidRequestError,
    LimitExceededError,
    SessionLostError,
    ShuttingDownError,
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


@dataclass(frozen=True)
class SessionPolicy:
    """Who may share memory with the worker, and how much each session may hold."""

    shared_memory: str = "local"
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_regions: int = DEFAULT_MAX_REGIONS_PER_SESSION
    max_bytes: int = DEFAULT_MAX_SESSION_BYTES

    def __post_init__(self) -> None:
        if self.shared_memory not in SHARED_MEMORY_POLICIES:
            raise ValueError(
                f"shared_memory must be one of {SHARED_MEMORY_POLICIES}, not {self.shared_memory!r}"
            )


class Region(Protocol):
    """Memory of a session: ``size`` bytes, as ``bytes`` (a uint8 array or tensor)."""

    size: int


@dataclass(eq=False)
class Session:
    """One client's handshake state and regions."""

    id: bytes
    peer: str
    transports: list[int]
    max_regions: int
    max_bytes: int
    #: Set when its stream is to end: the client went away, or the worker is stopping.
    ended: threading.Event = field(default_factory=threading.Event)
    #: Set once it is dropped: its regions are forgotten, its residuals released.
    closed: threading.Event = field(default_factory=threading.Event)
    _regions: dict[int, Region] = field(default_factory=dict)
    _next_id: int = 1  # 0 stays invalid: it is proto3's default
    #: Regions being mapped or allocated, and their bytes: counted against the limits
    #: from the check until they are added, so concurrent registrations cannot pass them.
    _pending: int = 0
    _pending_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: The id as calls name it in their metadata.
    hex_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.hex_id = self.id.hex()

    def add(self, size: int, make: Callable[[], Region]) -> int:
        """Makes a region of ``size`` bytes (``make()``) within the session's limits
        (LimitExceededError if it does not fit) and adds it; its id."""
        with self._room(size):
            region = make()
        return self._add(region)

    @contextlib.contextmanager
    def _room(self, size: int) -> Iterator[None]:
        """Counts a region of ``size`` bytes against the limits while it is made, until
        ``_add`` takes it over; given back if making it fails."""
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

    def _add(self, region: Region) -> int:
        """Adds a region that ``_reserve`` counted (by ``region.size``)."""
        with self._lock:
            self._pending -= 1
            self._pending_bytes -= region.size
            if self.closed.is_set():
                raise SessionLostError("this session was closed; open a new one with OpenSession")
            region_id, self._next_id = self._next_id, self._next_id + 1
            self._regions[region_id] = region
        return region_id

    def region(self, region_id: int) -> Region:
        """The region ``region_id`` of this session; InvalidRequestError if there is none."""
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
        policy: SessionPolicy = SessionPolicy(),
        *,
        cuda_ipc_unavailable: str = "",
        on_close: Sequence[Callable[[bytes], object]] = (),
    ) -> None:
        self.policy = policy
        self.max_sessions = policy.max_sessions
        #: Why CUDA IPC is not offered (the serving device), or "" if it is.
        self._no_cuda_ipc = cuda_ipc_unavailable
        self._sessions: dict[bytes, Session] = {}
        self._lock = threading.Lock()
        self._stopping = False
        #: Called with a session's id once it is closed, after it is marked closed (the
        #: servicer relies on that order to never keep a residual for a closed session).
        self.on_close: list[Callable[[bytes], object]] = list(on_close)

    def open(self, peer: str, wanted: Sequence[int]) -> tuple[Session, str]:
        """A new session for ``peer``, with the transports it may use of ``wanted``, and why
        any were refused."""
        allowed, refused = [pb.INLINE], []
        # CUDA IPC, like shared memory, needs a peer on this host (and the same GPU).
        same_host = ""
        if self.policy.shared_memory == "off":
            same_host = "shared memory is off on this worker"
        elif self.policy.shared_memory == "local" and not is_local_peer(peer):
            same_host = f"shared memory is only for local peers, and this one is {peer}"
        for transport, why_not in ((pb.SHM, ""), (pb.CUDA_IPC, self._no_cuda_ipc)):
            if transport in wanted:
                why_not = same_host or why_not
                if why_not:
                    refused.append(why_not)
                else:
                    allowed.append(transport)
        refused = "; ".join(dict.fromkeys(refused))  # each reason once
        session = Session(
            secrets.token_bytes(16), peer, allowed, self.policy.max_regions, self.policy.max_bytes
        )
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
