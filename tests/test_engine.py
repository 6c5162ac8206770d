"""The worker's torch engine (``pytorch2jax_server.engine``): a public surface that is
light to import (no gRPC, no jax, no server), and errors whose statuses are gRPC's."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
import torch

from pytorch2jax_server import _status, engine

IMPORT_ENGINE_ONLY = """
import sys
import pytorch2jax_server.engine
server = ("_server", "_servicer", "_cli", "_security")
loaded = sorted(
    m for m in sys.modules
    if m.split(".")[0] in ("grpc", "grpc_health", "grpc_reflection", "jax")
    or m.startswith("grpc")
    or m in {"pytorch2jax_server." + s for s in server}
)
print(" ".join(loaded) or "ok")
"""


def test_importing_the_engine_loads_no_grpc_jax_or_server():
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ENGINE_ONLY], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok", f"importing the engine loaded: {result.stdout}"


def test_every_name_in_all_exists():
    missing = [name for name in engine.__all__ if not hasattr(engine, name)]
    assert not missing
    assert sorted(engine.__all__) == sorted(set(engine.__all__))


def _worker_errors() -> list[type[engine.WorkerError]]:
    found, todo = [], [engine.WorkerError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


@pytest.mark.parametrize("cls", _worker_errors(), ids=lambda cls: cls.__name__)
def test_every_worker_error_is_public_and_reported_with_its_status(cls):
    assert cls.__name__.endswith("Error") and getattr(engine, cls.__name__) is cls
    code, details = _status.status_of(cls("what went wrong"))
    assert code is grpc.StatusCode[cls.status] and details == "what went wrong"


def test_the_docstring_example_runs():
    model = engine.Registry({"lin": torch.nn.Linear(3, 2)}).get("lin")
    x = torch.ones(4, 3)
    outcome = model.run((x,), {}, [x], {}, keep=model.floating_inputs([x], {}))
    cache = engine.ResidualCache()
    handle = cache.put(outcome.residual)
    arg_grads, param_grads = engine.vjp(cache.take(handle), [torch.ones(4, 2)])
    weight = dict(model.parameters)["weight"]
    torch.testing.assert_close(arg_grads[0], torch.ones(4, 2) @ weight.detach())
    assert param_grads == {}  # only of the parameters given to run()

    xs, ts = torch.randn(8, 4, 3), torch.randn(8, 4, 3)
    program = (engine.Jvp(wrt=(0,), outputs=(0,)), engine.Vmap(in_dims=(0, 0), size=8))
    (tangents,) = model.run((xs,), {}, [xs], {}, program=program, extras=[ts]).outputs
    torch.testing.assert_close(tangents, ts @ weight.detach().T)


def test_a_cancelled_call_stops_at_the_next_submodule():
    engine.install_cancellation_hook()
    call = engine.Call("Forward")
    call.cancelled = True
    with call, pytest.raises(engine.CallCancelledError, match="Forward was cancelled"):
        torch.nn.Linear(2, 2)(torch.ones(2))
    torch.nn.Linear(2, 2)(torch.ones(2))  # a thread that serves no call is never stopped
