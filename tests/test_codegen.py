"""The committed protobuf stubs are exactly what the .proto generates."""

from __future__ import annotations

import pathlib

import pytest

import pytorch2jax_protocol
from pytorch2jax_protocol import codegen

pytest.importorskip("grpc_tools", reason="the dev extra (grpcio-tools) regenerates the stubs")


def test_stubs_do_not_drift(tmp_path):
    generated = codegen.generate(tmp_path)
    assert generated, "codegen produced nothing"
    committed_root = pathlib.Path(pytorch2jax_protocol.__file__).parent.parent
    for path in generated:
        rel = path.relative_to(tmp_path)
        committed = committed_root / rel
        assert committed.exists(), f"{rel} is generated but not committed"
        assert committed.read_text() == path.read_text(), (
            f"{rel} differs from the .proto; run `python -m pytorch2jax_protocol.codegen`"
        )
