"""Several workers serving the same models behind one Client.

Calls are spread by gRPC's own client-side load balancing: ``round_robin`` over the
addresses a ``dns:///name:port`` target resolves to, or over a given list of addresses.
gRPC retries a call that finds its worker gone (UNAVAILABLE) on another one, and skips
workers that stopped answering until they come back.

A forward's autograd state (its residual) lives on the worker that ran it, and
``round_robin`` cannot choose a worker per call. So the pool remembers which worker
answered each forward that kept a residual (gRPC tells the peer of a finished call), and
sends that forward's VJP straight to it over a channel of its own. If that worker is gone
or dropped the residual, the VJP is recomputed from the inputs on any worker.

Tensors travel inline: a shared-memory session belongs to one worker process.
"""

from __future__ import annotations

import collections
import json
import socket
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from pytorch2jax._exceptions import InvalidArgumentError, ResidualLostError
from pytorch2jax_protocol import SERVICE_NAME, pb_grpc

#: Pinned residuals past this many are forgotten oldest first (their VJPs recompute).
#: The worker's own cache is bounded too; this only bounds the client's memory.
_MAX_PINS = 4096

#: round_robin, and up to 3 attempts of a call that found its worker unavailable. The
#: Bridge calls are safe to repeat: a forward at worst leaves a residual that expires.
_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": SERVICE_NAME}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def is_pool(target: str | Sequence[str]) -> bool:
    """Whether ``target`` names several workers: a list of addresses, or a DNS name."""
    return not isinstance(target, str) or target.startswith("dns:")


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options of a pool's channel: round_robin, retries, and a retry buffer that holds a
    whole request (gRPC retries only requests that still fit in it)."""
    return [
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.retry_buffer_size", max_message_bytes),
    ]


def pool_target(target: str | Sequence[str]) -> tuple[str, str | None]:
    """The gRPC target for a pool, and the host name its workers' TLS certificates should
    hold when reached by IP (None: the IPs themselves).

    A list of ``host:port`` addresses becomes an ``ipv4:`` or ``ipv6:`` target listing them
    (host names are resolved once, here); a ``dns:`` target is used as given, and gRPC
    re-resolves it as workers come and go.
    """
    if isinstance(target, str):  # dns:[//authority/]host[:port]
        name = target[len("dns:") :]
        if name.startswith("//"):
            name = name[2:].partition("/")[2]
        return target, name.rsplit(":", 1)[0] if ":" in name else name
    if not target:
        raise InvalidArgumentError("a pool of workers needs at least one address")
    families: dict[int, list[str]] = {}
    for address in target:
        if not isinstance(address, str) or address.startswith("unix:") or ":" not in address:
            raise InvalidArgumentError(
                f"workers of a pool are reached over TCP as host:port; got {address!r}"
            )
        host, port = address.rsplit(":", 1)
        try:
            family, *_, sockaddr = socket.getaddrinfo(
                host.strip("[]"), int(port), type=socket.SOCK_STREAM
            )[0]
        except (OSError, ValueError) as e:
            raise InvalidArgumentError(f"cannot resolve the worker address {address!r}: {e}")
        ip = sockaddr[0]
        families.setdefault(family, []).append(
            f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        )
    if len(families) > 1:
        raise InvalidArgumentError(
            "the workers of a pool must all be IPv4 or all IPv6; got both in "
            f"{list(target)}; use a dns:/// target to mix them"
        )
    ((family, addresses),) = families.items()
    scheme = "ipv6" if family == socket.AF_INET6 else "ipv4"
    return f"{scheme}:{','.join(addresses)}", None


class Pool:
    """Sends a Client's calls over its pool channel, each VJP to its forward's worker."""

    def __init__(self, channel: grpc.Channel, open_peer: Callable[[str], grpc.Channel]) -> None:
        self._stub = pb_grpc.BridgeStub(channel)
        self._open_peer = open_peer
        self._peers: dict[str, pb_grpc.BridgeStub] = {}
        self._peer_channels: list[grpc.Channel] = []
        self._pins: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        #: Calls answered by each worker, by its address: for users watching the spread.
        self.calls: collections.Counter[str] = collections.Counter()

    def call(self, method: str, request: Any, timeout: float, metadata: Any) -> Any:
        """``method``'s reply; raises grpc.RpcError, or ResidualLostError for a VJP whose
        worker is gone."""
        if method == "Vjp" and request.residual:
            return self._vjp_on_pinned(request, timeout, metadata)
        reply, call = getattr(self._stub, method).with_call(
            request, timeout=timeout, metadata=metadata
        )
        peer = call.peer()
        self.calls[peer] += 1
        if method == "Forward" and any(reply.residual):
            self._pins[reply.residual] = peer
            if len(self._pins) > _MAX_PINS:
                self._pins.popitem(last=False)
        return reply

    def _vjp_on_pinned(self, request: Any, timeout: float, metadata: Any) -> Any:
        peer = self._pins.pop(request.residual, None)
        if peer is None:
            raise ResidualLostError("this client no longer knows which worker ran the forward")
        stub = self._peers.get(peer)
        if stub is None:
            channel = self._open_peer(peer)
            self._peer_channels.append(channel)
            stub = self._peers[peer] = pb_grpc.BridgeStub(channel)
        try:
            reply = stub.Vjp(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise ResidualLostError(f"the worker that ran the forward ({peer}) is gone")
            raise
        self.calls[peer] += 1
        return reply

    def close(self) -> None:
        for channel in self._peer_channels:
            channel.close()
        self._peers.clear()
        self._peer_channels.clear()
