"""The fast lane's framing, as both sides speak it: a session's hot calls over a unix socket.

gRPC stays the control plane (sessions, shapes, auth, health, every remote host). A
client on the worker's host may also carry its session's ``Forward`` and ``Vjp`` calls
over a unix socket, as the same protobuf messages with a 16-byte header instead of HTTP/2,
and register shared memory by passing a file descriptor (``SCM_RIGHTS``) instead of
naming a segment in /dev/shm. A call over the lane costs one write and one read on each
side.

The lane is opened only through a session (``SessionInfo.fast_lane``): each connection
first sends ``HELLO`` with a one-time capability (32 random bytes), and the worker accepts
it only from the user it runs as and the process that opened the session (the socket's
``SO_PEERCRED``); it answers with the capability for the next connection. One connection
carries one call at a time; a client opens as many as it runs calls at once.

Why a plain unix socket: measured on the 2-core machine (a 910-byte request, median round
trip to an echoing thread), a socket pair takes 11-12 us and pyzmq's REQ/REP over ipc://
36-60 us (each side hops through ZeroMQ's I/O thread), and ZeroMQ cannot pass file
descriptors, which the memfd regions need. A shared-memory ring with futex doorbells would
save a syscall or two of those 12 us, against the 150 us of Python a small call costs in
the worker's handler; the socket also tells each side at once when the other is gone.

A frame is a header ``<IBBHd``: the body's length, the kind, a code (the method of a
``CALL``; the gRPC status code of a ``REPLY``), the length of the metadata at the start of
the body, and the call's timeout in seconds (0 in replies). The body is the metadata
(``key\\0value\\0`` pairs, as gRPC metadata) and then the payload: a request or reply
message, or a failed call's details in UTF-8. ``REGISTER`` carries a region's size
(``<Q``) and, as ancillary data, its memfd; its ``REPLY`` carries the region id (``<I``).

Prepared calls: a ``Forward`` or ``Vjp`` sent with ``prepare`` set leaves its form (model,
argument structure, parameter names, shapes and dtypes, keep, key, mode: all but its
tensors' bytes) with the worker under an id (``ForwardResponse.prepared``), in its
session. A later call of that form is a ``RUN`` frame: no metadata, a payload of ``PLAN``
(the id) and then its input tensors' bytes laid out as ``layout`` says (parameters in the
prepared order, argument leaves, key; for a Vjp, the residual handle and the
cotangents). Its ``REPLY`` holds the outputs' bytes the same way (a kept forward's
residual handle first). No protobuf, no pytree and no check of the form on either side:
the worker checks the id, the payload's size, and the outputs' shapes against the first
call's. An unknown id (another session's, or one the worker let go) is ``NOT_FOUND``: the
client prepares the call again. That takes about a third off a small call's time.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence

#: The header of every frame.
HEADER = struct.Struct("<IBBHd")

# Frame kinds.
HELLO = 1
CALL = 2
REGISTER = 3
REPLY = 4
RUN = 5

#: The methods a CALL may carry, by code.
METHODS = {1: "Forward", 2: "Vjp"}
METHOD_CODES = {name: code for code, name in METHODS.items()}

CAPABILITY_BYTES = 32
#: A RUN's first bytes: the prepared call's id, then padding to ``ALIGN``.
PLAN = struct.Struct("<I12x")
#: Where each tensor starts in a RUN's payload or reply (after ``PLAN``, or from 0).
ALIGN = 16
REGION_SIZE = struct.Struct("<Q")
REGION_ID = struct.Struct("<I")

#: Metadata longer than this is refused: a call names its session and little else.
MAX_METADATA_BYTES = 4096


def layout(sizes: Sequence[int], start: int = 0) -> tuple[list[int], int]:
    """Where tensors of ``sizes`` bytes lie one after another from ``start``, each at a
    multiple of ``ALIGN``; and the end of the last."""
    offsets, at = [], start
    for n in sizes:
        at = -(-at // ALIGN) * ALIGN
        offsets.append(at)
        at += n
    return offsets, at


class FrameError(ValueError):
    """Bytes that are not a frame of the fast lane: the connection cannot go on."""


class LaneClosedError(ConnectionError):
    """The other side closed the connection (or died) before a whole frame came."""


def encode_metadata(metadata: Sequence[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}\0{v}\0".encode() for k, v in metadata)


def decode_metadata(data: bytes) -> tuple[tuple[str, str], ...]:
    if not data:
        return ()
    try:
        parts = data.decode().split("\0")
    except UnicodeDecodeError:
        raise FrameError("the metadata is not UTF-8") from None
    if len(parts) % 2 != 1 or parts[-1]:
        raise FrameError("the metadata is not key\\0value\\0 pairs")
    return tuple(zip(parts[0:-1:2], parts[1:-1:2]))


def send(
    sock: socket.socket,
    kind: int,
    code: int = 0,
    payload: bytes = b"",
    *,
    metadata: bytes = b"",
    timeout: float = 0.0,
    fds: Sequence[int] = (),
) -> None:
    """Writes one frame (with ``fds`` as ancillary data, if any)."""
    header = HEADER.pack(len(metadata) + len(payload), kind, code, len(metadata), timeout)
    parts = [header, metadata, payload] if metadata else [header, payload]
    if fds:
        socket.send_fds(sock, parts, list(fds))
        return
    # One sendmsg for the parts (no copy into one buffer); a large payload may need more.
    sent = sock.sendmsg(parts)
    total = HEADER.size + len(metadata) + len(payload)
    if sent < total:
        sock.sendall(b"".join(parts)[sent:])


class Frame:
    """A frame as read: its kind, code, timeout, metadata and payload, and the file
    descriptors that came with it (the reader owns them: close what you do not keep)."""

    __slots__ = ("kind", "code", "timeout", "metadata", "payload", "fds")

    def __init__(self, kind, code, timeout, metadata, payload, fds) -> None:
        self.kind, self.code, self.timeout = kind, code, timeout
        self.metadata, self.payload, self.fds = metadata, payload, fds


_FD_ROOM = socket.CMSG_SPACE(4 * 4)  # a few descriptors; the kernel closes any more


def receive(sock: socket.socket, max_body: int, *, with_fds: bool = False) -> Frame:
    """Reads one frame. FrameError for a malformed header or a body over ``max_body``
    bytes (the stream cannot be resynchronised after either); LaneClosedError at EOF.
    With ``with_fds``, descriptors passed with the frame's first bytes are returned;
    without, any that came are closed."""
    header = bytearray(HEADER.size)
    view = memoryview(header)
    got = 0
    fds: list[int] = []
    try:
        while got < HEADER.size:
            if with_fds:
                n, ancillary, _, _ = sock.recvmsg_into([view[got:]], _FD_ROOM)
                for level, kind, data in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        usable = len(data) - len(data) % 4
                        fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
            else:
                n = sock.recv_into(view[got:])
            if n == 0:
                raise LaneClosedError("the connection closed")
            got += n
        length, kind, code, meta_len, timeout = HEADER.unpack(header)
        if kind not in (HELLO, CALL, REGISTER, REPLY, RUN):
            raise FrameError(f"unknown frame kind {kind}")
        if length > max_body:
            raise FrameError(f"a frame of {length} bytes is over the limit of {max_body}")
        if meta_len > min(length, MAX_METADATA_BYTES):
            raise FrameError(f"metadata of {meta_len} bytes in a body of {length}")
        if not timeout >= 0.0:  # also NaN
            raise FrameError(f"a timeout of {timeout} s")
        body = _read_exactly(sock, length)
    except BaseException:
        for fd in fds:
            _close(fd)
        raise
    return Frame(kind, code, timeout, body[:meta_len], memoryview(body)[meta_len:], fds)


def _read_exactly(sock: socket.socket, n: int) -> bytearray:
    data = bytearray(n)
    view = memoryview(data)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise LaneClosedError("the connection closed mid-frame")
        got += k
    return data


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """The (pid, uid, gid) of the process at the other end of a unix socket (Linux)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def socket_address(address: str) -> str | bytes:
    """What ``bind``/``connect`` take for a lane address: ``@name`` is abstract."""
    return b"\0" + address[1:].encode() if address.startswith("@") else address
