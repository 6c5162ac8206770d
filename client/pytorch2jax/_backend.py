"""What the JAX wrapper (``_ad``) needs from whatever runs torch: the Backend interface.

Two backends implement it: a worker over gRPC (``_remote``) and torch in this process.
Arrays cross this interface as numpy arrays (on CPU, zero-copy views of XLA's buffers);
pytrees of arguments and outputs are made of tuples, lists, dicts with string keys, None,
array leaves, and static Python scalars and strings.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import numpy as np

from pytorch2jax_protocol import HANDLE_BYTES

__all__ = ["HANDLE_BYTES", "Backend"]


class Backend(abc.ABC):
    """Runs one torch model or function for the JAX wrapper."""

    #: How error messages name the model, e.g. "model 'mlp' at localhost:50051".
    description: str

    #: Whether the arrays ``forward`` returns are the caller's alone (no one else writes
    #: them), so that JAX may wrap them without a copy.
    owns_outputs: bool = False

    #: Whether ``forward`` and ``vjp`` take arrays in GPU memory (JAX arrays, or XLA's
    #: buffers inside a callback) and may return ``cuda.DeviceView`` leaves, instead of
    #: numpy arrays both ways (see ``_ad``).
    device_arrays: bool = False

    @abc.abstractmethod
    def infer(self, params: dict[str, jax.ShapeDtypeStruct], args: tuple, kwargs: dict) -> Any:
        """The output pytree, leaves as ShapeDtypeStruct, for inputs of these shapes and dtypes."""

    @abc.abstractmethod
    def forward(
        self,
        params: dict[str, np.ndarray],
        args: tuple,
        kwargs: dict,
        *,
        keep_residual: bool,
        reply_bytes: int | None = None,
    ) -> tuple[Any, bytes]:
        """The output pytree (numpy leaves), and a residual handle (b"" if none was kept).

        ``reply_bytes``, when known, is the outputs' total size: room to prepare for them.
        """

    @abc.abstractmethod
    def vjp(
        self,
        residual: bytes,
        params: dict[str, np.ndarray],
        args: tuple,
        kwargs: dict,
        cotangents: list[np.ndarray | None],
    ) -> tuple[dict[str, np.ndarray], list[np.ndarray | None]]:
        """Gradients for every parameter, and for every array leaf of ``(args, kwargs)``.

        ``cotangents`` holds one entry per output leaf, None where the output is not
        differentiable. The residual may be gone; the backend then recomputes from the
        inputs. Argument leaves that are not differentiable get None.
        """

    def release(self, residuals: list[bytes]) -> None:
        """Frees the residuals of forwards whose backward will never run (an unused
        ``jax.vjp``, say). Must not block on the worker; unknown handles are ignored."""
