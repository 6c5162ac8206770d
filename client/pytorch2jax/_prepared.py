"""The client's end of prepared calls: a compiled call site's calls, after its first, as
an id and their tensors' bytes (``pytorch2jax_protocol.lane`` describes the frames).

The first call of a site over the fast lane goes in full with ``prepare`` set; the worker
answers with the id of what it kept of the call's form. ``PreparedCall`` holds that id,
where each input goes in a ``RUN``'s payload, and where each output lies in its reply
(dtypes and shapes as the first reply gave them, in JAX's leaf order). A prepared call
belongs to the lane (the session) it was made on: a new session prepares again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pytorch2jax._exceptions import WorkerInternalError
from pytorch2jax_protocol import lane


class PreparedCall:
    """One prepared call of a call site (see the module doc).

    ``head`` bytes (a Vjp's residual handle) precede the inputs in a RUN's payload;
    ``reply_head`` bytes (a kept forward's handle) precede the outputs in its reply.
    ``outputs`` are the reply's (dtype, shape) in the worker's order, and ``order`` the
    indices into them in JAX's leaf order (None: the same).
    """

    __slots__ = (
        "lane", "plan_id", "offsets", "size", "reply_head", "outputs", "out_offsets",
        "out_size", "order",
    )  # fmt: skip

    def __init__(
        self,
        lane_: Any,
        plan_id: int,
        inputs: Sequence[np.ndarray],
        outputs: Sequence[tuple[np.dtype, tuple[int, ...]]],
        *,
        head: int = 0,
        reply_head: int = 0,
        order: Sequence[int] | None = None,
    ) -> None:
        self.lane = lane_
        self.plan_id = plan_id
        self.offsets, self.size = lane.layout([a.nbytes for a in inputs], lane.PLAN.size + head)
        self.reply_head = reply_head
        self.outputs = [(np.dtype(d), tuple(s)) for d, s in outputs]
        self.out_offsets, self.out_size = lane.layout(
            [d.itemsize * math.prod(s) for d, s in self.outputs], reply_head
        )
        identity = order is None or list(order) == list(range(len(order)))
        self.order = None if identity else list(order)

    def payload(self, inputs: Sequence[np.ndarray], head: bytes = b"") -> bytearray:
        """A RUN's payload for ``inputs`` (of the first call's shapes and dtypes)."""
        buf = bytearray(self.size)
        lane.PLAN.pack_into(buf, 0, self.plan_id)
        start = lane.PLAN.size
        buf[start : start + len(head)] = head
        room = np.frombuffer(buf, np.uint8)
        for a, at in zip(inputs, self.offsets):
            if a.nbytes:
                room[at : at + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        return buf

    def results(self, reply: memoryview) -> tuple[list[np.ndarray], bytes]:
        """The outputs (views of ``reply``, in JAX's order) and the reply's head."""
        if len(reply) != self.out_size:
            raise WorkerInternalError(
                f"the worker answered a prepared call with {len(reply)} bytes where "
                f"{self.out_size} belong; are the client's and the worker's pytorch2jax "
                "versions the same?"
            )
        arrays = [
            np.frombuffer(reply, d, math.prod(s), at).reshape(s) if math.prod(s) else np.empty(s, d)
            for (d, s), at in zip(self.outputs, self.out_offsets)
        ]
        if self.order is not None:
            arrays = [arrays[i] for i in self.order]
        return arrays, bytes(reply[: self.reply_head])


def handle_of(head: bytes) -> bytes:
    """A kept forward's residual handle from a reply's head: b"" where none was kept
    (the worker leaves zeros, which no handle is)."""
    return head if head.strip(b"\0") else b""
