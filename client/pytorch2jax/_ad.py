"""The JAX side of every bridged call: one JAX primitive, ``torch_call``, that every JAX
transformation composes through, to any depth, with torch doing the work.

Why a primitive. A ``jax.custom_vjp`` function cannot be differentiated in forward mode
or twice, and under ``vmap`` its callback loops over the batch. ``custom_jvp`` plus a
custom transpose plus ``custom_vmap`` could get there, but those three do not compose with
each other (a ``custom_vmap`` function cannot be differentiated, for one). A primitive has
one rule per transformation, and each rule only adds a transform to the *program* the call
runs (``_backend``: ``Jvp``, ``Vjp``, ``Vmap``), which torch executes as the same stack of
``torch.func`` transforms:

- JVP rule: the primal call, keeping torch's autograd state (a residual handle, 16 bytes),
  and a call of ``program + Jvp``, linear in the tangents, that carries the handle;
- transpose rule: ``program + Jvp`` transposes to ``program + Vjp`` and back (each is the
  other's adjoint); the Vjp call carries the handle, so the backward of a forward need not
  re-run it (the training step stays one forward and one backward). A call that gets a
  handle it cannot use (a Jvp, a batched Vjp) frees it;
- batching rule: ``program + Vmap(in_dims)``, one torch call for the whole batch;
  unbatched inputs (params under ``in_axes=None``) are sent once. Under ``vmap`` the
  forward keeps nothing (a batched backward recomputes under ``torch.func.vmap``);
- abstract evaluation: output shapes follow from the model's (``Backend.infer``, asked
  once per input signature) through the transforms, so no example inputs are needed;
- lowering: a callback (``_callbacks``: ``buffer_callback`` on CPU, zero-copy);
- a DCE rule: a forward whose handle nobody uses (a ``has_aux`` output, say) keeps nothing.

How a call runs:

- With concrete arrays and no transformation, the backend is called directly: no
  compilation, data-dependent output shapes work, exceptions reach the caller as they are.
- Otherwise through the primitive: eagerly (``impl``) or compiled (the callback). Every
  call of one compiled callback has one form and one set of shapes, so it goes through a
  function the backend made for it (``Backend.call_site``), which may check the first
  call and trust the rest: most of a small call's time was such checks.
- An eager forward whose backward never runs (``jax.vjp`` left unused) frees its residual
  once JAX drops the handle (``_UnusedResiduals``); under ``jit`` the DCE rule and the
  backend's own bounds (bytes, entries, age, the session) free what is not used.

Integer and boolean inputs and outputs get no tangents (float0), as in JAX.
"""

from __future__ import annotations

import collections
import logging
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.interpreters import partial_eval as pe

from pytorch2jax._backend import (
    HANDLE_BYTES,
    VMAP_METHODS,
    Backend,
    Jvp,
    Result,
    Run,
    Transform,
    Vjp,
    Vmap,
)
from pytorch2jax._exceptions import InvalidArgumentError, VmapFallbackWarning

_HANDLE = jax.ShapeDtypeStruct((HANDLE_BYTES,), jnp.uint8)
_HANDLE_AVAL = jax.core.ShapedArray((HANDLE_BYTES,), jnp.uint8)
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


def _aval(x: Any) -> jax.core.ShapedArray:
    return jax.core.ShapedArray(tuple(np.shape(x)), jax.dtypes.canonicalize_dtype(x.dtype))


def _struct(aval: jax.core.ShapedArray) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype)


@dataclass(frozen=True)
class _Signature:
    """Everything about a call except the array data: hashable, static under jit."""

    treedef: Any  # of (args, kwargs), array and static leaves alike
    # (position, type, value) of each static leaf: the type too, because 2 == 2.0 == True
    # hash alike but can give the model different output dtypes.
    statics: tuple
    param_names: tuple[str, ...]
    #: A PRNG key's data is a flat input, after the argument arrays.
    keyed: bool = False
    #: Training (True) or eval (False) mode; None: the module's own.
    train: bool | None = None
    #: Buffers returned after the call, after the output leaves (by name).
    returned: tuple[str, ...] = ()
    # Derived once: every compiled call rebuilds its arguments and splits its inputs.
    n_arrays: int = field(init=False, repr=False, compare=False)
    #: Flat inputs of the model's own function: parameters, argument arrays, key.
    n_inputs: int = field(init=False, repr=False, compare=False)
    _static: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n_arrays = self.treedef.num_leaves - len(self.statics)
        object.__setattr__(self, "n_arrays", n_arrays)
        object.__setattr__(self, "n_inputs", len(self.param_names) + n_arrays + self.keyed)
        object.__setattr__(self, "_static", {i: v for i, _, v in self.statics})

    def rebuild(self, arrays: list[Any]) -> tuple[tuple, dict]:
        if not self.statics:
            return self.treedef.unflatten(arrays)
        static = self._static
        it = iter(arrays)
        leaves = [static[i] if i in static else next(it) for i in range(self.treedef.num_leaves)]
        return self.treedef.unflatten(leaves)


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
    call, outside of whatever the finaliser interrupted.
    """

    def __init__(self) -> None:
        self._watched: set[bytes] = set()
        self._dropped: collections.deque[bytes] = collections.deque()

    def watch(self, array: jax.Array, handle: bytes) -> None:
        self._watched.add(handle)
        weakref.finalize(array, self._drop, handle)

    def used(self, handle: bytes) -> None:
        """A call took it: the backend uses or frees it, nothing to send."""
        self._watched.discard(handle)

    def _drop(self, handle: bytes) -> None:
        if handle in self._watched:
            self._watched.discard(handle)
            self._dropped.append(handle)

    def drain(self) -> list[bytes]:
        if not self._dropped:  # every call asks: mostly there are none
            return []
        out = []
        while True:
            try:  # calls run on several threads: another may take the last one first
                out.append(self._dropped.popleft())
            except IndexError:
                return out


class TorchFunction:
    """A torch model or function, run by ``backend``, as a JAX function that every JAX
    transformation composes through.

    Call it as ``fn(params, args, kwargs)`` (``params`` a dict of arrays by parameter
    name, possibly empty) through the wrappers ``_client``/``_inprocess`` build on it.
    ``vmap_method`` says how a ``vmap`` of it runs (``_backend.VMAP_METHODS``);
    ``int32_as_int64`` whether int32 arguments reach torch as int64 when JAX's x64 is off.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        out_shapes: OutShapes = None,
        vmap_method: str = "auto",
        int32_as_int64: bool = True,
    ) -> None:
        if vmap_method not in VMAP_METHODS:
            raise InvalidArgumentError(
                f"vmap_method must be one of {', '.join(map(repr, VMAP_METHODS))}; got "
                f"{vmap_method!r}"
            )
        self.backend = backend
        self.vmap_method = vmap_method
        self._int32_as_int64 = int32_as_int64
        self._out_shapes = out_shapes
        self._infer_cache: dict[Any, Any] = {}
        # Per (signature, program, input shapes): the Vmaps that torch could not batch,
        # which later calls run as loops straight away.
        self._loops: dict[Any, frozenset[int]] = {}
        self._lock = threading.Lock()
        self._unused = _UnusedResiduals()

    # -- the public entry ---------------------------------------------------------------

    def __call__(
        self,
        params: dict[str, Any],
        args: tuple,
        kwargs: dict,
        *,
        rng: Any = None,
        train: bool | None = None,
        mutable: Any = False,
    ) -> Any:
        """The model's outputs; with ``mutable``, ``(outputs, {buffer name: value})``.

        ``rng``: a JAX PRNG key that seeds torch's generators for this call alone (the
        call is then a function of its inputs and the key). ``train``: training (True) or
        eval (False) mode for this call (None: the module's own). ``mutable``: True for
        every buffer given in ``params``, or a collection of buffer names, whose values
        after the call come back with the outputs.
        """
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
                arrays.append(
                    leaf if isinstance(leaf, (jax.Array, jax.core.Tracer)) else jnp.asarray(leaf)
                )
            elif isinstance(leaf, _STATIC_TYPES):
                statics.append((i, type(leaf), leaf))
            else:
                raise InvalidArgumentError(
                    f"{self.backend.description}: cannot pass a {type(leaf).__name__} to torch; "
                    "arguments must be JAX or numpy arrays, Python scalars or strings, in "
                    "tuples, lists and dicts"
                )
        names = tuple(sorted(params))
        if train is not None and not isinstance(train, bool):
            raise InvalidArgumentError(
                f"{self.backend.description}: train= takes True, False or None (a Python "
                f"bool, static under jit); got {type(train).__name__}"
            )
        returned = self._returned(mutable, names)
        if mutable is not False and mutable is not None and not returned:
            # Nothing to return: the plain call, and an empty dict of new buffers.
            return self.__call__(params, args, kwargs, rng=rng, train=train), {}
        key = [] if rng is None else [_key_bits(rng, self.backend.description)]
        sig = _Signature(treedef, tuple(statics), names, bool(key), train, returned)
        inputs = [params[n] for n in names] + arrays + key
        if not any(isinstance(x, jax.core.Tracer) for x in inputs):
            return self._direct(sig, inputs)
        structs = self._output_structs(sig, inputs)
        out_leaves, out_def = jax.tree_util.tree_flatten(structs)
        outputs = _call_p.bind(
            *inputs,
            fn=self,
            sig=sig,
            program=(),
            out_avals=tuple(_aval(s) for s in out_leaves),
            keep=None,
            has_residual=False,
        )
        return jax.tree_util.tree_unflatten(out_def, outputs)

    def _returned(self, mutable: Any, names: tuple[str, ...]) -> tuple[str, ...]:
        buffers = self.backend.buffers
        if mutable is False or mutable is None:
            return ()
        if mutable is True:
            return tuple(n for n in names if n in buffers)
        if isinstance(mutable, str) or not all(isinstance(n, str) for n in mutable):
            raise InvalidArgumentError(
                f"{self.backend.description}: mutable= takes True (every buffer given in "
                f"params) or a list of buffer names; got {mutable!r}"
            )
        unknown = sorted(set(mutable) - set(buffers))
        if unknown:
            raise InvalidArgumentError(
                f"{self.backend.description} has no buffer {unknown[0]!r} to return; its "
                f"buffers: {', '.join(buffers) or 'none'}"
            )
        return tuple(sorted(set(mutable)))

    # -- running ------------------------------------------------------------------------

    def _direct(self, sig: _Signature, inputs: list[jax.Array]) -> Any:
        """A call with concrete arrays and no transformation: no shapes needed."""
        io = self.backend.io
        result = self.run(sig, (), [io.to_backend(x) for x in inputs])
        owned = self.backend.owns_outputs
        return jax.tree_util.tree_map(lambda v: io.to_jax(v, None, owned=owned), result.outputs)

    def run(
        self,
        sig: _Signature,
        program: tuple[Transform, ...],
        inputs: list[Any],
        *,
        keep: tuple[int, ...] | None = None,
        residual: bytes = b"",
        out_structs: list[jax.ShapeDtypeStruct] | None = None,
        call: Callable[[Run], Result] | None = None,
    ) -> Result:
        """Runs ``program`` on the flat ``inputs`` (backend arrays) through the backend,
        or through ``call``, the backend's function for the call site (``call_site``)."""
        dropped = self._unused.drain()
        if dropped:
            try:
                self.backend.release(dropped)
            except Exception:  # noqa: BLE001 - they expire on the worker all the same
                _log.debug("could not release %d residuals", len(dropped), exc_info=True)
        if not any(residual):  # all zeros: no forward kept anything (see _batch)
            residual = b""
        else:
            self._unused.used(residual)
        n_params, n_arrays, n_inputs = len(sig.param_names), sig.n_arrays, sig.n_inputs
        key = None
        if any(isinstance(t, Vmap) for t in program):
            key = (sig, program, tuple((np.shape(x), x.dtype) for x in inputs))
            loops = self._loops.get(key)
            if loops:
                program = tuple(
                    Vmap(t.in_dims, t.size, "sequential") if i in loops else t
                    for i, t in enumerate(program)
                )
        result = (call or self.backend.run)(
            Run(
                params=dict(zip(sig.param_names, inputs[:n_params])),
                leaves=list(inputs[n_params : n_params + n_arrays]),
                rebuild=sig.rebuild,
                structure=sig,
                program=program,
                extras=list(inputs[n_inputs:]),
                keep=keep,
                residual=residual,
                out_structs=out_structs,
                int32_as_int64=self.int32_as_int64,
                key=inputs[n_inputs - 1] if sig.keyed else None,
                train=sig.train,
                returned=sig.returned,
            )
        )
        if result.fallbacks and key is not None:
            self._learn(key, result.fallbacks)
        return result

    @property
    def int32_as_int64(self) -> bool:
        """Whether int32 arguments reach torch as int64: asked for, and JAX has no int64
        (x64 off) to hold them as itself."""
        return self._int32_as_int64 and not jax.config.jax_enable_x64

    def _learn(self, key: Any, fallbacks: tuple[tuple[int, str], ...]) -> None:
        with self._lock:
            known = self._loops.get(key, frozenset())
            if len(self._loops) >= _MAX_SIGNATURES:
                self._loops.clear()
            self._loops[key] = known | {i for i, _ in fallbacks}
        for _, why in fallbacks:
            warnings.warn(
                f"{self.backend.description}: torch.func.vmap cannot batch it ({why}); its "
                "batch runs as a loop on the torch side, one example at a time, for this "
                "signature from now on. Pass vmap_method='sequential' to choose that and "
                "silence this warning, or vmap_method='batched' to get an error instead",
                VmapFallbackWarning,
                stacklevel=2,
            )

    def _output_structs(self, sig: _Signature, inputs: list[Any]) -> Any:
        specs = tuple(_spec(x) for x in inputs)
        key = (sig, specs)
        with self._lock:
            cached = self._infer_cache.get(key)
        if cached is not None:
            return cached
        n = len(sig.param_names)
        args, kwargs = sig.rebuild(list(specs[n : n + sig.n_arrays]))
        if self._out_shapes is None:
            structs = self.backend.infer(
                dict(zip(sig.param_names, specs[:n])),
                args,
                kwargs,
                int32_as_int64=self.int32_as_int64,
                train=sig.train,
            )
        elif callable(self._out_shapes):
            structs = self._out_shapes(*args, **kwargs)
        else:
            structs = self._out_shapes
        if sig.returned:  # the buffers come back as they went in (or as the model has them)
            given = dict(zip(sig.param_names, specs[:n]))
            state = {b: given.get(b, self.backend.buffers.get(b)) for b in sig.returned}
            structs = (structs, state)
        structs = jax.tree_util.tree_map(_canonical, structs)
        with self._lock:
            if len(self._infer_cache) >= _MAX_SIGNATURES:
                self._infer_cache.clear()  # a new shape every call: keep memory bounded
            self._infer_cache[key] = structs
        return structs

    def _flat_outputs(self, result: Result, program: tuple, out_avals: tuple) -> list[Any]:
        outputs = result.outputs
        leaves = jax.tree_util.tree_leaves(outputs) if not program else list(outputs)
        if len(leaves) != len(out_avals) or any(
            np.shape(x) != a.shape
            or (x.dtype != a.dtype and jax.dtypes.canonicalize_dtype(x.dtype) != a.dtype)
            for x, a in zip(leaves, out_avals)
        ):
            expected: Any = [_struct(a) for a in out_avals]
            if len(expected) == 1 and not isinstance(outputs, (tuple, list, dict)):
                expected = expected[0]
            raise InvalidArgumentError(
                f"{self.backend.description} returned {_describe(outputs)} but "
                f"{_describe(expected)} was expected; if you declared out_shapes=, fix them"
            )
        return leaves


def module_apply_fn(fn: TorchFunction, name: str, doc: str | None = None) -> Any:
    """``apply_fn(params, *args, rng=None, train=None, mutable=False, **kwargs)`` over
    ``fn``: a module's function form, the same for both backends."""

    def apply_fn(
        params: dict[str, Any],
        *args: Any,
        rng: Any = None,
        train: bool | None = None,
        mutable: Any = False,
        **kwargs: Any,
    ) -> Any:
        return fn(params, args, kwargs, rng=rng, train=train, mutable=mutable)

    apply_fn.__name__ = apply_fn.__qualname__ = name
    apply_fn.__doc__ = doc
    return apply_fn


# -- the primitive ----------------------------------------------------------------------

_call_p = Primitive("torch_call")
_call_p.multiple_results = True


def _split(values: Any, has_residual: bool) -> tuple[Any, list[Any]]:
    values = list(values)
    return (values[0], values[1:]) if has_residual else (None, values)


def _bind(
    fn: TorchFunction,
    sig: _Signature,
    program: tuple[Transform, ...],
    inputs: list[Any],
    out_avals: tuple,
    *,
    residual: Any = None,
    keep: tuple[int, ...] | None = None,
) -> list[Any]:
    head = [] if residual is None else [residual]
    return _call_p.bind(
        *head,
        *inputs,
        fn=fn,
        sig=sig,
        program=program,
        out_avals=tuple(out_avals),
        keep=keep,
        has_residual=residual is not None,
    )


def _abstract_eval(*avals, fn, sig, program, out_avals, keep, has_residual):
    return list(out_avals) + ([_HANDLE_AVAL] if keep is not None else [])


def _impl(*values, fn, sig, program, out_avals, keep, has_residual):
    residual, inputs = _split(values, has_residual)
    io = fn.backend.io
    result = fn.run(
        sig,
        program,
        [io.to_backend(x) for x in inputs],
        keep=keep,
        residual=io.to_bytes(residual) if has_residual else b"",
    )
    leaves = fn._flat_outputs(result, program, out_avals)
    owned = fn.backend.owns_outputs
    outputs = [io.to_jax(v, _struct(a), owned=owned) for v, a in zip(leaves, out_avals)]
    if keep is None:
        return outputs
    handle = jnp.asarray(_handle_array(result.residual))
    if result.residual:
        fn._unused.watch(handle, result.residual)
    return [*outputs, handle]


def _lowering(ctx, *values, fn, sig, program, out_avals, keep, has_residual):
    results = [_struct(a) for a in out_avals] + ([_HANDLE] if keep is not None else [])
    io = fn.backend.io
    # Every call of this callback has one form and the shapes of its avals: the backend
    # may remember what the first call checked and learnt (unless shapes are symbolic).
    concrete = all(isinstance(d, int) for a in ctx.avals_in for d in a.shape)
    call = fn.backend.call_site() if concrete else fn.backend.run

    def host(*arrays):
        residual, inputs = _split(arrays, has_residual)
        result = fn.run(
            sig,
            program,
            inputs,
            keep=keep,
            residual=io.to_bytes(residual) if has_residual else b"",
            out_structs=results[: len(out_avals)],
            call=call,
        )
        leaves = fn._flat_outputs(result, program, out_avals)
        return leaves + ([_handle_array(result.residual)] if keep is not None else [])

    def staged(*xs):
        return io.stage(host, results, xs)

    return mlir.lower_fun(staged, multiple_results=True)(ctx, *values)


def _jvp(primals, tangents, *, fn, sig, program, out_avals, keep, has_residual):
    residual, xs = _split(primals, has_residual)
    _, ts = _split(tangents, has_residual)
    wrt = tuple(
        i
        for i, (x, t) in enumerate(zip(xs, ts))
        if type(t) is not ad.Zero and _differentiable(x.dtype)
    )
    # The primal call keeps torch's autograd state for inputs ``wrt`` (and for those an
    # enclosing derivative asked to keep): a reverse pass then transposes the tangent call
    # into a Vjp that uses it. A forward-mode pass evaluates the tangent call instead,
    # which frees it.
    kept = tuple(sorted(set(wrt) | set(keep or ()))) or None  # () would mean "all" on the wire
    outs = _bind(fn, sig, program, xs, out_avals, residual=residual, keep=kept)
    if kept is None:
        handle = jnp.zeros(HANDLE_BYTES, jnp.uint8)
    else:
        outs, handle = outs[:-1], outs[-1]
    # Returned buffers (the last outputs) are state: no tangents.
    n_out = len(out_avals) - (len(sig.returned) if _returns_state(program) else 0)
    diff_out = tuple(j for j, a in enumerate(out_avals[:n_out]) if _differentiable(a.dtype))
    touts: list[Any] = [ad.Zero(a.to_tangent_aval()) for a in out_avals]
    if wrt and diff_out:
        computed = _bind(
            fn,
            sig,
            (*program, Jvp(wrt, diff_out)),
            [*xs, *(ts[i] for i in wrt)],
            tuple(out_avals[j] for j in diff_out),
            residual=handle,
        )
        for j, t in zip(diff_out, computed):
            touts[j] = t
    if keep is not None:  # this call's own handle output, which has no tangent
        return [*outs, handle], [*touts, ad.Zero(_HANDLE_AVAL.to_tangent_aval())]
    return outs, touts


def _transpose(cts, *values, fn, sig, program, out_avals, keep, has_residual):
    residual, inputs = _split(values, has_residual)
    last = program[-1] if program else None
    if not isinstance(last, (Jvp, Vjp)):
        raise NotImplementedError(f"{fn.backend.description}: a forward call is not linear")
    n_extras = len(last.wrt) if isinstance(last, Jvp) else len(last.outputs)
    xs, extras = inputs[: len(inputs) - n_extras], inputs[len(inputs) - n_extras :]
    if any(ad.is_undefined_primal(x) for x in xs):
        raise NotImplementedError(
            f"{fn.backend.description}: a tangent or cotangent call transposed with respect "
            "to its primal inputs"
        )
    cts = list(cts)[: len(out_avals)]
    nonzero = [k for k, c in enumerate(cts) if type(c) is not ad.Zero]
    extra_avals = tuple(e.aval if ad.is_undefined_primal(e) else _aval(e) for e in extras)
    head = [None] * (has_residual + len(xs))
    if not nonzero:
        return head + [
            ad.Zero(a.to_tangent_aval()) if ad.is_undefined_primal(e) else None
            for e, a in zip(extras, extra_avals)
        ]
    if isinstance(last, Jvp):
        # The tangents of inputs ``wrt`` gave the tangents of outputs ``outputs``: their
        # cotangents come from the Vjp of the same inner program.
        adjoint: Transform = Vjp(last.wrt, tuple(last.outputs[k] for k in nonzero))
    else:
        adjoint = Jvp(tuple(last.wrt[k] for k in nonzero), last.outputs)
    out = _bind(
        fn,
        sig,
        (*program[:-1], adjoint),
        [*xs, *(cts[k] for k in nonzero)],
        extra_avals,
        residual=residual,
    )
    return head + [o if ad.is_undefined_primal(e) else None for o, e in zip(out, extras)]


def _batch(values, dims, *, fn, sig, program, out_avals, keep, has_residual):
    residual, xs = _split(values, has_residual)
    residual_dim, in_dims = _split(dims, has_residual)
    if has_residual and residual_dim is not None:
        residual = None  # one handle per example: no kept forward fits a batched call
    size = next(x.shape[d] for x, d in zip(xs, in_dims) if d is not None)
    vmap = Vmap(tuple(in_dims), size, fn.vmap_method)
    batched = tuple(jax.core.ShapedArray((size, *a.shape), a.dtype) for a in out_avals)
    outs = _bind(fn, sig, (*program, vmap), xs, batched, residual=residual)
    out_dims = [0] * len(outs)
    if keep is not None:
        # A batched backward recomputes under torch.func.vmap, which a kept forward of the
        # whole batch cannot stand for (per-example gradients of unbatched params, say):
        # keep nothing.
        outs = [*outs, jnp.zeros(HANDLE_BYTES, jnp.uint8)]
        out_dims.append(None)
    return outs, out_dims


def _dce(used_outputs: list[bool], eqn: Any):
    if not any(used_outputs):
        return [False] * len(eqn.invars), None
    if eqn.params["keep"] is not None and not used_outputs[-1]:
        # Nobody takes the handle (the output only feeds a has_aux, or a stop_gradient):
        # keep no autograd state on the torch side. (A forward-mode call takes it, and
        # must: JAX's linearize transposes such a call later, into the Vjp that uses it.)
        eqn = eqn.replace(params={**eqn.params, "keep": None}, outvars=eqn.outvars[:-1])
    return [True] * len(eqn.invars), eqn


_call_p.def_impl(_impl)
_call_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(_call_p, _lowering)
ad.primitive_jvps[_call_p] = _jvp
ad.primitive_transposes[_call_p] = _transpose
batching.primitive_batchers[_call_p] = _batch
pe.dce_rules[_call_p] = _dce


# -- helpers ------------------------------------------------------------------------------


def _returns_state(program: tuple[Transform, ...]) -> bool:
    """Whether a call of ``program`` returns the model's outputs (and any returned
    buffers), not tangents or cotangents."""
    return not any(isinstance(t, (Jvp, Vjp)) for t in program)


def _key_bits(rng: Any, where: str) -> Any:
    """A PRNG key's raw data as int32 bits, as it crosses to torch."""
    dtype = getattr(rng, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(rng)
    elif dtype == jnp.uint32 and np.ndim(rng) >= 1:  # a raw key, jax.random.PRNGKey(0)
        data = rng
    else:
        raise InvalidArgumentError(
            f"{where}: rng= takes a JAX PRNG key (jax.random.key(0), or a raw "
            f"jax.random.PRNGKey(0)); got {_describe(rng) if dtype is not None else type(rng).__name__}"
        )
    return jax.lax.bitcast_convert_type(jnp.asarray(data), jnp.int32)


def _handle_array(handle: bytes) -> np.ndarray:
    return np.frombuffer(handle, np.uint8) if handle else _NO_HANDLE


def _describe(tree: Any) -> str:
    return str(
        jax.tree_util.tree_map(lambda x: f"{np.dtype(x.dtype).name}{list(np.shape(x))}", tree)
    )
