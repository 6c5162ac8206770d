"""The CUDA IPC transport on the worker: GPU pools it allocates for a client's session.

A pool is one plain ``cudaMalloc`` allocation on the GPU the worker serves on (not torch's
caching allocator, whose blocks cannot be exported one by one), exported as a CUDA IPC
handle that the client opens once. The client copies inputs, parameters and cotangents
into the pool and has its stream synchronised before it sends the call, so the worker may
read them at once; the worker writes outputs and gradients into the reply area and
synchronises its own stream before it replies.

The pool's memory is freed when the last tensor viewing it dies, which is after its
session ends: a call still running on a pool of a dropped session finishes safely.
"""

from __future__ import annotations

import torch

from pytorch2jax_protocol import cuda, pb

from pytorch2jax_server._sessions import Session
from pytorch2jax_server.engine import InvalidRequestError, LimitExceededError, UnsupportedError


class _Allocation:
    """Owns one cudaMalloc block; torch holds it through every tensor viewing the pool."""

    def __init__(self, ordinal: int, size: int) -> None:
        self.pointer = cuda.malloc(ordinal, size)
        self.__cuda_array_interface__ = cuda.array_interface(self.pointer, (size,), "|u1")

    def __del__(self) -> None:
        pointer, self.pointer = getattr(self, "pointer", 0), 0
        if pointer:
            cuda.free(pointer)


class DevicePool:
    """A client's pool on the worker's GPU, as a uint8 tensor over all of it."""

    def __init__(self, device: torch.device, size: int) -> None:
        self.size = size
        allocation = _Allocation(device.index or 0, size)
        self.handle = cuda.export(allocation.pointer)
        self.bytes = torch.as_tensor(allocation, device=device)


def serving_device(device: torch.device, uuid: bytes) -> torch.device:
    """``device`` if it is the GPU with ``uuid`` and can export IPC memory; else UnsupportedError
    with what the client should do."""
    if device.type != "cuda":
        raise UnsupportedError(
            "this worker serves on the CPU, so it has no CUDA IPC transport; start it with "
            "--device cuda, or use transport='shm'"
        )
    if len(uuid) != cuda.UUID_BYTES:
        raise InvalidRequestError(f"a GPU UUID has {cuda.UUID_BYTES} bytes; got {len(uuid)}")
    ordinal = device.index if device.index is not None else torch.cuda.current_device()
    if cuda.device_uuid(ordinal) != uuid:
        raise UnsupportedError(
            "the client's arrays are on another GPU than the one this worker serves on; "
            "put them on the worker's GPU, or use transport='shm'"
        )
    return torch.device("cuda", ordinal)


def unavailable_reason(device: torch.device) -> str:
    """Why CUDA IPC cannot be offered on ``device``, or "" if it can."""
    if device.type != "cuda":
        return "this worker serves on the CPU (start it with --device cuda for CUDA IPC)"
    if not cuda.available():
        return "this worker has no cuda-python or sees no GPU through it"
    return ""


def create_pool(session: Session, device: torch.device, uuid: bytes, size: int) -> tuple[int, bytes]:
    """A new GPU pool of ``size`` bytes in ``session``, on ``device`` (where models run),
    which must be the GPU ``uuid`` names: its region id and CUDA IPC handle."""
    if pb.CUDA_IPC not in session.transports:
        raise UnsupportedError(
            f"this worker does not offer CUDA IPC to this client (peer {session.peer}); use "
            "transport='shm' or 'inline'"
        )
    device = serving_device(device, uuid)
    if size <= 0:
        raise InvalidRequestError(f"a CUDA pool needs a positive size; got {size}")
    made: list[DevicePool] = []

    def make() -> DevicePool:
        try:
            made.append(DevicePool(device, size))
        except (cuda.CudaError, torch.OutOfMemoryError) as e:
            raise LimitExceededError(f"cannot allocate {size} bytes on the worker's GPU: {e}") from None
        return made[0]

    return session.add(size, make), made[0].handle
