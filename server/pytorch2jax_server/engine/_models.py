"""Served models: calling them on decoded arguments, inferring output shapes, and VJPs.

No gRPC and no protobuf here: this module takes and returns torch objects and raises the
engine's own errors (``_errors``); the servicer and ``_wire`` do the wire work.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    UnsupportedOperatorException,
)

from pytorch2jax_server.engine._cancel import waiting_for
from pytorch2jax_server.engine._errors import (
    CannotInferShapesError,
    InvalidRequestError,
    LimitExceededError,
    ModelNotFoundError,
    ResidualLostError,
    WorkerError,
)
from pytorch2jax_server.engine._programs import (
    Executed,
    Transform,
    Vjp,
    checked_keep,
    describe,
    execute,
    grads,
)
from pytorch2jax_server.engine._random import drawing
from pytorch2jax_server.engine._reparametrize import Reparametrizer
from pytorch2jax_server.engine._residuals import Residual
from pytorch2jax_server.engine._tensors import is_differentiable, shape_str

_X64_NARROWED = {
    torch.float64: torch.float32,
    torch.int64: torch.int32,
    torch.complex128: torch.complex64,
}

_MAX_ARITIES = 64

#: Words of torch's errors for what it cannot transform (not the arguments' fault).
_TRANSFORM_LIMITS = (
    "autograd.Function",
    "setup_context",
    "forward AD",
    "not implemented",
    "does not support",
    "double backward",
    "Batching rule",
)

_CANNOT_TRACE = (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedOperatorException,
)

_inferring = threading.local()  # .active: this thread infers output shapes


class _QuietShapeInference(logging.Filter):
    """Drops the traceback torch logs (at ERROR) when a meta kernel refuses fake inputs
    while this thread infers shapes: that is a client's wrong shapes, which the client
    is told (InvalidRequestError); in the worker's log it looked like a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_inferring, "active", False)


logging.getLogger("torch._subclasses.fake_tensor").addFilter(_QuietShapeInference())


def _plain(signature: inspect.Signature | None) -> str:
    """A signature without annotations, e.g. ``(x, *, scale=1.0)``, for messages."""
    if signature is None:
        return "(...)"
    empty = inspect.Parameter.empty
    params = [p.replace(annotation=empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=params, return_annotation=empty))


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n", 1)[0]


@dataclass
class Outcome:
    """A forward's outputs, with what a Vjp needs when autograd state was kept."""

    #: The model's output pytree; a program's flat outputs (a list).
    outputs: Any
    residual: Residual | None = None
    #: (index of an "auto" Vmap in the program, torch's reason) for each that ran as a loop.
    fallbacks: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Options:
    """How one call runs the module: its mode (None: the module's own) and the buffers
    whose values after the call come back with the outputs."""

    train: bool | None = None
    returned: tuple[str, ...] = ()


_PLAIN = _Options()
_NO_HOOKS = contextlib.nullcontext()


@dataclass(frozen=True)
class _Form:
    """What ``run`` checks of a call before it runs: everything but its tensors' data.
    ``ServedModel.run`` checks it on every call, a ``CallSite`` on its first only."""

    options: _Options
    #: The parameters' names in the call's order, and which of them are buffers.
    names: tuple[str, ...]
    constants: frozenset[int]
    #: Whether int32 leaves are widened to int64 (``int32_as_int64``).
    widen_leaves: bool
    #: Parameters given narrowed by a client without x64, each with the module's dtype
    #: (checked here for a forward; a program checks its own where it calls the model).
    narrowed: tuple[tuple[str, torch.dtype], ...]
    #: The flat inputs a forward's ``keep`` names that can keep autograd state.
    kept: frozenset[int]
    #: The CUDA devices whose generators a keyed or watched call seeds or watches.
    devices: tuple[torch.device, ...]


class ServedModel:
    """One model the worker serves: an ``nn.Module`` (called functionally) or a function."""

    def __init__(self, name: str, obj: Any, device: torch.device | str = "cpu") -> None:
        self.name = name
        self.is_module = isinstance(obj, torch.nn.Module)
        self.device = torch.device(device)
        if self.is_module:
            obj = obj.to(device)  # a function is the caller's to place: it gets its inputs there
        self._obj = obj
        fn = obj.forward if self.is_module else obj
        try:
            self.signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):  # some builtins have no signature
            self.signature = None
        self.plain_signature = _plain(self.signature)
        self.doc = _first_line(inspect.getdoc(obj))
        if self.is_module:
            self.parameters = dict(obj.named_parameters())
            self.buffers = dict(obj.named_buffers())
            self._reparametrized = Reparametrizer(obj)
            self._submodules = list(obj.modules())
        else:
            self.parameters, self.buffers = {}, {}
            self._submodules = []
        # Calls with the client's parameters swap them into the module object while it
        # runs, so two calls of one module must not overlap (one waiting for its turn
        # gives up once it is cancelled: _cancel.waiting_for).
        self._lock = threading.Lock()
        # (positional count, keyword names) that bind to the signature: binding is ~2 us.
        self._arities: set[tuple[int, tuple[str, ...]]] = set()

    def check_arity(self, args: tuple, kwargs: dict) -> None:
        arity = (len(args), tuple(kwargs))
        if self.signature is None or arity in self._arities:
            return
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise InvalidRequestError(
                f"model {self.name!r} takes {self.plain_signature}; it cannot be called with "
                f"{len(args)} positional argument(s) and keywords {sorted(kwargs)}: {e}"
            ) from None
        if len(self._arities) < _MAX_ARITIES:
            self._arities.add(arity)

    def check_parameters(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``params`` checked against the module's own, by name, shape and dtype.

        A JAX client without ``jax_enable_x64`` holds a float64 (int64, complex128) weight
        as float32 (int32, complex64); such values are widened back to the module's dtype.
        """
        return _widened_params(params, self._narrowed(params))

    def _narrowed(self, params: dict[str, torch.Tensor]) -> tuple[tuple[str, torch.dtype], ...]:
        """``params`` checked as ``check_parameters`` says; those given narrowed, each with
        the module's dtype to widen it back to."""
        if params and not self.is_module:
            raise InvalidRequestError(f"model {self.name!r} is a function; it takes no parameters")
        narrowed = []
        for name, value in params.items():
            # Buffers may be given too (e.g. BatchNorm statistics kept by the client).
            own = self.parameters.get(name, self.buffers.get(name))
            if own is None:
                known = ", ".join(self.parameters) or "none"
                raise InvalidRequestError(
                    f"model {self.name!r} has no parameter {name!r}; its parameters: {known}"
                )
            dtype = value.dtype
            if dtype != own.dtype and _X64_NARROWED.get(own.dtype) == dtype:
                narrowed.append((name, own.dtype))
                dtype = own.dtype
            if value.shape != own.shape or dtype != own.dtype:
                raise InvalidRequestError(
                    f"parameter {name!r} of model {self.name!r} is "
                    f"{str(own.dtype).removeprefix('torch.')}{shape_str(own.shape)}; got "
                    f"{str(dtype).removeprefix('torch.')}{shape_str(value.shape)}"
                )
        return tuple(narrowed)

    def infer(
        self,
        build_arguments: Callable[[], tuple[tuple, dict]],
        *,
        int32_as_int64: bool = False,
        train: bool | None = None,
    ) -> Any:
        """The output pytree as fake tensors (shape and dtype, no data).

        ``build_arguments`` makes the arguments; it runs under FakeTensorMode so that the
        empty tensors it creates are fake too and nothing is allocated or computed.
        ``int32_as_int64`` and ``train`` as for ``run`` (a module may return other outputs
        in training mode).
        """
        args, kwargs = (), {}
        _inferring.active = True
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                args, kwargs = build_arguments()
                if int32_as_int64:
                    args, kwargs = _widened((args, kwargs))
                self.check_arity(args, kwargs)
                if not self.is_module:
                    self._check_train(train)
                    return self.checked_outputs(self._obj(*args, **kwargs))
                # Over fake copies of the weights and buffers, so that a module which
                # updates its buffers (BatchNorm in training mode) leaves the real ones be.
                state = {n: mode.from_tensor(t) for n, t in self.parameters.items()}
                state.update((n, mode.from_tensor(t)) for n, t in self.buffers.items())
                with waiting_for(self._lock):
                    switched = self._switch(train)
                    try:
                        return self.checked_outputs(self._reparametrized(state, args, kwargs))
                    finally:
                        for m, was in switched:
                            m.training = was
        except _CANNOT_TRACE as e:
            flags = _scalar_flags(args, kwargs)
            hint = ""
            if flags:
                # A Python bool or int given to a jax.jit-ed function arrives as a traced
                # 0-d array, and branching on it depends on its value.
                hint = (
                    f"; if {', '.join(flags)} is a Python flag (use_cache=, train=...), "
                    "jax.jit made it a traced array: make it static "
                    "(jax.jit(f, static_argnames=...)) or close over it"
                )
            raise CannotInferShapesError(
                f"the output shapes of model {self.name!r} depend on its input data ({e}), "
                "so they cannot be inferred from shapes alone; declare them on the client "
                f"with out_shapes=...{hint}"
            ) from None
        except WorkerError:
            raise
        except Exception as e:
            raise self._rejected(e) from None
        finally:
            _inferring.active = False

    def run(
        self,
        args: tuple,
        kwargs: dict,
        leaves: list[torch.Tensor],
        params: dict[str, torch.Tensor],
        *,
        keep: Sequence[int] | None = None,
        program: Sequence[Transform] = (),
        extras: Sequence[torch.Tensor] = (),
        int32_as_int64: bool = False,
        key: torch.Tensor | None = None,
        train: bool | None = None,
        returned: Sequence[str] = (),
    ) -> Outcome:
        """Calls the model, or runs ``program`` over it (``_programs``).

        ``leaves`` are the tensor leaves of ``(args, kwargs)`` in wire order; ``params``
        replaces the module's own parameters by name (they stay untouched); ``extras``
        are the program's extra inputs. The flat inputs are the parameters (in
        ``params``' order), the leaves, the ``key`` if any, then the extras. With ``keep``
        (indices of flat inputs, see ``floating_inputs``), the outcome carries a
        ``Residual`` from which ``vjp``/``vjp_of_kept`` give their gradients without
        re-running the forward. With ``int32_as_int64``, int32 leaves reach the model as
        int64 (copies), the dtype a JAX client without x64 cannot hold.

        State and randomness (``_random``): ``key`` (raw uint32 key data) seeds torch's
        generators for this call alone; ``train`` runs a module in training (True) or
        eval (False) mode for this call (None: its own mode). A module in training mode
        runs on copies of the buffers the caller did not give, so its own never change;
        ``returned`` names buffers whose values after the call come back with the
        outputs, as ``(outputs, {name: buffer})`` (flat: after the output leaves, by name).
        """
        program = tuple(program)
        form = self._form(
            args, kwargs, leaves, params, keep, program, int32_as_int64, key, train, returned
        )
        return self._run(form, args, kwargs, leaves, params, keep, program, list(extras), key)

    def call_site(self) -> CallSite:
        """A ``CallSite``: ``run`` for calls that differ only in their tensors' data."""
        return CallSite(self._form, self._run)

    def _form(
        self,
        args: tuple,
        kwargs: dict,
        leaves: Sequence[torch.Tensor],
        params: dict[str, torch.Tensor],
        keep: Sequence[int] | None,
        program: tuple[Transform, ...],
        int32_as_int64: bool,
        key: torch.Tensor | None,
        train: bool | None,
        returned: Sequence[str],
    ) -> _Form:
        """What ``run`` checks of a call before running it (raising as it says)."""
        self.check_arity(args, kwargs)
        self._check_train(train)
        returned = tuple(returned)
        unknown = [n for n in returned if n not in self.buffers]
        if unknown:
            raise InvalidRequestError(
                f"model {self.name!r} has no buffer {unknown[0]!r} to return; its buffers: "
                f"{', '.join(self.buffers) or 'none'}"
            )
        names = tuple(params)
        narrowed: tuple[tuple[str, torch.dtype], ...] = ()
        kept: frozenset[int] = frozenset()
        # Buffers (BatchNorm statistics) are state, not weights: never differentiated.
        constants = frozenset(i for i, n in enumerate(names) if n in self.buffers)
        if not program:  # a program checks its parameters where it calls the model
            narrowed = self._narrowed(params)
            if keep is not None:
                # Narrowing and int32 -> int64 keep what can have gradients as it was.
                tail = [key] if key is not None else []
                flat = [*params.values(), *leaves, *tail]
                kept = frozenset(checked_keep(keep, flat, self.name)) - constants
        # The CPU generator is always seeded or watched; these are the CUDA ones.
        placed = (self.device,) if self.is_module else (t.device for t in leaves)
        devices = tuple(d for d in placed if d.type == "cuda")
        return _Form(
            _Options(train, returned),
            names,
            constants,
            int32_as_int64 and any(t.dtype == torch.int32 for t in leaves),
            narrowed,
            kept,
            devices,
        )

    def _run(
        self,
        form: _Form,
        args: tuple,
        kwargs: dict,
        leaves: list[torch.Tensor],
        params: dict[str, torch.Tensor],
        keep: Sequence[int] | None,
        program: tuple[Transform, ...],
        extras: list[torch.Tensor],
        key: torch.Tensor | None,
        nbytes: int | None = None,
    ) -> Outcome:
        """Runs a call of ``form``; a kept forward's residual is ``nbytes`` large when that
        is known (a call site's first kept forward measured it), else measured."""
        options = form.options
        train = options.train
        training = self.is_module and (self._obj.training if train is None else train)
        with drawing(key, devices=form.devices, watched=training, name=self.name):
            if form.widen_leaves:
                leaves = [t.to(torch.int64) if t.dtype == torch.int32 else t for t in leaves]
                args, kwargs = _substitute((args, kwargs), iter(leaves))
            tail = [key] if key is not None else []  # a flat input the model never sees
            if not program and keep is None:  # the plain forward: nothing kept, nothing counted
                checked = _widened_params(params, form.narrowed)
                with torch.no_grad():
                    return Outcome(self.checked_outputs(self._call(args, kwargs, checked, options)))
            saved = _SavedBytes()
            # Counting what autograd saves takes saved-tensor hooks, which torch.func.vjp
            # refuses and which see torch.func's wrapped tensors: a program with transforms
            # under its outermost Vjp is counted by its inputs and outputs alone.
            inner = program[:-1] if program and isinstance(program[-1], Vjp) else program
            hooks = (
                torch.autograd.graph.saved_tensors_hooks(saved.pack, _unpack)
                if keep is not None and not inner and nbytes is None
                else _NO_HOOKS
            )
            fallbacks: list[tuple[int, str]] = []
            with hooks:
                if not program:
                    # The very tensors the model gets, so marking them marks those.
                    checked = _widened_params(params, form.narrowed)
                    flat: list[torch.Tensor] = [*checked.values(), *leaves, *tail]
                    for i in form.kept:
                        flat[i].requires_grad_(True)
                    with torch.enable_grad():
                        outputs = self.checked_outputs(self._call(args, kwargs, checked, options))
                    out_leaves = tensor_leaves(outputs)
                else:
                    executed = self._execute(
                        list(form.names),
                        args,
                        kwargs,
                        len(leaves) + len(tail),
                        [*params.values(), *leaves, *tail, *extras],
                        program,
                        keep,
                        form.constants,
                        options,
                    )
                    flat, fallbacks = executed.inputs, executed.fallbacks
                    outputs = out_leaves = list(executed.outputs)
        if keep is None:
            return Outcome(outputs, fallbacks=fallbacks)
        if nbytes is None:
            nbytes = saved.total + _nbytes(flat) + _nbytes(out_leaves)
        residual = Residual(self.name, out_leaves, flat, form.names, nbytes, form.constants)
        return Outcome(outputs, residual, fallbacks)

    def _execute(
        self,
        names: list[str],
        args: tuple,
        kwargs: dict,
        n_rest: int,
        flat: list[torch.Tensor],
        program: Sequence[Transform],
        keep: Sequence[int] | None,
        constants: frozenset[int],
        options: _Options,
    ) -> Executed:
        n_params = len(names)
        n_base = n_params + n_rest  # the argument leaves, then the key (if any)

        def base(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            params = self.check_parameters(dict(zip(names, inputs[:n_params])))
            call_args, call_kwargs = _substitute((args, kwargs), iter(inputs[n_params:]))
            # Failures are reported below, where the program is known.
            outputs = self.checked_outputs(self._invoke(call_args, call_kwargs, params, options))
            return tuple(tensor_leaves(outputs))

        try:
            return execute(
                base, n_base, program, flat, keep=keep, constants=constants, name=self.name
            )
        except WorkerError:
            raise
        except Exception as e:  # the model's, or torch.func's refusal to transform it
            if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
                raise self._rejected(e) from None
            hint = ""
            if any(s in str(e) for s in _TRANSFORM_LIMITS):
                hint = (
                    " (torch cannot transform it this way: under torch.func a custom "
                    "autograd.Function needs setup_context, forward mode needs a jvp, and "
                    "higher derivatives a backward that is itself differentiable)"
                )
            raise InvalidRequestError(
                f"model {self.name!r} failed on its arguments as {describe(program)}: "
                f"{type(e).__name__}: {e}{hint}"
            ) from None

    def checked_outputs(self, tree: Any, where: str = "") -> Any:
        """The model's output pytree as it crosses the bridge: tensors (and None) in
        tuples, lists and dicts with string keys; a dict subclass (a Hugging Face
        ``ModelOutput``) as a plain dict of its fields. Anything else is refused, by type
        and place, with the way out."""
        if tree is None or isinstance(tree, torch.Tensor):
            return tree
        if isinstance(tree, (tuple, list)):
            items = [self.checked_outputs(x, f"{where}[{i}]") for i, x in enumerate(tree)]
            return items if isinstance(tree, list) else tuple(items)
        if isinstance(tree, dict) and all(isinstance(k, str) for k in tree):
            return {k: self.checked_outputs(v, f"{where}[{k!r}]") for k, v in tree.items()}
        kind = type(tree).__name__
        hint = ""
        if "Cache" in kind:
            hint = "; a Hugging Face model returns its cache unless called with use_cache=False"
        raise InvalidRequestError(
            f"model {self.name!r} returned a {kind}"
            + (f" at output{where}" if where else "")
            + "; bridged models return tensors, or tuples, lists and dicts (string keys) of "
            f"them{hint}; or wrap the model to return only the tensors you need"
        )

    def floating_inputs(
        self, leaves: Sequence[torch.Tensor], params: dict[str, torch.Tensor]
    ) -> tuple[int, ...]:
        """The flat inputs (``params`` first, then ``leaves``) that can have gradients:
        what a forward kept for a Vjp that names no inputs (every floating one)."""
        flat = [*params.values(), *leaves]
        return tuple(i for i, t in enumerate(flat) if is_differentiable(t.dtype))

    def _call(
        self, args: tuple, kwargs: dict, params: dict[str, torch.Tensor], options: _Options
    ) -> Any:
        try:
            return self._invoke(args, kwargs, params, options)
        except WorkerError:  # e.g. CallCancelledError from the module hook (_cancel)
            raise
        except Exception as e:
            raise self._rejected(e) from None

    def _invoke(
        self,
        args: tuple,
        kwargs: dict,
        params: dict[str, torch.Tensor],
        options: _Options | None = None,
    ) -> Any:
        """The model called on ``args`` with ``params`` in place of its own; with buffers
        to return (``options.returned``), ``(outputs, {name: buffer after the call})``."""
        if not self.is_module:
            return self._obj(*args, **kwargs)
        options = options or _PLAIN
        with waiting_for(self._lock):
            switched = self._switch(options.train)
            try:
                return self._invoke_held(args, kwargs, params, options)
            finally:
                for m, was in switched:
                    m.training = was

    def _invoke_held(
        self, args: tuple, kwargs: dict, params: dict[str, torch.Tensor], options: _Options
    ) -> Any:
        if self.buffers and self._obj.training:
            # Training mode updates buffers in place (BatchNorm's running statistics):
            # those the caller did not give run on copies, so the module's own never
            # change and its clients never see each other's calls.
            params = {n: b.clone() for n, b in self.buffers.items() if n not in params} | params
        if not params:
            return self._obj(*args, **kwargs)
        if not options.returned:
            return self._reparametrized(params, args, kwargs)
        final: dict[str, torch.Tensor] = {}
        outputs = self._reparametrized(params, args, kwargs, final=final)
        state = {n: final.get(n, params.get(n, self.buffers[n])) for n in options.returned}
        return outputs, {n: t.detach().clone() for n, t in state.items()}

    def _switch(self, train: bool | None) -> list[tuple[torch.nn.Module, bool]]:
        """Puts the module in training (True) or eval (False) mode (None: leaves it as it
        is); returns each submodule's mode to put back, [] when nothing changed."""
        if train is None or all(m.training == train for m in self._submodules):
            return []
        modes = [(m, m.training) for m in self._submodules]
        self._obj.train(train)
        return modes

    def _check_train(self, train: bool | None) -> None:
        if train is not None and not self.is_module:
            raise InvalidRequestError(
                f"model {self.name!r} is a function; it has no training mode to set (train=)"
            )

    def _rejected(self, e: Exception) -> WorkerError:
        if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
            return LimitExceededError(f"model {self.name!r} ran out of memory: {e}")
        # Any other exception from the model's own code on the caller's inputs: the
        # arguments are what must change, so it is INVALID_ARGUMENT with torch's message.
        return InvalidRequestError(
            f"model {self.name!r} failed on its arguments: {type(e).__name__}: {e}"
        )


class CallSite:
    """The calls of one model that differ only in their tensors' data, as those of one
    compiled JAX call site do: the same argument structure, parameter names, shapes and
    dtypes, program, keep, key or none, mode and returned buffers. ``run`` takes and
    gives what ``ServedModel.run`` does; what that checks of a call's form on every call
    (arity, parameters, keep, which dtypes to widen) it checks on the first and then
    trusts, and a kept forward's size (which counting takes a Python call per tensor
    autograd saves) is measured once. Used with calls of another form, it misbehaves.

    Example::

        site = model.call_site()
        for x in batches:  # each of one shape and dtype
            outcome = site.run((x,), {}, [x], params)
    """

    __slots__ = ("_check", "_execute", "_form", "_nbytes")

    def __init__(self, check: Callable[..., _Form], execute: Callable[..., Outcome]) -> None:
        self._check, self._execute = check, execute
        self._form: _Form | None = None
        self._nbytes: int | None = None

    def run(
        self,
        args: tuple,
        kwargs: dict,
        leaves: list[torch.Tensor],
        params: dict[str, torch.Tensor],
        *,
        keep: Sequence[int] | None = None,
        program: Sequence[Transform] = (),
        extras: Sequence[torch.Tensor] = (),
        int32_as_int64: bool = False,
        key: torch.Tensor | None = None,
        train: bool | None = None,
        returned: Sequence[str] = (),
    ) -> Outcome:
        """``ServedModel.run`` for a call of this site's form."""
        program = tuple(program)
        form = self._form
        if form is None:
            form = self._check(
                args, kwargs, leaves, params, keep, program, int32_as_int64, key, train, returned
            )
            self._form = form
        outcome = self._execute(
            form, args, kwargs, leaves, params, keep, program, list(extras), key, self._nbytes
        )
        if outcome.residual is not None:
            self._nbytes = outcome.residual.nbytes
        return outcome


def vjp(
    residual: Residual, cotangents: list[torch.Tensor | None], *, retain_graph: bool = False
) -> tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]:
    """Gradients of the kept forward with respect to every input it kept state for.

    ``cotangents`` has one entry per output tensor leaf (None where the output has none).
    Returns one gradient per argument leaf (None where none was kept: integer and boolean
    leaves) and one per kept parameter or buffer, by name. Complex tensors follow JAX's
    convention: JAX's VJP of a cotangent c is conj(torch's VJP of conj(c)).
    """
    outputs = residual.outputs
    if len(cotangents) != len(outputs):
        raise InvalidRequestError(
            f"{len(cotangents)} cotangent(s) sent for {len(outputs)} output tensor(s) of "
            f"model {residual.model!r}"
        )
    kept = [i for i, t in enumerate(residual.inputs) if t.requires_grad]
    found = dict(
        zip(
            kept,
            grads(
                outputs,
                cotangents,
                [residual.inputs[i] for i in kept],
                retain_graph=retain_graph,
                name=residual.model,
            ),
        )
    )
    for i in residual.constants:  # buffers given as parameters: zeros, they are state
        if is_differentiable(residual.inputs[i].dtype):
            found[i] = torch.zeros_like(residual.inputs[i])
    n = len(residual.param_names)
    arg_grads = [found.get(i) for i in range(n, len(residual.inputs))]
    param_grads = {name: found[i] for i, name in enumerate(residual.param_names) if i in found}
    return arg_grads, param_grads


def vjp_of_kept(
    residual: Residual,
    cotangents: Sequence[torch.Tensor],
    outputs: Sequence[int],
    wrt: Sequence[int],
) -> tuple[torch.Tensor, ...]:
    """Cotangents of flat inputs ``wrt`` of the kept forward, for ``cotangents`` of its
    outputs ``outputs`` (the others' are zero): a program's ``Vjp``, from the graph the
    forward kept. ResidualLostError when it kept no state for one of ``wrt``."""
    name = residual.model
    if len(cotangents) != len(outputs):
        raise InvalidRequestError(
            f"{len(cotangents)} cotangent(s) sent for {len(outputs)} output(s) of model {name!r}"
        )
    if not all(0 <= j < len(residual.outputs) for j in outputs):
        raise InvalidRequestError(
            f"cotangents of outputs {list(outputs)} of model {name!r}, which has "
            f"{len(residual.outputs)}"
        )
    if not all(0 <= i < len(residual.inputs) for i in wrt):
        raise InvalidRequestError(
            f"cotangents asked of inputs {list(wrt)} of model {name!r}, which has "
            f"{len(residual.inputs)}"
        )
    missing = [
        i for i in wrt if not residual.inputs[i].requires_grad and i not in residual.constants
    ]
    if missing:
        raise ResidualLostError(
            f"the kept forward of model {name!r} kept no autograd state for input(s) "
            f"{missing}; send the inputs again to recompute"
        )
    kept = [i for i in wrt if i not in residual.constants]
    found = dict(
        zip(
            kept,
            grads(
                [residual.outputs[j] for j in outputs],
                list(cotangents),
                [residual.inputs[i] for i in kept],
                name=name,
            ),
        )
    )
    # Buffers get zeros: they are state, not weights.
    return tuple(found[i] if i in found else torch.zeros_like(residual.inputs[i]) for i in wrt)


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    """The tensor leaves of an output pytree, in wire order (dicts sorted by key)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for x in tree for t in tensor_leaves(x)]
    if isinstance(tree, dict):
        return [t for k in sorted(tree) for t in tensor_leaves(tree[k])]
    return []


class Registry:
    """The models a worker serves, by name."""

    def __init__(self, models: dict[str, Any], device: torch.device | str = "cpu") -> None:
        #: Where the models run: the one place the worker's serving device is kept.
        self.device = torch.device(device)
        self._models = {name: ServedModel(name, obj, self.device) for name, obj in models.items()}

    def __iter__(self):
        return iter(self._models.values())

    def get(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if model is None:
            served = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFoundError(f"model {name!r} is not served; served models: {served}")
        return model


def _scalar_flags(args: tuple, kwargs: dict) -> list[str]:
    """The arguments that are 0-d boolean or integer tensors, by position or name."""

    def scalar(x: Any) -> bool:
        return isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_floating_point()

    found = [f"argument {i}" for i, a in enumerate(args) if scalar(a)]
    return found + [f"{k}=" for k, v in kwargs.items() if scalar(v)]


def _widened(tree: Any) -> Any:
    """``tree`` with its int32 tensor leaves as int64."""
    if isinstance(tree, torch.Tensor):
        return tree.to(torch.int64) if tree.dtype == torch.int32 else tree
    if isinstance(tree, (tuple, list)):
        return type(tree)(_widened(x) for x in tree)
    if isinstance(tree, dict):
        return {k: _widened(v) for k, v in tree.items()}
    return tree


def _widened_params(
    params: dict[str, torch.Tensor], narrowed: tuple[tuple[str, torch.dtype], ...]
) -> dict[str, torch.Tensor]:
    """``params`` with those ``narrowed`` names widened back to their dtypes."""
    if not narrowed:
        return params
    widened = dict(params)
    for name, dtype in narrowed:
        widened[name] = widened[name].to(dtype)
    return widened


def _substitute(tree: Any, leaves: Iterator[torch.Tensor]) -> Any:
    """``tree`` with its tensor leaves replaced, in wire order, by ``leaves``."""
    if isinstance(tree, torch.Tensor):
        return next(leaves)
    if isinstance(tree, (tuple, list)):
        return type(tree)(_substitute(x, leaves) for x in tree)
    if isinstance(tree, dict):
        return {k: _substitute(tree[k], leaves) for k in sorted(tree)}
    return tree


class _SavedBytes:
    """Counts the bytes autograd saves for backward, each storage once."""

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except RuntimeError:  # a tensor without plain storage (a transform's wrapper)
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in self._seen:
            self._seen.add(key)
            self.total += nbytes
        return t


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
