"""The JAX side of every bridged call: a ``jax.custom_vjp`` whose forward and backward run
torch through a Backend, usable under ``jit``, ``grad``, ``vmap``, ``lax.scan`` and
``jax.checkpoint``.

How a call runs:

- With concrete arrays (no transformation, or eager ``jax.grad``), the backend is called
  directly: no compilation, and its exceptions reach the caller as they are.
- Under tracing, output shapes come from ``Backend.infer`` (cached per input signature, or
  declared with ``out_shapes=``) and the call becomes a callback: on CPU
  ``jax.experimental.buffer_callback``, which hands over XLA's buffers without copies; on
  GPU with the ``cuda_ipc`` transport the same, with XLA's device buffers and stream;
  elsewhere ``jax.pure_callback``. Under ``vmap`` the callback loops over the batch.
- The forward of a differentiated call asks the backend to keep torch's autograd state and
  carries its handle (16 bytes) as a residual, so the backward need not re-run the forward;
  the inputs are kept too, so it can when the handle is gone. An eager forward whose
  backward never runs (``jax.vjp`` left unused) frees that state once JAX drops its handle
  (``_UnusedResiduals``); under tracing the handle lives in XLA, unseen, and the backend's
  own bounds (bytes, entries, age, the session) free it.

The key differences to a hand-written ``jax.custom_vjp`` around ``pure_callback``: shapes
need no example inputs, the forward is not recomputed for the backward, and integer inputs
and outputs are handled (they get no gradient).
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pytorch2jax._backend import HANDLE_BYTES, Backend
from pytorch2jax._copy import copy_into
from pytorch2jax._exceptions import InvalidArgumentError, UnsupportedError
from pytorch2jax._transports import cuda_ipc
from pytorch2jax_protocol import cuda, shm

try:
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # older jax: pure_callback everywhere
    _buffer_callback = None

_HANDLE = jax.ShapeDtypeStruct((HANDLE_BYTES,), jnp.uint8)
_NO_HANDLE = np.zeros(HANDLE_BYTES, np.uint8)
_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, jax.core.Tracer)
_STATIC_TYPES = (bool, int, float, str, type(None))

_log = logging.getLogger("pytorch2jax")

OutShapes = Any  # a pytree of jax.ShapeDtypeStruct, or a callable from input specs to one
_MAX_SIGNATURES = 4096


def _differentiable(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)


def _canonical(struct: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    # With jax_enable_x64 off, a torch float64/int64 output arrives as float32/int32.
    return jax.ShapeDtypeStruct(struct.shape, jax.dtypes.canonicalize_dtype(struct.dtype))


def _spec(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.canonicalize_dtype(x.dtype))


@dataclass(frozen=True)
class _Signature:
    """Everything about a call except the array data: hashable, static under jit."""

    treedef: Any  # of (args, kwargs), array and static leaves alike
    # (position, type, value) of each static leaf: the type too, because 2 == 2.0 == True
    # hash alike but can give the model different output dtypes.
    statics: tuple
    param_names: tuple[str, ...]

    def rebuild(self, arrays: list[Any]) -> tuple[tuple, dict]:
        leaves: list[Any] = [None] * self.treedef.num_leaves
        static = {i: v for i, _, v in self.statics}
        it = iter(arrays)
        for i in range(len(leaves)):
            leaves[i] = static[i] if i in static else next(it)
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _check_containers(tree: Any, where: str) -> None:
    # Torch receives tuples, lists, dicts with string keys and None; in those, the order
    # of leaves on the wire is JAX's flattening order. Other pytree nodes are refused.
    if isinstance(tree, collections.OrderedDict) or (
        not isinstance(tree, (tuple, list, dict))
        and tree is not None
        and not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(tree))
    ):
        raise InvalidArgumentError(
            f"{where}: a {type(tree).__name__} cannot be passed to torch; use tuples, lists "
            "and dicts with string keys (e.g. dict(x) for a FrozenDict or OrderedDict)"
        )
    if isinstance(tree, (tuple, list)):
        for x in tree:
            _check_containers(x, where)
    elif isinstance(tree, dict):
        if not all(isinstance(k, str) for k in tree):
            raise InvalidArgumentError(
                f"{where}: dict keys must be strings to reach torch; got {sorted(map(repr, tree))}"
            )
        for x in tree.values():
            _check_containers(x, where)


class _UnusedResiduals:
    """Residual handles of eager forwards, watched until their backward runs; those JAX
    drops unused are handed back (``drain``) for the backend to free.

    The finaliser runs wherever the handle's last reference goes, inside any code that
    drops a reference, so it only appends to a deque: the backend is called at the next
    forward, outside of whatever the finaliser interrupted.
    """

    def __init__(self) -> None:
        self._watched: set[bytes] = set()
        self._dropped: collections.deque[bytes] = collections.deque()

    def watch(self, array: jax.Array, handle: bytes) -> None:
        self._watched.add(handle)
        weakref.finalize(array, self._drop, handle)

    def used(self, handle: bytes) -> None:
        """The backward took it: the backend freed it, nothing to send."""
        self._watched.discard(handle)

    def _drop(self, handle: bytes) -> None:
        if handle in self._watched:
            self._watched.discard(handle)
            self._dropped.append(handle)

    def drain(self) -> list[bytes]:
        out = []
        while True:
            try:  # forwards run on several threads: another may take the last one first
                out.append(self._dropped.popleft())
            except IndexError:
                return out


class TorchFunction:
    """A torch model or function, run by ``backend``, as a differentiable JAX function.

    Call it as ``fn(params, *args, **kwargs)`` (``params`` a dict of arrays by parameter
    name, possibly empty) through the wrappers ``_client``/``_inprocess`` build on it.
    """

    def __init__(self, backend: Backend, *, out_shapes: OutShapes = None) -> None:
        self.backend = backend
        self._out_shapes = out_shapes
        self._infer_cache: dict[Any, Any] = {}
        self._lock = threading.Lock()
        self._unused = _UnusedResiduals()
        call = jax.custom_vjp(self._primal, nondiff_argnums=(0,))
        call.defvjp(self._fwd, self._bwd)
        self._call = call

    # -- the public entry ---------------------------------------------------------------

    def __call__(self, params: dict[str, Any], args: tuple, kwargs: dict) -> Any:
        if not isinstance(params, dict):
            raise InvalidArgumentError(
                f"{self.backend.description}: params must be a dict of arrays by parameter "
                f"name, as returned by convert_pytnn_to_jax; got {type(params).__name__}"
            )
        _check_containers((args, kwargs), self.backend.description)
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        arrays, statics = [], []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, _ARRAY_TYPES):
                # numpy inputs become JAX arrays first, so their dtype is canonical
                # (float64 -> float32 without x64) on every path alike.
                arrays.append(leaf if isinstance(leaf, (jax.Array, jax.core.Tracer)) else jnp.asarray(leaf))
            elif isinstance(leaf, _STATIC_TYPES):
                statics.append((i, type(leaf), leaf))
            else:
                raise InvalidArgumentError(
                    f"{self.backend.description}: cannot pass a {type(leaf).__name__} to torch; "
                    "arguments must be JAX or numpy arrays, Python scalars or strings, in "
                    "tuples, lists and dicts"
                )
        names = tuple(sorted(params))
        sig = _Signature(treedef, tuple(statics), names)
        return self._call(sig, tuple(params[n] for n in names), tuple(arrays))

    # -- custom_vjp rules ---------------------------------------------------------------

    def _primal(self, sig: _Signature, p: tuple, a: tuple) -> Any:
        return self._forward(sig, p, a, keep=False)[0]

    def _fwd(self, sig: _Signature, p: tuple, a: tuple):
        outputs, handle = self._forward(sig, p, a, keep=True)
        return outputs, (handle, p, a)

    def _bwd(self, sig: _Signature, residuals, cotangents):
        handle, p, a = residuals
        ct_leaves = jax.tree_util.tree_leaves(cotangents)
        # Integer and boolean outputs have float0 cotangents: nothing to send for them.
        diff_out = [i for i, ct in enumerate(ct_leaves) if ct.dtype != jax.dtypes.float0]
        cts = [ct_leaves[i] for i in diff_out]
        inputs = list(p) + list(a)
        diff_in = [i for i, x in enumerate(inputs) if _differentiable(x.dtype)]
        grad_structs = [_spec(inputs[i]) for i in diff_in]

        def host(handle_np, *arrays):
            n = len(inputs)
            p_np, a_np, ct_np = arrays[: len(p)], arrays[len(p) : n], arrays[n:]
            full_cts: list[np.ndarray | None] = [None] * len(ct_leaves)
            for i, ct in zip(diff_out, ct_np):
                full_cts[i] = ct
            args, kwargs = sig.rebuild(list(a_np))
            handle_bytes = _host_bytes(handle_np)
            self._unused.used(handle_bytes)
            p_grads, a_grads = self.backend.vjp(
                handle_bytes,
                dict(zip(sig.param_names, p_np)),
                args,
                kwargs,
                full_cts,
            )
            grads = [p_grads.get(name) for name in sig.param_names] + list(a_grads)
            return [grads[i] for i in diff_in]

        flat = iter(_run(host, grad_structs, [handle, *inputs, *cts], self.backend))
        diff = set(diff_in)
        grads = [next(flat) if i in diff else None for i in range(len(inputs))]
        return tuple(grads[: len(p)]), tuple(grads[len(p) :])

    # -- helpers ------------------------------------------------------------------------

    def _forward(self, sig: _Signature, p: tuple, a: tuple, *, keep: bool):
        n_params = len(p)

        def host(*arrays, reply_bytes=None):
            dropped = self._unused.drain()
            if dropped:
                try:
                    self.backend.release(dropped)
                except Exception:  # noqa: BLE001 - they expire on the worker all the same
                    _log.debug("could not release %d residuals", len(dropped), exc_info=True)
            args, kwargs = sig.rebuild(list(arrays[n_params:]))
            params = dict(zip(sig.param_names, arrays[:n_params]))
            return self.backend.forward(
                params, args, kwargs, keep_residual=keep, reply_bytes=reply_bytes
            )

        if _is_concrete([*p, *a]):
            # No tracing: no shapes needed (data-dependent outputs work), no callback.
            if self.backend.device_arrays:
                outputs, handle = host(*p, *a)
                to_jax = _from_device
            else:
                outputs, handle = host(*(np.asarray(x) for x in (*p, *a)))
                # Arrays the backend hands over for good can become JAX arrays without a
                # copy (device_put wraps 64-byte aligned host memory on CPU); others are copied.
                to_jax = jax.device_put if self.backend.owns_outputs else jnp.asarray
            outputs = jax.tree_util.tree_map(to_jax, outputs)
            if not keep:
                return outputs, None
            handle_array = jnp.asarray(_handle_array(handle))
            if handle:
                self._unused.watch(handle_array, handle)
            return outputs, handle_array

        structs = self._output_structs(sig, p, a)
        out_leaves, out_def = jax.tree_util.tree_flatten(structs)
        reply_bytes = sum(_nbytes(s) for s in out_leaves)

        def host_flat(*arrays):
            outputs, handle = host(*arrays, reply_bytes=reply_bytes)
            leaves, got_def = jax.tree_util.tree_flatten(outputs)
            if got_def != out_def or any(
                np.shape(x) != s.shape or jax.dtypes.canonicalize_dtype(x.dtype) != s.dtype
                for x, s in zip(leaves, out_leaves)
            ):
                raise InvalidArgumentError(
                    f"{self.backend.description} returned {_describe(outputs)} but "
                    f"{_describe(structs)} was expected; if you declared out_shapes=, fix them"
                )
            return leaves + ([_handle_array(handle)] if keep else [])

        results = list(out_leaves) + ([_HANDLE] if keep else [])
        flat = _run(host_flat, results, [*p, *a], self.backend)
        if keep:
            return jax.tree_util.tree_unflatten(out_def, flat[:-1]), flat[-1]
        return jax.tree_util.tree_unflatten(out_def, flat), None

    def _output_structs(self, sig: _Signature, p: tuple, a: tuple) -> Any:
        p_specs = tuple(_spec(x) for x in p)
        a_specs = tuple(_spec(x) for x in a)
        key = (sig, p_specs, a_specs)
        with self._lock:
            cached = self._infer_cache.get(key)
        if cached is not None:
            return cached
        args, kwargs = sig.rebuild(list(a_specs))
        if self._out_shapes is None:
            structs = self.backend.infer(dict(zip(sig.param_names, p_specs)), args, kwargs)
        elif callable(self._out_shapes):
            structs = self._out_shapes(*args, **kwargs)
        else:
            structs = self._out_shapes
        structs = jax.tree_util.tree_map(_canonical, structs)
        with self._lock:
            if len(self._infer_cache) >= _MAX_SIGNATURES:
                self._infer_cache.clear()  # a new shape every call: keep memory bounded
            self._infer_cache[key] = structs
        return structs


@functools.lru_cache(maxsize=None)
def _refuse_higher_order(description: str):
    @jax.custom_jvp
    def first_order_only(xs):
        return xs

    @first_order_only.defjvp
    def _(primals, tangents):
        raise UnsupportedError(
            f"{description}: only first-order gradients of a torch model are supported "
            "(grad, vjp, value_and_grad); differentiating its backward (hessian, grad of "
            "grad, jvp of a gradient) is not"
        )

    return first_order_only


def _first_order_only(values: list[Any], description: str) -> list[Any]:
    """``values`` unchanged; differentiating through them raises a clear UnsupportedError
    (instead of JAX's complaint that callbacks have no JVP rule)."""
    return _refuse_higher_order(description)(values)


def _nbytes(struct: jax.ShapeDtypeStruct) -> int:
    # Rounded up to the aligned slots that transports use.
    return shm.align(math.prod(struct.shape) * np.dtype(struct.dtype).itemsize)


def _handle_array(handle: bytes) -> np.ndarray:
    return np.frombuffer(handle, np.uint8) if handle else _NO_HANDLE


def _describe(tree: Any) -> str:
    return str(jax.tree_util.tree_map(lambda x: f"{np.dtype(x.dtype).name}{list(np.shape(x))}", tree))


def _is_concrete(values: list[Any]) -> bool:
    return not any(isinstance(v, jax.core.Tracer) for v in values)


def _run(
    host: Callable[..., list[np.ndarray]],
    results: list[jax.ShapeDtypeStruct],
    inputs: list,
    backend: Backend,
):
    """Runs ``host`` (numpy in, list of numpy out; device arrays both ways for a backend
    with ``device_arrays``) on ``inputs``: directly when they are concrete, otherwise as a
    callback inside the computation being traced."""
    device = backend.device_arrays
    if _is_concrete(inputs):
        if device:
            outs = host(*inputs)
            return [_from_device(o).astype(s.dtype) for o, s in zip(outs, results)]
        outs = host(*(np.asarray(x) for x in inputs))
        return [jnp.asarray(np.asarray(o, dtype=s.dtype)) for o, s in zip(outs, results)]
    inputs = _first_order_only(inputs, backend.description)
    if _buffer_callback is not None:
        if device and jax.default_backend() == "gpu":
            # XLA's GPU buffers go to the transport as they are: no trip through the host.
            callback = functools.partial(_into_device_buffers, host)
            return _buffer_callback(callback, results, vmap_method="sequential")(*inputs)
        if jax.default_backend() == "cpu":
            callback = functools.partial(_into_buffers, host)
            return _buffer_callback(callback, results, vmap_method="sequential")(*inputs)
    return jax.pure_callback(
        functools.partial(_as_results, host, results), results, *inputs, vmap_method="sequential"
    )


def _into_buffers(host, ctx, out, *inputs) -> None:
    # np.asarray of a CPU Buffer is a zero-copy view; the only copy is into XLA's output.
    results = host(*(np.asarray(b) for b in inputs))
    for buf, value in zip(out, results):
        copy_into(np.asarray(buf), np.asarray(value))


def _into_device_buffers(host, ctx, out, *inputs) -> None:
    # The transport's copies go on XLA's stream (ctx.stream), after the producers of the
    # inputs; the sync at the end lets the reply block go before XLA reads ``out``.
    with cuda_ipc.on_stream(ctx.stream):
        results = host(*inputs)
        for buf, value in zip(out, results):
            cuda_ipc.copy_to(buf, value)
        cuda.synchronize(ctx.stream)


def _from_device(value: Any) -> jax.Array:
    """A JAX array of a device backend's output (a device view, or a host array)."""
    return cuda_ipc.to_jax(value) if cuda_ipc.is_device_array(value) else jnp.asarray(value)


def _host_bytes(handle: Any) -> bytes:
    """A residual handle's 16 bytes, from a numpy or JAX array or an XLA GPU buffer."""
    if isinstance(handle, (np.ndarray, jax.Array)):
        return bytes(np.asarray(handle))
    return bytes(cuda_ipc.host_copy(handle))


def _as_results(host, results, *inputs) -> list[np.ndarray]:
    return [np.asarray(v, dtype=s.dtype) for v, s in zip(host(*inputs), results)]
