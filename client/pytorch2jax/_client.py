"""The connection to a worker: channel, deadlines, error mapping, and the served models
as JAX functions."""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import jax
import jax.numpy as jnp
import numpy as np

from pytorch2jax._ad import OutShapes, TorchFunction, module_apply_fn
from pytorch2jax._flax import TorchModule, linen_module
from pytorch2jax._exceptions import (
    InvalidArgumentError,
    ModelNotFoundError,
    ResidualLostError,
    WorkerInternalError,
    WorkerUnavailableError,
    from_rpc_error,
)
from pytorch2jax._models import ModelInfo
from pytorch2jax._pool import Pool, is_pool, pool_target
from pytorch2jax._pool import channel_options as pool_channel_options
from pytorch2jax._remote import Link, RemoteModel
from pytorch2jax._transports import InlineTransport, Transport, open_transport
from pytorch2jax._transports.lane import FastLane
from pytorch2jax_protocol import DEFAULT_MAX_MESSAGE_BYTES, channel_options, dtypes, pb, pb_grpc
from pytorch2jax_protocol.channels import (
    TARGET_ENV,
    TLS,
    ChannelConfigError,
    open_channel,
    token_from_env,
)
from pytorch2jax_protocol.tensors import WireFormatError, checked_nbytes

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_CALL_TIMEOUT_S = 300.0
#: How long a call that lost its worker waits for it to come back (a restart) before it
#: raises WorkerUnavailableError.
DEFAULT_RECONNECT_S = 5.0

#: gRPC waits up to 120 s between attempts to reach a worker that went away; a restarted
#: worker should be found within about a second.
_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def connect(
    target: str | Sequence[str] | None = None,
    *,
    token: str | None = None,
    tls: TLS | bool | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    call_timeout: float = DEFAULT_CALL_TIMEOUT_S,
    reconnect: float = DEFAULT_RECONNECT_S,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    transport: str | Transport = "auto",
) -> Client:
    """Connects to the worker at ``target``, waits until it answers, and agrees with it how
    tensor bytes travel.

    Args:
        target: ``host:port`` or ``unix:///path/to/socket``, as the worker printed it; or
            a pool of workers serving the same models: a list of ``host:port``, or
            ``dns:///name:port`` (calls are spread round-robin, see ``Client.workers``).
            Default: ``$PYTORCH2JAX_TARGET``.
        token: the bearer token the worker was started with. Default:
            ``$PYTORCH2JAX_TOKEN``.
        tls: ``pytorch2jax.TLS(ca=..., cert=..., key=...)`` for a worker serving TLS, or
            True to trust the system's roots. Default: from ``$PYTORCH2JAX_TLS_CA``,
            ``$PYTORCH2JAX_TLS_CLIENT_CERT``, ``$PYTORCH2JAX_TLS_CLIENT_KEY``,
            ``$PYTORCH2JAX_TLS_SERVER_NAME`` (``$PYTORCH2JAX_TLS=1``: system roots);
            plaintext if none is set. ``tls=False`` forces plaintext.
        timeout: seconds to wait for the worker before raising WorkerUnavailableError.
        call_timeout: deadline of each call, in seconds.
        reconnect: seconds a call that finds its worker gone (killed, restarting) waits
            for it to answer again before raising WorkerUnavailableError; within the
            call's deadline. A worker restarted at the same address is used again by
            the same Client (its session reopened); 0 raises at once.
        max_message_bytes: largest message sent or received (inline tensors included).
        transport: ``"auto"`` (CUDA IPC for a GPU JAX; on CPU the fast lane, else
            shared memory; if the worker is on this host and allows it, else inline),
            ``"lane"`` (calls over the worker's fast lane, a unix socket beside gRPC, with
            shared memory passed as file descriptors), ``"shm"`` (shared memory, calls by
            gRPC), ``"cuda_ipc"`` (each or UnsupportedError), or ``"inline"`` (bytes in
            the gRPC messages; any host); or a transport with options of its own, e.g.
            ``pytorch2jax.ShmTransport(arena_bytes=256 << 20)``, which then belongs to
            this client. A pool always sends tensors inline.

    Example::

        with pytorch2jax.connect("localhost:50051") as worker:
            apply_fn, params = worker.convert_pytnn_to_jax("mlp")
            loss = lambda p, x: apply_fn(p, x).sum()
            grads = jax.jit(jax.grad(loss))(params, x)
    """
    client = Client(
        target,
        token=token,
        tls=tls,
        call_timeout=call_timeout,
        reconnect=reconnect,
        max_message_bytes=max_message_bytes,
    )
    try:
        client.wait_ready(timeout)
        client.list_models()  # wrong credentials fail here, not at the first call
        client._open_transport(transport, max_message_bytes)
    except BaseException:
        client.close()
        raise
    return client


#: Schemes gRPC takes in a target; other ``scheme://`` prefixes are URLs, which it is not.
_GRPC_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HAS_PORT = re.compile(r":\d+$")


def _check_target(target: Any) -> None:
    """Refuses, with the right spelling, targets gRPC would only time out on."""
    if isinstance(target, int) and not isinstance(target, bool):
        raise InvalidArgumentError(
            f"connect() takes an address string, not a number: "
            f"connect('localhost:{target}') for a worker on this machine"
        )
    addresses = [target] if isinstance(target, str) else target
    if not isinstance(addresses, (list, tuple)) or not all(isinstance(a, str) for a in addresses):
        raise InvalidArgumentError(
            "a target is 'host:port', 'unix:///path/to/socket', 'dns:///name:port', or a "
            f"list of 'host:port'; got {target!r}"
        )
    for address in addresses:
        if address.startswith(_GRPC_SCHEMES):
            continue
        if _URL.match(address):
            rest = _URL.sub("", address).rstrip("/")
            raise InvalidArgumentError(
                f"{address!r} is a URL; a worker's address is host:port, without a scheme: "
                f"connect({rest!r}) (or unix:///path for a unix socket)"
            )
        if not _HAS_PORT.search(address):
            raise InvalidArgumentError(
                f"{address!r} has no port: connect('{address}:50051') for a worker on the "
                "default port, or the port it printed (`pytorch2jax-server listening on ...`)"
            )


class _Seen:
    """What a client sent and what came back, counted as each call ends (``Client.stats``).
    Calls come from several threads (JAX runs callbacks on its own)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: collections.Counter[str] = collections.Counter()
        self._models: collections.Counter[str] = collections.Counter()
        self._errors: collections.Counter[str] = collections.Counter()
        self._seconds: collections.Counter[str] = collections.Counter()
        self._retries = 0

    def record(self, method: str, model: str, code: str, started: float) -> None:
        """One call of ``method`` (on ``model``, or "") that ended with ``code``."""
        # No message sizes: upb's ByteSize() serializes the message again (about 1 ms
        # per MB), as costly as sending it.
        seconds = time.perf_counter() - started
        with self._lock:
            self._calls[method] += 1
            self._seconds[method] += seconds
            if model:
                self._models[model] += 1
            if code != "OK":
                self._errors[code] += 1

    def retried(self) -> None:
        with self._lock:
            self._retries += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": dict(self._calls),
                "models": dict(self._models),
                "errors": dict(self._errors),
                "seconds": dict(self._seconds),
                "retries": self._retries,
            }


def _code_name(error: grpc.RpcError) -> str:
    return error.code().name if hasattr(error, "code") else grpc.StatusCode.UNKNOWN.name


class Client:
    """A connection to one worker. Use ``connect()`` to make one; close it when done."""

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        token: str | None = None,
        tls: TLS | bool | None = None,
        call_timeout: float = DEFAULT_CALL_TIMEOUT_S,
        reconnect: float = DEFAULT_RECONNECT_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if target is None:
            target = os.environ.get(TARGET_ENV)
            if not target:
                raise InvalidArgumentError(
                    "no worker to connect to: pass a target (host:port or unix:///path) or "
                    f"set {TARGET_ENV}"
                )
        _check_target(target)
        if token is None:
            token = token_from_env()
        if tls is None:
            tls = TLS.from_env()
        elif tls is True:
            tls = TLS()
        elif tls is False:
            tls = None
        self.call_timeout = call_timeout
        self.reconnect = reconnect
        self.max_bytes = max_message_bytes
        self._tls = tls
        options = channel_options(max_message_bytes)
        self._pool: Pool | None = None
        try:
            if is_pool(target):
                where = pool_target(target)
                self.target = target if isinstance(target, str) else ",".join(target)
                # Workers are reached by IP, and an ipv4:/ipv6: list is no host name:
                # TLS checks their certificates against the name the target gives.
                if tls is not None and not tls.server_name:
                    if where.server_name is None:
                        raise InvalidArgumentError(
                            "TLS to a list of workers on different hosts needs the name their "
                            "certificates hold: pass tls=pytorch2jax.TLS(..., server_name=...)"
                            ", or use a dns:/// target"
                        )
                    tls = dataclasses.replace(tls, server_name=where.server_name)
                self._channel = open_channel(
                    where.channel_target,
                    tls=tls,
                    token=token,
                    options=options + pool_channel_options(max_message_bytes),
                )
                self._pool = Pool(
                    self._channel,
                    where.addresses,
                    lambda a: open_channel(a, tls=tls, token=token, options=options),
                )
            else:
                self.target = target
                self._channel = open_channel(
                    target, tls=tls, token=token, options=options + _RECONNECT_OPTIONS
                )
        except ChannelConfigError as e:
            raise InvalidArgumentError(str(e)) from None
        self._stub = pb_grpc.BridgeStub(self._channel)
        self._infos: dict[str, ModelInfo] | None = None
        # connect() negotiates a better one; a bare Client sends tensors inline, sessionless.
        self._transport: Transport = InlineTransport()
        # ReleaseResiduals calls sent without waiting (see _release_residuals).
        self._detached: set[grpc.Future] = set()
        self._detached_lock = threading.Lock()
        self._seen = _Seen()

    # -- lifecycle ----------------------------------------------------------------------

    def wait_ready(self, timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
        """Blocks until the worker answers; WorkerUnavailableError after ``timeout`` s."""
        if self._refused():
            raise WorkerUnavailableError(
                f"nothing listens at {self.target} (connection refused); start a worker "
                "there with `pytorch2jax-server --listen ADDRESS --model "
                "NAME=package.module:attr`, or check the address it printed"
            )
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            pass
        else:
            return
        # One call that fails at once tells why (refused, TLS handshake, certificate name).
        try:
            self._stub.ListModels(pb.ListModelsRequest(), timeout=1.0)
            return  # it came up just now
        except grpc.RpcError as e:
            why = f" (gRPC says: {e.details()})" if e.details() else ""
        tls_hint = ""
        if self._tls is None and not self.target.startswith("unix:"):
            tls_hint = (
                "; if it serves TLS, pass tls=pytorch2jax.TLS(ca=...) or set PYTORCH2JAX_TLS_CA"
            )
        raise WorkerUnavailableError(
            f"no worker answers at {self.target} after {timeout:g} s; is it running? Start "
            "one with `pytorch2jax-server --listen ADDRESS --model NAME=package.module:attr`"
            + tls_hint
            + why
        )

    def _refused(self) -> bool:
        """Whether the worker's address refuses connections now: a port nobody listens
        on, a unix socket that does not exist. That is known at once, where an address
        that does not answer at all (a host down, a firewall) takes the whole timeout."""
        if self._pool is not None:
            return False  # some of a pool's workers may still be starting
        try:
            self._stub.ListModels(pb.ListModelsRequest(), timeout=2.0, wait_for_ready=False)
        except grpc.RpcError as e:
            details = (e.details() or "").lower()
            return e.code() == grpc.StatusCode.UNAVAILABLE and any(
                w in details for w in ("connection refused", "no such file")
            )
        return False

    def _open_transport(self, transport: str | Transport, max_message_bytes: int) -> None:
        """Opens the data plane ``connect()`` asks for, before any model is made: models
        keep the transport they were made with (``_link``). A pool sends tensors inline."""
        if self._pool is None:
            self._transport = open_transport(
                transport, self._channel, self.target, max_message_bytes=max_message_bytes
            )
        elif isinstance(transport, Transport) or transport not in ("auto", "inline"):
            raise InvalidArgumentError(
                f"transport={transport!r} needs a single worker: a shared-memory or CUDA IPC "
                "session belongs to one worker process, and a pool sends tensors inline; "
                "connect to one worker (e.g. a sidecar on this host) for zero-copy"
            )

    @property
    def transport(self) -> str:
        """How calls and tensor bytes travel to this worker: ``"lane"``, ``"shm"``,
        ``"cuda_ipc"`` or ``"inline"`` (see ``connect``)."""
        return self._transport.name

    def transport_info(self) -> dict[str, Any]:
        """The transport's state, e.g. the shared memory it holds and uses."""
        return self._transport.describe()

    def worker_stats(self) -> dict[str, int]:
        """What the worker is doing and holding now: calls in flight, served and cancelled,
        sessions, shared-memory regions and bytes, residuals and bytes, resident memory.
        For a pool, one worker's (whichever answers).

        Example::

            stats = worker.worker_stats()
            print(stats["calls_in_flight"], stats["resident_bytes"] >> 20, "MiB")
        """
        reply = self._unary("GetWorkerStats", pb.WorkerStatsRequest())
        return {f.name: getattr(reply, f.name) for f in reply.DESCRIPTOR.fields}

    def stats(self) -> dict[str, Any]:
        """What this client has sent to its worker(s) so far, counted as each call ends:

        - ``calls``: calls by RPC method (``Forward``, ``Vjp``, ``InferShapes``,
          ``ListModels``...), failed ones too;
        - ``models``: calls by the model they name;
        - ``errors``: failed calls by gRPC status code (``INVALID_ARGUMENT``...;
          ``ABORTED``: the worker had lost this client's session, so the call was sent
          again on a new one; ``FAILED_PRECONDITION``: a residual was gone, so its VJP
          recomputed the forward);
        - ``seconds``: total seconds spent in calls, by method (retries included);
        - ``retries``: times a call was sent again after finding its worker gone
          (killed or restarting; see ``connect(reconnect=)``).

        Parameter downloads (``get_parameters``) and residuals released in the background
        are not counted. The worker's own view is its Prometheus metrics
        (``pytorch2jax-server --metrics-listen``).

        Example::

            stats = worker.stats()
            print(stats["calls"])    # {'ListModels': 1, 'InferShapes': 1, 'Forward': 20, 'Vjp': 10}
            print(stats["errors"])   # {'INVALID_ARGUMENT': 1}
            ms = 1e3 * stats["seconds"]["Forward"] / stats["calls"]["Forward"]
        """
        return self._seen.snapshot()

    def workers(self) -> dict[str, int]:
        """For a pool, the calls each worker answered, by its address; {} for one worker."""
        return dict(self._pool.calls) if self._pool is not None else {}

    def close(self) -> None:
        """Ends the session (the worker drops its mappings of our memory) and the channel.
        Arrays received earlier stay valid."""
        self._transport.close()
        if self._pool is not None:
            self._pool.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<pytorch2jax.Client {self.target} transport={self.transport}>"

    # -- what the worker serves ---------------------------------------------------------

    def list_models(self) -> list[ModelInfo]:
        """The models the worker serves."""
        reply = self._unary("ListModels", pb.ListModelsRequest())
        self._infos = {m.name: ModelInfo.from_proto(m) for m in reply.models}
        return list(self._infos.values())

    def describe(self, name: str) -> ModelInfo:
        """One served model's kind, parameters, buffers and signature."""
        if self._infos is None or name not in self._infos:
            self.list_models()  # the worker may have been restarted with other models
        assert self._infos is not None
        if name not in self._infos:
            raise ModelNotFoundError(
                f"model {name!r} is not served by {self.target}; served models: "
                f"{', '.join(sorted(self._infos)) or 'none'}"
            )
        return self._infos[name]

    def get_parameters(self, name: str, *, include_buffers: bool = False) -> dict[str, jax.Array]:
        """The model's parameters (and, if asked, its buffers) as JAX arrays, by name.

        They are streamed in chunks, so models larger than one message work.
        """
        request = pb.GetParametersRequest(model=name, include_buffers=include_buffers)
        parts: dict[str, tuple[pb.TensorChunk, bytearray]] = {}
        received: dict[str, int] = {}
        try:
            for chunk in self._stub.GetParameters(request, timeout=self.call_timeout):
                if chunk.name not in parts:
                    nbytes = checked_nbytes(chunk.dtype, chunk.shape, max_bytes=self.max_bytes)
                    parts[chunk.name] = (chunk, bytearray(nbytes))
                    received[chunk.name] = 0
                data = parts[chunk.name][1]
                end = chunk.offset + len(chunk.data)
                if chunk.offset != received[chunk.name] or end > len(data):
                    raise WorkerInternalError(f"worker sent malformed chunks of {chunk.name!r}")
                data[chunk.offset : end] = chunk.data
                received[chunk.name] = end
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.target) from None
        except WireFormatError as e:
            raise WorkerInternalError(f"worker sent a malformed tensor: {e}") from None
        short = [n for n, (_, data) in parts.items() if received[n] != len(data)]
        if short:
            raise WorkerInternalError(f"worker sent incomplete parameters: {', '.join(short)}")
        return {
            n: jnp.asarray(
                np.frombuffer(data, dtypes.to_numpy(head.dtype)).reshape(tuple(head.shape))
            )
            for n, (head, data) in parts.items()
        }

    # -- served models as JAX functions -------------------------------------------------

    def convert_pytnn_to_jax(
        self,
        name: str,
        *,
        out_shapes: OutShapes = None,
        vmap_method: str = "auto",
        int32_as_int64: bool = True,
    ) -> tuple[Callable[..., Any], dict[str, jax.Array]]:
        """A served ``nn.Module`` as ``(apply_fn, params)``.

        ``apply_fn(params, *args, **kwargs)`` runs the module on the worker with the given
        parameters (a dict by name, like ``params``; a subset uses the worker's own values
        for the rest) and returns its output pytree. Gradients with respect to ``params``
        and floating arguments come from the worker's VJP. Every JAX transformation
        composes through it, to any depth (``jit``, ``grad``, ``jvp``, ``jacfwd``,
        ``hessian``, ``vmap``, ``lax.scan``, ``jax.checkpoint``...), each running on the
        worker as the matching ``torch.func`` transform, one call per batch.

        ``out_shapes`` declares the output (a pytree of ``jax.ShapeDtypeStruct``, or a
        function of the arguments' ShapeDtypeStructs) for models whose shapes the worker
        cannot infer. ``vmap_method`` says how a ``vmap`` of it runs: ``"auto"``
        (``torch.func.vmap``; where torch cannot batch the model, a loop on the worker,
        with one ``VmapFallbackWarning`` per signature), ``"batched"`` (an error with
        torch's reason instead) or ``"sequential"`` (always the loop).
        ``int32_as_int64``: with JAX's x64 off (JAX then has no int64), int32 arguments
        (indices, labels) reach torch as int64, the dtype JAX would give them with x64
        on, and int64 outputs come back as int32; False passes int32 as it is.

        ``apply_fn`` takes three keywords of its own (README, "State and randomness"):
        ``rng=key`` (a JAX PRNG key: torch's random numbers, dropout's say, for that call,
        the same on any worker), ``train=`` (True or False: training or eval mode for
        that call; None: the worker's module's own) and ``mutable=`` (True: the buffers
        given in ``params``, or a list of buffer names, come back after the call: it then
        returns ``(outputs, new_buffers)``). The worker's own buffers never change.

        Example::

            apply_fn, params = worker.convert_pytnn_to_jax("mlp")
            y = jax.jit(apply_fn)(params, jnp.ones((4, 8)))
        """
        info = self.describe(name)
        if info.kind != "module":
            raise InvalidArgumentError(
                f"model {name!r} at {self.target} is a function, not a module; "
                f"use py_to_jax_wrapper({name!r})"
            )
        fn = TorchFunction(
            RemoteModel(self._link(), info),
            out_shapes=out_shapes,
            vmap_method=vmap_method,
            int32_as_int64=int32_as_int64,
        )

        doc = f"{info.doc}\n\napply_fn(params, ...) calls {name}{info.signature} at {self.target}"
        apply_fn = module_apply_fn(fn, name, doc)
        return apply_fn, self.get_parameters(name)

    def convert_pytnn_to_flax(
        self,
        name: str,
        *,
        out_shapes: OutShapes = None,
        vmap_method: str = "auto",
        int32_as_int64: bool = True,
    ):
        """A served ``nn.Module`` as ``(LinenModuleClass, variables)``.

        As ``pytorch2jax.convert_pytnn_to_flax``, with torch running on the worker:
        ``variables`` has ``"batch_stats"`` too when the module has floating buffers.

        Example::

            TorchMLP, variables = worker.convert_pytnn_to_flax("mlp")
            y = TorchMLP().apply(variables, jnp.ones((4, 8)))
        """
        apply_fn, params = self.convert_pytnn_to_jax(
            name, out_shapes=out_shapes, vmap_method=vmap_method, int32_as_int64=int32_as_int64
        )
        stats = self._floating_buffers(name)
        variables = {"params": params, **({"batch_stats": stats} if stats else {})}
        return linen_module(apply_fn, params, name, stats), variables

    def convert_pytnn_to_nnx(
        self,
        name: str,
        *,
        out_shapes: OutShapes = None,
        vmap_method: str = "auto",
        int32_as_int64: bool = True,
        rngs: Any = None,
    ) -> TorchModule:
        """A served ``nn.Module`` as an NNX module: ``nnx.Param`` weights, ``nnx.BatchStat``
        floating buffers, calls run on the worker; ``rngs`` (an ``nnx.Rngs``) gives the
        keys of its random numbers, from its ``dropout`` stream.

        Example::

            model = worker.convert_pytnn_to_nnx("mlp")
            optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        """
        apply_fn, params = self.convert_pytnn_to_jax(
            name, out_shapes=out_shapes, vmap_method=vmap_method, int32_as_int64=int32_as_int64
        )
        return TorchModule(apply_fn, params, self._floating_buffers(name), rngs=rngs)

    def _floating_buffers(self, name: str) -> dict[str, jax.Array]:
        """A served module's floating buffers (BatchNorm statistics), its state."""
        info = self.describe(name)
        floating = [n for n, s in info.buffers.items() if jnp.issubdtype(s.dtype, jnp.floating)]
        everything = self.get_parameters(name, include_buffers=True) if floating else {}
        return {n: everything[n] for n in floating}

    def py_to_jax_wrapper(
        self,
        name: str,
        *,
        out_shapes: OutShapes = None,
        vmap_method: str = "auto",
        int32_as_int64: bool = True,
    ) -> Callable[..., Any]:
        """A served torch function as a differentiable JAX function ``fn(*args, **kwargs)``.

        For a served module, it is called with the worker's own parameters, which stay
        fixed (gradients flow to the arguments only): useful for a frozen encoder or a
        perceptual loss. ``out_shapes`` as in ``convert_pytnn_to_jax``. The function takes
        ``rng=`` (a JAX PRNG key for torch's random numbers) and, for a module, ``train=``
        as ``apply_fn`` does.

        Example::

            scale_shift = worker.py_to_jax_wrapper("scale_shift")
            g = jax.grad(lambda x: scale_shift(x, x).sum())(jnp.ones(3))
        """
        info = self.describe(name)
        fn = TorchFunction(
            RemoteModel(self._link(), info),
            out_shapes=out_shapes,
            vmap_method=vmap_method,
            int32_as_int64=int32_as_int64,
        )

        def wrapped(*args: Any, rng: Any = None, train: bool | None = None, **kwargs: Any) -> Any:
            return fn({}, args, kwargs, rng=rng, train=train)

        wrapped.__name__ = wrapped.__qualname__ = name
        wrapped.__doc__ = f"{info.doc}\n\nCalls {name}{info.signature} at {self.target}"
        return wrapped

    # -- the one place calls go out and errors come back --------------------------------

    def _link(self) -> Link:
        """What a served model's backend uses of this client."""
        return Link(
            target=self.target,
            transport=self._transport,
            unary=self._unary,
            run_prepared=self._run_prepared,
            release_residuals=self._release_residuals,
        )

    def _unary(self, method: str, request: Any, metadata: Any = ()) -> Any:
        started = time.perf_counter()
        model = getattr(request, "model", "")
        try:
            reply = self._send(method, request, metadata)
        except grpc.RpcError as e:
            self._seen.record(method, model, _code_name(e), started)
            raise from_rpc_error(e, self.target) from None
        except ResidualLostError:  # a pool's VJP whose worker left; no status of its own
            self._seen.record(method, model, "FAILED_PRECONDITION", started)
            raise
        except BaseException:
            self._seen.record(method, model, "UNKNOWN", started)
            raise
        self._seen.record(method, model, "OK", started)
        return reply

    def _run_prepared(
        self, method: str, model: str, lane: FastLane, payload: bytearray
    ) -> memoryview | None:
        """The reply's bytes to a RUN of a prepared ``method`` call of ``model`` over
        ``lane``; None when the call must go in full instead: the session has no such
        prepared call (the full call prepares it again), no connection is free, or the
        lane broke or the worker stops (the full call goes by gRPC, which sees to that)."""
        started = time.perf_counter()
        try:
            reply = lane.run(payload, self.call_timeout)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                return None
            self._seen.record(method, model, _code_name(e), started)
            raise from_rpc_error(e, self.target) from None
        if reply is not None:
            self._seen.record(method, model, "OK", started)
        return reply

    def _send(self, method: str, request: Any, metadata: Any) -> Any:
        """``method``'s reply, or the grpc.RpcError it ended with."""
        if self._pool is not None:  # gRPC retries over the pool's other workers
            return self._pool.call(method, request, self.call_timeout, metadata)
        deadline = time.monotonic() + self.call_timeout
        give_up = None  # when to stop waiting for a worker that went away
        while True:
            try:
                timeout = max(deadline - time.monotonic(), 0.001)
                lane = self._transport.lane
                if lane is not None and lane.usable and method in lane.methods:
                    # A broken lane raises UNAVAILABLE once; the call then goes by gRPC.
                    reply = lane.call(method, request, metadata, timeout)
                    if reply is not None:
                        return reply
                return getattr(self._stub, method)(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                # Killed, or restarting: every Bridge call is safe to send again (a
                # forward at worst leaves a residual that its session or TTL frees, and a
                # restarted worker answers a stale session or residual with a status
                # that makes the client open a new one or recompute).
                now = time.monotonic()
                give_up = give_up or min(now + self.reconnect, deadline)
                if now >= give_up or not self._answers_within(give_up - now):
                    raise
                time.sleep(min(0.05, max(give_up - time.monotonic(), 0)))  # never spin
                self._seen.retried()

    def _release_residuals(self, handles: list[bytes]) -> None:
        """Asks the worker holding them to free these residuals, without waiting. One that
        does not answer loses nothing: they go with the session, or at the TTL."""
        if self._pool is not None:
            holders = self._pool.holders(handles)
        else:
            holders = [(self._stub, handles)]
        for stub, held in holders:
            request = pb.ReleaseResidualsRequest(residuals=held)
            try:
                future = stub.ReleaseResiduals.future(request, timeout=self.call_timeout)
            except ValueError:  # the channel is closed: so is the session, which freed them
                return
            # gRPC cancels a call whose future is garbage-collected: hold it until done.
            with self._detached_lock:
                self._detached.add(future)
            future.add_done_callback(self._forget_detached)

    def _forget_detached(self, future: grpc.Future) -> None:
        with self._detached_lock:
            self._detached.discard(future)

    def _answers_within(self, seconds: float) -> bool:
        """Whether the channel (re)connects to the worker within ``seconds``."""
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=seconds)
        except grpc.FutureTimeoutError:
            ready.cancel()  # else it stays subscribed to the channel's state
            return False
        return True
