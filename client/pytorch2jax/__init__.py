"""pytorch2jax: call PyTorch models and functions from JAX, with gradients.

Out of process, a worker (``pytorch2jax-server``) runs the torch models; this package,
which never imports torch, turns them into JAX functions::

    import pytorch2jax

    with pytorch2jax.connect("localhost:50051") as worker:
        apply_fn, params = worker.convert_pytnn_to_jax("mlp")
        grads = jax.jit(jax.grad(lambda p, x: apply_fn(p, x).sum()))(params, x)

In process, the original API (``py_to_jax_wrapper``, ``convert_pytnn_to_jax``,
``convert_pytnn_to_flax``, and ``convert_pytnn_to_nnx``) runs torch here; it imports torch
when first called.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("pytorch2jax")
except _PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

from pytorch2jax._client import Client, connect
from pytorch2jax._exceptions import (
    AuthenticationError,
    CallCancelledError,
    InvalidArgumentError,
    ModelNotFoundError,
    Pytorch2JaxError,
    ResidualLostError,
    ResourceExhaustedError,
    SessionLostError,
    UnsupportedError,
    VmapFallbackWarning,
    WorkerInternalError,
    WorkerTimeoutError,
    WorkerUnavailableError,
    original_error,
)
from pytorch2jax._flax import TorchModule
from pytorch2jax._inprocess import (
    convert_pytnn_to_flax,
    convert_pytnn_to_jax,
    convert_pytnn_to_nnx,
    py_to_jax_wrapper,
)
from pytorch2jax._models import ModelInfo
from pytorch2jax._transports import InlineTransport, ShmTransport, Transport
from pytorch2jax_protocol.channels import TLS

__all__ = [
    "AuthenticationError",
    "CallCancelledError",
    "Client",
    "InlineTransport",
    "InvalidArgumentError",
    "ModelInfo",
    "ModelNotFoundError",
    "Pytorch2JaxError",
    "ResidualLostError",
    "ResourceExhaustedError",
    "SessionLostError",
    "ShmTransport",
    "TLS",
    "TorchModule",
    "Transport",
    "UnsupportedError",
    "VmapFallbackWarning",
    "WorkerInternalError",
    "WorkerTimeoutError",
    "WorkerUnavailableError",
    "__version__",
    "connect",
    "convert_pytnn_to_flax",
    "convert_pytnn_to_jax",
    "convert_pytnn_to_nnx",
    "original_error",
    "py_to_jax_wrapper",
]
