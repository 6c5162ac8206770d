"""How tensor bytes travel between the worker and its clients.

gRPC carries control; a wire tensor's payload is either its bytes (``inline``), a
reference into a shared-memory region the client registered (``shm``), or one into a GPU
pool the worker made for the client (``cuda_ipc``). One ``CallCodec`` serves one call: it
decodes the request's tensors onto the serving device (inline ones are copied; shared ones
are viewed in place, or copied if the call keeps them) and encodes the reply's, into the
client's reply area when the request gave one and they fit, inline otherwise.
"""

from __future__ import annotations

import grpc
import torch

from pytorch2jax_protocol import pb
from pytorch2jax_protocol import shm as _shm

from pytorch2jax_server._dataplane import cuda_ipc, inline, shm
from pytorch2jax_server._sessions import Session, Sessions
from pytorch2jax_server.engine import InvalidRequestError, dense, dense_cpu, wire_dtype

__all__ = ["CallCodec", "cuda_ipc", "inline", "named_session", "session_of", "shm"]


def named_session(sessions: Sessions, context: grpc.ServicerContext) -> Session | None:
    """The session a call names in its metadata (an unknown one is SessionLostError), or None
    if it names none."""
    for key, value in context.invocation_metadata():
        if key == _shm.SESSION_METADATA_KEY:
            try:
                session_id = bytes.fromhex(value)
            except ValueError:
                raise InvalidRequestError(
                    f"the {_shm.SESSION_METADATA_KEY} metadata entry must be a session id in hex"
                ) from None
            return sessions.get(session_id)
    return None


def session_of(sessions: Sessions, context: grpc.ServicerContext) -> Session:
    """The session a call names in its metadata, which it must."""
    session = named_session(sessions, context)
    if session is not None:
        return session
    raise InvalidRequestError(
        "this call refers to shared memory but names no session; open one with OpenSession "
        f"and send its id in hex in the {_shm.SESSION_METADATA_KEY} metadata entry"
    )


class CallCodec:
    """Decodes one call's tensors and encodes its reply's."""

    def __init__(
        self,
        sessions: Sessions,
        context: grpc.ServicerContext,
        device: torch.device,
        reply_area: pb.SharedMemoryRef | None = None,
        *,
        keep: bool = False,
    ) -> None:
        self._sessions = sessions
        self._device = device  # where the models run
        self._on_cpu = device.type == "cpu"
        self._context = context
        self._session: Session | None = None
        # Tensors kept past the call (a residual: autograd's graph holds its inputs) must
        # not view the client's slots, which it reuses once the call returns.
        self._keep = keep
        self._area_ref = reply_area
        self._area = shm.area(self._session_(), reply_area) if reply_area is not None else None
        self._cursor = 0
        # The GPU whose stream must be synchronised before the reply (see finish).
        self._gpu: torch.device | None = None
        if self._area is not None and self._area.is_cuda:
            self._gpu = self._area.device

    def _session_(self) -> Session:
        if self._session is None:
            self._session = session_of(self._sessions, self._context)
        return self._session

    def decode(self, msg: pb.Tensor) -> torch.Tensor:
        """The tensor of ``msg``, on the device the models run on."""
        payload = msg.WhichOneof("payload")
        device = self._device
        if payload == "cuda_ipc":
            # A pool is always on the serving device (cuda_ipc.create_pool).
            t = shm.view(self._session_(), msg.cuda_ipc, msg.dtype, msg.shape, gpu=True)
            self._gpu = t.device
            return t.clone() if self._keep else t
        if payload != "shm":
            t = inline.decode(msg)
        else:
            t = shm.view(self._session_(), msg.shm, msg.dtype, msg.shape)
            if self._keep and device.type == "cpu":
                t = t.clone()
        return t if self._on_cpu else t.to(device)

    def encode(self, t: torch.Tensor) -> pb.Tensor:
        placed = self._place(t) if self._area is not None else None
        return placed if placed is not None else inline.encode(t)

    def finish(self) -> None:
        """Waits for the work on the client's GPU pools (reads of its request block, copies
        into its reply area): once we reply, the client reuses them."""
        if self._gpu is not None:
            torch.cuda.current_stream(self._gpu).synchronize()

    def _place(self, t: torch.Tensor) -> pb.Tensor | None:
        """``t`` copied into the next free bytes of the reply area, or None if it does not fit."""
        area = self._area
        t = dense(t) if area.is_cuda else dense_cpu(t)
        nbytes = t.numel() * t.element_size()
        start = _shm.align(self._cursor)
        if nbytes == 0 or start + nbytes > area.numel():
            return None
        dst = area[start : start + nbytes].view(t.dtype).view(t.shape)
        dst.copy_(t)
        self._cursor = start + nbytes
        ref = pb.SharedMemoryRef(
            region=self._area_ref.region, offset=self._area_ref.offset + start, nbytes=nbytes
        )
        if area.is_cuda:
            return pb.Tensor(dtype=wire_dtype(t.dtype), shape=t.shape, cuda_ipc=ref)
        return pb.Tensor(dtype=wire_dtype(t.dtype), shape=t.shape, shm=ref)
