"""``pytorch2jax-server``: load models, listen, print the bound addresses, serve."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

import torch

from pytorch2jax_server import _loading
from pytorch2jax_server._sessions import SessionPolicy
from pytorch2jax_server._security import Security, SecurityError
from pytorch2jax_server._server import create_server
from pytorch2jax_server._settings import ENV_PREFIX, SettingError, add_options, resolve
from pytorch2jax_server.engine import Registry, ResidualCache

#: Printed first on the line that names the bound addresses, so scripts can wait for it.
READY_PREFIX = "pytorch2jax-server listening on"
DEFAULT_GRACE_S = 30.0
_MB = 1 << 20


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pytorch2jax-server",
        description="Serve PyTorch models to JAX programs over gRPC (forward and VJP). "
        "Every setting but --model and --config can also come from the environment and "
        "from the config file's [server] table (the option's name with underscores); "
        "the command line wins over the environment, which wins over the file.",
        epilog="example: pytorch2jax-server --model mlp='pytorch2jax_server.examples:mlp()' "
        "--listen localhost:50051 --listen unix:///tmp/p2j.sock",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=package.module:attr",
        help="serve attr (an nn.Module, an nn.Module class, or a torch function; a trailing "
        "'()' calls a factory) under NAME; repeatable",
    )
    p.add_argument(
        "--config",
        default=os.environ.get(ENV_PREFIX + "CONFIG") or None,
        help=f"TOML file with [models] (and [server]) tables (env {ENV_PREFIX}CONFIG)",
    )
    add_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        specs = [_loading.parse_model_option(m) for m in args.model]
        table: dict = {}
        if args.config:
            config_specs, table = _loading.read_config(args.config)
            specs = config_specs + specs
        settings = resolve(args, table)
        logging.basicConfig(level=settings["log_level"], format="%(name)s: %(message)s")
        if not specs:
            raise _loading.ConfigError(
                "no models to serve; give --model NAME=package.module:attr or --config FILE"
            )
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise _loading.ConfigError(f"model names must be unique; got {names}")
        models = {s.name: _loading.load(s) for s in specs}
        token_file = settings["token_file"]
        security = Security.from_files(
            cert=settings["tls_cert"],
            key=settings["tls_key"],
            client_ca=settings["tls_client_ca"],
            # A token file named anywhere wins over a token in the environment.
            token=None if token_file else (os.environ.get(ENV_PREFIX + "TOKEN") or None),
            token_file=token_file,
        )
    except (_loading.ConfigError, SecurityError, SettingError) as e:
        print(f"pytorch2jax-server: {e}", file=sys.stderr)
        return 2

    if settings["torch_threads"]:
        torch.set_num_threads(settings["torch_threads"])
    residuals = ResidualCache(
        max_entries=settings["residual_cache_entries"],
        max_bytes=settings["residual_cache_mb"] * _MB,
        ttl_s=settings["residual_ttl"],
    )
    try:
        device = torch.device(settings["device"])
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("this torch build or machine has no CUDA")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    except RuntimeError as e:
        print(
            f"pytorch2jax-server: cannot serve on device {settings['device']!r}: {e}",
            file=sys.stderr,
        )
        return 2
    sessions = SessionPolicy(
        shared_memory=settings["shared_memory"],
        max_sessions=settings["max_sessions"],
        max_bytes=settings["shared_memory_mb"] * _MB,
    )
    try:
        worker = create_server(
            Registry(models, device),
            settings["listen"],
            residuals=residuals,
            sessions=sessions,
            max_workers=settings["max_workers"],
            max_concurrent_calls=settings["max_concurrent_calls"],
            max_message_bytes=settings["max_message_mb"] * _MB,
            security=security,
            metrics_listen=settings["metrics_listen"],
            fast_lane=settings["fast_lane"] == "on",
        )
    except (OSError, RuntimeError) as e:
        print(f"pytorch2jax-server: {e}", file=sys.stderr)
        return 1

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if worker.metrics is not None and worker.metrics.url is not None:
        # Before the ready line: whoever waits for that one finds this one written.
        print(f"metrics on {worker.metrics.url}", file=sys.stderr, flush=True)
    print(READY_PREFIX, " ".join(worker.addresses), flush=True)
    print(f"serving models: {', '.join(models)}", file=sys.stderr, flush=True)
    stop.wait()
    worker.stop(grace=DEFAULT_GRACE_S)
    return 0
