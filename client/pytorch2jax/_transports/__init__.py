"""How tensor bytes travel to and from the worker: one module per transport.

``open_transport`` picks one for a new Client: ``"inline"`` (in the gRPC messages, any
host), ``"shm"`` (POSIX shared memory, a worker on this host, calls by gRPC), ``"lane"``
(shared memory passed as file descriptors, and the calls over the worker's fast lane, a
unix socket beside gRPC: a worker on this host, Linux), ``"cuda_ipc"`` (GPU pools of a
worker on this host serving on the same GPU as JAX) or ``"auto"``: CUDA IPC when JAX runs
on a GPU and the worker offers it, else the fast lane when the worker offers one and it
can be reached, else shared memory when the worker offers it and can map our segments,
inline otherwise. A Transport object (``ShmTransport(...)`` with options of its own) is
opened as it is.
"""

from __future__ import annotations

import logging

import grpc
import jax

from pytorch2jax._exceptions import InvalidArgumentError, ResourceExhaustedError, UnsupportedError
from pytorch2jax._transports.base import Call, Transport
from pytorch2jax._transports.inline import InlineTransport
from pytorch2jax._transports.shm import ShmTransport
from pytorch2jax_protocol import cuda

__all__ = ["TRANSPORTS", "Call", "InlineTransport", "ShmTransport", "Transport", "open_transport"]

TRANSPORTS = ("auto", "inline", "shm", "lane", "cuda_ipc")

_log = logging.getLogger("pytorch2jax")


def open_transport(
    choice: str | Transport, channel: grpc.Channel, target: str, *, max_message_bytes: int
) -> Transport:
    """The transport ``choice`` names (or is), opened with the worker at ``target``."""
    if isinstance(choice, Transport):
        choice.open(channel, target, max_message_bytes=max_message_bytes)
        return choice
    if choice not in TRANSPORTS:
        raise InvalidArgumentError(
            f"transport must be one of {', '.join(map(repr, TRANSPORTS))} or a Transport "
            f"(e.g. pytorch2jax.ShmTransport(...)); got {choice!r}"
        )

    def opened(transport: Transport) -> Transport:
        transport.open(channel, target, max_message_bytes=max_message_bytes)
        return transport

    if choice == "inline":
        return opened(InlineTransport())
    if choice == "cuda_ipc":
        from pytorch2jax._transports.cuda_ipc import CudaIpcTransport  # imports jax's GPU

        return opened(CudaIpcTransport())
    if choice in ("shm", "lane"):
        return opened(ShmTransport(fast_lane="required" if choice == "lane" else "off"))
    if jax.default_backend() == "gpu":
        from pytorch2jax._transports.cuda_ipc import CudaIpcTransport

        try:
            return opened(CudaIpcTransport())
        except (UnsupportedError, ResourceExhaustedError, cuda.CudaError) as e:
            _log.info("no CUDA IPC with %s: %s", target, e)
    try:
        return opened(ShmTransport(fast_lane="if_offered"))
    except UnsupportedError as e:
        _log.info("tensors travel inline to %s: %s", target, e)
    except ResourceExhaustedError as e:  # the worker's session limit, or /dev/shm is full
        _log.warning("tensors travel inline to %s: %s", target, e)
    return opened(InlineTransport())
