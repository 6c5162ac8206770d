"""The pytorch2jax worker: serves PyTorch models to JAX clients over gRPC.

Run it with ``pytorch2jax-server --model NAME=package.module:attr``, or embed it::

    from pytorch2jax_server import Registry, create_server

    worker = create_server(Registry({"mlp": my_module}), ["localhost:0"])
    print(worker.addresses)
    ...
    worker.stop()

It never imports jax. The names below are imported when first used, so that
``import pytorch2jax_server.engine`` (torch only: the models, their VJPs and the residual
cache, shared with the client's in-process backend) does not load the gRPC server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytorch2jax_server._version import __version__

if TYPE_CHECKING:
    from pytorch2jax_server._cli import main
    from pytorch2jax_server._security import Security, SecurityError
    from pytorch2jax_server._server import Worker, create_server
    from pytorch2jax_server._sessions import SessionPolicy
    from pytorch2jax_server.engine import Registry, ResidualCache

__all__ = [
    "Registry",
    "ResidualCache",
    "Security",
    "SecurityError",
    "SessionPolicy",
    "Worker",
    "__version__",
    "create_server",
    "main",
]


def __getattr__(name: str) -> Any:
    # PEP 562: each name's module is imported on first use (static imports, no names
    # turned into code: see tests/test_security.py).
    if name in ("Registry", "ResidualCache"):
        from pytorch2jax_server import engine as module
    elif name in ("Security", "SecurityError"):
        from pytorch2jax_server import _security as module
    elif name in ("Worker", "create_server"):
        from pytorch2jax_server import _server as module
    elif name == "SessionPolicy":
        from pytorch2jax_server import _sessions as module
    elif name == "main":
        from pytorch2jax_server import _cli as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
