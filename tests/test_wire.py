"""The shared wire code validates sizes and keeps pytree leaf order equal to JAX's."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from pytorch2jax_protocol import dtypes, pb, tensors, values


def test_checked_nbytes():
    assert tensors.checked_nbytes(pb.FLOAT32, [2, 3]) == 24
    with pytest.raises(tensors.WireFormatError, match="negative dimension"):
        tensors.checked_nbytes(pb.FLOAT32, [2, -3])
    with pytest.raises(tensors.WireFormatError, match="over the limit"):
        tensors.checked_nbytes(pb.FLOAT64, [2**20, 2**20], max_bytes=2**30)
    with pytest.raises(tensors.WireFormatError, match="too large to index"):
        tensors.checked_nbytes(pb.FLOAT32, [0, 2**62, 2**62])  # 0 bytes, overflowing strides
    with pytest.raises(tensors.WireFormatError, match="too large to index"):
        tensors.checked_nbytes(pb.FLOAT64, [0, 2**60])  # 2**60 elements, but 2**63 bytes
    with pytest.raises(tensors.WireFormatError, match="unknown wire dtype 99"):
        tensors.checked_nbytes(99, [1])
    with pytest.raises(tensors.WireFormatError, match="rank"):
        tensors.checked_nbytes(pb.UINT8, [1] * 65)


@pytest.mark.parametrize("name", dtypes.SUPPORTED_NAMES)
def test_roundtrip_every_dtype(name):
    a = (np.arange(6) % 2).astype(dtypes.to_numpy(dtypes.code_of(name))).reshape(2, 3)
    b = tensors.from_wire(tensors.to_wire(a))
    assert b.dtype == a.dtype and b.shape == (2, 3)
    np.testing.assert_array_equal(b, a)


def test_payload_size_must_match():
    msg = tensors.to_wire(np.ones((2, 2), np.float32))
    msg.inline_data = msg.inline_data[:-1]
    with pytest.raises(tensors.WireFormatError, match="has 15 bytes but dtype float32 x shape \\(2, 2\\) needs 16"):
        tensors.from_wire(msg)


def test_leaf_order_matches_jax():
    tree = ({"b": np.ones(1), "a": [np.zeros(2), None, 3]}, (np.full(3, 2.0),))
    seen = []
    msg = values.encode(tree, lambda x: seen.append(x.shape) or tensors.to_wire(x))
    assert seen == [np.shape(x) for x in jax.tree_util.tree_leaves(tree) if isinstance(x, np.ndarray)]
    back = values.decode(msg, tensors.from_wire)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)


def test_hostile_nesting_and_dicts_are_refused():
    deep = pb.Value(none=True)
    for _ in range(values.MAX_DEPTH + 2):
        deep = pb.Value(list=pb.Sequence(items=[deep]))
    with pytest.raises(values.TreeFormatError, match="nested deeper"):
        values.decode(deep, tensors.from_wire)
    bad = pb.Value(dict=pb.Mapping(keys=["a", "a"], values=[pb.Value(none=True)] * 2))
    with pytest.raises(values.TreeFormatError, match="repeated keys"):
        values.decode(bad, tensors.from_wire)
    with pytest.raises(values.TreeFormatError, match="keys must be strings"):
        values.encode({1: np.ones(1)}, tensors.to_wire)
