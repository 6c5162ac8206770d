"""``benchmarks/load.py``: many client processes at once on one worker, every result right.

The script starts its own worker and clients (a third each over the fast lane and shared
memory over the unix socket, and inline over TCP, eager and ``jit`` forwards and VJPs on
two models) and exits 0 only
if no call failed, the worker's RSS stayed within 10% over the measured run, the worker
holds no residual after the last VJP and no session once the clients closed, and no
segment was left in /dev/shm.

The test runs the script's default, 16 clients x 500 calls: 47-66 s on a 2-core machine,
20-30 s of it 16 JAX processes starting and warming up.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"
CLIENTS, CALLS = 16, 500
#: The script's own bound, past which it stops everything and fails; the test waits a
#: little longer, to see it do so.
SCRIPT_TIMEOUT_S = 400
WAIT_S = SCRIPT_TIMEOUT_S + 60


@pytest.mark.slow
def test_load_has_no_errors(capsys):
    cmd = [sys.executable, str(SCRIPT), "--clients", str(CLIENTS), "--calls", str(CALLS),
           "--timeout", str(SCRIPT_TIMEOUT_S)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script then stops its worker and clients
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"benchmarks/load.py ran past {WAIT_S} s:\n{out}")
    assert proc.returncode == 0, out
    assert re.search(r"^errors: 0$", out, re.MULTILINE), out
    assert f"calls: {CLIENTS * CALLS} " in out, out
    with capsys.disabled():  # the table, in the suite's output
        print("\n" + out.rstrip())
