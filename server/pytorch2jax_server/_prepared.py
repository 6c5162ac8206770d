"""Prepared calls: a session's calls of one form, run by id with only their tensors' bytes.

A ``Forward`` (or a ``Vjp`` of a kept forward) that a client sends over the fast lane
with ``prepare`` set runs as usual, and then leaves what the worker worked out of it, all
but its tensors' data, as a ``Prepared`` in its session (``PreparedCalls``): the model,
the arguments' structure, the parameters' names, each input's dtype and shape, keep, key,
mode, and the outputs' dtypes and shapes. The client's later calls of that form, those of
one compiled JAX call site, are ``RUN`` frames: the id and the tensors' bytes in the
lane's ``layout``. The worker then decodes no protobuf and walks no pytree, and the
engine's ``CallSite`` checks the form once; it checks the payload's size, and the
outputs' shapes and dtypes against the first call's. (What databases call a prepared
statement.) See ``pytorch2jax_protocol.lane`` for the frames.

A session holds at most ``MAX_PREPARED`` of them; past that the oldest goes, and a client
that runs it gets NOT_FOUND and prepares it again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pytorch2jax_protocol import HANDLE_BYTES, lane
from pytorch2jax_server._dataplane import inline
from pytorch2jax_server._wire import from_bytes
from pytorch2jax_server.engine import CallSite, InvalidRequestError, ServedModel, wire_dtype

#: Prepared calls one session holds at most (the oldest goes first).
MAX_PREPARED = 256
#: Inputs (and outputs) of a prepared call take at most this many bytes: larger tensors
#: travel in shared memory, where a RUN's copy through the socket would cost more.
MAX_PREPARED_BYTES = 1 << 20


@dataclass(frozen=True)
class _Spec:
    """One tensor of a prepared call: its wire dtype, torch dtype, shape and bytes."""

    code: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int

    @classmethod
    def of(cls, t: torch.Tensor) -> _Spec:
        return cls(wire_dtype(t.dtype), t.dtype, tuple(t.shape), t.numel() * t.element_size())


class OutputsChangedError(Exception):
    """A RUN's outputs are not of the prepared call's shapes and dtypes (they depend on the
    data): the call goes in full instead, where the client says what it expected."""


class _Hole:
    """Where the i-th argument leaf goes in a prepared call's argument structure."""

    __slots__ = ()


_HOLE = _Hole()


def _skeleton(tree: Any) -> Any:
    """``tree`` (decoded arguments) with every tensor replaced by ``_HOLE``."""
    if isinstance(tree, torch.Tensor):
        return _HOLE
    if isinstance(tree, tuple):
        return tuple(_skeleton(x) for x in tree)
    if isinstance(tree, list):
        return [_skeleton(x) for x in tree]
    if isinstance(tree, dict):
        return {k: _skeleton(v) for k, v in tree.items()}
    return tree  # a static leaf: int, float, str, bool, None


def _fill(tree: Any, leaves: Iterator[torch.Tensor]) -> Any:
    """The skeleton ``tree`` with its holes filled from ``leaves``, in the order the wire
    decoder met the tensors (depth first, dict entries as sent)."""
    if tree is _HOLE:
        return next(leaves)
    if isinstance(tree, tuple):
        return tuple(_fill(x, leaves) for x in tree)
    if isinstance(tree, list):
        return [_fill(x, leaves) for x in tree]
    if isinstance(tree, dict):
        return {k: _fill(v, leaves) for k, v in tree.items()}
    return tree


class Prepared:
    """One prepared call (see the module doc). ``method`` is "Forward" or "Vjp"."""

    def __init__(
        self,
        method: str,
        model: ServedModel,
        inputs: Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor],
        *,
        head: int,
        reply_head: int,
        device: torch.device,
    ) -> None:
        self.method = method
        self.model = model
        self.device = device
        self._on_cpu = device.type == "cpu"
        self.inputs = tuple(_Spec.of(t) for t in inputs)
        self.outputs = tuple(_Spec.of(t) for t in outputs)
        #: A RUN's payload: PLAN, ``head`` bytes (a Vjp's residual handle), the inputs;
        #: its reply: ``reply_head`` bytes (a kept forward's handle), the outputs.
        self.offsets, self.size = lane.layout(
            [s.nbytes for s in self.inputs], lane.PLAN.size + head
        )
        self.out_offsets, self.out_size = lane.layout(
            [s.nbytes for s in self.outputs], reply_head
        )

    def small_enough(self) -> bool:
        """Whether it is small enough to prepare (``MAX_PREPARED_BYTES``)."""
        return (
            self.size <= MAX_PREPARED_BYTES
            and sum(s.nbytes for s in self.outputs) <= MAX_PREPARED_BYTES
        )

    def tensors(self, payload: memoryview) -> list[torch.Tensor]:
        """The inputs of a RUN's ``payload``: views of it (it is this call's alone), on the
        serving device."""
        if len(payload) != self.size:
            raise InvalidRequestError(
                f"a prepared call of model {self.model.name!r} carries {self.size} bytes; "
                f"got {len(payload)}"
            )
        raw = np.frombuffer(payload, np.uint8)
        if raw.ctypes.data % lane.ALIGN:  # views need aligned bytes: rare, then copy
            raw = raw.copy()
        if not raw.flags.writeable:
            raw = raw.copy()  # a model may write into its inputs
        out = []
        for spec, at in zip(self.inputs, self.offsets):
            t = from_bytes(raw[at : at + spec.nbytes], spec.code, spec.shape)
            out.append(t if self._on_cpu else t.to(self.device))
        return out

    def reply(self, outputs: Sequence[torch.Tensor]) -> bytearray:
        """The RUN's reply: ``reply_head`` zero bytes (for the caller to fill), then the
        outputs' bytes in the lane's layout, after checking they have the first call's
        dtypes and shapes (OutputsChangedError if not)."""
        if len(outputs) != len(self.outputs) or any(
            t.dtype != s.dtype or tuple(t.shape) != s.shape for t, s in zip(outputs, self.outputs)
        ):
            got = ", ".join(f"{t.dtype}{tuple(t.shape)}" for t in outputs)
            want = ", ".join(f"{s.dtype}{s.shape}" for s in self.outputs)
            raise OutputsChangedError(
                f"model {self.model.name!r} returned {got} where the call it was prepared "
                f"from returned {want}; send the call in full"
            )
        reply = bytearray(self.out_size)
        for t, at, spec in zip(outputs, self.out_offsets, self.outputs):
            reply[at : at + spec.nbytes] = inline.tensor_bytes(t)
        return reply


class ForwardPlan(Prepared):
    """A prepared Forward: how a RUN's inputs become the model's call."""

    def __init__(
        self,
        model: ServedModel,
        *,
        args: tuple,
        kwargs: dict,
        params: dict[str, torch.Tensor],
        leaves: Sequence[torch.Tensor],
        key: torch.Tensor | None,
        outputs: Sequence[torch.Tensor],
        keep: tuple[int, ...] | None,
        int32_as_int64: bool,
        train: bool | None,
        device: torch.device,
    ) -> None:
        tail = [key] if key is not None else []
        super().__init__(
            "Forward",
            model,
            [*params.values(), *leaves, *tail],
            outputs,
            head=0,
            reply_head=HANDLE_BYTES if keep is not None else 0,
            device=device,
        )
        self.names = tuple(params)
        self.n_leaves = len(leaves)
        self.keyed = key is not None
        self.skeleton = _skeleton((args, kwargs))
        self.keep = keep
        self.int32_as_int64 = int32_as_int64
        self.train = train
        self.site: CallSite = model.call_site()

    def call(self, tensors: list[torch.Tensor]) -> dict[str, Any]:
        """``CallSite.run``'s arguments for a RUN's input tensors."""
        n = len(self.names)
        leaves = tensors[n : n + self.n_leaves]
        args, kwargs = _fill(self.skeleton, iter(leaves))
        return {
            "args": args,
            "kwargs": kwargs,
            "leaves": leaves,
            "params": dict(zip(self.names, tensors[:n])),
            "keep": self.keep,
            "int32_as_int64": self.int32_as_int64,
            "key": tensors[-1] if self.keyed else None,
            "train": self.train,
        }


class VjpPlan(Prepared):
    """A prepared Vjp of a kept forward: a RUN's payload starts with the residual's handle."""

    def __init__(
        self,
        model: ServedModel,
        *,
        cotangents: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        cotangent_outputs: Sequence[int],
        wrt: Sequence[int],
        device: torch.device,
    ) -> None:
        super().__init__(
            "Vjp", model, cotangents, grads, head=HANDLE_BYTES, reply_head=0, device=device
        )
        self.cotangent_outputs = list(cotangent_outputs)
        self.wrt = list(wrt)

    @staticmethod
    def handle(payload: memoryview) -> bytes:
        return bytes(payload[lane.PLAN.size : lane.PLAN.size + HANDLE_BYTES])


class PreparedCalls:
    """A session's prepared calls, by id (see the module doc)."""

    def __init__(self, max_entries: int = MAX_PREPARED) -> None:
        self._max = max_entries
        self._entries: OrderedDict[int, Prepared] = OrderedDict()
        self._next = 1  # 0 is proto3's default: "none was made"
        self._lock = threading.Lock()

    def add(self, prepared: Prepared) -> int:
        with self._lock:
            plan_id = self._next
            self._next = (self._next % 0xFFFFFFFF) + 1  # ids are uint32 on the wire
            self._entries[plan_id] = prepared
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return plan_id

    def get(self, plan_id: int) -> Prepared | None:
        return self._entries.get(plan_id)

    def drop(self, plan_id: int) -> None:
        with self._lock:
            self._entries.pop(plan_id, None)

    def __len__(self) -> int:
        return len(self._entries)
