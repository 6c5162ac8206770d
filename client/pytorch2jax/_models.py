"""What a worker says about the models it serves."""

from __future__ import annotations

from dataclasses import dataclass

import jax

from pytorch2jax_protocol import dtypes, pb


@dataclass(frozen=True)
class ModelInfo:
    """A served model: its kind, parameters and buffers (shape and dtype), and signature."""

    name: str
    #: "module" (an nn.Module, called with parameters) or "function".
    kind: str
    parameters: dict[str, jax.ShapeDtypeStruct]
    buffers: dict[str, jax.ShapeDtypeStruct]
    signature: str
    doc: str

    @classmethod
    def from_proto(cls, msg: pb.ModelInfo) -> ModelInfo:
        def specs(named) -> dict[str, jax.ShapeDtypeStruct]:
            return {
                n.name: jax.ShapeDtypeStruct(tuple(n.spec.shape), dtypes.to_numpy(n.spec.dtype))
                for n in named
            }

        kind = "module" if msg.kind == pb.ModelInfo.MODULE else "function"
        return cls(
            msg.name, kind, specs(msg.parameters), specs(msg.buffers), msg.signature, msg.doc
        )
