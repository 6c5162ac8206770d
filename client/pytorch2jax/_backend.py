"""What the JAX layer (``_ad``) needs from whatever runs torch: the Backend interface, and
the programs a backend runs.

A bridged call runs a *program*: the model's flat function composed with a stack of
transforms, innermost first (``pytorch2jax_protocol.programs`` says what each does), which
torch runs as the same stack of ``torch.func`` transforms. ``jax.hessian`` of a loss
reaches torch as ``(Vjp, Jvp)``: ``torch.func.jvp`` of a ``torch.func.vjp`` of the model,
in one call. The flat function's inputs are the parameters (in ``Signature.param_names``
order), then the argument leaves (JAX's flattening order), then the transforms' extra
inputs; its outputs are the output leaves (the same order).

A call may also carry a PRNG key (its raw data as int32 bits: a flat input after the
argument leaves, which the model never sees but which seeds torch's generators for the
call), a training or eval mode, and buffers to return after the call (after the output
leaves, by name).

The transforms are the worker's own objects (the protocol package holds them). Two
backends implement the interface: a worker over gRPC (``_remote``) and torch in this
process (``_inprocess``). Arrays cross it as the backend's ``io`` says: numpy arrays (on
CPU, zero-copy views of XLA's buffers) unless a transport works in GPU memory.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax

from pytorch2jax._callbacks import HOST_IO, ArrayIO
from pytorch2jax_protocol import HANDLE_BYTES
from pytorch2jax_protocol.programs import VMAP_METHODS, Jvp, Transform, Vjp, Vmap

__all__ = [
    "HANDLE_BYTES",
    "VMAP_METHODS",
    "ArrayIO",
    "Backend",
    "Jvp",
    "Result",
    "Run",
    "Transform",
    "Vjp",
    "Vmap",
]


@dataclass
class Run:
    """One call of a program, as the backend receives it."""

    params: dict[str, Any]
    #: The array leaves of the arguments ``(args, kwargs)``, in wire order.
    leaves: list[Any]
    #: ``(args, kwargs)`` with the given array leaves (same order and number) in place.
    rebuild: Callable[[list[Any]], tuple[tuple, dict]]
    #: Hashable: the call's tree structure, static leaves and parameter names (all but
    #: the arrays' data and shapes), for backends that keep something per signature.
    structure: Any
    #: The transforms, innermost first; () calls the model as it is.
    program: tuple[Transform, ...] = ()
    #: The transforms' extra inputs, in order (tangents, cotangents).
    extras: list[Any] = field(default_factory=list)
    #: Keep torch's autograd state for a later ``Vjp`` w.r.t. these flat inputs (None: keep
    #: nothing). The result then carries its handle.
    keep: tuple[int, ...] | None = None
    #: The handle of a kept forward of ``program[:-1]`` when ``program`` ends with a Vjp
    #: of it: the backward then need not re-run the forward. Any other handle given here
    #: is no longer needed and is freed.
    residual: bytes = b""
    #: The flat outputs' shapes and dtypes, when known before the call (under tracing).
    out_structs: list[jax.ShapeDtypeStruct] | None = None
    #: int32 argument leaves reach torch as int64 (JAX without x64 has no int64).
    int32_as_int64: bool = False
    #: The PRNG key's data as int32 bits (a backend array), or None: no key.
    key: Any = None
    #: Training (True) or eval (False) mode for this call; None: the module's own.
    train: bool | None = None
    #: Buffers whose values after the call come back: the outputs are then
    #: ``(outputs, {name: buffer})`` (flat: the output leaves, then these by name).
    returned: tuple[str, ...] = ()

    def arguments(self) -> tuple[tuple, dict]:
        """``(args, kwargs)``: the call's argument pytrees."""
        return self.rebuild(self.leaves)

    def vjp_of_kept(self) -> tuple[Vjp, list[Any]] | None:
        """The last Vjp and its own cotangents (the kept forward had the other inputs),
        when this call is the Vjp of the kept forward ``residual`` names; else None."""
        last = self.program[-1] if self.program else None
        if not (self.residual and isinstance(last, Vjp) and self.keep is None):
            return None
        return last, self.extras[len(self.extras) - len(last.outputs) :]


@dataclass
class Result:
    #: The output pytree for an empty program; the flat outputs otherwise.
    outputs: Any
    #: The handle of the kept autograd state; b"" when none was kept.
    residual: bytes = b""
    #: (index of a Vmap in the program, why) for each ``"auto"`` Vmap that torch could not
    #: batch and that ran as a loop instead.
    fallbacks: tuple[tuple[int, str], ...] = ()


class Backend(abc.ABC):
    """Runs one torch model or function for the JAX wrapper."""

    #: How error messages name the model, e.g. "model 'mlp' at localhost:50051".
    description: str

    #: Whether the arrays ``run`` returns are the caller's alone (no one else writes
    #: them), so that JAX may wrap them without a copy.
    owns_outputs: bool = False

    #: The model's buffers (BatchNorm statistics...), by name: what a call may return.
    buffers: dict[str, jax.ShapeDtypeStruct] = {}  # noqa: RUF012 - replaced, never mutated

    @property
    def io(self) -> ArrayIO:
        """How this backend's arrays meet JAX's (host numpy arrays unless a GPU transport)."""
        return HOST_IO

    @abc.abstractmethod
    def infer(
        self,
        params: dict[str, jax.ShapeDtypeStruct],
        args: tuple,
        kwargs: dict,
        *,
        int32_as_int64: bool = False,
        train: bool | None = None,
    ) -> Any:
        """The output pytree, leaves as ShapeDtypeStruct, for inputs of these shapes and
        dtypes (int32 leaves as int64 when ``int32_as_int64``; ``train`` as ``Run`` says)."""

    @abc.abstractmethod
    def run(self, run: Run) -> Result:
        """Runs ``run.program`` on the inputs. Errors are pytorch2jax's exceptions."""

    def call_site(self) -> Callable[[Run], Result]:
        """``run``, for the calls of one compiled call site: calls that differ only in
        their arrays' data (one structure, program, keep, and shapes and dtypes), which
        may skip what the first of them checked or learnt. By default ``run`` itself."""
        return self.run

    def release(self, residuals: list[bytes]) -> None:
        """Frees the residuals of forwards whose backward will never run (an unused
        ``jax.vjp``, say). Must not block on the worker; unknown handles are ignored."""
