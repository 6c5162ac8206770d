"""``pytorch2jax-health``: asks a worker's standard gRPC health service whether it serves.

For container health checks and readiness probes, in either environment (it needs neither
torch nor jax). Exit status 0 when the worker answers SERVING, 1 otherwise, with one line
on stderr saying why::

    pytorch2jax-health unix:///run/pytorch2jax/worker.sock
    PYTORCH2JAX_TLS_CA=ca.pem pytorch2jax-health worker:50051
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pytorch2jax_protocol import SERVICE_NAME
from pytorch2jax_protocol.channels import TARGET_ENV, TLS, ChannelConfigError, open_channel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pytorch2jax-health", description=__doc__.splitlines()[0])
    p.add_argument(
        "target",
        nargs="?",
        default=os.environ.get(TARGET_ENV) or "localhost:50051",
        help=f"the worker's address (default: ${TARGET_ENV}, else localhost:50051)",
    )
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")
    p.add_argument(
        "--service",
        default=SERVICE_NAME,
        help="the service to ask about ('' for the whole server)",
    )
    args = p.parse_args(argv)
    try:
        channel = open_channel(args.target, tls=TLS.from_env())
    except ChannelConfigError as e:
        print(f"pytorch2jax-health: {e}", file=sys.stderr)
        return 2
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.timeout,
                wait_for_ready=True,  # a worker still starting gets the whole timeout
            )
        except grpc.RpcError as e:
            hint = ""
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not args.target.startswith("unix:"):
                hint = " (no answer: if the worker serves TLS, set PYTORCH2JAX_TLS_CA)"
            print(
                f"pytorch2jax-health: {args.target}: {e.code().name}: {e.details()}{hint}",
                file=sys.stderr,
            )
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"pytorch2jax-health: {args.target}: {status}", file=sys.stderr)
        return 1
    print(f"{args.target}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
