"""The Backend that runs a model on a worker, over the Bridge RPCs."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from pytorch2jax._backend import Backend
from pytorch2jax._exceptions import InvalidArgumentError, ResidualLostError
from pytorch2jax._models import ModelInfo
from pytorch2jax_protocol import dtypes, pb, tensors, values

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


_to_wire = _refusing_unencodable(tensors.to_wire)
_encode_arguments = _refusing_unencodable(values.encode_arguments)
_spec_of = _refusing_unencodable(tensors.spec_of)


def _struct_to_spec(s: jax.ShapeDtypeStruct) -> pb.TensorSpec:
    return _spec_of(s.dtype, s.shape)


def _named(params: dict[str, np.ndarray]) -> list[pb.NamedTensor]:
    return [pb.NamedTensor(name=n, tensor=_to_wire(v)) for n, v in params.items()]


class RemoteModel(Backend):
    def __init__(self, client: Client, info: ModelInfo) -> None:
        self._client = client
        self.info = info
        self.description = f"model {info.name!r} at {client.target}"

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

    def forward(self, params, args, kwargs, *, keep_residual):
        request = pb.ForwardRequest(
            model=self.info.name,
            arguments=_encode_arguments(args, kwargs, _to_wire),
            parameters=_named(params),
            keep_residual=keep_residual,
        )
        reply = self._client._unary("Forward", request)
        return values.decode(reply.outputs, tensors.from_wire), reply.residual

    def vjp(self, residual, params, args, kwargs, cotangents):
        request = pb.VjpRequest(
            model=self.info.name,
            cotangents=[pb.Tensor() if c is None else _to_wire(c) for c in cotangents],
        )
        reply = None
        if any(residual):
            request.residual = residual
            try:
                reply = self._client._unary("Vjp", request)
            except ResidualLostError:
                request.residual = b""  # evicted or expired: recompute from the inputs
        if reply is None:
            request.arguments.CopyFrom(_encode_arguments(args, kwargs, _to_wire))
            request.parameters.extend(_named(params))
            reply = self._client._unary("Vjp", request)
        param_grads = {g.name: tensors.from_wire(g.tensor) for g in reply.parameter_grads}
        arg_grads = [
            None if g.dtype == pb.DTYPE_UNSPECIFIED else tensors.from_wire(g)
            for g in reply.argument_grads
        ]
        return param_grads, arg_grads
