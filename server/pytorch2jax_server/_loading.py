"""Finding the models to serve: ``NAME=package.module:attr`` specs and TOML config files.

``attr`` may be an ``nn.Module`` instance, an ``nn.Module`` subclass (instantiated with the
spec's keyword arguments), or a plain function of tensors. A trailing ``()`` calls ``attr``
as a factory (with the keyword arguments) and serves what it returns, a module or a
function. Models are named only here, from the worker's own command line or config: a
client can never make the worker import anything.

A config file::

    [server]
    listen = ["127.0.0.1:50051", "unix:///tmp/pytorch2jax.sock"]

    [models]
    mlp = "pytorch2jax_server.examples:mlp()"

    [models.wide]
    target = "pytorch2jax_server.examples:MLP"
    kwargs = { hidden = 1024 }
"""

from __future__ import annotations

import importlib
import inspect
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*(\(\))?$")


class ConfigError(ValueError):
    """A model spec or config file the worker cannot use; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    target: str  # "package.module:attr" with an optional trailing "()"
    kwargs: dict[str, Any] = field(default_factory=dict)
    train: bool = False


def parse_model_option(option: str) -> ModelSpec:
    """Parses a ``--model NAME=package.module:attr`` option."""
    name, sep, target = option.partition("=")
    if not sep:
        raise ConfigError(
            f"--model {option!r} names no target; write --model NAME=package.module:attr"
        )
    return _spec(name.strip(), target.strip(), {}, False)


def _spec(name: str, target: str, kwargs: dict[str, Any], train: bool) -> ModelSpec:
    if not _NAME.match(name):
        raise ConfigError(
            f"model name {name!r} is not usable; use letters, digits, '_', '-' and '.'"
        )
    if not _TARGET.match(target):
        raise ConfigError(
            f"model {name!r}: target {target!r} is not of the form package.module:attr "
            "(optionally with a trailing '()' to call a factory)"
        )
    if not isinstance(kwargs, dict):
        raise ConfigError(f"model {name!r}: kwargs must be a table")
    return ModelSpec(name, target, dict(kwargs), bool(train))


def read_config(path: str | Path) -> tuple[list[ModelSpec], dict[str, Any]]:
    """The models and the ``[server]`` table of a TOML config file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    unknown = set(data) - {"server", "models"}
    if unknown:
        raise ConfigError(
            f"config file {str(path)!r} has unknown tables {sorted(unknown)}; "
            "expected [server] and [models]"
        )
    specs = []
    for name, entry in data.get("models", {}).items():
        if isinstance(entry, str):
            specs.append(_spec(name, entry, {}, False))
        elif isinstance(entry, dict) and "target" in entry:
            extra = set(entry) - {"target", "kwargs", "train"}
            if extra:
                raise ConfigError(f"model {name!r}: unknown keys {sorted(extra)}")
            specs.append(
                _spec(name, entry["target"], entry.get("kwargs", {}), entry.get("train", False))
            )
        else:
            raise ConfigError(
                f"model {name!r}: give a target string or a table with target = "
                "'package.module:attr'"
            )
    return specs, dict(data.get("server", {}))


def load(spec: ModelSpec) -> Any:
    """Imports and builds the model of ``spec``: an ``nn.Module`` or a function."""
    module_name, _, attr_path = spec.target.partition(":")
    call = attr_path.endswith("()")
    attr_path = attr_path.removesuffix("()")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"model {spec.name!r}: cannot import {module_name!r}: {e}") from e
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"model {spec.name!r}: {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if call or (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        if not callable(obj):
            raise ConfigError(f"model {spec.name!r}: {spec.target!r} is not callable")
        obj = obj(**spec.kwargs)
    elif spec.kwargs:
        raise ConfigError(
            f"model {spec.name!r}: kwargs given but {spec.target!r} is not called; "
            "add '()' to the target to call it as a factory"
        )
    if isinstance(obj, torch.nn.Module):
        obj.train(spec.train)
        return obj
    if callable(obj):
        if not call and _takes_no_arguments(obj):
            # A function of no tensors is never one to serve: it is a factory whose
            # product was meant (``examples:mlp`` for ``examples:mlp()``).
            raise ConfigError(
                f"model {spec.name!r}: {spec.target!r} takes no arguments, so it is not a "
                f"function of tensors to serve; to serve what it returns, call it as a "
                f"factory: --model {spec.name}={spec.target}()"
            )
        return obj
    raise ConfigError(
        f"model {spec.name!r}: {spec.target!r} is a {type(obj).__name__}, not an nn.Module "
        "or a function"
    )


def _takes_no_arguments(fn: Any) -> bool:
    """Whether ``fn`` can be called with no arguments at all (and has no *args)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: give it the benefit
        return False
    return not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params) and all(
        p.default is not p.empty for p in params
    )
