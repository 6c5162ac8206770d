"""The deployment as users run it, without Docker: a torch-only environment for the worker
(``pip install .[server]``) and a JAX-only one for the trainer (``pip install .[client]``),
each started with its docker-compose service's own command and environment, and the
compose files and Dockerfiles checked by the tools CI has.

The environments live in ``.test-envs/`` and are rebuilt when pyproject.toml or
constraints.txt change; pip's cache (filled by scripts/setup.sh) makes a build take well
under a minute. Each run reinstalls the project itself from a freshly built wheel.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
ENVS = REPO / ".test-envs"
CI = bool(os.environ.get("CI"))


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{shlex.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}"
    return result


# -- the two environments ---------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(REPO)], timeout=300)
    (built,) = out.glob("pytorch2jax-*.whl")
    return built


def _environment(name: str, extra: str, wheel: Path) -> Path:
    """A virtual environment with only ``pytorch2jax[extra]`` and what it needs."""
    venv = ENVS / name
    key = hashlib.sha256(
        extra.encode() + (REPO / "pyproject.toml").read_bytes() + (REPO / "constraints.txt").read_bytes()
    ).hexdigest()
    stamp = venv / "pytorch2jax-key"
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-c", str(REPO / "constraints.txt")]
    if not stamp.exists() or stamp.read_text() != key:
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
        _run([*pip, f"{wheel}[{extra}]"], timeout=1200)
        stamp.write_text(key)
    else:  # the dependencies are in place: only this checkout's code is new
        _run([*pip, "--no-deps", "--force-reinstall", str(wheel)], timeout=300)
    return venv


@pytest.fixture(scope="module")
def worker_env(wheel) -> Path:
    return _environment("worker", "server", wheel)


@pytest.fixture(scope="module")
def client_env(wheel) -> Path:
    return _environment("client", "client", wheel)


def _imports(venv: Path, module: str) -> bool:
    code = f"import {module}"
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True).returncode == 0


def test_environments_are_separate(worker_env, client_env):
    assert _imports(worker_env, "torch") and _imports(worker_env, "pytorch2jax_server")
    assert not _imports(worker_env, "jax"), "the worker's environment has jax"
    assert _imports(client_env, "jax") and _imports(client_env, "pytorch2jax")
    assert not _imports(client_env, "torch"), "the client's environment has torch"


def test_torch_apis_in_the_client_environment_say_what_to_install(client_env):
    """The wheel installs the in-process API and the worker's command in the client's
    environment too; without torch they say where torch goes, not ModuleNotFoundError."""
    python = str(client_env / "bin" / "python")
    code = (
        "import pytorch2jax\n"
        "for call in (lambda: pytorch2jax.py_to_jax_wrapper(abs), "
        "lambda: pytorch2jax.convert_pytnn_to_jax(None)):\n"
        "    try:\n        call()\n"
        "    except ModuleNotFoundError as e:\n        print(e.name, '|', e)\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stderr
    for line in lines:
        assert line.startswith("torch |") and "pytorch2jax[server]" in line and "connect()" in line
    server = subprocess.run(
        [str(client_env / "bin" / "pytorch2jax-server"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert server.returncode == 2
    assert "this environment has no torch" in server.stderr and "Traceback" not in server.stderr


# -- the compose services, run in those environments -------------------------------------


def _compose() -> dict:
    with open(DOCKER / "docker-compose.yml") as f:
        return yaml.safe_load(f)


_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}`` and ``${VAR:-default}``, from ``env``."""
    return _VARIABLE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def _dockerfile_env_and_copies(dockerfile: Path) -> tuple[dict[str, str], dict[str, Path]]:
    """The image's ENV, and where its absolute COPY destinations come from in the repo."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    env: dict[str, str] = {}
    copies: dict[str, Path] = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "ENV":
            env.update(w.split("=", 1) for w in words[1:])
        elif words[0] == "COPY" and words[-1].startswith("/"):
            copies[words[-1]] = REPO / words[1]
    return env, copies


class _Service:
    """A compose service as a process here: its paths mapped to folders of this machine."""

    def __init__(self, name: str, venv: Path, volumes: dict[str, Path], host_env: dict[str, str]):
        spec = _compose()["services"][name]
        image_env, copies = _dockerfile_env_and_copies(REPO / spec["build"]["dockerfile"])
        self.paths: dict[str, Path] = dict(copies)
        for entry in spec.get("volumes", []):
            source, target = entry.split(":")[:2]
            self.paths[target] = (DOCKER / source).resolve() if source.startswith(".") else volumes[source]
        env = {k: self._map(v) for k, v in image_env.items()}
        for key, value in spec.get("environment", {}).items():
            env[key] = self._map(_interpolate(str(value), host_env))
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PYTORCH2JAX_")},
            **{k: v for k, v in env.items() if v},
            "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        }
        self.command = [self._map(c) for c in spec["command"]]
        test = spec.get("healthcheck", {}).get("test")
        self.healthcheck = [self._map(c) for c in test[1:]] if test else None
        self.python = venv / "bin" / "python"

    def _map(self, value: str) -> str:
        for container, host in sorted(self.paths.items(), key=lambda kv: -len(kv[0])):
            value = value.replace(container, str(host))
        return value

    def resolve(self, command: list[str]) -> list[str]:
        exe = shutil.which(command[0], path=self.env["PATH"])
        assert exe, f"{command[0]} is not installed in this service's environment"
        return [exe, *command[1:]]


@pytest.fixture
def volumes(tmp_path) -> dict[str, Path]:
    paths = {}
    for name in _compose().get("volumes", {}):
        paths[name] = tmp_path / f"volume-{name}"
        paths[name].mkdir()
    return paths


@pytest.mark.parametrize("token", [None, "a-token-from-the-environment"])
def test_compose_services_train_in_separate_environments(
    worker_env, client_env, volumes, token, tmp_path
):
    host_env = {"PYTORCH2JAX_TOKEN": token} if token else {}
    worker = _Service("worker", worker_env, volumes, host_env)
    trainer = _Service("trainer", client_env, volumes, host_env)
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            worker.resolve(worker.command), env=worker.env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        # depends_on: service_healthy, by the service's own healthcheck command.
        deadline = time.monotonic() + 120
        while True:
            probe = subprocess.run(
                worker.resolve(worker.healthcheck), env=worker.env, capture_output=True, text=True
            )
            if probe.returncode == 0:
                break
            assert process.poll() is None, f"the worker exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the worker never became healthy: {probe.stderr}"
            time.sleep(0.5)
        result = subprocess.run(
            trainer.resolve(trainer.command), env=trainer.env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"the trainer failed:\n{result.stdout}\n{result.stderr}"
        assert re.search(r"\((shm|lane)\)", result.stdout), result.stdout  # zero-copy across the environments
        assert re.search(r"check: .*: ok", result.stdout), result.stdout
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert process.returncode == 0, log.read_text()


# -- the files Docker would read ---------------------------------------------------------


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        if CI:
            pytest.fail(f"{name} is needed in CI (scripts/test.sh installs it)")
        pytest.skip(f"{name} is not installed")
    return found


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]])
def test_compose_config_is_valid(files):
    cmd = [_tool("docker-compose")]
    for f in files:
        cmd += ["-f", str(DOCKER / f)]
    config = yaml.safe_load(_run([*cmd, "config"], timeout=120).stdout)
    services = config["services"]
    assert services["trainer"]["depends_on"]["worker"]["condition"] == "service_healthy"
    assert services["trainer"]["ipc"] == "service:worker"
    if "docker-compose.gpu.yml" in files:
        assert services["trainer"]["pid"] == "service:worker"
        assert services["worker"]["environment"]["PYTORCH2JAX_DEVICE"] == "cuda"


def test_dockerfiles_lint_clean():
    dockerfiles = sorted(DOCKER.glob("*.Dockerfile"))
    assert len(dockerfiles) == 2
    _run([_tool("hadolint"), *map(str, dockerfiles)], timeout=120)


def test_kubernetes_sketch_is_consistent():
    """The manifest parses, probes with our health command, and its Service is headless
    (what a dns:/// pool target needs)."""
    with open(DOCKER / "kubernetes.yaml") as f:
        docs = {d["kind"]: d for d in yaml.safe_load_all(f)}
    assert docs["Service"]["spec"]["clusterIP"] == "None"
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["exec"]["command"][0] == "pytorch2jax-health"
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["PYTORCH2JAX_TLS_CERT"].startswith(mounts["secrets"])
    assert env["PYTORCH2JAX_CONFIG"].startswith(mounts["models"])
    config = docs["ConfigMap"]["data"]["worker.toml"]
    assert "[models]" in config
