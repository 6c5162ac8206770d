"""The Backend that runs a model on a worker, over the Bridge RPCs."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from pytorch2jax._backend import Backend, Result, Run, Vjp
from pytorch2jax._callbacks import ArrayIO
from pytorch2jax._exceptions import InvalidArgumentError, ResidualLostError, SessionLostError
from pytorch2jax._models import ModelInfo
from pytorch2jax._transports import Call, cuda_ipc
from pytorch2jax_protocol import dtypes, pb, programs, shm, tensors, values

# The wire code's own errors, for values that cannot be encoded (e.g. a string array).
_UNENCODABLE = (dtypes.UnsupportedDTypeError, tensors.WireFormatError, values.TreeFormatError)

if TYPE_CHECKING:
    from pytorch2jax._client import Client


def _spec_to_struct(msg: pb.TensorSpec) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(msg.shape), dtypes.to_numpy(msg.dtype))


def _refusing_unencodable(fn):
    """``fn``, with the wire code's encoding errors raised as InvalidArgumentError."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _UNENCODABLE as e:
            raise InvalidArgumentError(str(e)) from None

    return wrapped


_encode_arguments = _refusing_unencodable(values.encode_arguments)
_spec_of = _refusing_unencodable(tensors.spec_of)


def _struct_to_spec(s: jax.ShapeDtypeStruct) -> pb.TensorSpec:
    return _spec_of(s.dtype, s.shape)


def _array_nbytes(x: Any) -> int | None:
    """The bytes of a numpy array or a GPU array (CUDA array interface); None otherwise."""
    if isinstance(x, np.ndarray):
        return x.nbytes
    if cuda_ipc.is_device_array(x):  # also a bfloat16 jax.Array, which has no CAI
        return cuda_ipc.nbytes_of(x)
    return None


def _nbytes(tree: Any, at_least: int = 0) -> int:
    """Bytes the array leaves of ``tree`` (those of ``at_least`` bytes or more) take in a
    transport's slots, alignment included."""
    sizes = (_array_nbytes(x) for x in jax.tree_util.tree_leaves(tree))
    return sum(shm.align(n) for n in sizes if n is not None and n >= at_least)


#: Reply room to lend before a call with unknown output shapes has been seen; outputs
#: that do not fit come back inline. Later calls lend what the last reply took, or as
#: much as their inputs take if that is more.
_FIRST_REPLY_BYTES = 1 << 20


class RemoteModel(Backend):
    # Reply arrays are views of a reply block that only they hold (shm), or of an
    # immutable protobuf message (inline).
    owns_outputs = True

    def __init__(self, client: Client, info: ModelInfo) -> None:
        self._client = client
        self.info = info
        self.description = f"model {info.name!r} at {client.target}"
        self.buffers = info.buffers
        self._reply_bytes = _FIRST_REPLY_BYTES

    @property
    def io(self) -> ArrayIO:
        return self._client._transport.io

    def _check_parameters(self, params: dict[str, jax.ShapeDtypeStruct]) -> None:
        own = self.info.parameters
        for name, got in params.items():
            want = own.get(name, self.info.buffers.get(name))
            if want is None:
                raise InvalidArgumentError(
                    f"{self.description} has no parameter {name!r}; its parameters: "
                    f"{', '.join(own) or 'none'}"
                )
            want_dtype = jax.dtypes.canonicalize_dtype(want.dtype)
            if got.shape != want.shape or got.dtype != want_dtype:
                raise InvalidArgumentError(
                    f"parameter {name!r} of {self.description} must be "
                    f"{np.dtype(want_dtype).name}{list(want.shape)}; got "
                    f"{np.dtype(got.dtype).name}{list(got.shape)}"
                )

    def infer(self, params, args, kwargs, *, int32_as_int64=False, train=None) -> Any:
        self._check_parameters(params)
        request = pb.InferShapesRequest(
            model=self.info.name,
            arguments=_encode_arguments(args, kwargs, _struct_to_spec),
            int32_as_int64=int32_as_int64,
            train=train,
        )
        reply = self._client._unary("InferShapes", request)
        return values.decode(reply.outputs, tensors.from_wire, _spec_to_struct)

    def _exchange(self, method: str, request_bytes: int, reply_bytes: int, build, decode):
        """One RPC whose tensors travel by the client's transport: ``build(call)`` makes the
        request, ``decode(reply, call)`` reads the reply. A worker that lost the transport's
        session (it restarted) gets a new session and the call once more."""
        transport = self._client._transport
        for attempt in (0, 1):
            with transport.call(request_bytes, reply_bytes) as call:
                try:
                    request = build(call)
                except _UNENCODABLE as e:
                    raise InvalidArgumentError(str(e)) from None
                call.ready()
                try:
                    reply = self._client._unary(method, request, metadata=call.metadata)
                except SessionLostError:
                    if attempt:
                        raise
                    transport.reset(call.metadata)
                    continue
                return decode(reply, call)
        raise AssertionError("unreachable")

    def run(self, run: Run) -> Result:
        kept = run.vjp_of_kept()
        if kept is not None:
            try:
                return self._vjp_of_kept(run, *kept)
            except ResidualLostError:
                pass  # evicted or expired: recompute from the inputs
            run = dataclasses.replace(run, residual=b"")
        return self._forward(run)

    def release(self, residuals):
        self._client._release_residuals(residuals)

    def _forward(self, run: Run) -> Result:
        program = programs.to_wire(run.program) if run.program else None

        args, kwargs = run.arguments()

        def build(call: Call) -> pb.ForwardRequest:
            msg = pb.ForwardRequest(
                model=self.info.name,
                arguments=values.encode_arguments(args, kwargs, call.put),
                parameters=_named(run.params, call),
                keep_residual=run.keep is not None,
                residual_wrt=run.keep or (),
                reply_area=call.reply_area,
                int32_as_int64=run.int32_as_int64,
                train=run.train,
                returned_buffers=run.returned,
            )
            if run.key is not None:
                msg.rng.CopyFrom(call.put(run.key))
            if program is not None:
                msg.program.CopyFrom(program)
                msg.program_inputs.extend(call.put(x) for x in run.extras)
            if run.residual:
                msg.release_residuals.append(run.residual)
            return msg

        def decode(reply: pb.ForwardResponse, call: Call) -> Result:
            outputs = values.decode(reply.outputs, call.get)
            self._reply_bytes = max(_nbytes(outputs), 64)  # next time, as much as this took
            return Result(
                outputs,
                reply.residual,
                tuple((f.transform, f.reason) for f in reply.vmap_fallbacks),
            )

        small = self._client._transport.inline_below
        request_bytes = _nbytes((run.params, run.leaves, run.key, run.extras), small)
        if run.out_structs is not None:
            reply_bytes = sum(shm.align(_struct_nbytes(s)) for s in run.out_structs)
        else:  # eager: guess from the last reply, and from the inputs
            reply_bytes = max(self._reply_bytes, request_bytes)
        return self._exchange("Forward", request_bytes, reply_bytes, build, decode)

    def _vjp_of_kept(self, run: Run, last: Vjp, cts: list[Any]) -> Result:
        """The Vjp of a kept forward: torch's stored graph, no forward re-run."""

        def build(call: Call) -> pb.VjpRequest:
            return pb.VjpRequest(
                model=self.info.name,
                residual=run.residual,
                cotangents=[call.put(c) for c in cts],
                cotangent_outputs=last.outputs,
                wrt=last.wrt,
                reply_area=call.reply_area,
            )

        def decode(reply: pb.VjpResponse, call: Call) -> Result:
            return Result([call.get(g) for g in reply.grads])

        small = self._client._transport.inline_below
        if run.out_structs is not None:
            grads_bytes = sum(shm.align(_struct_nbytes(s)) for s in run.out_structs)
        else:
            grads_bytes = _nbytes([*run.params.values(), *run.leaves])
        return self._exchange("Vjp", _nbytes(cts, small), grads_bytes, build, decode)


def _struct_nbytes(s: jax.ShapeDtypeStruct) -> int:
    return math.prod(s.shape) * np.dtype(s.dtype).itemsize


def _named(params: dict[str, np.ndarray], call: Call) -> list[pb.NamedTensor]:
    return [pb.NamedTensor(name=n, tensor=call.put(v)) for n, v in params.items()]
