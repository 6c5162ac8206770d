"""How the in-process API's arrays meet torch on the host: numpy arrays as torch tensors
and back, without copies where torch allows (``np_to_torch``, ``torch_to_np``), and the
``ArrayIO`` that hands them to ``LocalModel`` (``TORCH_HOST_IO``). Their GPU twin is
``_torch_device``. torch is imported when first asked for (``torch_module``), never by
``import pytorch2jax``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import ml_dtypes
import numpy as np

from pytorch2jax._callbacks import ArrayIO


@functools.cache  # on every tensor's path: a cached call is cheaper than an import
def torch_module():
    import torch  # deferred: `import pytorch2jax` must not import torch

    return torch


_BF16 = np.dtype(ml_dtypes.bfloat16)


def np_to_torch(a: np.ndarray):
    """A numpy array as a CPU tensor over the same memory (bfloat16 through its bits)."""
    torch = torch_module()
    if a.flags.writeable and a.dtype != _BF16:  # XLA's buffers inside a callback
        return torch.from_numpy(a)
    bf16 = a.dtype == _BF16
    if bf16:  # torch does not know numpy's bfloat16: go through its bits
        a = a.view(np.uint16)
    if a.flags.writeable:
        t = torch.from_numpy(a)
    else:
        with warnings.catch_warnings():
            # A JAX array's numpy view is read-only; writes are guarded by the
            # version-counter check (``_inprocess``'s docstring), not by numpy's flag.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if bf16 else t


def plain(t: Any) -> Any:
    """``t`` detached, with a lazy conjugation resolved: what may leave torch."""
    if t.requires_grad:
        t = t.detach()
    return t.resolve_conj() if t.is_conj() else t


def torch_to_np(t: Any) -> np.ndarray:
    """A tensor as a numpy array: a view of a CPU tensor, a host copy of any other."""
    t = plain(t)
    torch = torch_module()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
    return (t if t.is_cpu else t.cpu()).numpy()


class TorchHostIO(ArrayIO):
    """Host memory (``ArrayIO``'s numpy arrays), and how ``LocalModel`` makes torch
    tensors of them and numpy arrays of its outputs."""

    to_torch = staticmethod(np_to_torch)
    from_torch = staticmethod(torch_to_np)


TORCH_HOST_IO = TorchHostIO()
