"""The calls being served: how many, and stopping those nobody waits for any more.

A call whose deadline passes, or whose client cancels it or dies, goes on running in its
thread unless the worker stops it: gRPC only marks it terminated. ``Calls.serving`` ties a
thread to its call for the call's length, and a forward pre-hook on every ``nn.Module``
(registered once per process) raises ``CallCancelled`` at the next submodule a terminated
call enters. The servicer checks again between stages and before it keeps a residual, so
an abandoned call holds no thread for long and leaves no autograd state behind. Plain
torch functions and a backward pass in progress cannot be interrupted; they finish and
their result is dropped.

The hook costs about 2 us per submodule call (a global hook takes torch off its fast path;
measured on 151 Linear/ReLU modules of 16x16: 504 -> 786 us): noise beside real layers,
and the price of freeing a thread within one submodule of a deadline.

Admission: at most ``max_calls`` calls at once, counted here (gRPC's own limit counts the
sessions' streams too, and calls waiting for a thread are invisible to handlers); past it
a call is refused with RESOURCE_EXHAUSTED at once. Of those admitted, at most ``max_running``
run at a time; the others wait for a turn, first come first served (``_Turns``), and
calls of a module that another call is running wait for it (``waiting_for``). A wait is
given up once the call is cancelled.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator

import grpc
import torch

from pytorch2jax_server._errors import CallCancelled, LimitExceeded

#: How often a call waiting for its turn looks whether it was cancelled meanwhile.
_WAIT_SLICE_S = 0.05

_current = threading.local()
_hook_lock = threading.Lock()
_hook_installed = False


class Call:
    """One call being served; ``cancelled`` turns true once gRPC terminated it."""

    __slots__ = ("cancelled", "method")

    def __init__(self, method: str) -> None:
        self.method = method
        self.cancelled = False

    def check(self) -> None:
        """Raises CallCancelled if nobody waits for this call's answer any more."""
        if self.cancelled:
            raise CallCancelled(f"{self.method} was cancelled or ran past its deadline")


def _stop_cancelled_calls(module: torch.nn.Module, args: object) -> None:
    call = getattr(_current, "call", None)
    if call is not None:
        call.check()


def _install_hook() -> None:
    global _hook_installed
    with _hook_lock:
        if not _hook_installed:
            torch.nn.modules.module.register_module_forward_pre_hook(_stop_cancelled_calls)
            _hook_installed = True


class waiting_for:  # noqa: N801 - used as a function: ``with waiting_for(lock):``
    """Holds ``lock``; while waiting for it, raises CallCancelled once the call this
    thread serves (if any) is cancelled, instead of waiting on for nobody. (A class, not
    a generator: this is on every call's path.)"""

    __slots__ = ("_lock",)

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        lock = self._lock
        if lock.acquire(blocking=False):
            return
        call = getattr(_current, "call", None)
        while not lock.acquire(timeout=_WAIT_SLICE_S):
            if call is not None:
                call.check()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class _Turns:
    """``size`` turns to run, handed out first come, first served: a freed turn goes
    straight to the call that has waited longest (a semaphore's timed waits would send a
    waiter to the back each time it looks whether it was cancelled)."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: collections.deque[threading.Event] = collections.deque()
        self._lock = threading.Lock()

    def take(self, call: Call) -> None:
        """Waits for a turn; CallCancelled (holding none) once ``call`` is cancelled."""
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return
            turn = threading.Event()
            self._waiting.append(turn)
        while not turn.wait(_WAIT_SLICE_S):
            if call.cancelled:
                with self._lock:
                    granted = turn.is_set()
                    if not granted:
                        self._waiting.remove(turn)
                if granted:
                    self.give_back()
                call.check()

    def give_back(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()
            else:
                self._free += 1


class Calls:
    """Admits calls (``serving``) within the worker's limits, and counts them for
    ``GetWorkerStats``."""

    def __init__(self, *, max_calls: int, max_running: int) -> None:
        _install_hook()
        self.max_calls = max_calls
        self.in_flight = 0
        self.served = 0
        self.cancelled = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._turns = _Turns(max_running)

    @contextlib.contextmanager
    def serving(self, method: str, context: grpc.ServicerContext) -> Iterator[Call]:
        """Admits one call and tracks it in this thread, once its turn came: LimitExceeded
        past ``max_calls``, CallCancelled if it is cancelled before its turn. The context's
        callback runs when the RPC ends for any reason; before the handler returns, that
        means it was cancelled."""
        with self._lock:
            if self.in_flight >= self.max_calls:
                self.refused += 1
                raise LimitExceeded(
                    f"the worker is serving {self.max_calls} calls, as many as it accepts at "
                    "once; retry later, or start it with a larger --max-concurrent-calls"
                )
            self.in_flight += 1
        call = Call(method)
        done = False

        def terminated() -> None:
            if not done:
                call.cancelled = True

        _current.call = call
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
            _current.call = None
            with self._lock:
                self.in_flight -= 1
                self.served += 1
                self.cancelled += call.cancelled
