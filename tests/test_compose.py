"""The deployment in containers: ``docker/compose-test.sh`` builds both images of
docker/docker-compose.yml air-gapped, in a Docker engine of its own, runs the trainer's
gradient check against the worker over shared memory, then against two workers behind one
DNS name, stops the engine and puts the host back as it was. The test runs that script and
reads its lines; they also go to the terminal as they come, so CI's log shows each step
with its time.

The script needs root (it starts dockerd) and, where Docker is not installed, apt. Without
them the test skips, saying why; in CI (``CI`` set) it fails instead. With nothing cached (no
wheels, base image or image layers) it takes about 5 minutes on 2 cores, warm 1 to 2.
The compose override files are also checked by ``docker-compose config``, which needs no
engine.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
SCRIPT = DOCKER / "compose-test.sh"
CI = bool(os.environ.get("CI"))

#: The script's exit status when no Docker engine can be started here.
NO_ENGINE = 77
#: The script's own steps are bounded well inside this; past it, it is stopped (SIGTERM,
#: so that its trap still tears the engine down and restores the host).
SCRIPT_TIMEOUT_S = 40 * 60


def _cannot(why: str) -> None:
    if CI:
        pytest.fail(f"the compose test must run in CI, but {why}")
    pytest.skip(why)


def _command() -> list[str]:
    if os.geteuid() == 0:
        return ["bash", str(SCRIPT)]
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n", "--preserve-env=CI,PYTHON,PYTORCH2JAX_CACHE", "bash", str(SCRIPT)]
    _cannot("dockerd needs root, and this is neither root nor allowed sudo without a password")
    raise AssertionError  # not reached


def _run_script(capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The script's exit status and output, which is also printed as it comes."""
    with subprocess.Popen(
        _command(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        start_new_session=True,  # its own process group, which a timeout signals
    ) as process:

        def stop() -> None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

        timer = threading.Timer(SCRIPT_TIMEOUT_S, stop)
        timer.start()
        lines = []
        try:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line)
                with capsys.disabled():
                    print(line, end="", flush=True)
            process.wait()
        except BaseException:  # pytest-timeout, ^C: the script's trap still tears down
            stop()
            process.wait(timeout=300)
            raise
        finally:
            timer.cancel()
    return process.returncode, "".join(lines)


@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 600)
def test_compose_deployment_builds_air_gapped_and_trains(capsys):
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} is missing")
    returncode, out = _run_script(capsys)
    if returncode == NO_ENGINE:
        why = re.search(r"^compose-test: SKIP: (.*)$", out, re.M)
        _cannot(why.group(1) if why else f"docker/compose-test.sh exited {NO_ENGINE}:\n{out}")
    assert returncode == 0, f"docker/compose-test.sh exited {returncode}:\n{out}"

    assert re.search(r"^compose-test: building both images air-gapped .*: done in \d+ s$", out, re.M), out
    assert re.search(
        r"^compose-test: images built: pytorch2jax-worker:cpu \(\d+ MB\), pytorch2jax-trainer:cpu \(\d+ MB\)$",
        out,
        re.M,
    ), out

    # One worker over the unix socket, tensors in shared memory; gradients equal JAX's.
    shm, _, replicas = out.partition("compose-test: docker-compose up --scale worker=2")
    assert re.search(r"^  trainer: training 'mlp' served by unix://\S+ \(shm\)", shm, re.M), out
    assert re.search(r"^  trainer: check: .*: ok$", shm, re.M), out
    assert re.search(r"^compose-test: trainer check passed over shared memory", shm, re.M), out

    # Two workers behind dns:///worker:50051: the check passes and both answered calls.
    assert re.search(r"^  trainer: training 'mlp' served by dns:///worker:50051 \(inline\)", replicas, re.M), out
    assert re.search(r"^  trainer: check: .*: ok$", replicas, re.M), out
    spread = re.search(r"^compose-test: both replicas got calls: (.*); trainer check passed", replicas, re.M)
    assert spread, out
    calls = dict(entry.rsplit(" ", 1) for entry in spread.group(1).split(", "))
    assert len(calls) == 2 and all(int(n) > 0 for n in calls.values()), spread.group(1)

    # Torn down, and the host as it was (the script fails when it is not).
    assert re.search(r"^compose-test: host restored: ", out, re.M), out
    assert re.search(r"^compose-test: PASS in \d+ s$", out, re.M), out


# -- the override files, without an engine -----------------------------------------------


def _config(*files: str) -> dict:
    exe = shutil.which("docker-compose")
    if exe is None:
        _cannot("docker-compose is not installed (scripts/test.sh installs it in CI)")
    cmd = [exe]
    for name in files:
        cmd += ["-f", str(DOCKER / name)]
    result = subprocess.run([*cmd, "config"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def test_replicas_override_serves_one_pool_by_dns_name():
    services = _config("docker-compose.yml", "docker-compose.replicas.yml")
    worker, trainer = services["worker"], services["trainer"]
    assert worker["environment"]["PYTORCH2JAX_LISTEN"] == "0.0.0.0:50051"
    assert worker["healthcheck"]["test"] == ["CMD", "pytorch2jax-health", "localhost:50051"]
    assert "ports" not in worker and "container_name" not in worker  # so it can scale
    assert trainer["environment"]["PYTORCH2JAX_TARGET"] == "dns:///worker:50051"
    assert trainer["command"][-2:] == ["--min-workers", "2"] and "--check" in trainer["command"]
    assert trainer["depends_on"]["worker"]["condition"] == "service_healthy"


def test_airgap_override_builds_without_a_network_from_wheels():
    services = _config("docker-compose.yml", "docker-compose.airgap.yml")
    for service, wheels in [("worker", "worker"), ("trainer", "client")]:
        build = services[service]["build"]
        assert build["network"] == "none"
        assert build["args"]["PIP_NO_INDEX"] == "1"
        assert build["args"]["WHEELHOUSE"] == f"docker/wheelhouse/{wheels}"
    assert services["worker"]["build"]["args"]["TORCH_VARIANT"] == "cpu"
