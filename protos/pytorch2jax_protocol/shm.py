"""Shared memory as both sides use it, and the checks on a reference.

Two kinds of region. Over the fast lane, the client creates an anonymous memfd
(``create_fd``), sealed at its size, and passes its descriptor; the worker checks and maps
it (``attach_fd``). Nothing is ever named, so a crash at any moment leaves nothing
behind. Elsewhere the client creates a named POSIX segment (``create``), the worker maps
it (``attach``) and unlinks its name at once, so that from then on the memory lives
exactly as long as the two mappings; only a client killed between creating the segment
and the worker mapping it leaves its name in /dev/shm. Names are random (128 bits) and the
segment is mode 0600 from its creation.

We call ``shm_open`` through ``_posixshmem`` (what ``multiprocessing.shared_memory`` uses)
rather than ``SharedMemory`` itself: before Python 3.13 a process that attaches a segment
through ``SharedMemory`` registers it with the resource tracker, which unlinks it when that
process exits; we need to decide when names go away ourselves.

The space is reserved with ``posix_fallocate`` when created: /dev/shm is a tmpfs of bounded
size (64 MB in a default Docker container), and touching a page of a segment that tmpfs
cannot back kills the process with SIGBUS. Reserving first turns that into a clear error.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import secrets
import stat
from collections.abc import Sequence

import _posixshmem

from pytorch2jax_protocol.tensors import WireFormatError, checked_nbytes

#: Every slot starts at a multiple of this: JAX on CPU wraps host memory without a copy
#: only at 64-byte alignment, and it is a cache line.
ALIGNMENT = 64

#: The gRPC metadata entry in which a call names its session (the id in hex).
SESSION_METADATA_KEY = "p2j-session"

_NAME = re.compile(r"/p2j-[0-9a-f]{32}")
_UINT64 = (1 << 64) - 1


class SharedMemoryError(OSError):
    """A segment could not be created, reserved or attached."""


def align(n: int) -> int:
    """``n`` rounded up to a multiple of ``ALIGNMENT``."""
    return (n + ALIGNMENT - 1) & ~(ALIGNMENT - 1)


def create(size: int) -> tuple[str, mmap.mmap]:
    """A new segment of ``size`` bytes, reserved and mapped read-write; returns its name.

    The caller unlinks the name (``unlink``) once the worker has attached it, or failed to.
    """
    name = f"/p2j-{secrets.token_hex(16)}"
    fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        _reserve(fd, size)
        return name, mmap.mmap(fd, size)
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)


def attach(name: str, size: int) -> mmap.mmap:
    """Maps the segment ``name`` that a client created, checks it, and unlinks the name.

    Refused: names that are not ours, segments another user owns or others may open
    (a peer that can reach them could shrink them under us, and touching a page past
    the end raises SIGBUS), and segments smaller than ``size``.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SharedMemoryError(errno.EINVAL, "not a pytorch2jax shared-memory segment name")
    try:
        fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0)
    except FileNotFoundError:
        raise SharedMemoryError(
            errno.ENOENT,
            "the worker cannot see this shared-memory segment: it runs on another host or "
            "in a container that does not share the host's shared memory (Docker: ipc: host "
            "or shareable)",
        ) from None
    try:
        unlink(name)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise SharedMemoryError(
                errno.EPERM, "the segment must belong to the user the worker runs as"
            )
        if info.st_mode & 0o077:
            raise SharedMemoryError(errno.EPERM, "the segment must have mode 0600")
        return _mapped(fd, info, size, "segment")
    finally:
        os.close(fd)


def _mapped(fd: int, info: os.stat_result, size: int, what: str) -> mmap.mmap:
    """``size`` bytes of ``fd`` mapped, after checking it has them."""
    if size <= 0 or info.st_size < size:
        raise SharedMemoryError(
            errno.EINVAL, f"the {what} has {info.st_size} bytes, not the {size} registered"
        )
    return mmap.mmap(fd, size)


#: Whether this system makes anonymous shared memory that can be passed as a descriptor.
HAS_MEMFD = hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")

#: The seals a passed region must carry: its size is fixed, so no page the worker maps
#: can vanish under it (SIGBUS), and nobody can unseal it.
_SEALS = 0
if HAS_MEMFD:
    _SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def create_fd(size: int) -> tuple[int, mmap.mmap]:
    """A new anonymous region of ``size`` bytes (``memfd_create``), reserved, sealed at
    that size and mapped read-write: its descriptor (the caller closes it once passed)
    and the mapping. Nothing is ever named in /dev/shm: the memory goes when the last
    descriptor and mapping of it do, a crash included."""
    fd = os.memfd_create("pytorch2jax", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        _reserve(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise


def attach_fd(fd: int, size: int) -> mmap.mmap:
    """Maps a region a client passed as a descriptor, after checking it: a regular file
    of this user, at least ``size`` bytes, sealed against shrinking. Closes ``fd``."""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise SharedMemoryError(
                errno.EPERM, "the region must be a memfd of the user the worker runs as"
            )
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if seals & _SEALS != _SEALS:
            raise SharedMemoryError(
                errno.EPERM, "the region must be sealed at its size (F_SEAL_SHRINK, F_SEAL_GROW)"
            )
        return _mapped(fd, info, size, "region")
    finally:
        os.close(fd)


def _reserve(fd: int, size: int) -> None:
    """Reserves ``size`` bytes of ``fd`` up front: touching a page that tmpfs cannot back
    would kill the process with SIGBUS, where this gives a clear error."""
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:  # macOS: no reservation, only a size
            os.ftruncate(fd, size)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.ENOMEM):
            raise
        raise SharedMemoryError(
            e.errno,
            f"cannot reserve {size >> 20} MiB of shared memory ({e.strerror}); free some, "
            "make it larger (Docker: shm_size), or use transport='inline'",
        ) from None


def unlink(name: str) -> None:
    """Removes the name; the memory stays while it is mapped. A missing name is fine."""
    try:
        _posixshmem.shm_unlink(name)
    except FileNotFoundError:
        pass


def check_ref(
    offset: int, nbytes: int, region_size: int, dtype: int, shape: Sequence[int]
) -> int:
    """Checks that ``dtype`` x ``shape`` occupies exactly ``nbytes`` at ``offset`` within a
    region of ``region_size`` bytes; returns ``nbytes``. Raises WireFormatError."""
    need = checked_nbytes(dtype, shape)
    if nbytes != need:
        raise WireFormatError(
            f"shared-memory reference holds {nbytes} bytes but the tensor's dtype x shape "
            f"{tuple(shape)} needs {need}"
        )
    # Python integers do not wrap, but the peer's C++ or Rust twin would: refuse what
    # overflows 64 bits, then compare without adding.
    if offset > _UINT64 or nbytes > _UINT64 - offset or nbytes > region_size or (
        offset > region_size - nbytes
    ):
        raise WireFormatError(
            f"shared-memory reference [{offset}, {offset}+{nbytes}) lies outside its region "
            f"of {region_size} bytes"
        )
    return nbytes
