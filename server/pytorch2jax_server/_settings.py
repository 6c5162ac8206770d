"""The worker's settings, each declared once: name, kind (type and bounds), default,
environment variable and help. The command line's options, the config file's ``[server]``
table and ``--help`` all come from this one table (``SETTINGS``).

A setting named ``max_workers`` is ``--max-workers`` on the command line,
``PYTORCH2JAX_MAX_WORKERS`` in the environment and ``max_workers`` in ``[server]``; the
command line wins over the environment, which wins over the config file, which wins
over the default. Sizes are in MiB, times in seconds, as written.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pytorch2jax_protocol import DEFAULT_MAX_MESSAGE_BYTES
from pytorch2jax_server._sessions import (
    DEFAULT_MAX_SESSION_BYTES,
    DEFAULT_MAX_SESSIONS,
    SHARED_MEMORY_POLICIES,
)
from pytorch2jax_server._metrics import parse_address
from pytorch2jax_server._server import (
    DEFAULT_LISTEN,
    DEFAULT_MAX_CONCURRENT_CALLS,
    DEFAULT_MAX_WORKERS,
)
from pytorch2jax_server.engine import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, DEFAULT_TTL_S

ENV_PREFIX = "PYTORCH2JAX_"
_MB = 1 << 20
#: gRPC takes message sizes as 32-bit signed integers.
MAX_MESSAGE_MB = 2047


class SettingError(ValueError):
    """A value a setting cannot take; the message says which values it can."""


# -- kinds: how a setting's value is read from text (command line, environment) and checked
# -- when it comes typed (TOML) ---------------------------------------------------------------


@dataclass(frozen=True)
class Count:
    """An integer from ``least`` to ``most`` (None: no upper bound)."""

    least: int
    most: int | None = None

    def parse(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise SettingError(f"must be an integer; got {text!r}") from None
        return self.check(value)

    def check(self, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError
        if value < self.least or (self.most is not None and value > self.most):
            bounds = f"at least {self.least}"
            if self.most is not None:
                bounds = f"from {self.least} to {self.most}"
            raise SettingError(f"must be {bounds}; got {value}")
        return value


@dataclass(frozen=True)
class Seconds:
    """A finite number of seconds, 0 or more."""

    def parse(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise SettingError(f"must be a number of seconds, 0 or more; got {text!r}") from None
        return self.check(value)

    def check(self, value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError
        if not (math.isfinite(value) and value >= 0):
            raise SettingError(f"must be a number of seconds, 0 or more; got {value}")
        return float(value)


@dataclass(frozen=True)
class Choice:
    """One of ``choices``."""

    choices: tuple[str, ...]
    upper: bool = False  # accepted in any case, kept in upper case

    def parse(self, text: str) -> str:
        return self.check(text)

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError
        value = value.upper() if self.upper else value
        if value not in self.choices:
            raise SettingError(f"must be one of {', '.join(self.choices)}; got {value!r}")
        return value


@dataclass(frozen=True)
class Text:
    """A string, checked by ``validate`` (which raises ValueError with the fix)."""

    validate: Callable[[str], object] | None = None

    def parse(self, text: str) -> str:
        return self.check(text)

    def check(self, value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError
        if self.validate is not None:
            try:
                self.validate(value)
            except ValueError as e:
                raise SettingError(str(e)) from None
        return value


@dataclass(frozen=True)
class Addresses:
    """A list of addresses: repeated on the command line, comma-separated in the
    environment, a list in TOML."""

    def parse(self, text: str) -> list[str]:
        return [a.strip() for a in text.split(",") if a.strip()]

    def check(self, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
            raise SettingError("must be a list of address strings")
        return value


Kind = Count | Seconds | Choice | Text | Addresses


@dataclass(frozen=True)
class Setting:
    name: str
    kind: Kind
    default: Any
    help: str
    #: How --help shows the default, where its value alone would not say it.
    shown: str | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "listen",
        Addresses(),
        list(DEFAULT_LISTEN),
        "host:port (port 0 picks a free one) or unix:///path; repeatable (comma-separated "
        "in the environment)",
        shown=DEFAULT_LISTEN[0],
        metavar="ADDRESS",
    ),
    Setting("tls_cert", Text(), None, "serve TCP addresses over TLS with this certificate",
            shown="plaintext", metavar="PEM"),
    Setting("tls_key", Text(), None, "the certificate's private key", shown="none", metavar="PEM"),
    Setting("tls_client_ca", Text(), None, "require client certificates signed by this CA",
            shown="none", metavar="PEM"),
    Setting(
        "token_file",
        Text(),
        None,
        "require every call to carry this file's token as 'authorization: Bearer TOKEN'; "
        f"or give the token itself in {ENV_PREFIX}TOKEN",
        shown="no token",
        metavar="PATH",
    ),
    Setting(
        "max_workers",
        Count(1),
        DEFAULT_MAX_WORKERS,
        "calls (Forward, Vjp, InferShapes) that run at once; other admitted calls wait "
        "their turn",
    ),
    Setting(
        "max_concurrent_calls",
        Count(1),
        DEFAULT_MAX_CONCURRENT_CALLS,
        "calls admitted at once, running or waiting their turn; past it a call gets "
        "RESOURCE_EXHAUSTED at once",
    ),
    Setting(
        "max_message_mb",
        Count(1, MAX_MESSAGE_MB),
        DEFAULT_MAX_MESSAGE_BYTES // _MB,
        f"largest gRPC message, in MiB (at most {MAX_MESSAGE_MB}); larger requests get "
        "RESOURCE_EXHAUSTED",
    ),
    Setting(
        "residual_cache_mb",
        Count(0),
        DEFAULT_MAX_BYTES // _MB,
        "autograd state kept between a forward and its VJP, in MiB; the oldest go first, "
        "and their VJP recomputes the forward",
    ),
    Setting(
        "residual_cache_entries",
        Count(0),
        DEFAULT_MAX_ENTRIES,
        "forwards whose autograd state is kept at most; 0 keeps none, so every VJP recomputes",
    ),
    Setting(
        "residual_ttl",
        Seconds(),
        DEFAULT_TTL_S,
        "how long unused autograd state is kept, in seconds",
        metavar="SECONDS",
    ),
    Setting(
        "shared_memory",
        Choice(SHARED_MEMORY_POLICIES),
        "local",
        "which clients may pass tensors through shared memory: local ones (unix socket, "
        "loopback), any (containers sharing /dev/shm), or none (off)",
    ),
    Setting(
        "fast_lane",
        Choice(("on", "off")),
        "on",
        "carry the Forward and Vjp calls of clients that may use shared memory over a unix "
        "socket beside gRPC, with memory passed as file descriptors (Linux)",
    ),
    Setting("max_sessions", Count(1), DEFAULT_MAX_SESSIONS,
            "clients connected at once, each with a session"),
    Setting("shared_memory_mb", Count(1), DEFAULT_MAX_SESSION_BYTES // _MB,
            "shared memory one client may register, in MiB"),
    Setting(
        "device",
        Text(),
        "cpu",
        "where models run: cpu, cuda or cuda:N; on a GPU, clients on the same host and GPU "
        "can pass tensors by CUDA IPC",
    ),
    Setting("torch_threads", Count(1), None, "torch intra-op threads",
            shown="torch's own, one per core"),
    Setting(
        "metrics_listen",
        Text(parse_address),
        None,
        "serve Prometheus metrics over HTTP at http://HOST:PORT/metrics; port 0 picks a free "
        "one, and the worker prints the address on stderr",
        shown="off",
        metavar="HOST:PORT",
    ),
    Setting("log_level", Choice(("DEBUG", "INFO", "WARNING", "ERROR"), upper=True), "WARNING",
            "what the worker logs"),
)  # fmt: skip

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def add_options(parser: argparse.ArgumentParser) -> None:
    """One option per setting, its help saying its default and environment variable."""
    for s in SETTINGS:

        def parse(text: str, s: Setting = s) -> Any:
            try:
                return s.kind.parse(text)
            except SettingError as e:
                raise argparse.ArgumentTypeError(str(e)) from None

        parse.__name__ = s.name  # what argparse names in its error message
        shown = s.shown if s.shown is not None else _shown(s.default)
        extra: dict[str, Any] = {"action": "append"} if isinstance(s.kind, Addresses) else {}
        if isinstance(s.kind, Choice):
            extra["metavar"] = "{" + ",".join(s.kind.choices) + "}"
        parser.add_argument(
            s.flag,
            type=(lambda t: t) if isinstance(s.kind, Addresses) else parse,
            default=None,
            metavar=s.metavar or extra.pop("metavar", None),
            help=f"{s.help} (default: {shown}; env {s.env})",
            **extra,
        )


def resolve(
    args: argparse.Namespace, table: Mapping[str, Any], environ: Mapping[str, str] = os.environ
) -> dict[str, Any]:
    """Every setting's value: the command line's, else the environment's, else the config
    file's ``[server]`` table's (checked), else the default. SettingError names the
    place of a bad value."""
    unknown = sorted(set(table) - set(BY_NAME))
    if unknown:
        raise SettingError(
            f"unknown key {unknown[0]!r} in [server]; known keys: {', '.join(BY_NAME)}"
        )
    values: dict[str, Any] = {}
    for s in SETTINGS:
        given = getattr(args, s.name, None)
        text = environ.get(s.env) or None
        if given is not None:
            values[s.name] = given
        elif text is not None:
            try:
                values[s.name] = s.kind.parse(text)
            except SettingError as e:
                raise SettingError(f"{s.env}={text!r}: {e}") from None
        elif s.name in table:
            value = table[s.name]
            try:
                values[s.name] = s.kind.check(value)
            except TypeError:
                raise SettingError(f"[server] {s.name} = {value!r} has the wrong type") from None
            except SettingError as e:
                raise SettingError(f"[server] {s.name}: {e}") from None
        else:
            values[s.name] = s.default
    return values


def _shown(default: Any) -> str:
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)
