"""The pytorch2jax worker: serves PyTorch models to JAX clients over gRPC.

Run it with ``pytorch2jax-server --model NAME=package.module:attr``, or embed it::

    from pytorch2jax_server import Registry, create_server

    worker = create_server(Registry({"mlp": my_module}), ["localhost:0"])
    print(worker.addresses)
    ...
    worker.stop()

It never imports jax.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("pytorch2jax")
except _PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

from pytorch2jax_server._cli import main
from pytorch2jax_server._models import Registry
from pytorch2jax_server._residuals import ResidualCache
from pytorch2jax_server._security import Security, SecurityError
from pytorch2jax_server._server import Worker, create_server

__all__ = [
    "Registry",
    "ResidualCache",
    "Security",
    "SecurityError",
    "Worker",
    "__version__",
    "create_server",
    "main",
]
