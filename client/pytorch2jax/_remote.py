"""The Backend that runs a model on a worker, over the Bridge RPCs."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from pytorch2jax._backend import Backend
from pytorch2jax._exceptions import InvalidArgumentError, ResidualLostError, SessionLostError
from pytorch2jax._models import ModelInfo
from pytorch2jax._transports import Call, cuda_ipc
from pytorch2jax_protocol import dtypes, pb, shm, tensors, values

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
        self._reply_bytes = _FIRST_REPLY_BYTES

    @property
    def device_arrays(self) -> bool:
        return self._client._transport.device_arrays

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

    def infer(self, params, args, kwargs) -> Any:
        self._check_parameters(params)
        request = pb.InferShapesRequest(
            model=self.info.name,
            arguments=_encode_arguments(args, kwargs, _struct_to_spec),
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

    def forward(self, params, args, kwargs, *, keep_residual, reply_bytes=None):
        def build(call: Call) -> pb.ForwardRequest:
            return pb.ForwardRequest(
                model=self.info.name,
                arguments=values.encode_arguments(args, kwargs, call.put),
                parameters=_named(params, call),
                keep_residual=keep_residual,
                reply_area=call.reply_area,
            )

        def decode(reply: pb.ForwardResponse, call: Call):
            outputs = values.decode(reply.outputs, call.get)
            self._reply_bytes = max(_nbytes(outputs), 64)  # next time, as much as this took
            return outputs, reply.residual

        request_bytes = _nbytes((params, args, kwargs), self._client._transport.inline_below)
        if reply_bytes is None:  # eager: guess from the last reply, and from the inputs
            reply_bytes = max(self._reply_bytes, request_bytes)
        return self._exchange("Forward", request_bytes, reply_bytes, build, decode)

    def release(self, residuals):
        self._client._release_residuals(residuals)

    def vjp(self, residual, params, args, kwargs, cotangents):
        small = self._client._transport.inline_below
        inputs = [*params.values(), *jax.tree_util.tree_leaves((args, kwargs))]
        grads_bytes = _nbytes([x for x in inputs if _array_nbytes(x) is not None and _inexact(x)])
        cts_bytes = _nbytes([c for c in cotangents if c is not None], small)

        def request(recompute: bool):
            def build(call: Call) -> pb.VjpRequest:
                msg = pb.VjpRequest(
                    model=self.info.name,
                    cotangents=[pb.Tensor() if c is None else call.put(c) for c in cotangents],
                    reply_area=call.reply_area,
                )
                if recompute:
                    msg.arguments.CopyFrom(
                        values.encode_arguments(args, kwargs, call.put)
                    )
                    msg.parameters.extend(_named(params, call))
                else:
                    msg.residual = residual
                return msg

            return build

        def decode(reply: pb.VjpResponse, call: Call):
            param_grads = {g.name: call.get(g.tensor) for g in reply.parameter_grads}
            arg_grads = [
                None if g.dtype == pb.DTYPE_UNSPECIFIED else call.get(g)
                for g in reply.argument_grads
            ]
            return param_grads, arg_grads

        if any(residual):
            try:
                return self._exchange("Vjp", cts_bytes, grads_bytes, request(False), decode)
            except ResidualLostError:
                pass  # evicted or expired: recompute from the inputs
        request_bytes = cts_bytes + _nbytes((params, args, kwargs), small)
        return self._exchange("Vjp", request_bytes, grads_bytes, request(True), decode)


def _inexact(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _named(params: dict[str, np.ndarray], call: Call) -> list[pb.NamedTensor]:
    return [pb.NamedTensor(name=n, tensor=call.put(v)) for n, v in params.items()]
