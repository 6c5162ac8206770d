"""How a backend's host function meets JAX's arrays: ``ArrayIO``.

A bridged call runs Python (the backend) on JAX's arrays, eagerly or as a callback inside
a compiled computation. ``ArrayIO`` says in what form the backend takes and gives arrays
and how the callback is staged; the AD layer knows no more than this interface. The host
default (``HOST_IO``) hands numpy arrays both ways:

- inside ``jit`` on CPU through ``jax.experimental.buffer_callback``, which lends XLA's
  input and output buffers without copies (numpy views of them); elsewhere through
  ``jax.pure_callback``, which copies;
- eagerly, numpy views of the JAX arrays in, and JAX arrays made from the backend's
  outputs (wrapped without a copy when the backend says they are its caller's alone).

A GPU transport (``_transports.cuda_ipc``) supplies its own, over device memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pytorch2jax._copy import copy_into
from pytorch2jax._exceptions import Pytorch2JaxError, remember

try:
    from jax.experimental.buffer_callback import buffer_callback
except ImportError:  # older jax: pure_callback everywhere
    buffer_callback = None

#: A host function: backend arrays in, a list of backend arrays out (one per result).
Host = Callable[..., list[Any]]


class ArrayIO:
    """Host memory: numpy arrays in and out of the backend."""

    def to_backend(self, array: jax.Array) -> Any:
        """An eager JAX array as the backend takes it."""
        return np.asarray(array)

    def to_jax(self, value: Any, struct: jax.ShapeDtypeStruct | None, *, owned: bool) -> jax.Array:
        """A backend output as a JAX array (of ``struct``'s dtype, when given). ``owned``:
        nobody else holds the memory, so it may be wrapped instead of copied."""
        if struct is not None and np.dtype(value.dtype) != np.dtype(struct.dtype):
            value = np.asarray(value, dtype=struct.dtype)  # e.g. int64 -> int32 without x64
        # device_put wraps 64-byte aligned host memory on CPU; asarray copies.
        return jax.device_put(value) if owned else jnp.asarray(value)

    def to_bytes(self, value: Any) -> bytes:
        """A small array (a residual handle) inside a callback, as bytes."""
        return bytes(np.asarray(value))

    def stage(
        self, host: Host, results: Sequence[jax.ShapeDtypeStruct], inputs: Sequence[Any]
    ) -> list[Any]:
        """``host`` as a callback inside the computation being traced."""
        if buffer_callback is not None and jax.default_backend() == "cpu":
            callback = functools.partial(_into_buffers, host)
            return buffer_callback(callback, list(results), vmap_method="sequential")(*inputs)
        return jax.pure_callback(
            functools.partial(_as_results, host, results),
            list(results),
            *inputs,
            vmap_method="sequential",
        )


HOST_IO = ArrayIO()


class _Reported:
    """Our exceptions leaving a callback: remembered for ``original_error`` (XLA reports
    them as a JaxRuntimeError, whose text is all that reaches the caller) and raised
    without the bridge's own frames, which would fill that text."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, Pytorch2JaxError):
            remember(exc)
            raise exc.with_traceback(None) from None
        return False


#: Wraps a backend's call inside a callback (every ``stage``'s); it keeps no state: one
#: serves every call, on any thread.
REPORTED = _Reported()


def _into_buffers(host: Host, ctx: Any, out: Sequence[Any], *inputs: Any) -> None:
    # np.asarray of a CPU Buffer is a zero-copy view; the only copy is into XLA's output.
    with REPORTED:
        results = host(*map(np.asarray, inputs))
    for buf, value in zip(out, results):
        copy_into(np.asarray(buf), np.asarray(value))


def _as_results(
    host: Host, results: Sequence[jax.ShapeDtypeStruct], *inputs: Any
) -> list[np.ndarray]:
    with REPORTED:
        outputs = host(*inputs)
    return [np.asarray(v, dtype=s.dtype) for v, s in zip(outputs, results)]
