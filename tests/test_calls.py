"""The worker's admission of calls (``_calls``): turns first come, first served, and
waits that end once their call is cancelled (the engine's ``waiting_for``)."""

from __future__ import annotations

import threading
import time

import pytest

from pytorch2jax_server._calls import _Turns
from pytorch2jax_server.engine import Call, CallCancelledError, waiting_for


def _waiting(target, *args) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["value"] = target(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["value"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_turns_go_first_come_first_served():
    turns = _Turns(1)
    turns.take(Call("running"))
    order: list[str] = []

    def wait(name: str) -> None:
        turns.take(Call(name))
        order.append(name)
        time.sleep(0.05)  # a newcomer arriving now must not jump the queue
        turns.give_back()

    threads = []
    for name in ("first", "second", "third"):
        threads.append(_waiting(wait, name)[0])
        time.sleep(0.12)  # past a 50 ms slice: each has looked at its call at least once
    turns.give_back()
    for t in threads:
        t.join(5)
    assert order == ["first", "second", "third"]
    turns.take(Call("later"))  # every turn came back


def test_a_cancelled_wait_for_a_turn_leaves_the_queue():
    turns = _Turns(1)
    turns.take(Call("running"))
    call = Call("waiting")
    thread, out = _waiting(turns.take, call)
    time.sleep(0.1)
    call.cancelled = True
    thread.join(1)
    assert isinstance(out["value"], CallCancelledError)
    turns.give_back()
    turns.take(Call("next"))  # the freed turn did not go to the cancelled call


def test_a_cancelled_wait_for_a_lock_raises():
    lock = threading.Lock()
    lock.acquire()
    call = Call("Forward")

    def wait() -> None:
        with call, waiting_for(lock):
            pass

    thread, out = _waiting(wait)
    time.sleep(0.1)
    call.cancelled = True
    thread.join(1)
    assert isinstance(out["value"], CallCancelledError)
    lock.release()
    with waiting_for(lock):  # not held by the cancelled waiter
        assert lock.locked()


def test_call_check():
    call = Call("Vjp")
    call.check()
    call.cancelled = True
    with pytest.raises(CallCancelledError, match="Vjp was cancelled or ran past its deadline"):
        call.check()
