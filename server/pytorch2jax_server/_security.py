"""Who may call the worker: TLS on TCP addresses, and a bearer token checked on every call.

Unix sockets stay plaintext: they are created with mode 0600, so only this user reaches
them, and TLS would buy nothing there. The token is checked on every address. The gRPC
health service answers without a token, because orchestrators (docker's HEALTHCHECK,
Kubernetes' gRPC probes) cannot send one; it tells only whether the worker serves.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from pytorch2jax_protocol import AUTHORIZATION_METADATA_KEY

_log = logging.getLogger("pytorch2jax_server")

_OPEN_METHODS = ("/grpc.health.v1.Health/",)


class SecurityError(ValueError):
    """A TLS file or token that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Security:
    """How the worker authenticates: TLS credentials for TCP, and a bearer token."""

    #: TLS for TCP addresses, or None for plaintext.
    tls: grpc.ServerCredentials | None = None
    #: The token every call (but health checks) must carry as ``authorization: Bearer``.
    token: str | None = None
    #: Whether clients must present a certificate signed by the client CA.
    client_certificates: bool = False

    @classmethod
    def from_files(
        cls,
        *,
        cert: str | None = None,
        key: str | None = None,
        client_ca: str | None = None,
        token: str | None = None,
        token_file: str | None = None,
    ) -> Security:
        """Reads PEM files and the token; SecurityError names what is missing or unreadable."""
        if bool(cert) != bool(key):
            raise SecurityError("TLS needs both a certificate and its private key (PEM files)")
        if client_ca and not cert:
            raise SecurityError("a client CA only makes sense with TLS: give a certificate and key")
        if token and token_file:
            raise SecurityError("give the token or a token file, not both")
        if token_file:
            try:
                token = _read(token_file, "token file").decode().strip()
            except UnicodeDecodeError:
                raise SecurityError(f"the token file {token_file} is not text") from None
            if not token:
                raise SecurityError(f"the token file {token_file} is empty")
        tls = None
        if cert and key:
            tls = grpc.ssl_server_credentials(
                [(_read(key, "TLS key"), _read(cert, "TLS certificate"))],
                root_certificates=_read(client_ca, "client CA") if client_ca else None,
                require_client_auth=bool(client_ca),
            )
        return cls(tls=tls, token=token or None, client_certificates=bool(client_ca))

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [_TokenCheck(self.token)] if self.token else []

    def warn_if_exposed(self, address: str) -> None:
        """Logs a warning for a TCP address reachable from other hosts without protection."""
        if _is_loopback(address):
            return
        if self.tls is None and self.token is None:
            _log.warning(
                "listening on %s without TLS or a token: anyone who can reach this address "
                "can run the served models; add --token-file (and --tls-cert/--tls-key), or "
                "listen on localhost or a unix socket",
                address,
            )
        elif self.tls is None:
            _log.warning(
                "listening on %s without TLS: the token and tensors cross the network in "
                "clear; add --tls-cert and --tls-key",
                address,
            )
        elif self.token is None and not self.client_certificates:
            _log.warning(
                "listening on %s with TLS but neither a token nor client certificates: "
                "anyone who can reach this address can run the served models; add "
                "--token-file or --tls-client-ca",
                address,
            )


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SecurityError(f"cannot read the {what} {path}: {e.strerror}") from None


def _is_loopback(address: str) -> bool:
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or 0.0.0.0 / [::]: other hosts may reach it


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that refuses with UNAUTHENTICATED."""

    def refuse(_requests, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # Request-streaming handlers, whatever the method: gRPC reads a unary request whole
    # before its handler runs (4 unauthenticated 100 MB requests held 600 MB), but a
    # stream's messages only as the handler asks for them, and this one never asks. (On
    # the wire a unary request is a stream of one message.) No deserializers either.
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    return grpc.stream_unary_rpc_method_handler(refuse)


class _TokenCheck(grpc.ServerInterceptor):
    """Refuses calls whose ``authorization`` metadata is not ``Bearer <the token>``."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(_OPEN_METHODS):
            return continuation(handler_call_details)
        given = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTHORIZATION_METADATA_KEY:
                given = value
                break
        if given is not None and hmac.compare_digest(
            given.encode() if isinstance(given, str) else given, self._expected
        ):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:  # an unknown method: UNIMPLEMENTED, as without the check
            return None
        if given is None:
            message = "this worker requires a bearer token ('authorization: Bearer TOKEN')"
        else:
            message = "the bearer token is wrong: use the one the worker was started with"
        return _deny(handler, message)
