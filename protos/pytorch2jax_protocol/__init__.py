"""The wire contract shared by the pytorch2jax client and worker.

Holds the generated protobuf/gRPC stubs (``bridge.v1``) and the small numpy-only code both
sides need: the dtype table (``dtypes``), the tensor codec with its validation (``tensors``)
and the pytree <-> ``Value`` encoding (``values``). It imports neither torch nor jax, and
grpc only once ``pb_grpc`` (the service stubs) is first used: the messages and the numpy
codecs do without it (the worker's torch engine imports ``dtypes``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytorch2jax_protocol.bridge.v1 import bridge_pb2 as pb

if TYPE_CHECKING:
    from pytorch2jax_protocol.bridge.v1 import bridge_pb2_grpc as pb_grpc

#: gRPC's default 4 MiB receive limit is far too small for tensors; both ends raise it to
#: this unless told otherwise. Protobuf itself cannot serialize a message of 2 GiB or more.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30

#: Size of one streamed chunk of parameter bytes (GetParameters).
PARAMETER_CHUNK_BYTES = 4 << 20

#: Byte length of a residual handle. The client carries it as a uint8 array inside JAX
#: computations, where all zeros means that no residual was kept.
HANDLE_BYTES = 16

#: The metadata entry that carries ``Bearer <token>`` to a worker started with a token.
AUTHORIZATION_METADATA_KEY = "authorization"

#: Trailing metadata of a unary reply to a call that carries ``POOL_METADATA_KEY``: a
#: random id of the worker process, so that a client of several workers can send a
#: forward's VJP to the worker that ran it. (Setting it costs tens of us a call: only
#: pool clients ask for it.)
WORKER_ID_METADATA_KEY = "p2j-worker-id"
POOL_METADATA_KEY = "p2j-pool"

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Bridge"].full_name


def __getattr__(name: str) -> Any:
    # PEP 562: the gRPC stubs import grpc, which the messages and codecs do not need.
    if name == "pb_grpc":
        from pytorch2jax_protocol.bridge.v1 import bridge_pb2_grpc

        globals()["pb_grpc"] = bridge_pb2_grpc  # later lookups skip this function
        return bridge_pb2_grpc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC channel/server options that lift the message size limits to ``max_message_bytes``."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


__all__ = [
    "AUTHORIZATION_METADATA_KEY",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "HANDLE_BYTES",
    "PARAMETER_CHUNK_BYTES",
    "POOL_METADATA_KEY",
    "SERVICE_NAME",
    "WORKER_ID_METADATA_KEY",
    "channel_options",
    "pb",
    "pb_grpc",
]
