"""Programs: what a call runs, the same objects on both sides of the bridge.

A bridged call runs the model's flat function under a stack of transforms, innermost
first: the JAX client builds the stack from the JAX transformations of the call, the
worker runs it as the same stack of ``torch.func`` transforms. The flat function's inputs
are the parameters, then the argument tensor leaves (wire order), then each transform's
extra inputs in turn; its outputs are the output tensor leaves (wire order). Each
transform maps a flat function of ``n`` inputs to another:

- ``Jvp(wrt, outputs)``: adds the tangents of inputs ``wrt``; gives the tangents of
  outputs ``outputs``. Linear in the tangents.
- ``Vjp(wrt, outputs)``: adds the cotangents of outputs ``outputs``; gives the cotangents
  of inputs ``wrt``. Linear in the cotangents.
- ``Vmap(in_dims, size, method)``: the same inputs, each batched along its ``in_dims``
  entry (None: the same for every example), outputs batched along dimension 0.

``to_wire`` and ``from_wire`` convert to and from ``bridge.v1.Program``; ``from_wire``
checks what a message alone can say (the worker checks the rest against the call).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from pytorch2jax_protocol.bridge.v1 import bridge_pb2 as pb

#: How a Vmap runs: ``"batched"`` (``torch.func.vmap``, or an error saying why torch
#: cannot), ``"sequential"`` (a loop over the batch, on the torch side, in one call), or
#: ``"auto"`` (batched, falling back to the loop where torch cannot batch the function).
VMAP_METHODS = ("auto", "batched", "sequential")

#: The deepest program a worker runs: JAX code nests transformations a few deep, and each
#: level is a torch.func level (and Python frames) on the worker.
MAX_TRANSFORMS = 16


class ProgramFormatError(ValueError):
    """A ``Program`` message that is malformed."""


@dataclass(frozen=True)
class Jvp:
    """Forward mode: tangents of outputs ``outputs`` along tangents of inputs ``wrt``."""

    wrt: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class Vjp:
    """Reverse mode: cotangents of inputs ``wrt`` from cotangents of outputs ``outputs``."""

    wrt: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class Vmap:
    """Batching along ``in_dims`` (None: unbatched), ``size`` wide, by ``method``."""

    in_dims: tuple[int | None, ...]
    size: int
    method: str = "auto"


Transform = Union[Jvp, Vjp, Vmap]

_METHODS = {"auto": pb.Vmap.AUTO, "batched": pb.Vmap.BATCHED, "sequential": pb.Vmap.SEQUENTIAL}
_METHOD_NAMES = {v: k for k, v in _METHODS.items()}


def extra_inputs(t: Transform) -> int:
    """How many inputs ``t`` adds to the function it transforms."""
    if isinstance(t, Jvp):
        return len(t.wrt)
    if isinstance(t, Vjp):
        return len(t.outputs)
    return 0


def describe(program: Sequence[Transform]) -> str:
    """A program as composed functions, outermost first, e.g. ``jvp∘vjp∘model``."""
    names = {Jvp: "jvp", Vjp: "vjp", Vmap: "vmap"}
    return "∘".join([names[type(t)] for t in reversed(program)] + ["model"])


def to_wire(program: Sequence[Transform]) -> pb.Program:
    msg = pb.Program()
    for t in program:
        if isinstance(t, Jvp):
            msg.transforms.add(jvp=pb.Jvp(wrt=t.wrt, outputs=t.outputs))
        elif isinstance(t, Vjp):
            msg.transforms.add(vjp=pb.Vjp(wrt=t.wrt, outputs=t.outputs))
        else:
            in_dims = [-1 if d is None else d for d in t.in_dims]
            vmap = pb.Vmap(in_dims=in_dims, axis_size=t.size, method=_METHODS[t.method])
            msg.transforms.add(vmap=vmap)
    return msg


def from_wire(msg: pb.Program) -> tuple[Transform, ...]:
    if len(msg.transforms) > MAX_TRANSFORMS:
        raise ProgramFormatError(
            f"a program of {len(msg.transforms)} transforms; at most {MAX_TRANSFORMS} are run"
        )
    program: list[Transform] = []
    for t in msg.transforms:
        kind = t.WhichOneof("kind")
        if kind == "jvp":
            program.append(Jvp(tuple(t.jvp.wrt), tuple(t.jvp.outputs)))
        elif kind == "vjp":
            program.append(Vjp(tuple(t.vjp.wrt), tuple(t.vjp.outputs)))
        elif kind == "vmap":
            method = _METHOD_NAMES.get(t.vmap.method)
            if method is None:
                raise ProgramFormatError(f"unknown vmap method {t.vmap.method}")
            if any(d < -1 for d in t.vmap.in_dims):
                raise ProgramFormatError(
                    "vmap in_dims must be -1 (unbatched) or a dimension; got "
                    f"{list(t.vmap.in_dims)}"
                )
            in_dims = tuple(None if d == -1 else d for d in t.vmap.in_dims)
            program.append(Vmap(in_dims, t.vmap.axis_size, method))
        else:
            raise ProgramFormatError("a program transform has no kind set")
    return tuple(program)
