"""The calls being served: how many, and stopping those nobody waits for any more.

A call whose deadline passes, or whose client cancels it or dies, goes on running in its
thread unless the worker stops it: gRPC only marks it terminated. ``Calls.serving`` ties a
thread to its call (the engine's ``Call``) for the call's length and marks it cancelled
once gRPC terminates it; the engine's module hook then raises ``CallCancelledError`` at
the next submodule it enters (see ``engine._cancel``). The servicer checks again between
stages and before it keeps a residual, so an abandoned call holds no thread for long and
leaves no autograd state behind.

Admission: at most ``max_calls`` calls at once, counted here (gRPC's own limit counts the
sessions' streams too, and calls waiting for a thread are invisible to handlers); past it
a call is refused with RESOURCE_EXHAUSTED at once. Of those admitted, at most ``max_running``
run at a time; the others wait for a turn, first come first served (``_Turns``), and
calls of a module that another call is running wait for it (the engine's ``waiting_for``).
A wait is given up once the call is cancelled.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator

import grpc

from pytorch2jax_server.engine import (
    WAIT_SLICE_S,
    Call,
    LimitExceededError,
    install_cancellation_hook,
)


class _Turns:
    """``size`` turns to run, handed out first come, first served: a freed turn goes
    straight to the call that has waited longest (a semaphore's timed waits would send a
    waiter to the back each time it looks whether it was cancelled)."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: collections.deque[threading.Event] = collections.deque()
        self._lock = threading.Lock()

    def take(self, call: Call) -> None:
        """Waits for a turn; CallCancelledError (holding none) once ``call`` is cancelled."""
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return
            turn = threading.Event()
            self._waiting.append(turn)
        while not turn.wait(WAIT_SLICE_S):
            if call.cancelled:
                with self._lock:
                    granted = turn.is_set()
                    if not granted:
                        self._waiting.remove(turn)
                if granted:
                    self.give_back()
                call.check()

    @property
    def waiting(self) -> int:
        """Calls waiting for a turn now."""
        return len(self._waiting)

    def give_back(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()
            else:
                self._free += 1


class Calls:
    """Admits calls (``serving``) within the worker's limits, and counts them for
    ``GetWorkerStats`` and the metrics."""

    def __init__(self, *, max_calls: int, max_running: int) -> None:
        install_cancellation_hook()
        self.max_calls = max_calls
        self.in_flight = 0
        self.served = 0
        self.cancelled = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._turns = _Turns(max_running)

    @property
    def waiting(self) -> int:
        """Admitted calls waiting for their turn to run (counted in ``in_flight`` too)."""
        return self._turns.waiting

    @contextlib.contextmanager
    def serving(self, method: str, context: grpc.ServicerContext) -> Iterator[Call]:
        """Admits one call and tracks it in this thread, once its turn came:
        LimitExceededError past ``max_calls``, CallCancelledError if it is cancelled before
        its turn. The context's callback runs when the RPC ends for any reason; before the
        handler returns, that means it was cancelled."""
        with self._lock:
            if self.in_flight >= self.max_calls:
                self.refused += 1
                raise LimitExceededError(
                    f"the worker is serving {self.max_calls} calls, as many as it accepts at "
                    "once; retry later, or start it with a larger --max-concurrent-calls"
                )
            self.in_flight += 1
        call = Call(method)
        done = False

        def terminated() -> None:
            if not done:
                call.cancelled = True

        with call:
            try:
                if not context.add_callback(terminated):
                    call.cancelled = True  # it had ended before its handler started
                call.check()
                self._turns.take(call)
                try:
                    yield call
                finally:
                    self._turns.give_back()
            finally:
                done = True
                with self._lock:
                    self.in_flight -= 1
                    self.served += 1
                    self.cancelled += call.cancelled
