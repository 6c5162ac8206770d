"""The in-process API on a GPU: torch runs on JAX's device arrays, with no copy on the way in.

``LocalModel`` (``_inprocess``) uses ``TorchDeviceIO`` for a torch module that lives on a
CUDA device, and for a function when JAX's default backend is a GPU and torch has CUDA
(a function runs where its inputs are). Then:

- under ``jit``, through ``buffer_callback``: XLA's input buffers become torch tensors by
  DLPack, over the same memory; torch runs on XLA's stream (``ctx.stream``, as a
  ``torch.cuda.ExternalStream``), so its kernels follow the inputs' producers and XLA's
  next kernels follow its own; the outputs are copied into XLA's output buffers on that
  stream. Nothing goes through the host, and nothing waits on the host for the GPU;
- eagerly: JAX arrays become torch tensors by DLPack (which orders torch's stream after
  the arrays' producers), and torch's outputs become JAX arrays by DLPack: over torch's
  memory where the backend owns it, else copied on the device.

A function then gets CUDA tensors, and must make its own on their device
(``torch.rand(x.shape, device=x.device)``), as in plain torch;
``py_to_jax_wrapper(fn, device="cpu")`` keeps it on the host instead.

A module on the CPU keeps the host path (``_callbacks.HOST_IO``) whatever JAX's arrays
are on: torch then runs where the module is, on host copies of GPU arrays.

torch is imported when first needed (``_torch_arrays.torch_module``), never by
``import pytorch2jax``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pytorch2jax._callbacks import REPORTED, ArrayIO, buffer_callback
from pytorch2jax._exceptions import InvalidArgumentError
from pytorch2jax._torch_arrays import np_to_torch, plain, torch_module, torch_to_np


class DeviceTensor:
    """A torch output on the GPU, as the AD layer checks outputs: a shape and a numpy
    dtype (ml_dtypes' bfloat16 for torch's), and the tensor."""

    __slots__ = ("dtype", "shape", "tensor")

    def __init__(self, tensor: Any, dtype: np.dtype) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.dtype = dtype

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """A host copy (where JAX's arrays are on the host)."""
        host = torch_to_np(self.tensor)
        return host if dtype is None else host.astype(dtype)

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        return self.tensor.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self) -> Any:
        return self.tensor.__dlpack_device__()


def serving_device(obj: Any, device: Any = None) -> Any:
    """The CUDA device a torch module or function runs on in process, or None (the host
    path): ``device`` where given ("cpu": the host path); else a module's own device (its
    first tensor's); for a function, or a module with no tensors, JAX's default GPU when
    JAX's default backend is a GPU and torch has CUDA."""
    torch = torch_module()
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise InvalidArgumentError(
                f"device={device!r} is no torch device: use 'cpu', 'cuda' or 'cuda:N'"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidArgumentError(
                f"device={str(device)!r}, but this torch has no CUDA device; use device='cpu'"
            )
        return device if device.type == "cuda" else None
    if isinstance(obj, torch.nn.Module):
        for t in itertools.chain(obj.parameters(), obj.buffers()):
            return t.device if t.device.type == "cuda" else None
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return torch.device("cuda", jax.devices()[0].local_hardware_id)
    return None


class TorchDeviceIO(ArrayIO):
    """JAX's GPU arrays (or XLA's GPU buffers) in, torch's CUDA tensors out; see the
    module doc. ``np_dtype`` maps a torch dtype to numpy's."""

    def __init__(self, device: Any, np_dtype: Any) -> None:
        self.device = device
        self._np_dtype = np_dtype

    # -- torch's side (LocalModel's) ------------------------------------------------------

    def to_torch(self, x: Any) -> Any:
        """A JAX array, an XLA buffer or a numpy array as a torch tensor on the device:
        the same memory where it is there already."""
        if isinstance(x, np.ndarray):  # JAX's arrays on the host (a module on the GPU)
            return np_to_torch(x).to(self.device)  # a copy, on the device
        t = torch_module().from_dlpack(x)
        return t if t.device == self.device else t.to(self.device)

    def from_torch(self, t: Any) -> DeviceTensor:
        t = plain(t)
        if t.device != self.device:  # a module that returns a CPU tensor
            t = t.to(self.device)
        return DeviceTensor(t, self._np_dtype(t.dtype))

    # -- JAX's side (the AD layer's) ------------------------------------------------------

    def to_backend(self, array: jax.Array) -> Any:
        return array

    def to_jax(self, value: Any, struct: jax.ShapeDtypeStruct | None, *, owned: bool) -> jax.Array:
        if isinstance(value, DeviceTensor) and jax.default_backend() == "gpu":
            out = jax.dlpack.from_dlpack(value.tensor.contiguous())
            if not owned:
                out = jnp.array(out, copy=True)
        else:  # a handle, or JAX on the host (a module on the GPU, JAX's arrays on the CPU)
            out = jnp.asarray(np.asarray(value))
        if struct is not None and out.dtype != struct.dtype:
            out = out.astype(struct.dtype)  # e.g. int64 -> int32 without x64
        return out

    def to_bytes(self, value: Any) -> bytes:
        if isinstance(value, (np.ndarray, jax.Array)):
            return bytes(np.asarray(value))
        return torch_module().from_dlpack(value).cpu().numpy().tobytes()  # a small handle

    def stage(
        self, host: Any, results: Sequence[jax.ShapeDtypeStruct], inputs: Sequence[Any]
    ) -> list[Any]:
        if buffer_callback is None or jax.default_backend() != "gpu":
            # JAX's arrays on the host: the host path, its outputs copied back (__array__).
            return super().stage(host, results, inputs)
        callback = functools.partial(_into_device_buffers, host, self)
        return buffer_callback(callback, list(results), vmap_method="sequential")(*inputs)


def _into_device_buffers(host: Any, io: TorchDeviceIO, ctx: Any, out: Any, *inputs: Any) -> None:
    torch = torch_module()
    # torch's kernels and copies go on XLA's stream: after the inputs' producers, before
    # the outputs' readers. Memory torch allocates on it is reused only on it.
    with torch.cuda.stream(torch.cuda.ExternalStream(ctx.stream, device=io.device)):
        with REPORTED:
            results = host(*inputs)
        for buf, value in zip(out, results):
            target = torch.from_dlpack(buf)
            if isinstance(value, DeviceTensor):
                target.copy_(value.tensor.reshape(target.shape))
            else:  # a handle (read-only numpy): copied in from the host
                target.copy_(np_to_torch(np.asarray(value)).reshape(target.shape))
