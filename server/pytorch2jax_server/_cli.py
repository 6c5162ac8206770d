"""``pytorch2jax-server``: load models, listen, print the bound addresses, serve."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading

import torch

from pytorch2jax_protocol import DEFAULT_MAX_MESSAGE_BYTES
from pytorch2jax_server import _loading
from pytorch2jax_server._dataplane import SHARED_MEMORY_POLICIES, Sessions
from pytorch2jax_server._dataplane.shm import DEFAULT_MAX_SESSION_BYTES, DEFAULT_MAX_SESSIONS
from pytorch2jax_server._metrics import parse_address
from pytorch2jax_server._security import Security, SecurityError
from pytorch2jax_server._server import (
    DEFAULT_LISTEN,
    DEFAULT_MAX_CONCURRENT_CALLS,
    DEFAULT_MAX_WORKERS,
    create_server,
)
from pytorch2jax_server.engine import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    DEFAULT_TTL_S,
    Registry,
    ResidualCache,
)

#: Printed first on the line that names the bound addresses, so scripts can wait for it.
READY_PREFIX = "pytorch2jax-server listening on"
DEFAULT_GRACE_S = 30.0
_MB = 1 << 20

#: Options that an environment variable can set, for containers: PYTORCH2JAX_<NAME>. The
#: command line wins over the environment, which wins over the config file.
_ENV_PREFIX = "PYTORCH2JAX_"


#: The keys a config file's [server] table may set (the long options' names, in their
#: units), and the least value of each number: the command line checks the same bounds.
_SERVER_KEYS: dict[str, type | tuple[type, ...]] = {
    "listen": list,
    "tls_cert": str,
    "tls_key": str,
    "tls_client_ca": str,
    "token_file": str,
    "device": str,
    "shared_memory": str,
    "max_workers": int,
    "max_concurrent_calls": int,
    "max_message_mb": int,
    "max_sessions": int,
    "shared_memory_mb": int,
    "residual_cache_mb": int,
    "residual_cache_entries": int,
    "residual_ttl": (int, float),
    "torch_threads": int,
    "metrics_listen": str,
}
_AT_LEAST = {"residual_cache_mb": 0, "residual_cache_entries": 0, "residual_ttl": 0}
#: gRPC takes message sizes as 32-bit signed integers.
_MAX_MESSAGE_MB = 2047


def _check_server_table(settings: dict) -> None:
    for key, value in settings.items():
        want = _SERVER_KEYS.get(key)
        if want is None:
            raise _loading.ConfigError(
                f"unknown key {key!r} in [server]; known keys: {', '.join(_SERVER_KEYS)}"
            )
        if not isinstance(value, want) or isinstance(value, bool):
            raise _loading.ConfigError(f"[server] {key} = {value!r} has the wrong type")
        if key == "shared_memory" and value not in SHARED_MEMORY_POLICIES:
            raise _loading.ConfigError(
                f"[server] shared_memory must be one of {', '.join(SHARED_MEMORY_POLICIES)}"
            )
        if isinstance(value, (int, float)) and not value >= _AT_LEAST.get(key, 1):  # NaN too
            raise _loading.ConfigError(
                f"[server] {key} must be at least {_AT_LEAST.get(key, 1)}; got {value}"
            )
        if key == "residual_ttl" and math.isinf(value):
            raise _loading.ConfigError("[server] residual_ttl must be finite")
        if key == "max_message_mb" and value > _MAX_MESSAGE_MB:
            raise _loading.ConfigError(f"[server] max_message_mb must be at most {_MAX_MESSAGE_MB}")
        if key == "listen" and not all(isinstance(a, str) for a in value):
            raise _loading.ConfigError("[server] listen must be a list of address strings")
        if key == "metrics_listen":
            try:
                parse_address(value)
            except ValueError as e:
                raise _loading.ConfigError(f"[server] metrics_listen: {e}") from None


def _count(least: int, most: int | None = None):
    """An argparse type: an integer from ``least`` to ``most``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < least or (most is not None and value > most):
            bounds = f"from {least} to {most}" if most is not None else f"at least {least}"
            raise argparse.ArgumentTypeError(f"must be {bounds}; got {value}")
        return value

    parse.__name__ = "integer"  # what argparse names in its error message
    return parse


def _seconds(text: str) -> float:
    """An argparse type: a finite, non-negative number of seconds."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more; got {text}")
    return value


def _metrics_address(text: str) -> str:
    """An argparse type: HOST:PORT, kept as it is written."""
    try:
        parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _env(name: str) -> str | None:
    return os.environ.get(_ENV_PREFIX + name) or None


def _add_env_option(p: argparse.ArgumentParser, flag: str, help: str, **kwargs) -> None:
    """An option that ``PYTORCH2JAX_<FLAG>`` sets when the command line does not."""
    name = flag.lstrip("-").replace("-", "_").upper()
    p.add_argument(flag, default=_env(name), help=f"{help} (env {_ENV_PREFIX}{name})", **kwargs)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pytorch2jax-server",
        description="Serve PyTorch models to JAX programs over gRPC (forward and VJP).",
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
    _add_env_option(p, "--config", "TOML file with [models] (and [server]) tables")
    p.add_argument(
        "--listen",
        action="append",
        metavar="ADDRESS",
        help="host:port (port 0 picks a free one) or unix:///path; repeatable (env "
        f"PYTORCH2JAX_LISTEN, comma-separated; default: {DEFAULT_LISTEN[0]})",
    )
    _add_env_option(
        p, "--tls-cert", "serve TCP addresses over TLS with this certificate", metavar="PEM"
    )
    _add_env_option(p, "--tls-key", "the certificate's private key", metavar="PEM")
    _add_env_option(
        p, "--tls-client-ca", "require client certificates signed by this CA", metavar="PEM"
    )
    _add_env_option(
        p,
        "--token-file",
        "require every call to carry this file's token as 'authorization: Bearer TOKEN'; "
        "or give the token itself in PYTORCH2JAX_TOKEN",
        metavar="PATH",
    )
    p.add_argument(
        "--max-workers",
        type=_count(1),
        default=None,
        help="calls (Forward, Vjp, InferShapes) that run at once; other admitted calls wait "
        f"their turn (default {DEFAULT_MAX_WORKERS})",
    )
    p.add_argument(
        "--max-concurrent-calls",
        type=_count(1),
        default=None,
        help="calls admitted at once, running or waiting their turn; past it a call gets "
        f"RESOURCE_EXHAUSTED at once (default {DEFAULT_MAX_CONCURRENT_CALLS})",
    )
    p.add_argument(
        "--max-message-mb",
        type=_count(1, _MAX_MESSAGE_MB),
        default=None,
        help="largest gRPC message; larger requests get RESOURCE_EXHAUSTED "
        f"(default {DEFAULT_MAX_MESSAGE_BYTES // _MB}, at most {_MAX_MESSAGE_MB})",
    )
    p.add_argument(
        "--residual-cache-mb",
        type=_count(0),
        default=None,
        help="autograd state kept between a forward and its VJP, in MiB; the oldest go "
        f"first, and their VJP recomputes the forward (default {DEFAULT_MAX_BYTES // _MB})",
    )
    p.add_argument(
        "--residual-cache-entries",
        type=_count(0),
        default=None,
        help="forwards whose autograd state is kept at most; 0 keeps none, so every VJP "
        f"recomputes (default {DEFAULT_MAX_ENTRIES})",
    )
    p.add_argument(
        "--residual-ttl",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help=f"how long unused autograd state is kept (default {DEFAULT_TTL_S:g})",
    )
    p.add_argument(
        "--shared-memory",
        choices=SHARED_MEMORY_POLICIES,
        default=None,
        help="which clients may pass tensors through shared memory: local ones (unix socket, "
        "loopback; the default), any (containers sharing /dev/shm), or none",
    )
    p.add_argument(
        "--max-sessions",
        type=_count(1),
        default=None,
        help=f"clients connected at once, each with a session (default {DEFAULT_MAX_SESSIONS})",
    )
    p.add_argument(
        "--shared-memory-mb",
        type=_count(1),
        default=None,
        help="shared memory one client may register, in MiB "
        f"(default {DEFAULT_MAX_SESSION_BYTES // _MB})",
    )
    _add_env_option(
        p,
        "--device",
        "where models run: cpu (the default), cuda or cuda:N; on a GPU, clients on the "
        "same host and GPU can pass tensors by CUDA IPC",
    )
    p.add_argument(
        "--torch-threads",
        type=_count(1),
        default=None,
        help="torch intra-op threads (default: torch's own, one per core)",
    )
    _add_env_option(
        p,
        "--metrics-listen",
        "serve Prometheus metrics over HTTP at http://HOST:PORT/metrics; port 0 picks a free "
        "one, and the worker prints the address on stderr (default: off)",
        metavar="HOST:PORT",
        type=_metrics_address,
    )
    p.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL") or "WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
        help=f"what the worker logs (env {_ENV_PREFIX}LOG_LEVEL; default WARNING)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(name)s: %(message)s")
    settings: dict = {}

    def setting(key: str, cli_value, default):
        # The command line wins over the config's [server] table, in the same units.
        return cli_value if cli_value is not None else settings.get(key, default)

    try:
        specs = [_loading.parse_model_option(m) for m in args.model]
        if args.config:
            config_specs, settings = _loading.read_config(args.config)
            _check_server_table(settings)
            specs = config_specs + specs
        if not specs:
            raise _loading.ConfigError(
                "no models to serve; give --model NAME=package.module:attr or --config FILE"
            )
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise _loading.ConfigError(f"model names must be unique; got {names}")
        models = {s.name: _loading.load(s) for s in specs}
        token_file = setting("token_file", args.token_file, None)
        security = Security.from_files(
            cert=setting("tls_cert", args.tls_cert, None),
            key=setting("tls_key", args.tls_key, None),
            client_ca=setting("tls_client_ca", args.tls_client_ca, None),
            # A token file named anywhere wins over a token in the environment.
            token=None if token_file else _env("TOKEN"),
            token_file=token_file,
        )
    except (_loading.ConfigError, SecurityError) as e:
        print(f"pytorch2jax-server: {e}", file=sys.stderr)
        return 2

    torch_threads = setting("torch_threads", args.torch_threads, None)
    if torch_threads:
        torch.set_num_threads(torch_threads)
    residuals = ResidualCache(
        max_entries=setting(
            "residual_cache_entries", args.residual_cache_entries, DEFAULT_MAX_ENTRIES
        ),
        max_bytes=setting("residual_cache_mb", args.residual_cache_mb, DEFAULT_MAX_BYTES // _MB)
        * _MB,
        ttl_s=setting("residual_ttl", args.residual_ttl, DEFAULT_TTL_S),
    )
    try:
        device = torch.device(setting("device", args.device, "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("this torch build or machine has no CUDA")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    except RuntimeError as e:
        print(f"pytorch2jax-server: cannot serve on device {args.device!r}: {e}", file=sys.stderr)
        return 2
    sessions = Sessions(
        device=device,
        shared_memory=setting("shared_memory", args.shared_memory, "local"),
        max_sessions=setting("max_sessions", args.max_sessions, DEFAULT_MAX_SESSIONS),
        max_bytes=setting(
            "shared_memory_mb", args.shared_memory_mb, DEFAULT_MAX_SESSION_BYTES // _MB
        )
        * _MB,
    )
    env_listen = [a.strip() for a in (_env("LISTEN") or "").split(",") if a.strip()]
    listen = args.listen or env_listen or settings.get("listen") or list(DEFAULT_LISTEN)
    try:
        worker = create_server(
            Registry(models, device),
            listen,
            residuals=residuals,
            sessions=sessions,
            max_workers=setting("max_workers", args.max_workers, DEFAULT_MAX_WORKERS),
            max_concurrent_calls=setting(
                "max_concurrent_calls", args.max_concurrent_calls, DEFAULT_MAX_CONCURRENT_CALLS
            ),
            max_message_bytes=setting(
                "max_message_mb", args.max_message_mb, DEFAULT_MAX_MESSAGE_BYTES // _MB
            )
            * _MB,
            security=security,
            metrics_listen=setting("metrics_listen", args.metrics_listen, None),
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
