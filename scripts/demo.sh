#!/usr/bin/env bash
# The main job: sets up .venv, starts a PyTorch worker serving an example MLP on a unix
# socket, trains it from JAX + optax through the worker (examples/train_remote.py), then
# stops the worker. Extra arguments go to the training script, e.g. `--steps 500`.
set -euo pipefail
cd "$(dirname "$0")/.."
# Piped (| tee, CI logs), Python would buffer its lines until the end.
export PYTHONUNBUFFERED=1
bash scripts/setup.sh

run_dir="$(mktemp -d -t pytorch2jax-demo-XXXXXX)"
socket="unix://$run_dir/worker.sock"
.venv/bin/pytorch2jax-server --listen "$socket" \
    --model "mlp=pytorch2jax_server.examples:mlp()" >"$run_dir/worker.out" 2>"$run_dir/worker.err" &
worker_pid=$!
stop_worker() {
    kill -TERM "$worker_pid" 2>/dev/null && wait "$worker_pid" 2>/dev/null || true
    rm -rf "$run_dir"
}
trap stop_worker EXIT

for _ in $(seq 1 600); do  # up to 60 s: the worker prints its address once it serves
    grep -q "listening on" "$run_dir/worker.out" 2>/dev/null && break
    if ! kill -0 "$worker_pid" 2>/dev/null; then
        cat "$run_dir/worker.err" >&2
        exit 1
    fi
    sleep 0.1
done
echo "worker: $(cat "$run_dir/worker.out")"
.venv/bin/python examples/train_remote.py --target "$socket" "$@"
