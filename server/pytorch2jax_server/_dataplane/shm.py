"""Shared memory on the worker: the host regions clients share with a session, and validated
tensor views of a session's regions (host memory, or GPU pools of ``cuda_ipc``).

A client shares memory by naming a POSIX segment it created (``RegisterRegion``; the worker
unlinks the name once mapped) or, over the fast lane, by passing a memfd (nothing is ever
named). Either way the worker maps it and checks it: its owner and mode (or seals), and its
size against the one registered (``pytorch2jax_protocol.shm``).

Every reference is checked before use (``shm.check_ref``): the region must be one of the
caller's session, ``offset + nbytes`` must lie inside it (with an overflow guard) and
``nbytes`` must equal dtype x shape. Messages never name a segment or a path.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pytorch2jax_protocol import pb, shm
from pytorch2jax_protocol.tensors import WireFormatError

from pytorch2jax_server._dataplane import cuda_ipc
from pytorch2jax_server._sessions import Session
from pytorch2jax_server._wire import from_bytes
from pytorch2jax_server.engine import InvalidRequestError, UnsupportedError, torch_dtype


@dataclass(eq=False)
class HostRegion:
    """A client's memory as mapped into the worker, as a byte array over all of it.

    Every tensor viewing it (``_wire.from_bytes``) keeps the mapping alive, so it is
    unmapped only after the last one dies.
    """

    size: int
    bytes: np.ndarray  # uint8


def map_segment(session: Session, name: str, size: int) -> int:
    """Maps the client's named segment ``name`` into ``session`` (RegisterRegion); its id."""
    return _map(session, lambda: shm.attach(name, size), size, "segment")


def map_descriptor(session: Session, fd: int, size: int) -> int:
    """Maps a region the client passed as a descriptor (the fast lane) into ``session``,
    and closes the descriptor; its id."""
    owned = [fd]  # attach_fd closes it; a refusal before it ran must close it too

    def attach() -> mmap.mmap:
        return shm.attach_fd(owned.pop(), size)

    try:
        return _map(session, attach, size, "region")
    finally:
        for left in owned:
            os.close(left)


def _map(session: Session, attach: Callable[[], mmap.mmap], size: int, what: str) -> int:
    if pb.SHM not in session.transports:
        raise UnsupportedError(
            "this worker does not accept shared memory from this client "
            f"(peer {session.peer}); use transport='inline', or start the worker with "
            "--shared-memory any if the peer is on this host"
        )

    def make() -> HostRegion:
        try:
            mapping = attach()
        except shm.SharedMemoryError as e:
            if e.errno in (errno.ENOENT, errno.EPERM):
                # Another host or container, or another user: the client should go inline.
                raise UnsupportedError(str(e.strerror)) from None
            raise InvalidRequestError(f"cannot use this shared-memory {what}: {e.strerror}") from None
        return HostRegion(size, np.frombuffer(mapping, np.uint8))

    return session.add(size, make)


def view(
    session: Session,
    ref: pb.SharedMemoryRef,
    dtype: int,
    shape: Sequence[int],
    *,
    gpu: bool = False,
) -> torch.Tensor:
    """The validated bytes of ``ref`` as a tensor of ``dtype`` and ``shape`` (no copy), in
    a host region of ``session``, or with ``gpu`` in one of its GPU pools."""
    region = session.region(ref.region)
    if isinstance(region, cuda_ipc.DevicePool) != gpu:
        raise InvalidRequestError(
            f"region {ref.region} is {'a GPU pool' if not gpu else 'host memory'}; "
            f"reference it as {'cuda_ipc' if not gpu else 'shm'}"
        )
    if ref.offset % shm.ALIGNMENT:
        # Also what makes the dtype view below valid for every itemsize.
        raise InvalidRequestError(
            f"shared-memory offsets must be multiples of {shm.ALIGNMENT}; got {ref.offset}"
        )
    try:
        shm.check_ref(ref.offset, ref.nbytes, region.size, dtype, shape)
    except WireFormatError as e:
        raise InvalidRequestError(str(e)) from None
    if gpu:
        raw = region.bytes[ref.offset : ref.offset + ref.nbytes]
        return raw.view(torch_dtype(dtype)).view(tuple(shape))
    return from_bytes(region.bytes[ref.offset : ref.offset + ref.nbytes], dtype, shape)


def area(session: Session, ref: pb.SharedMemoryRef) -> torch.Tensor:
    """The validated bytes of a reply area, as a uint8 tensor (no copy), host or GPU."""
    gpu = isinstance(session.region(ref.region), cuda_ipc.DevicePool)
    return view(session, ref, pb.UINT8, [ref.nbytes], gpu=gpu)
