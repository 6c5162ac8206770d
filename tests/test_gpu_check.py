"""The prepared GPU check (``scripts/gpu-check.sh``, issue 18) and the benchmark's GPU rows,
run dry on the CPU, so that neither rots between the rare runs on a GPU machine."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_rows_run_dry_on_the_cpu_and_write_their_figures(tmp_path):
    figures = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/data_planes.py", "--sections", "gpu", "--gpu-dry-run",
         "--calls", "5", "--steps", "2", "--gpu-sizes-mb", "1", "--json", str(figures)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {r["row"]: r for r in json.loads(figures.read_text())["rows"]}
    head = "gpu (dry run on the CPU)"
    assert rows[f"{head} 1 MB: jit forward, shm"]["floor"] == f"{head} 1 MB: device-to-device copy, 2 x 1 MB"
    assert rows[f"{head} 1 MB: jit forward+VJP, shm"]["gb_per_s"] > 0
    step = rows[f"{head} train: JAX+optax step, shm"]
    assert step["target"]["want"] == "<= 1.3" and isinstance(step["target"]["met"], bool)
    assert f"{head} small: jit forward, in process" in rows
    assert "want <= 1.3x" in result.stdout  # the table prints each target beside its figure


def test_the_gpu_check_script_runs_dry_and_summarises_its_steps(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path / "none"),
           "GPU_CHECK_STEPS": "gpu-tests"}  # fmt: skip
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "run", str(out), "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dry-run" and summary["ok"]
    assert [s["step"] for s in summary["steps"]] == ["gpu-tests"]
    assert "jax backend:" in (out / "env.txt").read_text()
    assert "skipped" in (out / "gpu-tests.log").read_text()  # no GPU here: they skip


def test_the_gpu_check_says_how_to_use_it():
    result = subprocess.run(["bash", "scripts/gpu-check.sh"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "gpu-check.sh run OUT [--dry-run]" in result.stdout
