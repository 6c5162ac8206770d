"""How tensor bytes travel to and from the worker: one module per transport.

``open_transport`` picks one for a new Client: ``"inline"`` (in the gRPC messages, any
host), ``"shm"`` (POSIX shared memory, a worker on this host), ``"cuda_ipc"`` (not in this
version) or ``"auto"``: shared memory when the worker offers it and can map our segments,
inline otherwise.
"""

from __future__ import annotations

import logging

import grpc

from pytorch2jax._exceptions import InvalidArgumentError, ResourceExhaustedError, UnsupportedError
from pytorch2jax._transports.base import Call, Transport
from pytorch2jax._transports.inline import InlineTransport
from pytorch2jax._transports.shm import ShmTransport

__all__ = ["TRANSPORTS", "Call", "InlineTransport", "ShmTransport", "Transport", "open_transport"]

TRANSPORTS = ("auto", "inline", "shm", "cuda_ipc")

_log = logging.getLogger("pytorch2jax")


def open_transport(choice: str, channel: grpc.Channel, target: str) -> Transport:
    if choice not in TRANSPORTS:
        raise InvalidArgumentError(
            f"transport must be one of {', '.join(map(repr, TRANSPORTS))}; got {choice!r}"
        )
    if choice == "inline":
        return InlineTransport()
    if choice == "cuda_ipc":
        raise UnsupportedError(
            "the cuda_ipc transport is not available in this version of pytorch2jax; use "
            "'shm' for CPU arrays on this host or 'inline'"
        )
    if choice == "shm":
        return ShmTransport(channel, target)
    try:
        return ShmTransport(channel, target)
    except UnsupportedError as e:
        _log.info("tensors travel inline to %s: %s", target, e)
    except ResourceExhaustedError as e:  # the worker's session limit, or /dev/shm is full
        _log.warning("tensors travel inline to %s: %s", target, e)
    return InlineTransport()
