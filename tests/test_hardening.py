"""Hardening, second round: what a failure may send back, and what a request may cost.

Error details keep their status at any length (gRPC turns details over its 8 KiB soft
limit into RESOURCE_EXHAUSTED, at random between 8 and 16 KiB); tracebacks inside a
model's message stay in the worker's log.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from conftest import TRANSPORTS, start_worker

import pytorch2jax


@pytest.mark.parametrize("length", [12 * 1024, 200 * 1024])
def test_long_error_messages_keep_their_status(clients, length):
    client = clients["inline"]
    fails = client.py_to_jax_wrapper("long_error")
    x = jnp.ones(3)
    for _ in range(20):
        with pytest.raises(pytorch2jax.InvalidArgumentError) as info:
            fails(x, length=length)
        message = str(info.value)
        assert "START" in message and message.rstrip().endswith("END"), message[-200:]
        assert f"characters cut; the worker's log has them all" in message
        assert len(message.encode()) < 5 * 1024
    # Under jit, shape inference fails the same way.
    with pytest.raises(pytorch2jax.InvalidArgumentError, match="characters cut"):
        jax.jit(lambda x: fails(x, length=length))(x)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_traceback_inside_a_models_message_stays_in_the_workers_log(transport, clients):
    fails = clients[transport].py_to_jax_wrapper("error_with_traceback")
    with pytest.raises(pytorch2jax.InvalidArgumentError) as info:
        fails(jnp.ones(3))
    message = str(info.value)
    assert "Traceback" not in message and "File " not in message and "dataset[idx]" not in message
    assert "Caught ValueError in DataLoader worker process 0." in message
    assert message.rstrip().endswith("ValueError: sample 7 is corrupt")


def test_the_workers_log_keeps_the_whole_message():
    models = {"error_with_traceback": "pytorch2jax_server.examples:error_with_traceback"}
    with start_worker("--log-level", "INFO", models=models) as w:
        with pytorch2jax.connect(w.unix) as client:
            with pytest.raises(pytorch2jax.InvalidArgumentError):
                client.py_to_jax_wrapper("error_with_traceback")(jnp.ones(3))
        log = w.stderr()
    assert "Original Traceback (most recent call last)" in log and "dataset[idx]" in log
