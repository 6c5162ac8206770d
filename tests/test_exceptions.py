"""The exception hierarchy: complete over gRPC status codes, and the public surface."""

from __future__ import annotations

import grpc
import pytest

import pytorch2jax
from pytorch2jax import _exceptions


def test_every_status_code_maps_to_one_class():
    codes = set(grpc.StatusCode) - {grpc.StatusCode.OK}
    assert set(_exceptions._BY_CODE) == codes
    for cls in _exceptions._BY_CODE.values():
        assert issubclass(cls, pytorch2jax.Pytorch2JaxError)


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize(
    ("code", "cls", "builtin"),
    [
        (grpc.StatusCode.UNAVAILABLE, pytorch2jax.WorkerUnavailableError, ConnectionError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, pytorch2jax.WorkerTimeoutError, TimeoutError),
        (grpc.StatusCode.NOT_FOUND, pytorch2jax.ModelNotFoundError, LookupError),
        (grpc.StatusCode.INVALID_ARGUMENT, pytorch2jax.InvalidArgumentError, ValueError),
    ],
)
def test_mapping_keeps_details_and_builtin_bases(code, cls, builtin):
    err = _exceptions.from_rpc_error(_FakeRpcError(code, "the details"), "host:1")
    assert type(err) is cls and isinstance(err, builtin)
    assert str(err).startswith("worker at host:1: ")
    assert "the details" in str(err)


def test_exported_members():
    public = {n for n in dir(pytorch2jax) if not n.startswith("_")}
    assert set(pytorch2jax.__all__) - {"__version__"} == public - {
        m for m in public if type(getattr(pytorch2jax, m)).__name__ == "module"
    }
