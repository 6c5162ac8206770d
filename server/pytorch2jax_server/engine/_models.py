"""Served models: calling them on decoded arguments, inferring output shapes, and VJPs.

No gRPC and no protobuf here: this module takes and returns torch objects and raises the
engine's own errors (``_errors``); the servicer and ``_wire`` do the wire work.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
    WorkerError,
)
from pytorch2jax_server.engine._reparametrize import Reparametrizer
from pytorch2jax_server.engine._residuals import Residual
from pytorch2jax_server.engine._tensors import is_differentiable, shape_str

_X64_NARROWED = {
    torch.float64: torch.float32,
    torch.int64: torch.int32,
    torch.complex128: torch.complex64,
}

_MAX_ARITIES = 64

_CANNOT_TRACE = (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedOperatorException,
)


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

    outputs: Any  # the model's output pytree
    residual: Residual | None = None


class ServedModel:
    """One model the worker serves: an ``nn.Module`` (called functionally) or a function."""

    def __init__(self, name: str, obj: Any, device: torch.device | str = "cpu") -> None:
        self.name = name
        self.is_module = isinstance(obj, torch.nn.Module)
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
        else:
            self.parameters, self.buffers = {}, {}
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
        if params and not self.is_module:
            raise InvalidRequestError(f"model {self.name!r} is a function; it takes no parameters")
        checked = {}
        for name, value in params.items():
            # Buffers may be given too (e.g. BatchNorm statistics kept by the client).
            own = self.parameters.get(name, self.buffers.get(name))
            if own is None:
                known = ", ".join(self.parameters) or "none"
                raise InvalidRequestError(
                    f"model {self.name!r} has no parameter {name!r}; its parameters: {known}"
                )
            if value.dtype != own.dtype and _X64_NARROWED.get(own.dtype) == value.dtype:
                value = value.to(own.dtype)
            if value.shape != own.shape or value.dtype != own.dtype:
                raise InvalidRequestError(
                    f"parameter {name!r} of model {self.name!r} is "
                    f"{str(own.dtype).removeprefix('torch.')}{shape_str(own.shape)}; got "
                    f"{str(value.dtype).removeprefix('torch.')}{shape_str(value.shape)}"
                )
            checked[name] = value
        return checked

    def infer(self, build_arguments: Callable[[], tuple[tuple, dict]]) -> Any:
        """The output pytree as fake tensors (shape and dtype, no data).

        ``build_arguments`` makes the arguments; it runs under FakeTensorMode so that the
        empty tensors it creates are fake too and nothing is allocated or computed.
        """
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                args, kwargs = build_arguments()
                self.check_arity(args, kwargs)
                if not self.is_module:
                    return self._obj(*args, **kwargs)
                # Over fake copies of the weights and buffers, so that a module which
                # updates its buffers (BatchNorm in training mode) leaves the real ones be.
                state = {n: mode.from_tensor(t) for n, t in self.parameters.items()}
                state.update((n, mode.from_tensor(t)) for n, t in self.buffers.items())
                with waiting_for(self._lock):
                    return self._reparametrized(state, args, kwargs)
        except _CANNOT_TRACE as e:
            raise CannotInferShapesError(
                f"the output shapes of model {self.name!r} depend on its input data ({e}), "
                "so they cannot be inferred from shapes alone; declare them on the client "
                "with out_shapes=..."
            ) from None
        except WorkerError:
            raise
        except Exception as e:
            raise self._rejected(e) from None

    def run(
        self,
        args: tuple,
        kwargs: dict,
        leaves: list[torch.Tensor],
        params: dict[str, torch.Tensor],
        *,
        keep_autograd: bool,
    ) -> Outcome:
        """Calls the model; with ``keep_autograd``, keeps what a Vjp needs.

        ``leaves`` are the tensor leaves of ``(args, kwargs)`` in wire order; ``params``
        replaces the module's own parameters by name (they stay untouched).
        """
        self.check_arity(args, kwargs)
        params = self.check_parameters(params)
        if not keep_autograd:
            with torch.no_grad():
                return Outcome(self._call(args, kwargs, params))
        for t in leaves:
            if is_differentiable(t.dtype):
                t.requires_grad_(True)
        for p in params.values():
            if is_differentiable(p.dtype):
                p.requires_grad_(True)
        saved = _SavedBytes()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(saved.pack, _unpack):
            outputs = self._call(args, kwargs, params)
        out_leaves = tensor_leaves(outputs)
        nbytes = saved.total + _nbytes(leaves) + _nbytes(params.values()) + _nbytes(out_leaves)
        return Outcome(outputs, Residual(self.name, out_leaves, leaves, params, nbytes))

    def _call(self, args: tuple, kwargs: dict, params: dict[str, torch.Tensor]) -> Any:
        try:
            if not self.is_module:
                return self._obj(*args, **kwargs)
            with waiting_for(self._lock):
                if not params:
                    return self._obj(*args, **kwargs)
                return self._reparametrized(params, args, kwargs)
        except WorkerError:  # e.g. CallCancelledError from the module hook (_cancel)
            raise
        except Exception as e:
            raise self._rejected(e) from None

    def _rejected(self, e: Exception) -> WorkerError:
        if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
            return LimitExceededError(f"model {self.name!r} ran out of memory: {e}")
        # Any other exception from the model's own code on the caller's inputs: the
        # arguments are what must change, so it is INVALID_ARGUMENT with torch's message.
        return InvalidRequestError(
            f"model {self.name!r} failed on its arguments: {type(e).__name__}: {e}"
        )


def vjp(
    residual: Residual, cotangents: list[torch.Tensor | None], *, retain_graph: bool = False
) -> tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]:
    """Gradients of the kept forward with respect to its floating arguments and parameters.

    ``cotangents`` has one entry per output tensor leaf (None where the output has none).
    Returns one gradient per argument leaf (None for integer/boolean leaves) and one per
    floating parameter or buffer. Complex tensors follow JAX's convention: JAX's VJP of a
    cotangent c is conj(torch's VJP of conj(c)).
    """
    outputs = residual.outputs
    if len(cotangents) != len(outputs):
        raise InvalidRequestError(
            f"{len(cotangents)} cotangent(s) sent for {len(outputs)} output tensor(s) of "
            f"model {residual.model!r}"
        )
    roots, seeds = [], []
    for i, (out, ct) in enumerate(zip(outputs, cotangents)):
        if ct is None or not out.requires_grad:
            continue
        if ct.shape != out.shape:
            raise InvalidRequestError(
                f"cotangent {i} of model {residual.model!r} has shape {shape_str(ct.shape)}; "
                f"the output has {shape_str(out.shape)}"
            )
        ct = ct.to(out.dtype)
        roots.append(out)
        seeds.append(ct.conj() if ct.is_complex() else ct)
    wrt = [t for t in residual.argument_leaves if t.requires_grad]
    wrt += [p for p in residual.parameters.values() if p.requires_grad]
    grads: Iterable[torch.Tensor | None] = [None] * len(wrt)
    if roots and wrt:
        grads = torch.autograd.grad(
            roots, wrt, seeds, allow_unused=True, retain_graph=retain_graph
        )
    filled = iter(
        torch.zeros_like(w) if g is None else (g.conj() if g.is_complex() else g)
        for w, g in zip(wrt, grads)
    )
    arg_grads = [next(filled) if t.requires_grad else None for t in residual.argument_leaves]
    param_grads = {n: next(filled) for n, p in residual.parameters.items() if p.requires_grad}
    return arg_grads, param_grads


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
        self._models = {name: ServedModel(name, obj, device) for name, obj in models.items()}

    def __iter__(self):
        return iter(self._models.values())

    def get(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if model is None:
            served = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFoundError(f"model {name!r} is not served; served models: {served}")
        return model


class _SavedBytes:
    """Counts the bytes autograd saves for backward, each storage once."""

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.total += storage.nbytes()
        return t


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
