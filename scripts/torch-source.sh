#!/usr/bin/env bash
# Says where torch should come from on this machine, for scripts/setup.sh (and anyone
# installing by hand): prints one line, `cpu-index URL` or `package-index`, and why on
# stderr.
#
# PyPI's Linux torch is the CUDA build, several GB of nvidia-* packages, even at a pinned
# version. Without an NVIDIA GPU (no working `nvidia-smi`), the CPU build from the PyTorch
# CPU index is the one to want. Where that index cannot be reached (an offline mirror, a
# proxy that only passes the package index), the package index is used, with a message.
#
#   PYTORCH2JAX_TORCH_CPU_INDEX   the CPU index (default https://download.pytorch.org/whl/cpu)
#   PYTORCH2JAX_TORCH_SOURCE      force "cpu-index" or "package-index"
set -euo pipefail
index="${PYTORCH2JAX_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
python="${PYTHON:-python3}"

reachable() {  # the index answers within 5 s
    "$python" - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).close()
except Exception:
    sys.exit(1)
PY
}

case "${PYTORCH2JAX_TORCH_SOURCE:-}" in
    cpu-index) echo "cpu-index $index"; exit 0 ;;
    package-index) echo "package-index"; exit 0 ;;
    "") ;;
    *) echo "PYTORCH2JAX_TORCH_SOURCE must be cpu-index or package-index" >&2; exit 2 ;;
esac
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then
    echo "torch: an NVIDIA GPU is here; the package index's CUDA build" >&2
    echo "package-index"
elif reachable "$index"; then
    echo "torch: no NVIDIA GPU; the CPU build from $index" >&2
    echo "cpu-index $index"
else
    echo "torch: no NVIDIA GPU, but $index cannot be reached; torch from the package" \
        "index instead (there it is the CUDA build, several GB, unless a CPU wheel is in" \
        "pip's cache or a local index; set PYTORCH2JAX_TORCH_CPU_INDEX to a mirror)" >&2
    echo "package-index"
fi
