"""Programs: a served model's flat function under a stack of ``torch.func`` transforms.

The JAX client turns each JAX transformation of a bridged call into a transform of the
program the call runs, so ``jax.hessian`` of a loss arrives here as ``(Vjp, Jvp)`` and runs
as ``torch.func.jvp`` of ``torch.func.vjp`` of the model, in one call, and ``vmap(grad)``
as ``torch.func.vmap`` of a ``torch.func.vjp``.

A flat function takes tensors and returns a tuple of tensors. The model's own takes its
parameters (in the request's order) and its argument leaves (wire order) and returns its
output leaves (wire order). Each transform maps a flat function of ``n`` inputs to another:

- ``Jvp(wrt, outputs)``: adds the tangents of inputs ``wrt``; returns the tangents of
  outputs ``outputs`` (``torch.func.jvp``).
- ``Vjp(wrt, outputs)``: adds the cotangents of outputs ``outputs``; returns the
  cotangents of inputs ``wrt`` (``torch.func.vjp``), in JAX's convention for complex
  numbers: JAX's VJP of a cotangent c is conj(torch's VJP of conj(c)).
- ``Vmap(in_dims, size, method)``: batches every input along its ``in_dims`` entry (None:
  the same for every example) and every output along dimension 0: ``torch.func.vmap``,
  or a loop over the batch where torch cannot batch the function (``.item()``,
  data-dependent control flow, in-place writes into unbatched tensors). Each example
  draws its own random numbers (``randomness="different"``), as in the loop.

The outermost Vjp runs with plain autograd (``torch.autograd.grad``), as a first-order
backward always has: custom ``autograd.Function``s without functorch support keep working
there, and a kept forward's graph serves it without re-running the forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from pytorch2jax_server.engine._errors import (
    CallCancelledError,
    InvalidRequestError,
    LimitExceededError,
)
from pytorch2jax_protocol.programs import (
    VMAP_METHODS,
    Jvp,
    Transform,
    Vjp,
    Vmap,
    describe,
    extra_inputs,
)
from pytorch2jax_server.engine._random import restore, rewind_point
from pytorch2jax_server.engine._tensors import is_differentiable, shape_str

__all__ = [
    "VMAP_METHODS",
    "Executed",
    "Jvp",
    "Transform",
    "Vjp",
    "Vmap",
    "checked_keep",
    "compose",
    "describe",
    "execute",
    "extra_inputs",
    "grads",
]

Flat = Callable[..., tuple[torch.Tensor, ...]]


@dataclass
class Executed:
    """What running a program gave."""

    outputs: tuple[torch.Tensor, ...]
    #: The inputs as the program ran on them: those kept for a later Vjp require grad.
    inputs: list[torch.Tensor]
    #: (index of an "auto" Vmap, torch's reason) for each that ran as a loop.
    fallbacks: list[tuple[int, str]] = field(default_factory=list)


def execute(
    base: Flat,
    n_base: int,
    program: Sequence[Transform],
    inputs: Sequence[torch.Tensor],
    *,
    keep: Sequence[int] | None = None,
    constants: frozenset[int] = frozenset(),
    name: str = "",
) -> Executed:
    """Runs ``program`` over ``base`` (a flat function of ``n_base`` inputs) on ``inputs``.

    With ``keep``, the inputs of those indices require grad and the outputs keep their
    autograd graph, for a later ``vjp_of_kept``; otherwise no graph is kept. Base inputs
    in ``constants`` (a module's buffers) are never differentiated: their tangents are
    ignored, their cotangents are zeros, and no state is kept for them.
    """
    fallbacks: list[tuple[int, str]] = []
    inputs = list(inputs)
    last = program[-1] if program else None
    inner = program[:-1] if isinstance(last, Vjp) else program
    f, n = compose(base, n_base, inner, fallbacks, name, constants)
    if isinstance(last, Vjp):
        _check_indices(last.wrt, n, "input", last, name)
    expected = n + (extra_inputs(last) if isinstance(last, Vjp) else 0)
    if len(inputs) != expected:
        raise InvalidRequestError(
            f"the program {describe(program)} of model {name!r} takes {expected} inputs; "
            f"got {len(inputs)}"
        )
    keep_set = checked_keep(keep, inputs, name) - constants
    inputs = [x.detach().requires_grad_(True) if i in keep_set else x for i, x in enumerate(inputs)]
    if isinstance(last, Vjp):
        outputs = _autograd_vjp(
            f, n, last, inputs, create_graph=keep is not None, name=name, constants=constants
        )
    elif keep is not None or any(isinstance(t, Vjp) for t in inner):
        # Under torch.func.vjp too: some kernels look at the grad mode itself, not at
        # torch.func's levels (the LSTM on CPU then saves no workspace for its backward).
        with torch.enable_grad():
            outputs = f(*inputs)
    else:
        with torch.no_grad():
            outputs = f(*inputs)
    return Executed(tuple(_materialized(o) for o in outputs), inputs, fallbacks)


def compose(
    base: Flat,
    n_base: int,
    program: Sequence[Transform],
    fallbacks: list[tuple[int, str]],
    name: str,
    constants: frozenset[int] = frozenset(),
) -> tuple[Flat, int]:
    """The flat function of ``program`` over ``base``, and how many inputs it takes."""
    f, n = base, n_base
    for index, t in enumerate(program):
        if isinstance(t, (Jvp, Vjp)):
            _check_indices(t.wrt, n, "input", t, name)
            f = (_jvp if isinstance(t, Jvp) else _vjp)(f, n, t, name, constants)
        elif isinstance(t, Vmap):
            if len(t.in_dims) != n:
                raise InvalidRequestError(
                    f"a vmap of model {name!r} gives {len(t.in_dims)} in_dims for {n} inputs"
                )
            if t.method not in VMAP_METHODS:
                raise InvalidRequestError(f"unknown vmap method {t.method!r}")
            if t.size < 1 or all(d is None for d in t.in_dims):
                raise InvalidRequestError(
                    f"a vmap of model {name!r} needs a batched input and a batch of at least 1"
                )
            f = _vmap(f, t, index, fallbacks, name)
        else:
            raise InvalidRequestError(f"unknown transform {t!r}")
        n += extra_inputs(t)
    return f, n


def _check_indices(indices: Sequence[int], n: int, what: str, t: Transform, name: str) -> None:
    bad = [i for i in indices if not 0 <= i < n]
    if bad or len(set(indices)) != len(indices):
        raise InvalidRequestError(
            f"a {type(t).__name__.lower()} of model {name!r} names {what}s {list(indices)}; "
            f"it has {n}, each named at most once"
        )


def checked_keep(keep: Sequence[int] | None, inputs: list[torch.Tensor], name: str) -> set[int]:
    """``keep`` as a set, checked: indices of floating inputs."""
    if keep is None:
        return set()
    keep_set = set(keep)
    bad = [
        i for i in keep_set if not 0 <= i < len(inputs) or not is_differentiable(inputs[i].dtype)
    ]
    if bad:
        raise InvalidRequestError(
            f"model {name!r}: autograd state can be kept only for floating inputs; input(s) "
            f"{sorted(bad)} of {len(inputs)} are not"
        )
    return keep_set


def _select(outputs: Sequence[torch.Tensor], indices: Sequence[int], name: str) -> tuple:
    try:
        return tuple(outputs[j] for j in indices)
    except IndexError:
        raise InvalidRequestError(
            f"a transform of model {name!r} names outputs {list(indices)}; it has {len(outputs)}"
        ) from None


def _with(xs: Sequence[torch.Tensor], wrt: Sequence[int], values: Sequence[torch.Tensor]) -> list:
    full = list(xs)
    for i, v in zip(wrt, values):
        full[i] = v
    return full


def _jvp(f: Flat, n: int, t: Jvp, name: str, constants: frozenset[int]) -> Flat:
    active = [k for k, i in enumerate(t.wrt) if i not in constants]
    wrt = tuple(t.wrt[k] for k in active)

    def tangents_of(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        xs, ts = inputs[:n], inputs[n:]
        if not wrt:  # tangents of constants only: the outputs do not move
            return tuple(torch.zeros_like(o) for o in _select(f(*xs), t.outputs, name))
        primals = tuple(xs[i] for i in wrt)

        def restricted(*w: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return _select(f(*_with(xs, wrt, w)), t.outputs, name)

        tangents = tuple(_like(ts[k], p, "tangent", name) for k, p in zip(active, primals))
        return tuple(torch.func.jvp(restricted, primals, tangents)[1])

    return tangents_of


def _vjp(f: Flat, n: int, t: Vjp, name: str, constants: frozenset[int]) -> Flat:
    wrt = tuple(i for i in t.wrt if i not in constants)

    def cotangents_of(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        xs, cts = inputs[:n], inputs[n:]

        def restricted(*w: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return _select(f(*_with(xs, wrt, w)), t.outputs, name)

        outputs, pullback = torch.func.vjp(restricted, *(xs[i] for i in wrt))
        seeds = tuple(_seed(c, o, name) for c, o in zip(cts, outputs))
        found = dict(zip(wrt, (_from_torch_grad(g) for g in pullback(seeds)))) if wrt else {}
        return tuple(found[i] if i in found else torch.zeros_like(xs[i]) for i in t.wrt)

    return cotangents_of


def _autograd_vjp(
    f: Flat,
    n: int,
    t: Vjp,
    inputs: list[torch.Tensor],
    *,
    create_graph: bool,
    name: str,
    constants: frozenset[int],
) -> tuple[torch.Tensor, ...]:
    xs, cts = inputs[:n], inputs[n:]
    wrt = [i for i in t.wrt if i not in constants]
    xs = [
        x if x.requires_grad or i not in wrt else x.detach().requires_grad_(True)
        for i, x in enumerate(xs)
    ]
    bad = [i for i in wrt if not is_differentiable(xs[i].dtype)]
    if bad:
        raise InvalidRequestError(
            f"a vjp of model {name!r} asks cotangents of non-floating inputs {bad}"
        )
    with torch.enable_grad():
        outputs = _select(f(*xs), t.outputs, name)
        found = dict(
            zip(wrt, grads(outputs, cts, [xs[i] for i in wrt], create_graph=create_graph, name=name))
        )
    return tuple(found[i] if i in found else torch.zeros_like(xs[i]) for i in t.wrt)


def grads(
    outputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor | None],
    wrt: Sequence[torch.Tensor],
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
    name: str = "",
) -> tuple[torch.Tensor, ...]:
    """Cotangents of ``wrt`` for ``cotangents`` of ``outputs`` (None: zero), by autograd,
    in JAX's convention for complex numbers; zeros where an input does not matter."""
    roots, seeds = [], []
    for out, ct in zip(outputs, cotangents):
        if ct is None or not out.requires_grad:
            continue
        roots.append(out)
        seeds.append(_seed(ct, out, name))
    found: Sequence[torch.Tensor | None] = [None] * len(wrt)
    if roots and wrt:
        found = torch.autograd.grad(
            roots,
            list(wrt),
            seeds,
            allow_unused=True,
            create_graph=create_graph,
            retain_graph=retain_graph,
        )
    return tuple(
        torch.zeros_like(w) if g is None else _from_torch_grad(g) for w, g in zip(wrt, found)
    )


def _seed(ct: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
    if ct.shape != out.shape:
        raise InvalidRequestError(
            f"a cotangent of model {name!r} has shape {shape_str(ct.shape)}; the output has "
            f"{shape_str(out.shape)}"
        )
    if ct.dtype != out.dtype:
        ct = ct.to(out.dtype)
    return ct.conj() if ct.is_complex() else ct


def _from_torch_grad(g: torch.Tensor) -> torch.Tensor:
    return _materialized(g.conj() if g.is_complex() else g)


def _materialized(t: torch.Tensor) -> torch.Tensor:
    """``t``, or real zeros for one of torch's symbolic ZeroTensors (autograd returns them
    for a derivative that does not depend on an input), which have no data to send."""
    if t._is_zerotensor():
        return torch.zeros(t.shape, dtype=t.dtype, device=t.device)
    return t


def _like(t: torch.Tensor, primal: torch.Tensor, what: str, name: str) -> torch.Tensor:
    if t.shape != primal.shape:
        raise InvalidRequestError(
            f"a {what} of model {name!r} has shape {shape_str(t.shape)}; its input has "
            f"{shape_str(primal.shape)}"
        )
    return t.to(primal.dtype)


def _vmap(f: Flat, t: Vmap, index: int, fallbacks: list[tuple[int, str]], name: str) -> Flat:
    dims = t.in_dims

    def check(inputs: Sequence[torch.Tensor]) -> None:
        for x, d in zip(inputs, dims):
            if d is not None and (d >= x.dim() or x.shape[d] != t.size):
                raise InvalidRequestError(
                    f"a vmap of model {name!r} over {t.size} examples got an input of shape "
                    f"{shape_str(x.shape)} batched along dimension {d}"
                )

    def batched(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Each example draws its own random numbers, as it would in a loop.
        return tuple(torch.func.vmap(f, in_dims=dims, out_dims=0, randomness="different")(*inputs))

    def looped(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        check(inputs)
        results = [
            f(*(x if d is None else x.select(d, b) for x, d in zip(inputs, dims)))
            for b in range(t.size)
        ]
        return tuple(torch.stack(list(column)) for column in zip(*results))

    if t.method == "sequential":
        return looped

    def auto(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        check(inputs)
        point = rewind_point([x.device for x in inputs])
        try:
            return batched(*inputs)
        except (CallCancelledError, LimitExceededError):  # not vmap's doing
            raise
        except Exception as e:  # noqa: BLE001 - whatever torch.func.vmap could not do
            # (the model's failures arrive as InvalidRequestError: the loop tells apart
            # what vmap could not do from what the model cannot)
            if t.method == "batched":
                raise InvalidRequestError(
                    f"torch.func.vmap cannot batch model {name!r} (vmap_method='batched'): "
                    f"{type(e).__name__}: {e}; use vmap_method='auto' or 'sequential' to run "
                    "its batch as a loop"
                ) from None
            why = str(e) if isinstance(e, InvalidRequestError) else f"{type(e).__name__}: {e}"
        if point is not None:  # the loop draws what vmap_method="sequential" would
            restore(point)
        outputs = looped(*inputs)  # if this fails too, the error is the model's own
        fallbacks.append((index, why))
        return outputs

    return auto
