"""Regenerates the committed protobuf and gRPC stubs from ``bridge/v1/bridge.proto``.

Run ``python -m pytorch2jax_protocol.codegen`` after editing the .proto; it needs the
``dev`` extra (grpcio-tools). ``tests/test_codegen.py`` runs it into a temporary folder and
fails when the committed files differ, so the stubs cannot drift from the contract.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent
PROTO_FILES = ("pytorch2jax_protocol/bridge/v1/bridge.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Writes the stubs under ``out_dir`` (mirroring the package layout); returns their paths."""
    from grpc_tools import protoc  # the dev extra; never needed at run time

    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTO_FILES:
        rc = protoc.main(
            [
                "protoc",
                f"--proto_path={PACKAGE_ROOT.parent}",
                f"--proto_path={include}",
                f"--python_out={out_dir}",
                f"--pyi_out={out_dir}",
                f"--grpc_python_out={out_dir}",
                proto,
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed on {proto} with exit code {rc}")
    return sorted(p for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=PACKAGE_ROOT.parent,
        help="folder that holds the pytorch2jax_protocol package (default: in place)",
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
