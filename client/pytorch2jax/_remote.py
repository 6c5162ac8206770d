"""The Backend that runs a model on a worker, over the Bridge RPCs: ``RemoteModel``, and
``Link``, what it uses of the client that made it."""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from pytorch2jax._backend import Backend, Result, Run, Vjp
from pytorch2jax._callbacks import ArrayIO
from pytorch2jax._exceptions import InvalidArgumentError, ResidualLostError, SessionLostError
from pytorch2jax._models import ModelInfo
from pytorch2jax._prepared import PreparedCall, handle_of
from pytorch2jax._transports import Call, cuda_ipc
from pytorch2jax_protocol import HANDLE_BYTES, dtypes, pb, programs, shm, tensors, values

# The wire code's own errors, for values that cannot be encoded (e.g. a string array).
_UNENCODABLE = (dtypes.UnsupportedDTypeError, tensors.WireFormatError, values.TreeFormatError)

if TYPE_CHECKING:
    from pytorch2jax._transports import Transport
    from pytorch2jax._transports.lane import FastLane


@dataclasses.dataclass(frozen=True)
class Link:
    """What a RemoteModel uses of the client that made it (``Client`` hands each model
    one): where the worker is, the client's transport, and the client's one place where
    calls go out and errors come back."""

    #: The worker's address, for messages.
    target: str
    #: How tensor bytes travel (it keeps its session across the worker's restarts).
    transport: Transport
    #: ``unary(method, request, metadata=())``: the reply, or pytorch2jax's exception.
    unary: Callable[..., Any]
    #: ``run_prepared(method, model, lane, payload)``: a RUN's reply bytes, or None when
    #: the call must go in full.
    run_prepared: Callable[..., memoryview | None]
    #: ``release_residuals(handles)``: frees residuals without waiting.
    release_residuals: Callable[[list[bytes]], None]


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

    def __init__(self, link: Link, info: ModelInfo) -> None:
        self._link = link
        self.info = info
        self.description = f"model {info.name!r} at {link.target}"
        self.buffers = info.buffers
        self._reply_bytes = _FIRST_REPLY_BYTES

    @property
    def io(self) -> ArrayIO:
        return self._link.transport.io

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
        reply = self._link.unary("InferShapes", request)
        return values.decode(reply.outputs, tensors.from_wire, _spec_to_struct)

    def _exchange(self, method: str, request_bytes: int, reply_bytes: int, build, decode):
        """One RPC whose tensors travel by the client's transport: ``build(call)`` makes the
        request, ``decode(reply, call)`` reads the reply. A worker that lost the transport's
        session (it restarted) gets a new session and the call once more."""
        transport = self._link.transport
        for attempt in (0, 1):
            with transport.call(request_bytes, reply_bytes) as call:
                try:
                    request = build(call)
                except _UNENCODABLE as e:
                    raise InvalidArgumentError(str(e)) from None
                call.ready()
                try:
                    reply = self._link.unary(method, request, metadata=call.metadata)
                except SessionLostError:
                    if attempt:
                        raise
                    transport.reset(call.metadata)
                    continue
                return decode(reply, call)
        raise AssertionError("unreachable")

    def run(self, run: Run) -> Result:
        return self._run(run, None)

    def call_site(self):
        # Every call of a compiled call site has the same shapes and program: what the
        # first works out of them (the bytes its request and reply take, the program's
        # message, a prepared call over the fast lane) serves the others.
        site = _Site()
        return functools.partial(self._run, site=site)

    def _prepare(self, run: Run, site: _Site | None, method: str) -> FastLane | None:
        """The fast lane to prepare ``method`` calls of ``site`` on, if they may be: a
        forward with no program or returned buffers, or the Vjp of a kept one, whose
        inputs are on the host."""
        if site is None or run.returned or site.declined[method] >= _DECLINES:
            return None
        if method == "Forward" and run.program:
            return None
        lane = self._link.transport.lane
        if lane is None or not lane.usable:
            return None
        arrays = (*run.params.values(), *run.leaves, run.key, *run.extras)
        if not all(isinstance(a, np.ndarray) for a in arrays if a is not None):
            return None
        return lane

    def _prepared(self, site: _Site | None, method: str) -> PreparedCall | None:
        """``site``'s prepared ``method`` call, if it is its session's lane's still."""
        plan = site.plans.get(method) if site is not None else None
        if plan is None:
            return None
        lane = self._link.transport.lane
        if plan.lane is not lane or not lane.usable:
            site.plans.pop(method, None)  # another session's: prepare it again
            return None
        return plan

    def _learn(self, site: _Site, method: str, plan_id: int, make) -> None:
        if plan_id:
            site.plans[method] = make(plan_id)
        else:  # sent by gRPC (no free lane connection), or the worker would not
            site.declined[method] += 1

    def _run(self, run: Run, site: _Site | None) -> Result:
        kept = run.vjp_of_kept()
        if kept is not None:
            try:
                return self._vjp_of_kept(run, *kept, site=site)
            except ResidualLostError:
                pass  # evicted or expired: recompute from the inputs
            run = dataclasses.replace(run, residual=b"")
        return self._forward(run, site)

    def release(self, residuals):
        self._link.release_residuals(residuals)

    def _forward(self, run: Run, site: _Site | None = None) -> Result:
        inputs = [*run.params.values(), *run.leaves, *([] if run.key is None else [run.key])]
        plan = self._prepared(site, "Forward")
        if plan is not None:
            reply = self._link.run_prepared(
                "Forward", self.info.name, plan.lane, plan.payload(inputs)
            )
            if reply is not None:
                if run.residual:
                    self.release([run.residual])  # a call that cannot use it
                outputs, head = plan.results(reply)
                return Result(outputs, handle_of(head))
            site.plans.pop("Forward", None)  # gone: this call prepares it again
        lane = self._prepare(run, site, "Forward")
        sizes = site.sizes.get("Forward") if site is not None else None
        if sizes is None:
            program = programs.to_wire(run.program) if run.program else None
            small = self._link.transport.inline_below
            request_bytes = _nbytes((run.params, run.leaves, run.key, run.extras), small)
            if run.out_structs is not None:
                reply_bytes = sum(shm.align(_struct_nbytes(s)) for s in run.out_structs)
            else:  # eager: guess from the last reply, and from the inputs
                reply_bytes = max(self._reply_bytes, request_bytes)
            if site is not None and run.out_structs is not None:
                site.sizes["Forward"] = (request_bytes, reply_bytes, program)
        else:
            request_bytes, reply_bytes, program = sizes

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
                prepare=lane is not None,
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
            if run.out_structs is None:  # eager: lend as much as this took next time
                self._reply_bytes = max(_nbytes(outputs), 64)
            if lane is not None:
                specs: list[tuple[np.dtype, tuple[int, ...]]] = []

                def spec(msg: pb.Tensor) -> int:
                    specs.append((dtypes.to_numpy(msg.dtype), tuple(msg.shape)))
                    return len(specs) - 1

                # The reply's tensors in wire order, and where JAX's leaf order puts them.
                order = jax.tree_util.tree_leaves(values.decode(reply.outputs, spec))
                self._learn(
                    site,
                    "Forward",
                    reply.prepared,
                    lambda plan_id: PreparedCall(
                        lane,
                        plan_id,
                        inputs,
                        specs,
                        reply_head=HANDLE_BYTES if run.keep is not None else 0,
                        order=order,
                    ),
                )
            return Result(
                outputs,
                reply.residual,
                tuple((f.transform, f.reason) for f in reply.vmap_fallbacks),
            )

        return self._exchange("Forward", request_bytes, reply_bytes, build, decode)

    def _vjp_of_kept(
        self, run: Run, last: Vjp, cts: list[Any], site: _Site | None = None
    ) -> Result:
        """The Vjp of a kept forward: torch's stored graph, no forward re-run."""
        # A prepared Vjp carries the residual's handle at a fixed place: one of that size.
        by_handle = len(run.residual) == HANDLE_BYTES
        plan = self._prepared(site, "Vjp") if by_handle else None
        if plan is not None:
            reply = self._link.run_prepared(
                "Vjp", self.info.name, plan.lane, plan.payload(cts, run.residual)
            )
            if reply is not None:
                return Result(plan.results(reply)[0])
            site.plans.pop("Vjp", None)  # gone: this call prepares it again
        lane = self._prepare(run, site, "Vjp") if by_handle else None

        def build(call: Call) -> pb.VjpRequest:
            return pb.VjpRequest(
                model=self.info.name,
                residual=run.residual,
                cotangents=[call.put(c) for c in cts],
                cotangent_outputs=last.outputs,
                wrt=last.wrt,
                reply_area=call.reply_area,
                prepare=lane is not None,
            )

        def decode(reply: pb.VjpResponse, call: Call) -> Result:
            if lane is not None:
                specs = [(dtypes.to_numpy(g.dtype), tuple(g.shape)) for g in reply.grads]
                self._learn(
                    site,
                    "Vjp",
                    reply.prepared,
                    lambda plan_id: PreparedCall(
                        lane, plan_id, cts, specs, head=HANDLE_BYTES
                    ),
                )
            return Result([call.get(g) for g in reply.grads])

        sizes = site.sizes.get("Vjp") if site is not None else None
        if sizes is None:
            small = self._link.transport.inline_below
            if run.out_structs is not None:
                grads_bytes = sum(shm.align(_struct_nbytes(s)) for s in run.out_structs)
            else:
                grads_bytes = _nbytes([*run.params.values(), *run.leaves])
            sizes = (_nbytes(cts, small), grads_bytes, None)
            if site is not None and run.out_structs is not None:
                site.sizes["Vjp"] = sizes
        return self._exchange("Vjp", sizes[0], sizes[1], build, decode)


#: Full calls of a site that asked to prepare and got no prepared call, after which it
#: stops asking (the worker will not: its tensors are too large, say).
_DECLINES = 3


class _Site:
    """What one compiled call site's first call worked out for the others, by RPC: the
    bytes its request and reply take in the transport's memory, its program message
    (read-only once made), and its prepared call over the fast lane."""

    __slots__ = ("declined", "plans", "sizes")

    def __init__(self) -> None:
        self.sizes: dict[str, tuple[int, int, pb.Program | None]] = {}
        self.plans: dict[str, PreparedCall] = {}
        self.declined: collections.Counter[str] = collections.Counter()


def _struct_nbytes(s: jax.ShapeDtypeStruct) -> int:
    return math.prod(s.shape) * np.dtype(s.dtype).itemsize


def _named(params: dict[str, np.ndarray], call: Call) -> list[pb.NamedTensor]:
    return [pb.NamedTensor(name=n, tensor=call.put(v)) for n, v in params.items()]
