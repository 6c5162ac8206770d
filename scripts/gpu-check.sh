#!/usr/bin/env bash
# Issue 18's one-shot check of the GPU path, for a machine with an NVIDIA GPU, CUDA torch
# and a CUDA JAX already installed, and no package index (CI never runs it: it has no GPU).
#
#   bash scripts/gpu-check.sh wheels [DIR]          here, where pip reaches an index: the
#       wheels such a machine lacks, for its Python (GPU_PYTHON_VERSION, default 3.12),
#       into DIR (default .whl, which git ignores); carry DIR to the machine
#   bash scripts/gpu-check.sh run OUT [--dry-run]   there: installs the project with
#       --no-deps over the machine's torch and JAX plus the wheels (WHEELS, default .whl),
#       prints the versions and nvidia-smi, runs the GPU-marked tests, the model-equivalence
#       suite with the shared worker on the GPU (over cuda_ipc, shm, the fast lane and
#       inline) and in process, and the benchmark's GPU rows; writes to OUT: env.txt,
#       install.log, gpu-tests.log, models.log, bench.log, more-tests.log, figures.json
#       (the benchmark's rows) and summary.json (each step's exit status and time)
#
# --dry-run tries it all where there is no GPU (with this repository's .venv:
# PYTHON=.venv/bin/python): the GPU tests then skip, the models suite runs over the CPU's
# transports, and the GPU rows run on the CPU (shared memory for CUDA IPC). One run keeps
# within GPU_CHECK_BUDGET_S (default 450 s): each step gets what is left of it, so that a fix
# and a second run fit in a GPU machine's 15 minutes. GPU_CHECK_STEPS (e.g. "install
# models") runs only the steps it names; tests/test_gpu_check.py runs a short dry run so.
set -uo pipefail
cd "$(dirname "$0")/.."

wheels() {
    local dir="${1:-.whl}" version="${GPU_PYTHON_VERSION:-3.12}"
    mkdir -p "$dir"
    # What the GPU image lacks or holds older than the generated stubs need (grpcio >= 1.85.1,
    # protobuf >= 7.35): the versions constraints.txt pins.
    local pins=()
    for name in grpcio grpcio-health-checking grpcio-reflection protobuf; do
        pins+=("$(grep -iE "^${name}==" constraints.txt)")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "${pins[@]}"
    ls -1 "$dir"
}

run() {
    local out="${1:?usage: gpu-check.sh run OUT [--dry-run]}" dry=""
    [ "${2:-}" = "--dry-run" ] && dry=1
    local py="${PYTHON:-python3}" wheels_dir="${WHEELS:-.whl}" budget="${GPU_CHECK_BUDGET_S:-450}"
    local start=$SECONDS steps
    mkdir -p "$out"
    out="$(cd "$out" && pwd)"
    steps="$(mktemp)"
    export PYTHONUNBUFFERED=1
    # The worker's torch and the client's JAX share the GPU: JAX takes memory as it needs it.
    export XLA_PYTHON_CLIENT_PREALLOCATE=false

    left() { echo $((budget - (SECONDS - start))); }
    step() {  # step NAME LOG CAP command...: runs it for at most CAP s (and what is left)
        local name="$1" log="$2" cap="$3" t0=$SECONDS limit rc
        shift 3
        if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then
            return  # not chosen
        fi
        limit=$(left)
        [ "$cap" -lt "$limit" ] && limit=$cap
        if [ "$limit" -le 10 ]; then
            echo "gpu-check: $name: skipped, the budget is spent" | tee -a "$out/$log"
            printf '%s\t%s\t%s\n' "$name" skipped 0 >>"$steps"
            return
        fi
        echo "gpu-check: $name (at most $limit s) ..."
        timeout -k 10 "$limit" "$@" >>"$out/$log" 2>&1
        rc=$?
        printf '%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) >>"$steps"
        echo "gpu-check: $name: exit $rc in $((SECONDS - t0)) s; $(tail -n 1 "$out/$log")"
    }

    # The project over the machine's torch and JAX, with the wheels it lacks, in a folder of
    # its own on PYTHONPATH: nothing of the machine's environment changes.
    local site
    site="$(mktemp -d /tmp/p2j-site.XXXXXX)"
    # shellcheck disable=SC2016 # expanded by that bash
    step install install.log 60 bash -c '
        py="$1" wheels="$2" site="$3"
        if compgen -G "$wheels/*.whl" >/dev/null; then
            "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --target "$site" "$wheels"/*.whl || exit
        fi
        # No index, so no isolated build: the setuptools installed there builds it.
        "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
            --target "$site" . || exit
        rm -rf build  # what setuptools leaves in the checkout
        echo "installed into $site"' install "$py" "$wheels_dir" "$site"
    export PYTHONPATH="$site"
    if ! "$py" -c "import pytorch2jax, pytorch2jax_server" 2>/dev/null; then
        # The build failed (install.log says why): the sources themselves, so the rest runs.
        export PYTHONPATH="$site:$PWD/client:$PWD/server:$PWD/protos"
        echo "gpu-check: the project did not install; running from the sources" | tee -a "$out/install.log"
    fi

    {
        echo "date: $(date -u +%FT%TZ)"
        echo "python: $("$py" --version 2>&1) at $(command -v "$py")"
        "$py" - <<'EOF'
import importlib.metadata as md
for name in ("torch", "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "cuda-bindings",
             "numpy", "grpcio", "protobuf", "flax", "optax", "pytest", "hypothesis", "pytorch2jax"):
    try:
        print(f"{name}: {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
import jax, torch
import pytorch2jax
from pytorch2jax_protocol import cuda
print("pytorch2jax imported from:", pytorch2jax.__file__)
print("jax backend:", jax.default_backend(), jax.devices())
print("torch cuda:", torch.version.cuda, torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("cuda-bindings usable:", cuda.available())
EOF
        echo
        command -v nvidia-smi >/dev/null && nvidia-smi || echo "no nvidia-smi"
    } >"$out/env.txt" 2>&1
    cat "$out/env.txt"

    local gpu=1
    "$py" -c "import jax, torch; assert jax.default_backend() == 'gpu' and torch.cuda.is_available()" \
        2>/dev/null || gpu=""
    if [ -z "$gpu" ] && [ -z "$dry" ]; then
        echo "gpu-check: no GPU that both torch and JAX see (env.txt says why); nothing more to run"
        printf '%s\t%s\t%s\n' gpu-visible 1 0 >>"$steps"
    else
        # A line per test (a step cut short still shows how far it got), and no test may
        # hang for longer than a minute.
        # The tests compare with float32 references: no TF32 in cuBLAS and cuDNN (NVIDIA's
        # switch for both libraries); the benchmark keeps the defaults users get.
        local pytest=(env NVIDIA_TF32_OVERRIDE=0
            "$py" -m pytest -v -rfEs -p no:cacheprovider --timeout 60 --durations 10)
        step gpu-tests gpu-tests.log 90 "${pytest[@]}" -m gpu tests
        step models models.log 150 "${pytest[@]}" tests/test_models.py
        local bench=("$py" benchmarks/data_planes.py --sections gpu --json "$out/figures.json")
        if [ -n "$dry" ]; then
            bench+=(--gpu-dry-run --calls 50 --steps 5)
        else
            bench+=(--calls 300 --steps 20)
        fi
        step bench bench.log 150 "${bench[@]}"
        # With what time is left: the transforms, state and randomness suites, over CUDA IPC
        # too (a line per test: a cut-short step still shows how far it got).
        step more-tests more-tests.log 150 "${pytest[@]}" tests/test_cuda_ipc.py \
            tests/test_transforms.py tests/test_state.py tests/test_randomness.py
    fi

    "$py" - "$steps" "$out/summary.json" "$((SECONDS - start))" "${dry:+dry-run}" <<'EOF'
import json, sys
steps_file, path, seconds, mode = sys.argv[1:5]
steps = []
for line in open(steps_file):
    name, rc, s = line.rstrip("\n").split("\t")
    steps.append({"step": name, "exit": rc if rc == "skipped" else int(rc), "seconds": int(s)})
ok = all(s["exit"] == 0 for s in steps)
json.dump({"mode": mode or "gpu", "seconds": int(seconds), "ok": ok, "steps": steps},
          open(path, "w"), indent=1)
print(json.dumps({"ok": ok, "seconds": int(seconds), "steps": steps}))
sys.exit(0 if ok else 1)
EOF
    local rc=$?
    rm -f "$steps"
    rm -rf "$site"
    return $rc
}

case "${1:-}" in
    wheels) shift; wheels "$@" ;;
    run) shift; run "$@" ;;
    *) sed -n '2,20p' "$0"; exit 2 ;;
esac
