"""The worker's command line: config files, bad specs, health, reflection, shutdown."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import pytorch2jax
from conftest import start_worker


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytorch2jax_server", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), r"no models to serve; give --model NAME=package.module:attr or --config FILE"),
        (("--model", "mlp"), r"--model 'mlp' names no target"),
        (("--model", "m=no_such_module_xyz:thing"), r"model 'm': cannot import 'no_such_module_xyz'"),
        (("--model", "m=pytorch2jax_server.examples:nothing"), r"has no attribute 'nothing'"),
        (("--model", "m=pytorch2jax_server.examples"), r"is not of the form package.module:attr"),
        (("--config", "/nonexistent/p2j.toml"), r"cannot read config file"),
        # A factory without its (): it would be served as a function of no tensors.
        (
            ("--model", "mlp=pytorch2jax_server.examples:mlp"),
            r"takes no arguments.*call it as a factory: --model mlp=pytorch2jax_server.examples:mlp\(\)",
        ),
    ],
)
def test_bad_model_specs_exit_with_a_fix(args, message):
    import re

    result = _run_cli(*args)
    assert result.returncode == 2
    assert re.search(message, result.stderr), result.stderr


@pytest.mark.parametrize(
    ("server_table", "message"),
    [
        ("max_workres = 4", r"unknown key 'max_workres' in \[server\]; known keys: listen,"),
        ('max_workers = "4"', r"\[server\] max_workers = '4' has the wrong type"),
        ("max_concurrent_calls = 0", r"\[server\] max_concurrent_calls: must be at least 1; got 0"),
        ("residual_ttl = nan", r"\[server\] residual_ttl: must be a number of seconds, 0 or more; got nan"),
        ("residual_ttl = inf", r"\[server\] residual_ttl: must be a number of seconds, 0 or more; got inf"),
        ("max_message_mb = 4096", r"\[server\] max_message_mb: must be from 1 to 2047; got 4096"),
        ('listen = ["localhost:0", 5]', r"\[server\] listen: must be a list of address strings"),
        ('shared_memory = "sometimes"', r"\[server\] shared_memory: must be one of local, any, off"),
    ],
)
def test_bad_server_table_exits_with_a_fix(tmp_path, server_table, message):
    import re

    config = tmp_path / "worker.toml"
    config.write_text(f'[server]\n{server_table}\n[models]\nf = "pytorch2jax_server.examples:double"\n')
    result = _run_cli("--config", str(config))
    assert result.returncode == 2
    assert re.search(message, result.stderr), result.stderr


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-workers", "0", "--max-workers: must be at least 1; got 0"),
        ("--max-message-mb", "4096", "--max-message-mb: must be from 1 to 2047; got 4096"),
        ("--residual-ttl", "nan", "--residual-ttl: must be a number of seconds, 0 or more"),
    ],
)
def test_limits_out_of_bounds_are_refused(flag, value, message):
    result = _run_cli("--model", "f=pytorch2jax_server.examples:double", flag, value)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


def test_config_file(tmp_path):
    sock = tmp_path / "cfg.sock"
    config = tmp_path / "worker.toml"
    config.write_text(
        f"""
[server]
listen = ["unix://{sock}"]
residual_cache_mb = 64

[models]
fn = "pytorch2jax_server.examples:scale_shift"

[models.wide]
target = "pytorch2jax_server.examples:MLP"
kwargs = {{ in_features = 3, hidden = 5 }}
"""
    )
    with start_worker("--config", str(config), models={}, listen=[]) as w:
        assert w.addresses == [f"unix://{sock}"]
        with pytorch2jax.connect(w.unix) as client:
            infos = {m.name: m for m in client.list_models()}
            assert infos["fn"].kind == "function"
            assert infos["wide"].kind == "module"
            assert infos["wide"].parameters["net.0.weight"].shape == (5, 3)


def test_unix_socket_is_private_and_removed_on_sigterm(tmp_path):
    sock = tmp_path / "w.sock"
    with start_worker(models={"fn": "pytorch2jax_server.examples:scale_shift"}, listen=[f"unix://{sock}"]) as w:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        w.process.send_signal(signal.SIGTERM)
        assert w.process.wait(timeout=30) == 0
        assert not sock.exists()


def test_health_and_reflection(worker):
    with grpc.insecure_channel(worker.tcp) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pytorch2jax.bridge.v1.Bridge"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert {"pytorch2jax.bridge.v1.Bridge", "grpc.health.v1.Health"} <= names


def test_port_zero_prints_the_bound_port(worker):
    host, port = worker.tcp.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0


def test_a_busy_tcp_port_is_refused_with_a_fix(worker):
    """gRPC's SO_REUSEPORT would let a second worker share the port and split clients
    between the two at random; it is off, so the second one stops with a fix."""
    result = _run_cli("--listen", worker.tcp, "--model", "mlp=pytorch2jax_server.examples:mlp()")
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on {worker.tcp}: the port is in use" in result.stderr
    assert "port 0 for any free one" in result.stderr
    with pytorch2jax.connect(worker.tcp) as client:  # the first worker still serves alone
        assert "gpt2" in {m.name for m in client.list_models()}


def test_help_documents_every_option_with_its_default():
    result = _run_cli("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for option in (
        "--residual-cache-mb RESIDUAL_CACHE_MB autograd state",
        "--residual-cache-entries RESIDUAL_CACHE_ENTRIES forwards whose",
        "--residual-ttl SECONDS how long",
        "--log-level {DEBUG,INFO,WARNING,ERROR} what the worker logs",
    ):
        assert option in text, option
    for default in (
        "(default: 2048; env PYTORCH2JAX_RESIDUAL_CACHE_MB)",
        "(default: 1024; env PYTORCH2JAX_RESIDUAL_CACHE_ENTRIES)",
        "(default: 120; env PYTORCH2JAX_RESIDUAL_TTL)",
        "(at most 2047); larger requests get RESOURCE_EXHAUSTED (default: 1024;",
        "(default: 8192; env PYTORCH2JAX_SHARED_MEMORY_MB)",
    ):
        assert default in text, default


def test_metrics_listen_is_documented_and_a_bad_address_is_refused(tmp_path):
    text = " ".join(_run_cli("--help").stdout.split())
    assert "--metrics-listen HOST:PORT serve Prometheus metrics over HTTP" in text
    assert "(default: off; env PYTORCH2JAX_METRICS_LISTEN)" in text
    fix = "'nonsense' is not HOST:PORT; e.g. 127.0.0.1:9464, or 127.0.0.1:0 for any free port"
    model = ("--model", "f=pytorch2jax_server.examples:double")
    result = _run_cli(*model, "--metrics-listen", "nonsense")
    assert result.returncode == 2
    assert f"argument --metrics-listen: {fix}" in result.stderr, result.stderr
    from_env = subprocess.run(
        [sys.executable, "-m", "pytorch2jax_server", *model],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTORCH2JAX_METRICS_LISTEN": "nonsense"},
    )
    assert from_env.returncode == 2
    assert f"PYTORCH2JAX_METRICS_LISTEN='nonsense': {fix}" in from_env.stderr, from_env.stderr
    config = tmp_path / "worker.toml"
    config.write_text('[server]\nmetrics_listen = "nonsense"\n[models]\nf = "pytorch2jax_server.examples:double"\n')
    result = _run_cli("--config", str(config))
    assert result.returncode == 2
    assert f"[server] metrics_listen: {fix}" in result.stderr, result.stderr


def test_every_setting_is_declared_once_and_reaches_all_three_places(tmp_path):
    """Each setting of _settings.SETTINGS is an option, an environment variable and a
    [server] key, and --help states its default; the environment wins over the file and
    loses to the command line."""
    from pytorch2jax_server._settings import SETTINGS

    text = " ".join(_run_cli("--help").stdout.split())
    for s in SETTINGS:
        assert s.flag in text and f"env {s.env})" in text, s.name
    config = tmp_path / "worker.toml"
    config.write_text(
        '[server]\nmax_workers = 3\nmax_sessions = 5\nresidual_ttl = 7.5\n'
        '[models]\nf = "pytorch2jax_server.examples:double"\n'
    )
    import argparse

    from pytorch2jax_server._cli import _parser
    from pytorch2jax_server._settings import resolve

    args = _parser().parse_args(["--config", str(config), "--max-workers", "2"])
    settings = resolve(args, {"max_workers": 3, "max_sessions": 5, "residual_ttl": 7.5}, {"PYTORCH2JAX_MAX_SESSIONS": "4"})
    assert (settings["max_workers"], settings["max_sessions"], settings["residual_ttl"]) == (2, 4, 7.5)
    assert settings["listen"] == ["localhost:50051"] and settings["log_level"] == "WARNING"
    assert isinstance(args, argparse.Namespace)
    bad = subprocess.run(
        [sys.executable, "-m", "pytorch2jax_server", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTORCH2JAX_MAX_WORKERS": "zero"},
    )
    assert bad.returncode == 2
    assert "PYTORCH2JAX_MAX_WORKERS='zero': must be an integer; got 'zero'" in bad.stderr
