"""Pytrees of call arguments and model outputs <-> ``Value`` messages.

A pytree here is built from tuples, lists, dicts with string keys, None, and leaves. Tensor
leaves go through the caller's ``leaf`` function (each side knows its own array type);
``bool``, ``int``, ``float`` and ``str`` travel as static values. Dict entries are written in
sorted key order, which is the order JAX flattens them in, so the n-th tensor leaf on the
wire is the n-th leaf of ``jax.tree_util.tree_leaves`` on the client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pytorch2jax_protocol import pb

#: Deepest nesting of containers. Protobuf itself refuses messages nested deeper than 100
#: (each container level here is two messages), so this is the bound a peer meets first.
MAX_DEPTH = 32

#: Most values (leaves and containers) one pytree may hold. Each decoded value costs the
#: receiver far more than its bytes on the wire (a 15-byte tensor became ~1 KB of worker
#: memory), so the count is checked from the containers' lengths before their items are
#: decoded: what a request makes the worker hold stays proportional to its bytes.
MAX_VALUES = 1 << 16

LeafEncoder = Callable[[Any], "pb.Tensor | pb.TensorSpec"]
LeafDecoder = Callable[[Any], Any]


class TreeFormatError(ValueError):
    """A pytree that cannot be put on the wire, or a Value message that is malformed."""


def encode(obj: Any, leaf: LeafEncoder, *, static: bool = True) -> pb.Value:
    """The ``Value`` message of pytree ``obj``; ``leaf`` encodes each tensor leaf.

    With ``static=False`` (model outputs), scalars and strings are handed to ``leaf`` too,
    which decides whether to accept them.
    """
    return _encode(obj, leaf, 0, static)


def _encode(obj: Any, leaf: LeafEncoder, depth: int, static: bool = True) -> pb.Value:
    if depth > MAX_DEPTH:
        raise TreeFormatError(f"pytree is nested deeper than {MAX_DEPTH} levels")
    if obj is None:
        return pb.Value(none=True)
    if isinstance(obj, (tuple, list)):
        seq = pb.Sequence(items=[_encode(x, leaf, depth + 1, static) for x in obj])
        return pb.Value(tuple=seq) if isinstance(obj, tuple) else pb.Value(list=seq)
    if isinstance(obj, dict):
        return pb.Value(dict=_encode_mapping(obj, leaf, depth + 1, static))
    if not static:
        return _leaf(obj, leaf)
    if isinstance(obj, bool):  # before int: bool is an int subclass
        return pb.Value(bool_value=obj)
    if isinstance(obj, int):
        if not -(1 << 63) <= obj < (1 << 63):
            raise TreeFormatError(f"integer {obj} does not fit in 64 bits")
        return pb.Value(int_value=obj)
    if isinstance(obj, float):
        return pb.Value(float_value=obj)
    if isinstance(obj, str):
        return pb.Value(string_value=obj)
    return _leaf(obj, leaf)


def _leaf(obj: Any, leaf: LeafEncoder) -> pb.Value:
    msg = leaf(obj)
    if isinstance(msg, pb.TensorSpec):
        return pb.Value(spec=msg)
    return pb.Value(tensor=msg)


def _encode_mapping(obj: dict, leaf: LeafEncoder, depth: int, static: bool = True) -> pb.Mapping:
    if not all(isinstance(k, str) for k in obj):
        raise TreeFormatError(
            f"dict keys must be strings to cross the bridge; got {sorted(map(repr, obj))}"
        )
    keys = sorted(obj)
    return pb.Mapping(keys=keys, values=[_encode(obj[k], leaf, depth, static) for k in keys])


def encode_arguments(args: tuple, kwargs: dict, leaf: LeafEncoder) -> pb.Arguments:
    """The ``Arguments`` message of a call ``f(*args, **kwargs)``."""
    return pb.Arguments(
        args=[_encode(a, leaf, 1) for a in args], kwargs=_encode_mapping(kwargs, leaf, 1)
    )


class _Budget:
    """How many more values a pytree being decoded may hold."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_VALUES

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise TreeFormatError(
                f"a pytree holds more than {MAX_VALUES} values (tensors, containers and "
                "scalars); send fewer, larger tensors (stack them)"
            )


def decode(msg: pb.Value, tensor: LeafDecoder, spec: LeafDecoder | None = None) -> Any:
    """The pytree of ``msg``; ``tensor`` (and ``spec``) decode its leaves, in wire order."""
    budget = _Budget()
    budget.take(1)
    return _decode(msg, tensor, spec, 0, budget)


def _decode(
    msg: pb.Value, tensor: LeafDecoder, spec: LeafDecoder | None, depth: int, budget: _Budget
) -> Any:
    if depth > MAX_DEPTH:
        raise TreeFormatError(f"value is nested deeper than {MAX_DEPTH} levels")
    kind = msg.WhichOneof("kind")
    if kind == "tensor":
        return tensor(msg.tensor)
    if kind == "spec":
        if spec is None:
            raise TreeFormatError("a tensor leaf carries only a spec where data was expected")
        return spec(msg.spec)
    if kind in ("tuple", "list"):
        values = getattr(msg, kind).items
        budget.take(len(values))
        items = [_decode(v, tensor, spec, depth + 1, budget) for v in values]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return _decode_mapping(msg.dict, tensor, spec, depth + 1, budget)
    if kind == "none":
        return None
    if kind is None:
        raise TreeFormatError("a value has no kind set")
    return getattr(msg, kind)


def _decode_mapping(
    msg: pb.Mapping, tensor: LeafDecoder, spec: LeafDecoder | None, depth: int, budget: _Budget
) -> dict:
    if len(msg.keys) != len(msg.values):
        raise TreeFormatError(f"a dict has {len(msg.keys)} keys but {len(msg.values)} values")
    budget.take(len(msg.values))
    if len(set(msg.keys)) != len(msg.keys):
        raise TreeFormatError("a dict has repeated keys")
    return {k: _decode(v, tensor, spec, depth, budget) for k, v in zip(msg.keys, msg.values)}


def decode_arguments(
    msg: pb.Arguments, tensor: LeafDecoder, spec: LeafDecoder | None = None
) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of an ``Arguments`` message, leaves decoded in wire order."""
    budget = _Budget()
    budget.take(len(msg.args))
    args = tuple(_decode(v, tensor, spec, 1, budget) for v in msg.args)
    return args, _decode_mapping(msg.kwargs, tensor, spec, 1, budget)
