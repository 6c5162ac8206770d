"""The Bridge gRPC service: decode the request, run the model, encode the reply.

Torch maths lives in the engine (``engine``); this module only moves between wire and
torch objects (with ``_wire`` and ``_dataplane``) and reports failures: every exception of
a handler becomes a status code at one place (``_reporting``, by ``_status.status_of``); a
bad request never takes the worker down.

Calls that run a model (``_serving``) are counted and stopped once nobody waits for them
(see ``_calls``); what they would have kept for a Vjp is kept for the client's session.
Every call's method, model, status code and latency go to the worker's ``_metrics`` where
its status is decided (``_reporting``; ``GetParameters`` records its own).
"""

from __future__ import annotations

import functools
import os
import secrets
import time
from collections.abc import Iterator
from typing import Any

import grpc
import torch

from pytorch2jax_protocol import (
    PARAMETER_CHUNK_BYTES,
    POOL_METADATA_KEY,
    WORKER_ID_METADATA_KEY,
    pb,
    pb_grpc,
    programs,
    values,
)
from pytorch2jax_protocol import lane as lane_frames
from pytorch2jax_server._calls import Calls
from pytorch2jax_server._dataplane import (
    CallCodec,
    cuda_ipc,
    inline,
    named_session,
    session_of,
    shm,
)
from pytorch2jax_server._lane import Lane
from pytorch2jax_server._metrics import Metrics
from pytorch2jax_server._prepared import (
    ForwardPlan,
    OutputsChangedError,
    PreparedCalls,
    VjpPlan,
)
from pytorch2jax_server._sessions import Session, Sessions
from pytorch2jax_server._status import status_of
from pytorch2jax_server._version import __version__
from pytorch2jax_server._wire import empty_from_spec, model_info, to_spec
from pytorch2jax_server.engine import (
    Call,
    InvalidRequestError,
    Registry,
    ResidualCache,
    ResidualLostError,
    ServedModel,
    Transform,
    tensor_leaves,
    vjp,
    vjp_of_kept,
    wire_dtype,
)


def _reporting(method):
    """Turns any exception of a unary handler into its status code (``status_of``),
    records the call in the metrics, and names the worker in the trailing metadata (for
    clients of several workers)."""
    name = method.__name__

    @functools.wraps(method)
    def handler(self, request, context: grpc.ServicerContext):
        started = time.perf_counter()
        if any(k == POOL_METADATA_KEY for k, _ in context.invocation_metadata() or ()):
            context.set_trailing_metadata(self._identity)
        try:
            reply = method(self, request, context)
        except Exception as e:  # noqa: BLE001 - the one boundary where all of them are mapped
            code, details = status_of(e)
        else:
            self._record(name, request, "OK", started)
            return reply
        self._record(name, request, code.name, started)
        context.abort(code, details)

    return handler


def _serving(method):
    """``_reporting`` for a call that runs a model: counted, and stopped once cancelled
    (``_calls``); the method gets its ``Call`` as a fourth argument."""

    @functools.wraps(method)
    def tracked(self, request, context: grpc.ServicerContext):
        with self._calls.serving(method.__name__, context) as call:
            return method(self, request, context, call)

    return _reporting(tracked)


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _Decoded:
    """A request's arguments and parameters as torch tensors, leaves kept in wire order."""

    def __init__(
        self, arguments: pb.Arguments, parameters: list[pb.NamedTensor], codec: CallCodec
    ) -> None:
        self._codec = codec
        self.leaves: list[torch.Tensor] = []
        _check_count(len(parameters), "parameters")
        self.args, self.kwargs = values.decode_arguments(arguments, self._leaf)
        self.params: dict[str, torch.Tensor] = {}
        for named in parameters:
            if named.name in self.params:
                raise InvalidRequestError(f"parameter {named.name!r} is sent twice")
            self.params[named.name] = codec.decode(named.tensor)

    def _leaf(self, msg: pb.Tensor) -> torch.Tensor:
        t = self._codec.decode(msg)
        self.leaves.append(t)
        return t


def _check_count(n: int, what: str) -> None:
    """Refuses, before decoding them, more tensors than any pytree may hold."""
    if n > values.MAX_VALUES:
        raise InvalidRequestError(
            f"a request carries {n} {what}, more than {values.MAX_VALUES}; send fewer, "
            "larger tensors (stack them)"
        )


def _encode_outputs(model: ServedModel, outputs: Any, leaf) -> pb.Value:
    def checked(obj: Any):
        if isinstance(obj, torch.Tensor):
            return leaf(obj)
        raise InvalidRequestError(
            f"model {model.name!r} returned a {type(obj).__name__}; served models must return "
            "tensors, or tuples, lists and dicts of them"
        )

    return values.encode(outputs, checked, static=False)


def _program_of(msg: pb.Program) -> tuple[Transform, ...]:
    try:
        return programs.from_wire(msg)
    except programs.ProgramFormatError as e:
        raise InvalidRequestError(str(e)) from None


def _lost(model: ServedModel, remedy: str) -> ResidualLostError:
    return ResidualLostError(
        f"the worker no longer holds the autograd state of this forward of model "
        f"{model.name!r} (evicted or expired); {remedy}"
    )


def _prepared_calls(context) -> PreparedCalls | None:
    """The session's prepared calls, for a call over the fast lane (whose context has
    them); None over gRPC, where nothing is prepared."""
    return getattr(context, "prepared", None)


def _reply_area(request) -> pb.SharedMemoryRef | None:
    return request.reply_area if request.HasField("reply_area") else None


class BridgeServicer(pb_grpc.BridgeServicer):
    def __init__(
        self,
        registry: Registry,
        residuals: ResidualCache,
        sessions: Sessions,
        calls: Calls,
        metrics: Metrics | None = None,
        lane: Lane | None = None,
    ) -> None:
        self._registry = registry
        self._lane = lane
        self._residuals = residuals
        self._sessions = sessions
        self._calls = calls
        self._metrics = Metrics(calls, residuals, sessions) if metrics is None else metrics
        # Metric labels name served models only: a client's made-up names (a typo, a
        # fuzzer) would each add series without end.
        self._served = frozenset(m.name for m in registry)
        # Tells a client of several workers where a residual lives (see the client's _pool).
        self._identity = ((WORKER_ID_METADATA_KEY, secrets.token_hex(8)),)

    def _record(self, method: str, request, code: str, started: float) -> None:
        model = getattr(request, "model", "")
        self._metrics.record(
            method, model if model in self._served else "", code, time.perf_counter() - started
        )

    def OpenSession(self, request, context) -> Iterator[pb.SessionInfo]:
        # The stream is the session's lifetime: it ends when the client closes it or its
        # connection drops (the callback fires), or when the worker stops (end_streams).
        try:
            session, refused = self._sessions.open(context.peer(), list(request.transports))
        except Exception as e:  # noqa: BLE001 - mapped at the boundary
            context.abort(*status_of(e))
        context.add_callback(session.ended.set)
        try:
            info = pb.SessionInfo(
                session=session.id,
                transports=session.transports,
                server_version=__version__,
                refused=refused,
            )
            if request.fast_lane and pb.SHM in session.transports:
                if self._lane is not None:
                    info.fast_lane.CopyFrom(self._lane.offer(session, request.pid))
                else:
                    info.refused = "; ".join(filter(None, (refused, "the fast lane is off")))
            yield info
            session.ended.wait()
        finally:
            self._sessions.close(session)

    @_reporting
    def RegisterRegion(self, request, context):
        session = session_of(self._sessions, context)
        return pb.RegisterRegionResponse(
            region=shm.map_segment(session, request.name, request.size)
        )

    @_reporting
    def CreateCudaPool(self, request, context):
        session = session_of(self._sessions, context)
        region, handle = cuda_ipc.create_pool(
            session, self._registry.device, request.device_uuid, request.size
        )
        return pb.CreateCudaPoolResponse(region=region, ipc_handle=handle)

    @_reporting
    def ListModels(self, request, context):
        return pb.ListModelsResponse(
            models=[model_info(m) for m in self._registry], server_version=__version__
        )

    def GetParameters(self, request, context) -> Iterator[pb.TensorChunk]:
        # A streaming handler cannot be wrapped like the unary ones: look everything up
        # before the first chunk, so that errors come out as a status, not mid-stream.
        started = time.perf_counter()
        try:
            model = self._registry.get(request.model)
            tensors = [(n, p, False) for n, p in model.parameters.items()]
            if request.include_buffers:
                tensors += [(n, b, True) for n, b in model.buffers.items()]
            for _, t, _ in tensors:
                wire_dtype(t.dtype)
        except Exception as e:  # noqa: BLE001 - mapped at the boundary
            code, details = status_of(e)
            self._record("GetParameters", request, code.name, started)
            context.abort(code, details)
        ended = "UNKNOWN"  # what gRPC answers for a stream whose handler raised
        try:
            for name, t, is_buffer in tensors:
                data = inline.encode(t).inline_data
                first = pb.TensorChunk(
                    name=name, dtype=wire_dtype(t.dtype), shape=t.shape, is_buffer=is_buffer
                )
                if not data:
                    yield first
                for offset in range(0, len(data), PARAMETER_CHUNK_BYTES):
                    chunk = first if offset == 0 else pb.TensorChunk(name=name, offset=offset)
                    chunk.data = data[offset : offset + PARAMETER_CHUNK_BYTES]
                    yield chunk
            ended = "OK"
        except GeneratorExit:  # the client left (or its deadline passed) mid-stream
            ended = "CANCELLED"
            raise
        finally:
            self._record("GetParameters", request, ended, started)

    @_serving
    def InferShapes(self, request, context, call: Call):
        model = self._registry.get(request.model)

        device = self._registry.device

        def build():
            def from_tensor(msg: pb.Tensor) -> torch.Tensor:
                return empty_from_spec(pb.TensorSpec(dtype=msg.dtype, shape=msg.shape), device)

            def from_spec(msg: pb.TensorSpec) -> torch.Tensor:
                return empty_from_spec(msg, device)

            return values.decode_arguments(request.arguments, from_tensor, from_spec)

        outputs = model.infer(
            build,
            int32_as_int64=request.int32_as_int64,
            train=request.train if request.HasField("train") else None,
        )
        return pb.InferShapesResponse(outputs=_encode_outputs(model, outputs, to_spec))

    @_serving
    def Forward(self, request, context, call: Call):
        model = self._registry.get(request.model)
        program = _program_of(request.program) if request.HasField("program") else ()
        if request.release_residuals:
            self._residuals.release(list(request.release_residuals))
        # Checked before the work: a client whose session is gone must open a new one.
        owner = named_session(self._sessions, context) if request.keep_residual else None
        codec = CallCodec(
            self._sessions,
            context,
            self._registry.device,
            _reply_area(request),
            keep=request.keep_residual,
        )
        try:
            decoded = _Decoded(request.arguments, request.parameters, codec)
            _check_count(len(request.program_inputs), "program inputs")
            extras = [codec.decode(t) for t in request.program_inputs]
            keep = None
            if request.keep_residual:
                keep = tuple(request.residual_wrt) or model.floating_inputs(
                    decoded.leaves, decoded.params
                )
            key = codec.decode(request.rng) if request.HasField("rng") else None
            train = request.train if request.HasField("train") else None
            outcome = model.run(
                decoded.args,
                decoded.kwargs,
                decoded.leaves,
                decoded.params,
                keep=keep,
                program=program,
                extras=extras,
                int32_as_int64=request.int32_as_int64,
                key=key,
                train=train,
                returned=list(request.returned_buffers),
            )
            outputs = _encode_outputs(model, outcome.outputs, codec.encode)
        finally:
            codec.finish()
        prepared = 0
        store = _prepared_calls(context)
        if request.prepare and store is not None and not program and not request.returned_buffers:
            plan = ForwardPlan(
                model,
                args=decoded.args,
                kwargs=decoded.kwargs,
                params=decoded.params,
                leaves=decoded.leaves,
                key=key,
                outputs=tensor_leaves(outcome.outputs),
                keep=keep,
                int32_as_int64=request.int32_as_int64,
                train=train,
                device=self._registry.device,
            )
            prepared = store.add(plan) if plan.small_enough() else 0
        call.check()  # keep no autograd state for a caller that is gone
        handle = b""
        if outcome.residual:
            handle = self._residuals.put(outcome.residual, owner=owner.id if owner else b"")
            # Its session may have closed meanwhile, after it released its residuals.
            # (Closing marks it closed first, so one of the two always sees the other.)
            if owner is not None and owner.closed.is_set():
                self._residuals.release([handle])
                handle = b""
        return pb.ForwardResponse(
            outputs=outputs,
            residual=handle,
            vmap_fallbacks=[
                pb.VmapFallback(transform=i, reason=why) for i, why in outcome.fallbacks
            ],
            prepared=prepared,
        )

    @_serving
    def Vjp(self, request, context, call: Call):
        model = self._registry.get(request.model)
        codec = CallCodec(self._sessions, context, self._registry.device, _reply_area(request))
        try:
            return self._vjp(model, request, codec, call, _prepared_calls(context))
        finally:
            codec.finish()

    def _vjp(
        self,
        model: ServedModel,
        request: pb.VjpRequest,
        codec: CallCodec,
        call: Call,
        store: PreparedCalls | None,
    ) -> pb.VjpResponse:
        cotangents = [
            None if ct.dtype == pb.DTYPE_UNSPECIFIED else codec.decode(ct)
            for ct in request.cotangents
        ]
        residual = None
        if request.residual:
            residual = self._residuals.take(
                request.residual, model=model.name, keep=request.retain_residual
            )
        if request.wrt:  # a program's Vjp of a kept forward; without it, a Forward recomputes
            if any(c is None for c in cotangents):
                raise InvalidRequestError("a Vjp naming its cotangent_outputs sends each of them")
            if residual is None:
                raise _lost(model, "run the program's Vjp as a Forward")
            call.check()
            found = vjp_of_kept(
                residual, cotangents, list(request.cotangent_outputs), list(request.wrt)
            )
            prepared = 0
            if request.prepare and store is not None and not request.retain_residual:
                plan = VjpPlan(
                    model,
                    cotangents=cotangents,
                    grads=found,
                    cotangent_outputs=request.cotangent_outputs,
                    wrt=request.wrt,
                    device=self._registry.device,
                )
                prepared = store.add(plan) if plan.small_enough() else 0
            return pb.VjpResponse(grads=[codec.encode(g) for g in found], prepared=prepared)
        if residual is None:
            if not request.HasField("arguments"):
                raise _lost(model, "send the arguments again to recompute")
            decoded = _Decoded(request.arguments, request.parameters, codec)
            # Used within this call only: views of the client's slots are fine.
            residual = model.run(
                decoded.args,
                decoded.kwargs,
                decoded.leaves,
                decoded.params,
                keep=model.floating_inputs(decoded.leaves, decoded.params),
            ).residual
        call.check()
        arg_grads, param_grads = vjp(residual, cotangents, retain_graph=request.retain_residual)
        return pb.VjpResponse(
            argument_grads=[pb.Tensor() if g is None else codec.encode(g) for g in arg_grads],
            parameter_grads=[
                pb.NamedTensor(name=n, tensor=codec.encode(g)) for n, g in param_grads.items()
            ],
        )

    def run_prepared(
        self, session: Session, store: PreparedCalls, payload: memoryview, context
    ) -> bytearray:
        """The reply to a fast lane's RUN of one of ``session``'s prepared calls (``store``):
        admitted, cancelled, reported and mapped to a status as a handler's call is."""
        started = time.perf_counter()
        plan_id = 0  # no id: 0 is none's, as on the wire
        if len(payload) >= lane_frames.PLAN.size:
            (plan_id,) = lane_frames.PLAN.unpack_from(payload)
        plan = store.get(plan_id)
        if plan is None:
            self._metrics.record("RunPrepared", "", "NOT_FOUND", time.perf_counter() - started)
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                "this session has no such prepared call (the worker let it go, or it never "
                "was this session's): send the call in full, to prepare it again",
            )
        try:
            with self._calls.serving(plan.method, context) as call:
                if isinstance(plan, ForwardPlan):
                    reply = self._run_forward_plan(session, plan, payload, call)
                else:
                    reply = self._run_vjp_plan(plan, payload, call)
        except OutputsChangedError as e:
            store.drop(plan_id)
            code, details = grpc.StatusCode.NOT_FOUND, str(e)
        except Exception as e:  # noqa: BLE001 - mapped at the boundary, as in _reporting
            code, details = status_of(e)
        else:
            self._metrics.record(plan.method, plan.model.name, "OK", time.perf_counter() - started)
            return reply
        self._metrics.record(plan.method, plan.model.name, code.name, time.perf_counter() - started)
        context.abort(code, details)
        raise AssertionError("abort raises")

    def _run_forward_plan(
        self, session: Session, plan: ForwardPlan, payload: memoryview, call: Call
    ) -> bytearray:
        outcome = plan.site.run(**plan.call(plan.tensors(payload)))
        reply = plan.reply(tensor_leaves(outcome.outputs))
        call.check()  # keep no autograd state for a caller that is gone
        if outcome.residual:
            handle = self._residuals.put(outcome.residual, owner=session.id)
            # As in Forward: its session may have closed meanwhile.
            if session.closed.is_set():
                self._residuals.release([handle])
                handle = b""
            reply[: len(handle)] = handle  # none kept (too large): zeros, which no handle is
        return reply

    def _run_vjp_plan(self, plan: VjpPlan, payload: memoryview, call: Call) -> bytearray:
        cotangents = plan.tensors(payload)
        residual = self._residuals.take(plan.handle(payload), model=plan.model.name)
        if residual is None:
            raise _lost(plan.model, "run the program's Vjp as a Forward")
        call.check()
        return plan.reply(vjp_of_kept(residual, cotangents, plan.cotangent_outputs, plan.wrt))

    @_reporting
    def ReleaseResiduals(self, request, context):
        return pb.ReleaseResidualsResponse(released=self._residuals.release(list(request.residuals)))

    @_reporting
    def GetWorkerStats(self, request, context):
        sessions, regions, region_bytes = self._sessions.held()
        lane_connections, lane_calls, prepared_calls = (
            self._lane.held() if self._lane is not None else (0, 0, 0)
        )
        calls = self._calls
        return pb.WorkerStats(
            lane_connections=lane_connections,
            lane_calls=lane_calls,
            prepared_calls=prepared_calls,
            calls_in_flight=calls.in_flight,
            calls_served=calls.served,
            calls_cancelled=calls.cancelled,
            calls_refused=calls.refused,
            sessions=sessions,
            regions=regions,
            region_bytes=region_bytes,
            residuals=len(self._residuals),
            residual_bytes=self._residuals.nbytes,
            resident_bytes=_resident_bytes(),
        )
