"""The set-up scripts on a fresh machine: torch's CPU build without a GPU (from the
PyTorch CPU index, or the package index with a message where that index is out of
reach), a line per step, and the demo's lines as they happen when piped."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _torch_source(tmp_path: Path, *, gpu: bool | None, index: str) -> subprocess.CompletedProcess:
    """scripts/torch-source.sh with a fake nvidia-smi (listing a GPU, or failing as it does
    on a machine without a driver) first on PATH, or with none at all (gpu=None)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = os.environ["PATH"]
    if gpu is not None:
        fake = bin_dir / "nvidia-smi"
        body = 'echo "GPU 0: NVIDIA H200 (UUID: GPU-0)"' if gpu else "echo 'NVIDIA-SMI has failed' >&2; exit 9"
        fake.write_text(f"#!/bin/sh\n{body}\n")
        fake.chmod(0o755)
        path = f"{bin_dir}{os.pathsep}{path}"
    else:  # only directories without an nvidia-smi
        path = os.pathsep.join(d for d in path.split(os.pathsep) if not (Path(d) / "nvidia-smi").exists())
    env = {**os.environ, "PATH": path, "PYTORCH2JAX_TORCH_CPU_INDEX": index}
    env.pop("PYTORCH2JAX_TORCH_SOURCE", None)
    return subprocess.run(
        ["bash", str(REPO / "scripts/torch-source.sh")], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def cpu_index(tmp_path):
    """A stand-in for the PyTorch CPU index: an HTTP server with a torch/ page."""
    root = tmp_path / "index"
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "index.html").write_text("<a>torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl</a>")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(root))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_a_gpu_torch_comes_from_the_cpu_index(tmp_path, cpu_index):
    for gpu in (None, False):  # no nvidia-smi, or one that finds no GPU
        result = _torch_source(tmp_path, gpu=gpu, index=cpu_index)
        assert result.stdout.split() == ["cpu-index", cpu_index], result.stderr
        assert "no NVIDIA GPU; the CPU build" in result.stderr


def test_with_a_gpu_torch_comes_from_the_package_index(tmp_path, cpu_index):
    result = _torch_source(tmp_path, gpu=True, index=cpu_index)
    assert result.stdout.split() == ["package-index"]
    assert "an NVIDIA GPU is here" in result.stderr


def test_an_unreachable_cpu_index_falls_back_with_a_message(tmp_path):
    start = time.monotonic()
    result = _torch_source(tmp_path, gpu=None, index=f"http://127.0.0.1:{_closed_port()}/whl/cpu")
    assert result.stdout.split() == ["package-index"]
    assert "cannot be reached; torch from the package index instead" in result.stderr
    assert "PYTORCH2JAX_TORCH_CPU_INDEX" in result.stderr
    assert time.monotonic() - start < 15


def test_setup_says_what_it_does_and_skips_when_nothing_changed():
    # The suite runs after scripts/setup.sh (scripts/test.sh): the pins are installed.
    result = subprocess.run(
        ["bash", str(REPO / "scripts/setup.sh")], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("setup: ") for line in lines), result.stdout
    assert any("up to date" in line or "done in" in line for line in lines)


def test_the_demo_prints_as_it_goes_when_piped():
    """Piped, each line arrives when it is printed, not all at the end."""
    process = subprocess.Popen(
        ["bash", str(REPO / "scripts/demo.sh"), "--steps", "300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    arrivals = []
    assert process.stdout is not None
    with process.stdout:
        for line in process.stdout:
            arrivals.append((time.monotonic(), line.rstrip()))
    assert process.wait(timeout=600) == 0, "\n".join(line for _, line in arrivals)
    steps = [t for t, line in arrivals if line.startswith("step")]
    assert len(steps) >= 3, arrivals
    # The first training line came well before the last: not one burst at exit.
    assert steps[-1] - steps[0] > 0.5, arrivals
    assert any(line.startswith("setup: ") for _, line in arrivals)
