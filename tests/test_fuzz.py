"""Fuzzing the worker over gRPC: no request, however malformed, crashes or stalls it, gets
an INTERNAL or UNKNOWN answer or a message naming its files or shared memory, or keeps it
from answering the next good request right.

hypothesis builds the requests: messages for every RPC with hostile fields (unknown dtypes,
negative, huge and overflowing dimensions, payloads of the wrong size, wrong arity, unknown
models, parameters and residual handles), serialized requests with unknown fields appended,
bytes flipped or cut, bytes that are no message at all, and references into a real
session's shared memory that point outside it. The worker is this module's own, so that a
crash fails no other test; the number of requests and their statuses are printed at the end.

Every test runs twice: with Forward and Vjp sent by gRPC, and over the fast lane (the same
messages and bytes, in the lane's frames; tests/test_lane.py fuzzes the framing itself).
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import pytest
import torch
from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLE_MODELS, FAST_LANE, STATUS_CODES, RawSession, start_worker, varint
from pytorch2jax_protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    SERVICE_NAME,
    channel_options,
    dtypes,
    lane,
    pb,
    pb_grpc,
    shm,
    tensors,
    values,
)
from pytorch2jax_server import examples

#: Longer than any call of these small models takes, even on a busy 2-core CI machine: a
#: call past it is a stall.
CALL_TIMEOUT_S = 10.0
Code = grpc.StatusCode
ALLOWED = frozenset(
    {
        Code.OK,
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.RESOURCE_EXHAUSTED,
        Code.FAILED_PRECONDITION,  # an unknown residual handle
        Code.UNIMPLEMENTED,  # shapes that depend on data, a transport not offered
        Code.ABORTED,  # an unknown session
    }
)
#: What gRPC itself answers (with INTERNAL) when a request does not parse; see
#: test_undecodable_request_is_invalid_argument.

_SERVICE = pb.DESCRIPTOR.services_by_name["Bridge"]
_UINT64 = (1 << 64) - 1
_INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
_REPO = Path(__file__).resolve().parents[1]
#: The fuzzer's session's shared-memory region, into which references point.
REGION_BYTES = 1 << 16

#: The models fuzzed calls are built for: a model added to EXAMPLE_MODELS later (a slow
#: one, say) is not served here until this module knows how to call it.
MODELS = {
    name: EXAMPLE_MODELS[name]
    for name in (
        "mlp",
        "convnet",
        "dict_output",
        "embedding",
        "bf16_mlp",
        "linear10",
        "scale_shift",
        "noisy_scale",
        "masked_select",
    )
}
MLP_X = (np.arange(16, dtype=np.float32).reshape(2, 8) - 8) / 4


def _fuzz_settings(max_examples: int):
    """``max_examples``, the same ones each run: no database, and no shrinking (a dead
    worker fails every later example, so shrinking would only find the smallest request
    sent to a dead worker; the assertion messages name the culprit instead)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


# --- the fuzzer: sends, checks every answer, counts ----------------------------------------


def _private_markers(worker) -> list[str]:
    """Substrings no message may contain: shared-memory names and the worker's paths."""
    tmp = os.path.dirname(worker.unix.removeprefix("unix://"))
    dirs = {
        str(_REPO),
        sysconfig.get_paths()["purelib"],
        sys.prefix,
        sys.base_prefix,
        tmp,
        tempfile.gettempdir(),
    }
    return ["/dev/shm", "/p2j-"] + sorted(d.rstrip("/") + "/" for d in dirs if len(d) > 1)


#: An absolute path of two parts or more, and a Python source file.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/<])/(?:[\w.@+~-]+/)+[\w.@+~-]*")
_SOURCE_FILE = re.compile(r"\w\.py\b")


def _strings(value) -> Iterator[str]:
    """Every string field of a message, at any depth (what an error message may echo)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Message):
        for _, v in value.ListFields():
            yield from _strings(v)
    elif not isinstance(value, (bytes, int, float)):  # a repeated field
        for v in value:
            yield from _strings(v)


def _describe(request) -> str:
    if isinstance(request, bytes):
        return f"bytes {request[:300]!r} ({len(request)} bytes)"
    text = text_format.MessageToString(request, as_one_line=True)
    return f"{type(request).__name__} {{{text[:1500]}}}"


class _Fuzzer:
    """Sends requests to its worker and checks every answer; counts requests and statuses."""

    def __init__(self, worker, plane: str) -> None:
        self.worker = worker
        self.channel = grpc.insecure_channel(
            worker.unix, options=channel_options(DEFAULT_MAX_MESSAGE_BYTES)
        )
        self.stub = pb_grpc.BridgeStub(self.channel)
        # References are fuzzed in this session's one region; registrations in another.
        self.session = RawSession(worker.unix, fast_lane=plane == "lane")
        # Forward and Vjp go over the session's lane, on one connection.
        self.lane = None
        if plane == "lane":
            self.lane, answer = self.session.lane_connect()
            assert answer.code == 0
        self.region, self.memory = self.session.register(REGION_BYTES)
        assert self.region == 1  # region ids count from 1 per session: the strategies' 1
        self.memory.view(np.float32)[:] = np.arange(REGION_BYTES // 4) % 199 - 99
        self.registrations = RawSession(worker.unix)
        self._markers = _private_markers(worker)
        self.requests = self.examples = self.good = 0
        self.statuses: Counter[str] = Counter()
        self.mlp_expected = examples.mlp()(torch.from_numpy(MLP_X)).detach().numpy()

    def close(self) -> None:
        if self.lane is not None:
            self.lane.close()
        self.session.close()
        self.registrations.close()
        self.channel.close()

    def metadata(self, which: str, session: RawSession | None = None) -> tuple:
        return {
            "none": (),
            "session": (session or self.session).metadata,
            "unknown session": (("p2j-session", "00" * 16),),
            "short session id": (("p2j-session", "ab"),),
            "not hex": (("p2j-session", "not-hex"),),
        }[which]

    def call(self, method: str, request: Message | bytes, metadata: tuple = ()):
        """Sends ``request`` (a message, or bytes as they are) and checks the answer;
        returns the status code and the reply (bytes for bytes, chunks for a stream)."""
        what = f"{method}: {_describe(request)}"
        streaming = _SERVICE.methods_by_name[method].server_streaming
        if isinstance(request, bytes):
            path = f"/{SERVICE_NAME}/{method}"
            multi = self.channel.unary_stream if streaming else self.channel.unary_unary
            stub = multi(path, request_serializer=None, response_deserializer=None)
            echoed = _parsed_strings(method, request)
        else:
            stub = getattr(self.stub, method)
            echoed = list(_strings(request))
        self.requests += 1
        reply, details = None, ""
        try:
            if self.lane is not None and method in lane.METHOD_CODES:
                code, reply, details = self._over_lane(method, request, metadata)
            elif method == "OpenSession":  # the stream lasts as long as the session
                answer = stub(request, timeout=CALL_TIMEOUT_S, metadata=metadata)
                try:
                    reply = next(answer)
                finally:
                    answer.cancel()
            elif streaming:
                reply = list(stub(request, timeout=CALL_TIMEOUT_S, metadata=metadata))
            else:
                reply = stub(request, timeout=CALL_TIMEOUT_S, metadata=metadata)
            if self.lane is None or method not in lane.METHOD_CODES:
                code = Code.OK
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        self.statuses[code.name] += 1
        self._check(method, request, what, code, details, echoed)
        if code != Code.OK:
            self.check_still_serves(after=what)
        return code, reply

    def _over_lane(self, method: str, request: Message | bytes, metadata: tuple):
        """Sends a Forward or Vjp over the lane: its status, reply and details."""
        data = request if isinstance(request, bytes) else request.SerializeToString()
        frame = RawSession.lane_call(self.lane, method, data, metadata, CALL_TIMEOUT_S)
        code = STATUS_CODES[frame.code]
        if code != Code.OK:
            return code, None, bytes(frame.payload).decode()
        if isinstance(request, bytes):
            return code, bytes(frame.payload), ""
        return code, getattr(pb, f"{method}Response").FromString(frame.payload), ""

    def _check(self, method, request, what: str, code, details: str, echoed: list[str]) -> None:
        assert self.worker.process.poll() is None, (
            f"the worker died on {what}\n{self.worker.stderr()[-4000:]}"
        )
        assert code != Code.DEADLINE_EXCEEDED, f"no answer in {CALL_TIMEOUT_S} s to {what}"
        assert code in ALLOWED, f"{code.name} ({details!r}) for {what}"
        leaked = self.private_parts(details, echoed)
        assert not leaked, f"{code.name} details {details!r} name {leaked} for {what}"

    def private_parts(self, details: str, echoed: list[str]) -> list[str]:
        # What the request itself said may come back (e.g. an unknown model's name).
        for s in sorted(echoed, key=len, reverse=True):
            if self._private(s):
                details = details.replace(repr(s), "").replace(s, "")
        return self._private(details)

    def _private(self, text: str) -> list[str]:
        found = [m for m in self._markers if m in text]
        return found + _ABSOLUTE_PATH.findall(text) + _SOURCE_FILE.findall(text)

    def check_still_serves(self, *, after: str = "the example") -> None:
        """A good Forward gets the right numbers."""
        self.good += 1
        x = np.arange(4, dtype=np.float32) - self.good
        try:
            reply = self.stub.Forward(_scale_shift(x), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as e:
            raise AssertionError(f"a good request failed ({e.code()}) after {after}") from None
        np.testing.assert_array_equal(tensors.from_wire(reply.outputs.tensor), 2 * x, err_msg=after)

    def end_example(self) -> None:
        """After each example: mlp, a module, still gives torch's numbers."""
        self.examples += 1
        self.good += 1
        x = pb.Value(tensor=tensors.to_wire(MLP_X))
        request = pb.ForwardRequest(model="mlp", arguments=pb.Arguments(args=[x]))
        reply = self.stub.Forward(request, timeout=CALL_TIMEOUT_S)
        np.testing.assert_allclose(
            tensors.from_wire(reply.outputs.tensor), self.mlp_expected, rtol=1e-5, atol=1e-6
        )

    def read(self, msg: pb.Tensor) -> np.ndarray:
        """A float32 reply tensor's values, inline or in this session's region."""
        if msg.WhichOneof("payload") == "shm":
            assert msg.shm.region == self.region
            raw = self.memory[msg.shm.offset : msg.shm.offset + msg.shm.nbytes]
            return raw.view(np.float32).reshape(tuple(msg.shape)).copy()
        return tensors.from_wire(msg)

    def summary(self, seconds: float) -> str:
        statuses = dict(self.statuses.most_common())
        line = (
            f"fuzz ({'fast lane' if self.lane is not None else 'gRPC'}): {self.requests} requests over {self.examples} examples in {seconds:.1f} s "
            f"(and {self.good} good ones, after each bad one and each example); "
            f"statuses: {statuses}"
        )
        return line


def _request_type(method: str) -> type[Message]:
    return getattr(pb, _SERVICE.methods_by_name[method].input_type.name)


def _parsed_strings(method: str, data: bytes) -> list[str]:
    try:
        return list(_strings(_request_type(method).FromString(data)))
    except DecodeError:
        return []


def _scale_shift(x: np.ndarray | pb.Tensor) -> pb.ForwardRequest:
    """``scale_shift(x, 0.0)``, which is ``2 * x``."""
    x = tensors.to_wire(x) if isinstance(x, np.ndarray) else x
    args = [pb.Value(tensor=x), pb.Value(tensor=tensors.to_wire(np.float32(0)))]
    return pb.ForwardRequest(model="scale_shift", arguments=pb.Arguments(args=args))


@pytest.fixture(scope="module", params=["grpc", "lane"] if FAST_LANE else ["grpc"])
def fuzz(request) -> Iterator[_Fuzzer]:
    with start_worker(models=MODELS) as worker:
        fuzzer = _Fuzzer(worker, request.param)
        start = time.monotonic()
        try:
            yield fuzzer
        finally:
            summary = fuzzer.summary(time.monotonic() - start)
            fuzzer.close()
            plugins = request.config.pluginmanager
            reporter = plugins.get_plugin("terminalreporter")
            capture = plugins.get_plugin("capturemanager")
            if reporter is not None and capture is not None:  # shown without -s
                with capture.global_and_fixture_disabled():
                    # -q leaves the line of progress dots open.
                    reporter.write_line(("\n" if reporter.verbosity < 0 else "") + summary)


# --- strategies --------------------------------------------------------------------------


def _mostly(usual, *others, odds: int = 4):
    """``usual`` drawn ``odds`` times as often as each of ``others`` (``one_of`` draws its
    branches about equally, and counts a strategy given twice once)."""
    choices = [usual] * odds + list(others)
    return st.sampled_from(range(len(choices))).flatmap(lambda i: choices[i])


#: Short strings of the characters that matter here: quotes, slashes, colons, dots, NUL,
#: newlines, and some beyond ASCII.
_TEXT = st.text(
    st.sampled_from("abcmlpxyz_019 .:/-()'\"\\\x00\n\u00e9\u6f22\U0001f600"), max_size=12
)
_DTYPES = [dtypes.code_of(n) for n in dtypes.SUPPORTED_NAMES]
#: Enum values outside the table (proto3 enums are open: any int32 arrives as is).
_BAD_DTYPES = st.one_of(
    st.sampled_from([0, 13, 99, -1, (1 << 31) - 1, -(1 << 31)]),
    st.integers(-(1 << 31), (1 << 31) - 1),
)
dtype_codes = _mostly(st.sampled_from(_DTYPES), _BAD_DTYPES, odds=3)

_HUGE = [1 << 31, 1 << 32, 1 << 40, 1 << 59, 1 << 60, 1 << 61, 1 << 62, (1 << 63) - 1]
_SMALL_DIMS = st.integers(0, 4)
shapes = _mostly(
    st.lists(_SMALL_DIMS, max_size=4),
    st.lists(st.one_of(_SMALL_DIMS, st.sampled_from([-1, -(1 << 63)] + _HUGE), _INT64), max_size=5),
    st.lists(st.just(1), min_size=60, max_size=70),  # around MAX_RANK
    # Products past 2**64, and empty tensors whose other dimensions are huge.
    st.lists(st.sampled_from([1 << 21, 1 << 22, (1 << 32) + 1, 3 << 40]), min_size=2, max_size=4),
    st.tuples(st.lists(st.sampled_from(_HUGE), min_size=1, max_size=3), st.integers(0, 3)).map(
        lambda s: [*s[0][: s[1]], 0, *s[0][s[1] :]]
    ),
    odds=3,
)

#: Region 1 is the fuzzer's session's one region.
region_ids = _mostly(
    st.just(1), st.sampled_from([0, 2, 7, (1 << 32) - 1]), st.integers(0, (1 << 32) - 1), odds=2
)
_ALIGNED = st.integers(0, REGION_BYTES // 64).map(lambda k: 64 * k)  # in, or just past
offsets = st.one_of(
    _ALIGNED,
    st.integers(0, REGION_BYTES),  # mostly misaligned
    st.sampled_from([REGION_BYTES - 64, 1 << 32, 1 << 63, _UINT64 - 63, _UINT64]),
    st.integers(0, _UINT64),
)
byte_counts = st.one_of(
    st.sampled_from([0, 4, 16, 64, REGION_BYTES, REGION_BYTES + 1, 1 << 63, _UINT64 - 63, _UINT64]),
    st.integers(0, _UINT64),
)
shm_refs = st.builds(
    lambda r, o, n: pb.SharedMemoryRef(region=r, offset=o, nbytes=n),
    region_ids,
    offsets,
    byte_counts,
)


@st.composite
def wire_tensors(draw) -> pb.Tensor:
    """A tensor message whose dtype, shape and payload are each right or wrong."""
    msg = pb.Tensor(dtype=draw(dtype_codes), shape=draw(shapes))
    payload = draw(st.sampled_from(["exact", "exact", "short", "long", "none", "shm", "cuda_ipc"]))
    if payload in ("shm", "cuda_ipc"):
        getattr(msg, payload).CopyFrom(draw(shm_refs))
        return msg
    if payload == "none":
        return msg
    try:
        need = tensors.checked_nbytes(msg.dtype, msg.shape)
    except tensors.WireFormatError:
        need = None
    if need is None or need > 1 << 16:
        data = draw(st.binary(max_size=64))
    elif payload == "exact":
        data = draw(st.binary(min_size=need, max_size=need)) if need <= 256 else bytes(need)
    elif payload == "short" and need:
        data = bytes(draw(st.integers(0, need - 1)))
    else:
        data = bytes(need + draw(st.integers(1, 64)))
    msg.inline_data = data
    return msg


_KWARG_NAMES = st.one_of(
    st.sampled_from(["scale", "x", "shift", "y", "images", "tokens", "weights", "self", "", "1x"]),
    _TEXT,
)


@st.composite
def mappings(draw, items) -> pb.Mapping:
    keys = draw(st.lists(_KWARG_NAMES, max_size=3))  # repeats now and then
    count = len(keys) if draw(st.integers(0, 4)) else draw(st.integers(0, 4))
    return pb.Mapping(keys=keys, values=[draw(items) for _ in range(count)])


def _nested(depth: int) -> pb.Value:
    """``[[...[None]...]]``, ``depth`` lists deep."""
    return pb.Value.FromString(_nested_bytes(depth))


def _nested_bytes(depth: int) -> bytes:
    # Written by hand: protobuf refuses to build a message deeper than it would parse.
    value = pb.Value(none=True).SerializeToString()
    for _ in range(depth):
        items = b"\x0a" + varint(len(value)) + value  # Sequence.items, field 1
        value = b"\x22" + varint(len(items)) + items  # Value.list, field 4
    return value


_LEAVES = _mostly(
    wire_tensors().map(lambda t: pb.Value(tensor=t)),
    st.builds(pb.TensorSpec, dtype=dtype_codes, shape=shapes).map(lambda s: pb.Value(spec=s)),
    st.just(pb.Value(none=True)),
    st.booleans().map(lambda b: pb.Value(bool_value=b)),
    _INT64.map(lambda i: pb.Value(int_value=i)),
    st.floats().map(lambda f: pb.Value(float_value=f)),
    _TEXT.map(lambda s: pb.Value(string_value=s)),
    st.just(pb.Value()),  # no kind set
    odds=3,
)
_TREES = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: pb.Value(tuple=pb.Sequence(items=xs))),
        st.lists(inner, max_size=3).map(lambda xs: pb.Value(list=pb.Sequence(items=xs))),
        mappings(inner).map(lambda m: pb.Value(dict=m)),
    ),
    max_leaves=5,
)
#: Now and then nested past values.MAX_DEPTH, but short of protobuf's own limit (100
#: messages deep, two a level) even inside the other trees.
wire_values = _mostly(_TREES, st.integers(28, 38).map(_nested), odds=8)
random_arguments = st.builds(
    lambda args, kwargs: pb.Arguments(args=args, kwargs=kwargs),
    st.lists(wire_values, max_size=4),
    mappings(wire_values),
)


def _plausible(model: str, n: int, rng: np.random.Generator) -> tuple[list, dict]:
    """Arguments each served model accepts (a batch of ``n``), as numpy arrays."""

    def f(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "mlp": ([f(n, 8)], {}),
        "convnet": ([f(n, 3, 5, 5)], {}),
        "dict_output": ([f(n, 4), f(n, 4)], {"scale": 0.5}),
        "embedding": ([rng.integers(0, 50, (n, 3)), f(n, 3)], {}),
        "bf16_mlp": ([f(n, 4).astype(ml_dtypes.bfloat16)], {}),
        "linear10": ([f(n, 10)], {}),
        "scale_shift": ([f(n), np.float32(rng.standard_normal())], {"scale": 3.0}),
        "noisy_scale": ([f(n)], {}),
        "masked_select": ([f(n)], {}),
    }[model]


def plausible_arguments(model: str, n: int, seed: int) -> pb.Arguments:
    args, kwargs = _plausible(model, n, np.random.default_rng(seed))
    return values.encode_arguments(tuple(args), kwargs, tensors.to_wire)


_MUTATIONS = [
    "none",
    "drop an argument",
    "extra argument",
    "unknown keyword",
    "leaf dtype",
    "leaf shape",
    "leaf payload cut",
    "leaf payload grown",
    "leaf replaced",
    "leaf in shared memory",
    "leaf in a list",
]


@st.composite
def mutated_arguments(draw, model: str) -> pb.Arguments:
    """Arguments ``model`` accepts, with at most one thing wrong."""
    msg = plausible_arguments(model, draw(st.integers(0, 3)), draw(st.integers(0, 1 << 32)))
    mutation = draw(st.sampled_from(_MUTATIONS))
    leaves = [v for v in msg.args if v.WhichOneof("kind") == "tensor"]
    leaf = draw(st.sampled_from(leaves)) if leaves else None
    if mutation == "drop an argument" and msg.args:
        del msg.args[-1]
    elif mutation == "extra argument":
        msg.args.append(draw(wire_values))
    elif mutation == "unknown keyword":
        msg.kwargs.keys.append(draw(_KWARG_NAMES))
        msg.kwargs.values.append(draw(wire_values))
    elif leaf is None:
        pass
    elif mutation == "leaf dtype":
        leaf.tensor.dtype = draw(dtype_codes)  # the same bytes, read as another dtype
    elif mutation == "leaf shape":
        del leaf.tensor.shape[:]
        leaf.tensor.shape.extend(draw(shapes))
        if draw(st.booleans()):  # with as many bytes as the new shape needs, where sane
            try:
                need = tensors.checked_nbytes(leaf.tensor.dtype, leaf.tensor.shape)
            except tensors.WireFormatError:
                need = None
            if need is not None and need <= 1 << 16:
                leaf.tensor.inline_data = bytes(need)
    elif mutation == "leaf payload cut":
        data = leaf.tensor.inline_data
        leaf.tensor.inline_data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif mutation == "leaf payload grown":
        leaf.tensor.inline_data += draw(st.binary(min_size=1, max_size=9))
    elif mutation == "leaf replaced":
        leaf.CopyFrom(draw(wire_values))
    elif mutation == "leaf in shared memory":
        leaf.tensor.shm.CopyFrom(draw(shm_refs))
    elif mutation == "leaf in a list":
        leaf.CopyFrom(pb.Value(list=pb.Sequence(items=[leaf])))
    return msg


_SERVED = sorted(MODELS)
_UNKNOWN_MODELS = [
    "",
    " mlp",
    "MLP",
    "mlp\x00",
    "os:system",
    "builtins:eval",
    "pytorch2jax_server.examples:mlp()",
    "pytorch2jax_server.examples:scale_shift",
    "pytorch2jax_server.examples:wide_mlp",
    "__import__('os').system('true')",
    "../mlp",
    "/etc/passwd",
    "mlp.py",
    "slow",
]
model_names = _mostly(st.sampled_from(_SERVED), st.sampled_from(_UNKNOWN_MODELS), _TEXT, odds=12)


@st.composite
def calls(draw) -> tuple[str, pb.Arguments]:
    """A model name and arguments: mostly a served model's, with one thing wrong or not."""
    name = draw(model_names)
    if draw(st.integers(0, 4)) == 0:
        return name, draw(random_arguments)
    return name, draw(mutated_arguments(name if name in MODELS else draw(st.sampled_from(_SERVED))))


def _named(name: str, array: np.ndarray) -> pb.NamedTensor:
    return pb.NamedTensor(name=name, tensor=tensors.to_wire(array))


_PARAMETER_NAMES = [
    "net.0.weight", "net.0.bias", "net.4.bias", "weight", "bias", "embed.weight", "nope", ""
]
parameters = _mostly(
    st.just([]),
    st.lists(
        st.builds(
            lambda n, t: pb.NamedTensor(name=n, tensor=t),
            st.one_of(st.sampled_from(_PARAMETER_NAMES), _TEXT),
            wire_tensors(),
        ),
        max_size=3,
    ),
    # Right name, right or wrong shape and dtype (mlp's and linear10's).
    st.lists(
        st.sampled_from(
            [
                _named("net.0.bias", np.full(64, 0.5, np.float32)),
                _named("net.0.bias", np.zeros(64, np.float64)),
                _named("net.0.bias", np.zeros(63, np.float32)),
                _named("net.0.weight", np.zeros((8, 64), np.float32)),
                _named("weight", np.eye(10, dtype=np.float32)),
                _named("bias", np.zeros(10, np.int32)),
            ]
        ),
        min_size=1,
        max_size=2,
    ),
)
optional_refs = _mostly(st.none(), shm_refs, odds=3)


def _with_area(msg: Message, area: pb.SharedMemoryRef | None) -> Message:
    if area is not None:
        msg.reply_area.CopyFrom(area)
    return msg


@st.composite
def forward_requests(draw) -> pb.ForwardRequest:
    model, arguments = draw(calls())
    msg = pb.ForwardRequest(
        model=model,
        arguments=arguments,
        parameters=draw(parameters),
        keep_residual=draw(st.booleans()),
    )
    return _with_area(msg, draw(optional_refs))


@st.composite
def vjp_requests(draw) -> pb.VjpRequest:
    model, arguments = draw(calls())
    msg = pb.VjpRequest(
        model=model,
        residual=draw(st.binary(max_size=24)),
        parameters=draw(parameters),
        cotangents=draw(st.lists(st.one_of(wire_tensors(), st.just(pb.Tensor())), max_size=3)),
        retain_residual=draw(st.booleans()),
    )
    if draw(st.booleans()):
        msg.arguments.CopyFrom(arguments)
    return _with_area(msg, draw(optional_refs))


@st.composite
def infer_requests(draw) -> pb.InferShapesRequest:
    model, arguments = draw(calls())
    if draw(st.booleans()):  # as specs, the way clients send them
        for v in arguments.args:
            if v.WhichOneof("kind") == "tensor":
                v.spec.CopyFrom(pb.TensorSpec(dtype=v.tensor.dtype, shape=v.tensor.shape))
    return pb.InferShapesRequest(model=model, arguments=arguments)


_SEGMENT_NAMES = st.one_of(
    st.sampled_from(
        [
            "",
            "/etc/passwd",
            "/dev/shm/p2j-" + "0" * 32,
            "/p2j-../../etc/passwd",
            "/p2j-" + "0" * 32,
            "/p2j-" + "A" * 32,
            "p2j-" + "0" * 32,
            "/p2j-" + "0" * 32 + "\n",
            "/p2j-" + "0" * 31,
        ]
    ),
    st.binary(min_size=16, max_size=16).map(lambda b: "/p2j-" + b.hex()),
    _TEXT,
)
_SIZES = st.one_of(
    st.sampled_from([0, 1, 4095, 4096, 4097, 1 << 20, 1 << 33, 1 << 63, _UINT64]),
    st.integers(0, _UINT64),
)

#: A strategy per RPC (test_every_rpc_is_fuzzed keeps this complete).
REQUESTS = {
    "ListModels": st.just(pb.ListModelsRequest()),
    "GetWorkerStats": st.just(pb.WorkerStatsRequest()),
    "OpenSession": st.builds(
        pb.OpenSessionRequest,
        transports=st.lists(
            st.one_of(
                st.sampled_from([0, pb.INLINE, pb.SHM, pb.CUDA_IPC]),
                st.integers(-(1 << 31), (1 << 31) - 1),
            ),
            max_size=4,
        ),
    ),
    "RegisterRegion": st.builds(pb.RegisterRegionRequest, name=_SEGMENT_NAMES, size=_SIZES),
    "CreateCudaPool": st.builds(
        pb.CreateCudaPoolRequest, device_uuid=st.binary(max_size=20), size=_SIZES
    ),
    "GetParameters": st.builds(
        pb.GetParametersRequest, model=model_names, include_buffers=st.booleans()
    ),
    "InferShapes": infer_requests(),
    "Forward": forward_requests(),
    "Vjp": vjp_requests(),
    "ReleaseResiduals": st.builds(
        pb.ReleaseResidualsRequest, residuals=st.lists(st.binary(max_size=40), max_size=20)
    ),
}
_MODEL_CALLS = ("Forward", "Vjp", "InferShapes", "GetParameters")
#: Those that run models are drawn more often than the others.
_METHODS = sorted(REQUESTS) + ["Forward", "Vjp", "InferShapes"] * 3
any_requests = st.sampled_from(_METHODS).flatmap(
    lambda m: REQUESTS[m].map(lambda request: (m, request))
)
metadata_kinds = st.sampled_from(
    ["none", "none", "session", "session", "unknown session", "short session id", "not hex"]
)


@st.composite
def unknown_fields(draw) -> bytes:
    """One field of a number and wire type the message may not have (1-20 are mostly known
    numbers, here perhaps with another wire type)."""
    number = draw(st.one_of(st.integers(1, 20), st.integers(21, (1 << 29) - 1)))
    wire_type = draw(st.sampled_from([0, 1, 2, 5]))
    if wire_type == 0:
        body = varint(draw(st.integers(0, _UINT64)))
    elif wire_type == 2:
        data = draw(st.binary(max_size=32))
        body = varint(len(data)) + data
    else:
        size = 8 if wire_type == 1 else 4
        body = draw(st.binary(min_size=size, max_size=size))
    return varint(number << 3 | wire_type) + body


_BYTE_MUTATIONS = [
    "unknown fields",
    "unknown fields",
    "garbage after",
    "cut short",
    "bytes flipped",
    "random bytes",
    "empty",
    "nested too deep",
]


@st.composite
def serialized_requests(draw) -> tuple[str, bytes]:
    """An RPC and bytes that are, or are not quite, a request of it."""
    method, request = draw(any_requests)
    data = request.SerializeToString()
    how = draw(st.sampled_from(_BYTE_MUTATIONS))
    if how == "unknown fields":
        fields = draw(st.lists(unknown_fields(), min_size=1, max_size=4))
        at = draw(st.sampled_from(["end", "start"]))
        data = b"".join(fields) + data if at == "start" else data + b"".join(fields)
    elif how == "garbage after":
        data += draw(st.binary(min_size=1, max_size=16))
    elif how == "cut short" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "bytes flipped" and data:
        flipped = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(flipped) - 1))
            flipped[i] ^= draw(st.integers(1, 255))
        data = bytes(flipped)
    elif how == "random bytes":
        data = draw(st.binary(max_size=200))
    elif how == "empty":
        data = b""
    elif how == "nested too deep":
        method = "Forward"
        value = _nested_bytes(draw(st.integers(40, 80)))
        arguments = b"\x0a" + varint(len(value)) + value  # Arguments.args, field 1
        data = b"\x12" + varint(len(arguments)) + arguments  # ForwardRequest.arguments
    return method, data


# --- the tests ---------------------------------------------------------------------------


def test_every_rpc_is_fuzzed():
    assert set(REQUESTS) == set(_SERVICE.methods_by_name)


@_fuzz_settings(500)
@given(case=any_requests, metadata=metadata_kinds)
def test_random_requests(fuzz, case, metadata):
    method, request = case
    code, _ = fuzz.call(method, request, fuzz.metadata(metadata))
    if method in _MODEL_CALLS and request.model not in MODELS:
        # Names are looked up, never imported: "os:system" is no model. (The lane refuses
        # a call naming another session before it looks at the call.)
        other_session = fuzz.lane is not None and method in lane.METHOD_CODES and metadata in (
            "unknown session", "short session id", "not hex"
        )
        want = Code.ABORTED if other_session else Code.NOT_FOUND
        assert code == want, f"{code} for model {request.model!r}"
    fuzz.end_example()


@_fuzz_settings(400)
@given(case=serialized_requests(), metadata=metadata_kinds)
def test_serialized_requests(fuzz, case, metadata):
    method, data = case
    fuzz.call(method, data, fuzz.metadata(metadata))
    fuzz.end_example()


@st.composite
def references(draw) -> pb.Tensor:
    """A float32 tensor in the fuzzer's session's region, where the reference may point
    outside it, be misaligned, or not match its dtype and shape."""
    shape = draw(st.one_of(st.lists(st.integers(0, 8), max_size=3), shapes))
    dtype = draw(_mostly(st.just(pb.FLOAT32), dtype_codes))
    try:
        need = tensors.checked_nbytes(dtype, shape)
    except tensors.WireFormatError:
        need = draw(byte_counts)
    nbytes = draw(_mostly(st.just(need), byte_counts, st.integers(max(need - 8, 0), need), odds=2))
    region, offset = draw(_mostly(st.just(1), region_ids)), draw(_mostly(_ALIGNED, offsets, odds=2))
    ref = pb.SharedMemoryRef(region=region, offset=offset, nbytes=nbytes)
    msg = pb.Tensor(dtype=dtype, shape=shape)
    getattr(msg, draw(st.sampled_from(["shm", "shm", "shm", "cuda_ipc"]))).CopyFrom(ref)
    return msg


def _in_our_region(fuzz: _Fuzzer, msg: pb.Tensor) -> np.ndarray | None:
    """The values of a float32 tensor that lies in the fuzzer's region, else None."""
    if msg.WhichOneof("payload") != "shm" or msg.dtype != pb.FLOAT32:
        return None
    if msg.shm.region != fuzz.region or msg.shm.offset + msg.shm.nbytes > REGION_BYTES:
        return None
    try:
        return fuzz.read(msg).copy()
    except ValueError:  # bytes that do not make this shape: the worker refuses them too
        return None


@_fuzz_settings(300)
@given(
    x=references(),
    cotangent=references(),
    area=st.one_of(st.none(), shm_refs),
    method=st.sampled_from(["Forward", "Forward", "Vjp"]),
    metadata=st.sampled_from(["session"] * 6 + ["none", "unknown session"]),
)
def test_hostile_shared_memory_references(fuzz, x, cotangent, area, method, metadata):
    expected_x = _in_our_region(fuzz, x)
    expected_ct = _in_our_region(fuzz, cotangent)
    arguments = _scale_shift(x).arguments
    if method == "Forward":
        request = pb.ForwardRequest(model="scale_shift", arguments=arguments)
    else:
        request = pb.VjpRequest(model="scale_shift", arguments=arguments, cotangents=[cotangent])
    request = _with_area(request, area)
    code, reply = fuzz.call(method, request, fuzz.metadata(metadata))
    # Where the references were good, the numbers are right too (wherever they came back).
    with np.errstate(all="ignore"):
        if code == Code.OK and method == "Forward" and expected_x is not None:
            np.testing.assert_array_equal(fuzz.read(reply.outputs.tensor), 2 * expected_x)
        if code == Code.OK and method == "Vjp" and expected_ct is not None:
            np.testing.assert_array_equal(fuzz.read(reply.argument_grads[0]), 2 * expected_ct)
    fuzz.end_example()


@_fuzz_settings(80)
@given(
    segment=st.sampled_from([None, 4096, 4096, 8192]),
    mode=st.sampled_from([0o600, 0o600, 0o644]),
    twice=st.booleans(),
    name=_SEGMENT_NAMES,
    size=st.one_of(st.sampled_from([4096, 4096, 8192]), _SIZES),
    metadata=st.sampled_from(["session"] * 5 + ["none", "unknown session", "not hex"]),
)
def test_register_region(fuzz, segment, mode, twice, name, size, metadata):
    """Registrations of real segments (any size asked, mode 0600 or not, twice) and of
    names that are no segment; in a session of their own, which fills up."""
    mapping = None
    if segment is not None:
        name, mapping = shm.create(segment)
        os.chmod(f"/dev/shm{name}", mode)
    try:
        for _ in range(2 if twice else 1):
            fuzz.call(
                "RegisterRegion",
                pb.RegisterRegionRequest(name=name, size=size),
                fuzz.metadata(metadata, fuzz.registrations),
            )
    finally:
        if mapping is not None:
            shm.unlink(name)
            mapping.close()
    fuzz.end_example()


_VJP_MODELS = ["scale_shift", "mlp", "dict_output", "embedding", "convnet", "masked_select"]


_COTANGENT_MISTAKES = [
    "none", "none", "one more", "one less", "dtype", "shape", "payload", "unspecified"
]


@st.composite
def cotangents_for(draw, outputs: list[pb.Tensor]) -> tuple[list[pb.Tensor], bool]:
    """Cotangents for ``outputs``: right ones (float32, their shapes), with perhaps one
    wrong in count, dtype, shape or payload; and whether they are all right."""
    rng = np.random.default_rng(draw(st.integers(0, 1 << 32)))
    cts = [
        tensors.to_wire(rng.standard_normal(tuple(o.shape)).astype(np.float32)) for o in outputs
    ]
    wrong = draw(st.sampled_from(_COTANGENT_MISTAKES))
    if wrong == "one more":
        cts.append(draw(wire_tensors()))
    elif wrong == "one less" and cts:
        cts.pop()
    elif wrong == "unspecified" and cts:
        cts[0] = pb.Tensor()
    elif cts:
        ct = cts[draw(st.integers(0, len(cts) - 1))]
        if wrong == "dtype":
            ct.dtype = draw(dtype_codes)
        elif wrong == "shape":
            del ct.shape[:]
            ct.shape.extend(draw(shapes))
        elif wrong == "payload":
            ct.inline_data = ct.inline_data[:-1] if ct.inline_data else b"\0"
    return cts, wrong == "none"


@_fuzz_settings(120)
@given(
    model=st.sampled_from(_VJP_MODELS),
    n=st.integers(1, 3),
    seed=st.integers(0, 1 << 32),
    handle=st.sampled_from(["kept", "kept", "kept", "cut", "flipped", "another model"]),
    send_arguments=st.booleans(),
    retain=st.booleans(),
    data=st.data(),
)
def test_vjp_of_a_kept_forward(fuzz, model, n, seed, handle, send_arguments, retain, data):
    """A real residual handle (or one almost like it), with good and bad cotangents."""
    arguments = plausible_arguments(model, n, seed)
    forward = pb.ForwardRequest(model=model, arguments=arguments, keep_residual=True)
    code, reply = fuzz.call("Forward", forward)
    assert code == Code.OK and reply.residual, f"{code} for {forward}"
    outputs = _tensor_leaves(reply.outputs)
    cts, right = data.draw(cotangents_for(outputs))
    residual = {
        "kept": reply.residual,
        "cut": reply.residual[:-1],
        "flipped": bytes([reply.residual[0] ^ 1]) + reply.residual[1:],
        "another model": reply.residual,
    }[handle]
    vjp_model = "linear10" if handle == "another model" else model
    request = pb.VjpRequest(
        model=vjp_model, residual=residual, cotangents=cts, retain_residual=retain
    )
    if send_arguments:
        request.arguments.CopyFrom(arguments)
    code, grads = fuzz.call("Vjp", request)
    if model == "scale_shift" and right and handle == "kept":
        # x * scale + sin(shift) with scale=3: the gradient of x is 3 * cotangent.
        assert code == Code.OK
        grad = tensors.from_wire(grads.argument_grads[0])
        np.testing.assert_array_equal(grad, 3 * tensors.from_wire(cts[0]))
    fuzz.call("ReleaseResiduals", pb.ReleaseResidualsRequest(residuals=[reply.residual, residual]))
    fuzz.end_example()


_PROGRAM_MODELS = ["scale_shift", "mlp", "embedding", "linear10"]
_INDICES = st.lists(
    _mostly(st.integers(0, 3), st.sampled_from([7, 1 << 31, (1 << 32) - 1])), max_size=3
)


@st.composite
def programs(draw, inputs: list[pb.Tensor]) -> tuple[pb.Program, list[pb.Tensor]]:
    """A program of 1-5 transforms over a call of ``inputs`` (its argument tensors), and
    extra inputs for it: mostly indices in range and tangents shaped like the inputs,
    sometimes not (indices out of range or repeated, dimensions past the rank, batch
    sizes that do not match or are huge, unknown methods, hostile tensors)."""
    transforms, extras = [], []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["jvp", "vjp", "vmap"]))
        if kind == "vmap":
            in_dims = draw(
                st.lists(st.sampled_from([-3, -1, -1, 0, 0, 0, 1, 4]), max_size=len(inputs) + 4)
            )
            size = draw(_mostly(st.integers(1, 3), st.sampled_from([0, 1 << 40])))
            method = draw(_mostly(st.sampled_from([0, 1, 2]), st.just(9)))
            vmap = pb.Vmap(in_dims=in_dims, axis_size=size, method=method)
            transforms.append(pb.Transform(vmap=vmap))
            continue
        wrt, outputs = draw(_INDICES), draw(_INDICES)
        message = pb.Jvp if kind == "jvp" else pb.Vjp
        transforms.append(pb.Transform(**{kind: message(wrt=wrt, outputs=outputs)}))
        for _ in range(len(wrt) if kind == "jvp" else len(outputs)):
            extras.append(draw(_mostly(st.sampled_from(inputs), wire_tensors())))
    return pb.Program(transforms=transforms), extras


@_fuzz_settings(150)
@given(
    model=st.sampled_from(_PROGRAM_MODELS),
    n=st.integers(1, 3),
    seed=st.integers(0, 1 << 32),
    keep=st.booleans(),
    keep_wrt=_INDICES,
    data=st.data(),
)
def test_programs_of_transforms(fuzz, model, n, seed, keep, keep_wrt, data):
    """Forwards under random programs of jvp, vjp and vmap: torch.func errors and bad
    indices are the caller's (INVALID_ARGUMENT), never the worker's end."""
    arguments = plausible_arguments(model, n, seed)
    inputs = [v.tensor for v in arguments.args if v.WhichOneof("kind") == "tensor"]
    program, extras = data.draw(programs(inputs))
    forward = pb.ForwardRequest(
        model=model,
        arguments=arguments,
        program=program,
        program_inputs=extras,
        keep_residual=keep,
        residual_wrt=keep_wrt if keep else [],
    )
    code, reply = fuzz.call("Forward", forward)
    if code == Code.OK and reply.residual:
        vjp = pb.VjpRequest(
            model=model,
            residual=reply.residual,
            wrt=data.draw(_INDICES.filter(bool)),
            cotangent_outputs=data.draw(_INDICES),
            cotangents=data.draw(st.lists(st.sampled_from(inputs), max_size=3)),
        )
        fuzz.call("Vjp", vjp)
        fuzz.call("ReleaseResiduals", pb.ReleaseResidualsRequest(residuals=[reply.residual]))
    fuzz.end_example()


def _tensor_leaves(value: pb.Value) -> list[pb.Tensor]:
    kind = value.WhichOneof("kind")
    if kind == "tensor":
        return [value.tensor]
    if kind in ("tuple", "list"):
        return [t for v in getattr(value, kind).items for t in _tensor_leaves(v)]
    if kind == "dict":
        return [t for v in value.dict.values for t in _tensor_leaves(v)]
    return []


def test_undecodable_request_is_invalid_argument(fuzz):
    forward = fuzz.channel.unary_unary(f"/{SERVICE_NAME}/Forward")
    with pytest.raises(grpc.RpcError) as e:
        forward(b"\x0a\x02\xff\xfe", timeout=CALL_TIMEOUT_S)  # a model name of bad UTF-8
    assert e.value.code() == Code.INVALID_ARGUMENT
    assert "not a valid Forward request message" in e.value.details()
