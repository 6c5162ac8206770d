"""Several workers serving the same models behind one Client.

Calls are spread by gRPC's own client-side load balancing: ``round_robin`` over the
addresses a ``dns:///name:port`` target resolves to, or over a given list of addresses.
gRPC retries a call that finds its worker gone (UNAVAILABLE) on another one, and skips
workers that stopped answering until they come back.

A forward's autograd state (its residual) lives on the worker that ran it, and
``round_robin`` cannot choose a worker per call. So the pool remembers which worker
answered each forward that kept a residual (its id comes back in the trailing metadata),
and sends that forward's VJP straight to it over a channel of its own. If that worker is
gone or dropped the residual, the VJP is recomputed from the inputs on any worker.

Tensors travel inline: a shared-memory session belongs to one worker process.
"""

from __future__ import annotations

import collections
import json
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from pytorch2jax._exceptions import InvalidArgumentError, ResidualLostError
from pytorch2jax_protocol import (
    POOL_METADATA_KEY,
    SERVICE_NAME,
    WORKER_ID_METADATA_KEY,
    pb,
    pb_grpc,
)

#: Pinned residuals past this many are forgotten oldest first (their VJPs recompute).
#: The worker's own cache is bounded too; this only bounds the client's memory.
_MAX_PINS = 4096

#: How long a worker of the pool may take to say its id before it is taken as down.
_PROBE_TIMEOUT_S = 2.0

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


@dataclass(frozen=True)
class PoolTarget:
    """Where a pool's workers are."""

    #: The target of the pool's load-balanced channel.
    channel_target: str
    #: The host name the workers' TLS certificates hold, when the target says it: a DNS
    #: name, or the one host of all the listed addresses (None: not known).
    server_name: str | None
    #: Each worker's ``ip:port``: the list's, resolved once; a DNS name's, resolved anew
    #: at each call.
    addresses: Callable[[], list[str]]


def pool_target(target: str | Sequence[str]) -> PoolTarget:
    """A list of ``host:port`` addresses becomes an ``ipv4:`` or ``ipv6:`` target listing
    them (host names are resolved once, here); a ``dns:`` target is used as given, and
    gRPC re-resolves it as workers come and go (and so does ``addresses``)."""
    if isinstance(target, str):  # dns:[//authority/]host[:port]
        name = target[len("dns:") :]
        if name.startswith("//"):
            name = name[2:].partition("/")[2]
        host, _, port = name.rpartition(":") if ":" in name else (name, "", "443")
        return PoolTarget(target, host, lambda: _resolve(host, port)[1])
    if not target:
        raise InvalidArgumentError("a pool of workers needs at least one address")
    families: set[int] = set()
    hosts: set[str] = set()
    addresses: list[str] = []
    for address in target:
        if not isinstance(address, str) or address.startswith("unix:") or ":" not in address:
            raise InvalidArgumentError(
                f"workers of a pool are reached over TCP as host:port; got {address!r}"
            )
        host, port = address.rsplit(":", 1)
        host = host.strip("[]")
        family, resolved = _resolve(host, port)
        if not resolved:
            raise InvalidArgumentError(f"cannot resolve the worker address {address!r}")
        families.add(family)
        hosts.add(host)
        addresses.append(resolved[0])
    if len(families) > 1:
        raise InvalidArgumentError(
            "the workers of a pool must all be IPv4 or all IPv6; got both in "
            f"{list(target)}; use a dns:/// target to mix them"
        )
    scheme = "ipv6" if families == {socket.AF_INET6} else "ipv4"
    return PoolTarget(
        f"{scheme}:{','.join(addresses)}",
        hosts.pop() if len(hosts) == 1 else None,
        lambda: addresses,
    )


def _resolve(host: str, port: str) -> tuple[int, list[str]]:
    """The family of ``host``'s first address, and ``ip:port`` for each of its addresses."""
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError):
        return 0, []
    found = []
    for family, *_, sockaddr in infos:
        ip = sockaddr[0]
        address = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        if address not in found:
            found.append(address)
    return infos[0][0], found


class Pool:
    """Sends a Client's calls over its pool channel, each VJP to its forward's worker.

    Workers are told apart by the id in their replies' trailing metadata. The first time
    an id is seen, each address of the pool is asked for its id (ListModels, over a
    channel to that address alone, kept for the VJPs it will carry).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        addresses: Callable[[], list[str]],
        open_direct: Callable[[str], grpc.Channel],
    ) -> None:
        self._stub = pb_grpc.BridgeStub(channel)
        self._addresses = addresses
        self._open_direct = open_direct
        self._direct: dict[str, tuple[grpc.Channel, pb_grpc.BridgeStub]] = {}
        self._address_of: dict[str, str] = {}  # worker id -> its address
        self._pins: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        # Calls may come from several threads (JAX runs callbacks on its own).
        self._lock = threading.Lock()
        self._discovering = threading.Lock()  # held across the probes, which take time
        #: Calls answered by each worker, by its address: for users watching the spread.
        self.calls: collections.Counter[str] = collections.Counter()
        #: VJPs answered by the worker holding their residual, and those whose residual
        #: was not found (they are recomputed).
        self.routed_vjps = 0
        self.lost_residuals = 0

    def call(self, method: str, request: Any, timeout: float, metadata: Any) -> Any:
        """``method``'s reply; raises grpc.RpcError, or ResidualLostError for a VJP whose
        worker is gone."""
        if method == "Vjp" and request.residual:
            return self._vjp_on_pinned(request, timeout, metadata)
        reply, call = getattr(self._stub, method).with_call(
            request, timeout=timeout, metadata=(*metadata, _ASK_WORKER_ID)
        )
        worker = _worker_id(call)
        if worker is not None:
            address = self._address(worker)
            with self._lock:
                self.calls[address] += 1
                if method == "Forward" and reply.residual:
                    self._pins[reply.residual] = worker
                    if len(self._pins) > _MAX_PINS:
                        self._pins.popitem(last=False)
        return reply

    def _vjp_on_pinned(self, request: Any, timeout: float, metadata: Any) -> Any:
        with self._lock:
            worker = self._pins.pop(request.residual, None)
        address = self._address(worker) if worker is not None else None
        if address is None or address == worker:  # not found at any address of the pool
            self._lost()
            raise ResidualLostError("the worker that ran the forward is not in the pool")
        try:
            reply = self._direct[address][1].Vjp(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self._lost()
                raise ResidualLostError(f"the worker that ran the forward ({address}) is gone")
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:  # evicted or expired there
                self._lost()
            raise
        with self._lock:
            self.calls[address] += 1
            self.routed_vjps += 1
        return reply

    def holders(self, handles: list[bytes]) -> list[tuple[pb_grpc.BridgeStub, list[bytes]]]:
        """Which worker holds which of these residuals (forgetting them): a stub of each,
        with its handles. Handles of workers no longer known are left out."""
        by_address: dict[str, list[bytes]] = collections.defaultdict(list)
        with self._lock:
            for handle in handles:
                worker = self._pins.pop(handle, None)
                address = self._address_of.get(worker) if worker is not None else None
                if address is not None:
                    by_address[address].append(handle)
        direct = {a: self._direct.get(a) for a in by_address}  # None once closed
        return [(d[1], by_address[a]) for a, d in direct.items() if d is not None]

    def _lost(self) -> None:
        with self._lock:
            self.lost_residuals += 1

    def _address(self, worker: str) -> str:
        """The address of the worker with this id; the id itself if no address answers
        with it."""
        if worker not in self._address_of:
            with self._discovering:
                if worker not in self._address_of:
                    self._discover()
        return self._address_of.get(worker, worker)

    def _discover(self) -> None:
        # Every address again: a worker restarted at a known address has a new id.
        for address in self._addresses():
            if address not in self._direct:
                channel = self._open_direct(address)
                self._direct[address] = (channel, pb_grpc.BridgeStub(channel))
            try:
                _, call = self._direct[address][1].ListModels.with_call(
                    pb.ListModelsRequest(), timeout=_PROBE_TIMEOUT_S, metadata=(_ASK_WORKER_ID,)
                )
            except grpc.RpcError:
                continue  # down for now: asked again when an unknown id shows up
            worker = _worker_id(call)
            if worker is not None:
                stale = [w for w, a in self._address_of.items() if a == address]
                for w in stale:
                    del self._address_of[w]
                self._address_of[worker] = address

    def close(self) -> None:
        with self._discovering:
            for channel, _ in self._direct.values():
                channel.close()
            self._direct.clear()


#: Asks the worker to name itself in the reply's trailing metadata.
_ASK_WORKER_ID = (POOL_METADATA_KEY, "1")


def _worker_id(call: grpc.Call) -> str | None:
    for key, value in call.trailing_metadata() or ():
        if key == WORKER_ID_METADATA_KEY:
            return value
    return None
