"""A bounded cache of autograd state kept between a Forward and its Vjp.

Bounded by entry count and by bytes (least recently used first out) and by age (TTL).
Correctness never depends on it: a Vjp whose handle is gone gets FAILED_PRECONDITION and
the client re-sends the inputs, so the worker re-runs the forward. So a full cache evicts
rather than refusing calls: its bytes stay bounded and no call fails for it.

A residual made under a session belongs to it and goes when the session ends (its client
closed, or died: the stream breaks), not a TTL later. The worker also sweeps expired ones
on a timer (``expire``), so an idle worker does not hold a dead client's graphs.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pytorch2jax_protocol import HANDLE_BYTES

DEFAULT_MAX_ENTRIES = 1024
DEFAULT_MAX_BYTES = 2 << 30
#: A forward whose backward never comes (``jax.vjp`` left unused, ``has_aux`` outputs)
#: holds its graph until evicted or this old; a later backward then recomputes.
DEFAULT_TTL_S = 120.0


@dataclass
class Residual:
    """What a Vjp needs from its forward: its outputs with their graph, and its inputs
    (those it kept state for require grad)."""

    model: str
    #: The flat outputs (tensor leaves in wire order).
    outputs: list[Any]
    #: The flat inputs: parameters (``param_names``), argument leaves, program inputs.
    inputs: list[Any]
    param_names: tuple[str, ...]
    nbytes: int
    #: Inputs never differentiated (buffers): their cotangents are zeros.
    constants: frozenset[int] = frozenset()
    #: The session of the client that made it, or b"" for a sessionless caller.
    owner: bytes = b""
    created: float = field(default_factory=time.monotonic)


def _unguessable() -> bytes:
    return secrets.token_bytes(HANDLE_BYTES)


class ResidualCache:
    """``handles`` makes each new handle (HANDLE_BYTES, never all zeros): by default
    unguessable ones, as a worker's must be (a client must not take another's residual);
    a cache that only its own process reaches may count instead, sparing a system call
    per forward."""

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl_s: float = DEFAULT_TTL_S,
        handles: Callable[[], bytes] = _unguessable,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._handles = handles
        self._entries: OrderedDict[bytes, Residual] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def put(self, residual: Residual, *, owner: bytes = b"") -> bytes:
        """Stores ``residual`` for session ``owner``; returns its handle, or b"" when it
        can never fit."""
        if self.max_entries <= 0 or residual.nbytes > self.max_bytes:
            return b""
        residual.owner = owner
        handle = self._handles()
        with self._lock:
            self._expire(time.monotonic())
            while self._entries and (
                len(self._entries) >= self.max_entries
                or self._bytes + residual.nbytes > self.max_bytes
            ):
                self._pop_oldest()
            self._entries[handle] = residual
            self._bytes += residual.nbytes
        return handle

    def take(
        self, handle: bytes, *, model: str | None = None, keep: bool = False
    ) -> Residual | None:
        """The residual of ``handle`` (of ``model``, if given), removed unless ``keep``;
        None if it is gone or belongs to another model (which then keeps it)."""
        with self._lock:
            self._expire(time.monotonic())
            residual = self._entries.get(handle)
            if residual is None or (model is not None and residual.model != model):
                return None
            if keep:
                self._entries.move_to_end(handle)
            else:
                del self._entries[handle]
                self._bytes -= residual.nbytes
            return residual

    def release(self, handles: list[bytes]) -> int:
        return sum(self.take(h) is not None for h in handles)

    def release_owner(self, owner: bytes) -> int:
        """Drops every residual of session ``owner``; returns how many."""
        with self._lock:
            handles = [h for h, r in self._entries.items() if r.owner == owner]
            for h in handles:
                self._bytes -= self._entries.pop(h).nbytes
        return len(handles)

    def expire(self) -> int:
        """Drops every residual older than the TTL, wherever it sits; returns how many.
        (``put`` and ``take`` only look at the front, to stay O(1).)"""
        cutoff = time.monotonic() - self.ttl_s
        with self._lock:
            handles = [h for h, r in self._entries.items() if r.created < cutoff]
            for h in handles:
                self._bytes -= self._entries.pop(h).nbytes
        return len(handles)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _expire(self, now: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now - oldest.created <= self.ttl_s:
                # Entries are in LRU order, not creation order, so an old entry behind a
                # recent one waits for its turn or for eviction; bytes stay bounded either way.
                break
            self._pop_oldest()

    def _pop_oldest(self) -> None:
        _, residual = self._entries.popitem(last=False)
        self._bytes -= residual.nbytes
