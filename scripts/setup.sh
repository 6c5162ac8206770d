#!/usr/bin/env bash
# Creates .venv (once) and installs pytorch2jax into it, editable, with the worker, client,
# test and dev extras, every version pinned by constraints.txt. Safe to re-run: when the
# pins and pyproject.toml have not changed since the last set-up, it installs nothing.
# torch comes from where scripts/torch-source.sh says (the CPU build without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
pip=(.venv/bin/python -m pip --disable-pip-version-check)

step() {  # step "what" command...: one line before, one with its time after
    local what="$1" start=$SECONDS
    shift
    echo "setup: $what ..."
    "$@"
    echo "setup: $what: done in $((SECONDS - start)) s"
}

if [ ! -x .venv/bin/python ]; then
    step "creating .venv with $("$python" --version 2>&1)" "$python" -m venv .venv
fi
stamp=.venv/pytorch2jax-setup
key="$(cat constraints.txt pyproject.toml | "$python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
    echo "setup: .venv is up to date (constraints.txt and pyproject.toml unchanged)"
    exit 0
fi
torch_pin="$(grep -E '^torch==' constraints.txt)"
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    read -r source index <<<"$(PYTHON=.venv/bin/python bash scripts/torch-source.sh)"
    if [ "$source" = cpu-index ]; then
        # torch alone from the CPU index; its dependencies come with the rest, pinned.
        step "installing $torch_pin (CPU build) from $index" \
            "${pip[@]}" install --no-deps --index-url "$index" "$torch_pin"
    fi
fi
step "installing pytorch2jax (editable) with the server, client, test and dev extras" \
    "${pip[@]}" install --progress-bar off -q -c constraints.txt -e ".[server,client,test,dev]"
echo "$key" >"$stamp"
echo "setup: .venv ready: $(.venv/bin/python -c 'import torch, jax; print(f"torch {torch.__version__}, jax {jax.__version__}")')"
