"""The client never imports torch; the worker never imports jax."""

from __future__ import annotations

import subprocess
import sys

CLIENT = """
import sys
import pytorch2jax, pytorch2jax._client, pytorch2jax._ad, pytorch2jax._remote
assert "torch" not in sys.modules, "pytorch2jax imported torch"
with pytorch2jax.connect({target!r}) as c:
    apply_fn, params = c.convert_pytnn_to_jax("mlp")
    import jax, jax.numpy as jnp
    jax.jit(jax.grad(lambda p: apply_fn(p, jnp.ones((2, 8))).sum()))(params)
assert "torch" not in sys.modules, "calling a served model imported torch"
print("ok")
"""

WORKER = """
import sys
import pytorch2jax_server, pytorch2jax_server._cli, pytorch2jax_server.examples
from pytorch2jax_server import Registry, create_server
w = create_server(Registry({"mlp": pytorch2jax_server.examples.mlp()}), ["127.0.0.1:0"])
w.stop(0)
assert "jax" not in sys.modules, "pytorch2jax_server imported jax"
print("ok")
"""


def _run(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_client_does_not_import_torch(worker):
    _run(CLIENT.format(target=worker.unix))


def test_worker_does_not_import_jax():
    _run(WORKER)
