"""Opening a channel to a worker: TLS credentials and the bearer token, from arguments or
from the environment (``PYTORCH2JAX_*``), shared by the JAX client and the health probe.

The token travels as ``authorization: Bearer <token>`` metadata on every call, added by a
client interceptor rather than gRPC call credentials, because call credentials are refused
on plaintext channels and a token on a unix socket (no TLS needed there) is common.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from pytorch2jax_protocol import AUTHORIZATION_METADATA_KEY

__all__ = ["TLS", "open_channel", "token_from_env"]

#: Environment variables the client side reads when connect() is not told otherwise.
TARGET_ENV = "PYTORCH2JAX_TARGET"
TOKEN_ENV = "PYTORCH2JAX_TOKEN"
_TLS_ENV = {
    "ca": "PYTORCH2JAX_TLS_CA",
    "cert": "PYTORCH2JAX_TLS_CLIENT_CERT",
    "key": "PYTORCH2JAX_TLS_CLIENT_KEY",
    "server_name": "PYTORCH2JAX_TLS_SERVER_NAME",
}
_TLS_ON_ENV = "PYTORCH2JAX_TLS"


class ChannelConfigError(ValueError):
    """TLS settings that cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class TLS:
    """TLS settings for connecting to a worker over TCP.

    Args:
        ca: PEM file of the CA that signed the worker's certificate; None trusts the
            system's roots.
        cert, key: PEM files of this client's certificate and key, for a worker that
            requires client certificates (``--tls-client-ca``).
        server_name: the host name the worker's certificate holds, when it differs from
            the host in the target (e.g. a target given as an IP address).
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    @classmethod
    def from_env(cls) -> TLS | None:
        """TLS from ``PYTORCH2JAX_TLS_CA``, ``_TLS_CLIENT_CERT``, ``_TLS_CLIENT_KEY`` and
        ``_TLS_SERVER_NAME`` (any of them turns TLS on; without a CA, the system's roots
        are trusted), or with the system's roots if ``PYTORCH2JAX_TLS=1``; None if none of
        them is set."""
        given = {field: os.environ.get(name) or None for field, name in _TLS_ENV.items()}
        if any(given.values()) or os.environ.get(_TLS_ON_ENV, "").lower() in ("1", "true"):
            return cls(**given)
        return None

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ChannelConfigError(
                "a client certificate needs its key and the key its certificate: give both "
                "TLS(cert=..., key=...)"
            )
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA certificate") if self.ca else None,
            private_key=_read(self.key, "client key") if self.key else None,
            certificate_chain=_read(self.cert, "client certificate") if self.cert else None,
        )

    def options(self) -> list[tuple[str, Any]]:
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


def token_from_env() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def open_channel(
    target: str,
    *,
    tls: TLS | None = None,
    token: str | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """A channel to ``target``: TLS if ``tls`` is given (but to a unix socket, which the
    worker always serves in plaintext), ``token`` sent on every call."""
    options = list(options or [])
    if tls is not None and not target.startswith("unix:"):
        channel = grpc.secure_channel(target, tls.credentials(), options + tls.options())
    else:
        channel = grpc.insecure_channel(target, options)
    if token:
        channel = grpc.intercept_channel(channel, _BearerToken(token))
    return channel


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ChannelConfigError(f"cannot read the {what} {path}: {e.strerror}") from None


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._entry = (AUTHORIZATION_METADATA_KEY, f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            (*(details.metadata or ()), self._entry),
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_token(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._with_token(client_call_details), request_iterator)
