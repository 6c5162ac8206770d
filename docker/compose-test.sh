#!/usr/bin/env bash
# Builds the images of docker/docker-compose.yml air-gapped and runs the deployment in a
# Docker engine of its own: what tests/test_compose.py runs in CI. As root:
#   bash docker/compose-test.sh
#
# Steps, each with a line before and one with its time after:
#   1. docker.io, docker-compose (and debootstrap, when it is needed) from apt if missing
#   2. dockerd with its own data root, exec root, pidfile and socket, in the background
#   3. a base image with Python 3.11: python:3.11-slim when Docker Hub answers, else
#      Debian bookworm made by debootstrap (kept as a tarball in the cache) and imported
#   4. wheels for Python 3.11 (pip download under constraints.txt; torch's CPU build),
#      kept in the cache until constraints.txt or pyproject.toml change
#   5. both images, by `docker-compose build` with docker-compose.airgap.yml: no network
#      in the build, pip --no-index from those wheels
#   6. `docker-compose up`: the trainer's gradient check and training, over shared memory
#   7. two workers as a TCP service by DNS name (docker-compose.replicas.yml): the
#      trainer's calls reach both, and the check passes
# Then, on failure too: compose down, dockerd stopped by its PID, and what dockerd changed
# on the host put back (iptables rules and chains, ip_forward, bridges, cgroups). A run
# killed before that is cleaned up by the next one, from the state it saved.
#
# Exit status: 0 passed, 1 failed, 77 no Docker engine can be started here (not root, no
# apt, dockerd does not come up), which tests/test_compose.py skips outside CI.
#
# Environment:
#   PYTORCH2JAX_CACHE            wheels and base tarball (default ~/.cache/pytorch2jax)
#   PYTORCH2JAX_DOCKER_ROOT      dockerd's data root, kept between runs for its images
#                                and build cache (default /var/lib/pytorch2jax-docker)
#   PYTORCH2JAX_BASE_IMAGE       a base image already in that engine, instead of step 3
#   PYTORCH2JAX_TORCH_CPU_INDEX  where torch's CPU wheel is looked for, besides pip's own
#                                configuration (default https://download.pytorch.org/whl/cpu)
#   PYTORCH2JAX_DEBIAN_MIRROR    debootstrap's mirror (default http://deb.debian.org/debian)
#   PYTHON                       the Python whose pip downloads the wheels
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON_VERSION=3.11  # the base image's Python, and so the wheels'
CACHE="${PYTORCH2JAX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pytorch2jax}"
DATA_ROOT="${PYTORCH2JAX_DOCKER_ROOT:-/var/lib/pytorch2jax-docker}"
EXEC_ROOT=/run/pytorch2jax-docker
PIDFILE=/run/pytorch2jax-docker.pid
SOCKET=/run/pytorch2jax-docker.sock
STATE=/run/pytorch2jax-docker.state  # the host as it was before dockerd started
TORCH_INDEX="${PYTORCH2JAX_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
MIRROR="${PYTORCH2JAX_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
OFFLINE_BASE=pytorch2jax-base:bookworm
PROJECT=pytorch2jax-compose-test
UP_TIMEOUT=600
# Every `timeout` here is --foreground: the command stays in this script's process group,
# so a signal to the group (the test's deadline, ^C) reaches it, and then the trap runs.

export DOCKER_HOST="unix://$SOCKET" DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
export DEBIAN_FRONTEND=noninteractive
unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH
START=$SECONDS
WORK=""
DOCKERD_PID=""
OUR_POLICY_RC=""

say() { echo "compose-test: $*"; }
fail() { say "FAIL: $*" >&2; exit 1; }
no_engine() { say "SKIP: no Docker engine can be started here: $*" >&2; exit 77; }

step() {  # step "what" command...: one line before, one with its time after
    local what="$1" start=$SECONDS rc=0
    shift
    say "$what ..."
    "$@" || rc=$?
    if [ "$rc" -ne 0 ]; then
        say "$what: failed after $((SECONDS - start)) s" >&2
        return "$rc"
    fi
    say "$what: done in $((SECONDS - start)) s"
}
# Functions run by step are in an `||` list, where bash ignores set -e: each of them says
# `|| return 1` (or `|| fail`) where a command must succeed.

# Debian's docker CLI, the engine's own version, before any other on PATH (set once
# docker.io is installed).
DOCKER_BIN=""
docker() { if [ -n "$DOCKER_BIN" ]; then "$DOCKER_BIN" "$@"; else command docker "$@"; fi; }
files_shm=(-f "$REPO/docker/docker-compose.yml")
files_replicas=(-f "$REPO/docker/docker-compose.yml" -f "$REPO/docker/docker-compose.replicas.yml")

# -- the host, before and after ------------------------------------------------------------

save_host() {
    mkdir -p "$STATE"
    local cmd table
    for cmd in iptables ip6tables; do
        command -v "$cmd" >/dev/null || continue
        for table in filter nat mangle raw; do
            "$cmd" -t "$table" -S >"$STATE/$cmd-$table" 2>/dev/null || rm -f "$STATE/$cmd-$table"
        done
    done
    sysctl -n net.ipv4.ip_forward >"$STATE/ip_forward"
    sysctl -n net.ipv6.conf.all.forwarding >"$STATE/ip6_forward" 2>/dev/null || true
    ip -o link show | awk -F': ' '{sub(/@.*/, "", $2); print $2}' >"$STATE/links"
    find /sys/fs/cgroup -maxdepth 3 -type d -name docker >"$STATE/cgroups" 2>/dev/null || true
}

restore_iptables() {  # undo, rule by rule, what was added to one table since save_host
    local cmd="$1" table="$2" before="$STATE/$1-$2" added line chain policy n=0
    added="$("$cmd" -t "$table" -S 2>/dev/null | grep -Fxv -f "$before")" || true
    # Rules, then the chains they jumped to, then the built-in chains' policies.
    while IFS= read -r line; do
        eval "$cmd -t $table -D ${line#-A }" && n=$((n + 1))
    done < <(grep '^-A ' <<<"$added" | tac)
    for chain in $(awk '$1 == "-N" {print $2}' <<<"$added"); do "$cmd" -t "$table" -F "$chain"; done
    for chain in $(awk '$1 == "-N" {print $2}' <<<"$added"); do
        "$cmd" -t "$table" -X "$chain" && RESTORED+=("$cmd -t $table chain $chain")
    done
    while read -r _ chain policy; do
        "$cmd" -t "$table" -P "$chain" "$policy" && RESTORED+=("$cmd -t $table -P $chain $policy")
    done < <(grep '^-P ' "$before" | grep -Fxv -f <("$cmd" -t "$table" -S | grep '^-P '))
    [ "$n" -eq 0 ] || RESTORED+=("$cmd -t $table: $n rules")
}

restore_host() {  # puts back what save_host saw; fails if the host still differs
    [ -d "$STATE" ] || return 0
    local file name dir value ok=0
    RESTORED=()
    for file in "$STATE"/iptables-* "$STATE"/ip6tables-*; do
        [ -f "$file" ] || continue
        name="$(basename "$file")"
        restore_iptables "${name%%-*}" "${name#*-}"
    done
    value="$(cat "$STATE/ip_forward")"
    if [ "$(sysctl -n net.ipv4.ip_forward)" != "$value" ]; then
        sysctl -qw net.ipv4.ip_forward="$value" && RESTORED+=("net.ipv4.ip_forward=$value")
    fi
    if [ -s "$STATE/ip6_forward" ] && [ "$(sysctl -n net.ipv6.conf.all.forwarding)" != "$(cat "$STATE/ip6_forward")" ]; then
        sysctl -qw net.ipv6.conf.all.forwarding="$(cat "$STATE/ip6_forward")" \
            && RESTORED+=("net.ipv6.conf.all.forwarding=$(cat "$STATE/ip6_forward")")
    fi
    # The links dockerd made: docker0, br-* of compose's networks, veths left by a crash.
    for name in $(ip -o link show | awk -F': ' '{sub(/@.*/, "", $2); print $2}'); do
        case "$name" in docker0 | br-* | veth*) ;; *) continue ;; esac
        grep -Fxq "$name" "$STATE/links" || { ip link delete "$name" && RESTORED+=("link $name"); }
    done
    # The cgroups dockerd made (cgroup v1: /sys/fs/cgroup/*/docker), once empty.
    for dir in $(find /sys/fs/cgroup -maxdepth 3 -type d -name docker 2>/dev/null); do
        grep -Fxq "$dir" "$STATE/cgroups" || { find "$dir" -depth -type d -exec rmdir {} + && RESTORED+=("cgroup $dir"); }
    done
    if [ ${#RESTORED[@]} -gt 0 ]; then
        say "undone what dockerd changed: $(printf '%s; ' "${RESTORED[@]}" | sed 's/; $//')"
    fi
    # Now exactly as before?
    for file in "$STATE"/iptables-* "$STATE"/ip6tables-*; do
        [ -f "$file" ] || continue
        name="$(basename "$file")"
        if ! diff <("${name%%-*}" -t "${name#*-}" -S) "$file" >/dev/null; then
            say "the host's ${name%%-*} -t ${name#*-} still differs from before:" >&2
            diff <("${name%%-*}" -t "${name#*-}" -S) "$file" >&2
            ok=1
        fi
    done
    [ "$(sysctl -n net.ipv4.ip_forward)" = "$(cat "$STATE/ip_forward")" ] || { say "net.ipv4.ip_forward still differs" >&2; ok=1; }
    diff <(ip -o link show | awk -F': ' '{sub(/@.*/, "", $2); print $2}') "$STATE/links" >/dev/null \
        || { say "the host's links differ from before: $(ip -o link show | awk -F': ' '{print $2}' | tr '\n' ' ')" >&2; ok=1; }
    [ "$ok" -eq 0 ] && rm -rf "$STATE"
    return "$ok"
}

unmount_under() {  # what is still mounted below $1, deepest first
    local path
    awk -v p="$1/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r | while read -r path; do
        umount -l "$path" 2>/dev/null || true
    done
}

stop_dockerd() {  # by its PID: ours, or one a killed run left (its pidfile)
    local pid="${1:-}" i
    [ -n "$pid" ] || { [ -f "$PIDFILE" ] && pid="$(cat "$PIDFILE")"; } || true
    if [ -n "$pid" ] && [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm")" = dockerd ]; then
        kill -TERM "$pid"
        for i in $(seq 60); do [ -d "/proc/$pid" ] || break; sleep 1; done
        [ -d "/proc/$pid" ] && { say "dockerd $pid did not stop in 60 s; killing it" >&2; kill -KILL "$pid"; sleep 1; }
    fi
    # Its containerd (managed, under our exec root) ends with it; a crash may leave it.
    for pid in $(pgrep -x containerd || true); do
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$EXEC_ROOT"; then
            kill -TERM "$pid"
        fi
    done
    unmount_under "$EXEC_ROOT"
    unmount_under "$DATA_ROOT"
    rm -rf "$PIDFILE" "$SOCKET" "$EXEC_ROOT"
}

cleanup() {
    local rc=$? start=$SECONDS
    trap - EXIT INT TERM
    set +e
    say "tearing down ..."
    if [ -n "$DOCKERD_PID" ] && [ -d "/proc/$DOCKERD_PID" ]; then
        timeout --foreground 180 docker-compose --ansi never -p "$PROJECT" "${files_replicas[@]}" down -v --remove-orphans -t 10 >/dev/null 2>&1
        timeout --foreground 120 "$DOCKER_BIN" image prune -f >/dev/null 2>&1  # images the builds replaced
    fi
    [ -n "$DOCKERD_PID" ] && stop_dockerd "$DOCKERD_PID"
    if [ ! -d "$STATE" ]; then
        :  # dockerd never started
    elif restore_host; then
        say "host restored: iptables, ip_forward and links as before dockerd started"
    else
        say "FAIL: the host could not be restored (above); $STATE keeps how it was" >&2
        [ "$rc" -ne 0 ] || rc=1
    fi
    [ -n "$OUR_POLICY_RC" ] && rm -f /usr/sbin/policy-rc.d
    if [ -n "$WORK" ]; then unmount_under "$WORK"; rm -rf "$WORK"; fi
    say "tearing down: done in $((SECONDS - start)) s"
    if [ "$rc" -eq 0 ]; then say "PASS in $((SECONDS - START)) s"; else say "exit status $rc after $((SECONDS - START)) s"; fi
    exit "$rc"
}

# -- the steps -------------------------------------------------------------------------

install_packages() {  # install_packages PACKAGE...: from apt, with no service started
    if [ ! -e /usr/sbin/policy-rc.d ]; then  # Debian's way to keep postinst from starting docker.service
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        OUR_POLICY_RC=1
    fi
    { apt-get install -y -q "$@" >"$WORK/apt.log" 2>&1 \
        || { apt-get update -q && apt-get install -y -q "$@"; } >>"$WORK/apt.log" 2>&1; } \
        || { tail -20 "$WORK/apt.log" >&2; return 1; }
    [ -n "$OUR_POLICY_RC" ] && rm -f /usr/sbin/policy-rc.d && OUR_POLICY_RC=""
    return 0
}

start_dockerd() {
    mkdir -p "$EXEC_ROOT" || return 1
    # Its own settings file, not the host's /etc/docker/daemon.json, and its identity key
    # in the data root, not /etc/docker/key.json.
    echo "{\"deprecated-key-path\": \"$DATA_ROOT/key.json\"}" >"$DATA_ROOT/daemon.json" || return 1
    # setsid: a signal to this script's process group (a test's timeout) leaves dockerd
    # to the trap, which stops it after compose down.
    setsid dockerd --config-file "$DATA_ROOT/daemon.json" --data-root "$DATA_ROOT" \
        --exec-root "$EXEC_ROOT" --pidfile "$PIDFILE" --host "unix://$SOCKET" --log-level warn \
        >"$WORK/dockerd.log" 2>&1 </dev/null 9<&- &  # 9: the lock, which must not outlive us
    DOCKERD_PID=$!
    local i
    for i in $(seq 120); do
        docker version >/dev/null 2>&1 && return 0
        [ -d "/proc/$DOCKERD_PID" ] || break
        sleep 0.5
    done
    tail -20 "$WORK/dockerd.log" >&2
    return 1
}

debootstrap_base() {  # Debian bookworm with Python, as a tarball in the cache
    local root="$WORK/rootfs"
    timeout --foreground 900 debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
        bookworm "$root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; return 1; }
    # This host's CA bundle: pip in images from this base reaches the package index
    # through a TLS proxy that re-signs (the air-gapped builds here need no index).
    [ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc "$root"/usr/share/man
    mkdir -p "$CACHE" && tar -C "$root" -cf "$CACHE/base-bookworm.tar.part" . \
        && mv "$CACHE/base-bookworm.tar.part" "$CACHE/base-bookworm.tar" || return 1
    rm -rf "$root"
}

choose_base() {
    if [ -n "${PYTORCH2JAX_BASE_IMAGE:-}" ]; then
        BASE="$PYTORCH2JAX_BASE_IMAGE"
        docker image inspect "$BASE" >/dev/null 2>&1 || fail "PYTORCH2JAX_BASE_IMAGE=$BASE is not in the engine"
        say "base image: $BASE (PYTORCH2JAX_BASE_IMAGE)"
    elif docker image inspect "python:$PYTHON_VERSION-slim" >/dev/null 2>&1 \
        || timeout --foreground 60 "$DOCKER_BIN" pull -q "python:$PYTHON_VERSION-slim" >/dev/null 2>&1; then
        BASE="python:$PYTHON_VERSION-slim"
        say "base image: $BASE (Docker Hub)"
    else
        BASE="$OFFLINE_BASE"
        if docker image inspect "$BASE" >/dev/null 2>&1; then
            say "base image: $BASE (Docker Hub cannot be reached; in the engine already)"
            return
        fi
        if [ ! -f "$CACHE/base-bookworm.tar" ]; then
            command -v debootstrap >/dev/null || step "installing debootstrap" install_packages debootstrap \
                || fail "could not install debootstrap"
            step "making Debian bookworm with debootstrap (Docker Hub cannot be reached)" debootstrap_base \
                || fail "debootstrap failed"
        fi
        docker import --change 'ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
            --change 'CMD ["/bin/bash"]' "$CACHE/base-bookworm.tar" "$BASE" >/dev/null \
            || fail "docker import of $CACHE/base-bookworm.tar failed"
        say "base image: $BASE (Docker Hub cannot be reached; imported from $CACHE/base-bookworm.tar)"
    fi
}

make_wheels() {  # $WHEELS/worker and $WHEELS/client, for Python $PYTHON_VERSION
    local python="${PYTHON:-}" torch_pin key
    [ -n "$python" ] || { [ -x "$REPO/.venv/bin/python" ] && python="$REPO/.venv/bin/python"; } || python=python3
    torch_pin="$(grep -E '^torch==' "$REPO/constraints.txt")"
    key="$(cat "$REPO/constraints.txt" "$REPO/pyproject.toml" <(echo "$PYTHON_VERSION $TORCH_INDEX") | sha256sum | cut -c1-64)"
    if [ "$(cat "$WHEELS/key" 2>/dev/null)" = "$key" ]; then
        say "wheels for Python $PYTHON_VERSION: up to date in $WHEELS"
        return
    fi
    local pip=("$python" -m pip download --quiet --disable-pip-version-check --progress-bar off
        --only-binary=:all: --python-version "$PYTHON_VERSION" -c "$REPO/constraints.txt")
    mkdir -p "$WHEELS/worker" "$WHEELS/client" || return 1
    # torch alone first, its CPU build: the CPU index's 2.13.0+cpu sorts above PyPI's
    # CUDA 2.13.0, and pip's own configuration may hold it too (a local index, a cache).
    step "downloading $torch_pin (CPU build) for the worker" \
        timeout --foreground 1200 "${pip[@]}" --no-deps --retries 1 --extra-index-url "$TORCH_INDEX" -d "$WHEELS/worker" "$torch_pin" \
        2> >(grep -v -e 'is ignored: it is neither' -e 'Retrying' >&2) || fail "pip could not download $torch_pin"
    # setuptools: the project's build backend, which pip installs into the build's
    # isolated environment from these wheels.
    step "downloading the worker's wheels (pytorch2jax[server])" \
        timeout --foreground 1200 "${pip[@]}" --find-links "$WHEELS/worker" -d "$WHEELS/worker" "setuptools>=68" "$REPO[server]" \
        2> >(grep -v 'is ignored: it is neither' >&2) || fail "pip could not download the worker's wheels"
    step "downloading the trainer's wheels (pytorch2jax[client])" \
        timeout --foreground 1200 "${pip[@]}" -d "$WHEELS/client" "setuptools>=68" "$REPO[client]" \
        2> >(grep -v 'is ignored: it is neither' >&2) || fail "pip could not download the trainer's wheels"
    ls "$WHEELS/worker" | grep -q '^torch-.*+cpu' \
        || say "warning: the worker's torch wheel is not a +cpu build: $(ls "$WHEELS/worker" | grep '^torch-')" >&2
    echo "$key" >"$WHEELS/key" || return 1
    say "wheels: worker $(du -sh "$WHEELS/worker" | cut -f1), trainer $(du -sh "$WHEELS/client" | cut -f1)"
}

stage_context() {  # only what the images need, and the wheels where the airgap file says
    CONTEXT="$WORK/context"
    mkdir -p "$CONTEXT"
    tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' --exclude=docker/wheelhouse --exclude=docker/secrets \
        -cf - pyproject.toml README.md constraints.txt protos server client examples docker | tar -C "$CONTEXT" -xf -
    mkdir -p "$CONTEXT/docker/wheelhouse"
    cp -al "$WHEELS/worker" "$WHEELS/client" "$CONTEXT/docker/wheelhouse/" 2>/dev/null \
        || cp -a "$WHEELS/worker" "$WHEELS/client" "$CONTEXT/docker/wheelhouse/"
}

build_images() {
    PYTORCH2JAX_BUILD_CONTEXT="$CONTEXT" PYTORCH2JAX_BASE_IMAGE="$BASE" \
        timeout --foreground 1800 docker-compose --ansi never -p "$PROJECT" "${files_shm[@]}" \
        -f "$REPO/docker/docker-compose.airgap.yml" build --parallel >"$WORK/build.log" 2>&1 \
        || { tail -60 "$WORK/build.log" >&2; return 1; }
}

image_line() {  # "name (size)" of an image the compose file names
    local name="$1" bytes
    bytes="$(docker image inspect -f '{{.Size}}' "$name")"
    echo "$name ($((bytes / 1000000)) MB)"
}

up() {  # up LOG WORKERS COMPOSE-FILE-ARGS...: the services until the trainer exits; its status
    local log="$1" workers="$2"
    shift 2
    timeout --foreground "$UP_TIMEOUT" docker-compose --ansi never -p "$PROJECT" "$@" up --no-build --no-color \
        --scale worker="$workers" --abort-on-container-exit --exit-code-from trainer >"$log" 2>&1
    local rc=$?
    # Every container's output, also of those `up` never attached to (an unhealthy worker).
    docker-compose --ansi never -p "$PROJECT" "$@" logs --no-color >"$log.services" 2>&1
    docker-compose --ansi never -p "$PROJECT" "$@" down -v --remove-orphans -t 10 >>"$log" 2>&1
    return "$rc"
}

check_up() {  # check_up NAME LOG RC: the trainer passed its check; its lines, or logs
    local name="$1" log="$2" rc="$3"
    if [ "$rc" -ne 0 ] || ! grep -Eq '^trainer[_-].*\| check: .*: ok' "$log"; then
        say "$name: the trainer failed (exit status $rc); docker-compose up said:" >&2
        tail -30 "$log" >&2
        say "$name: the services' output:" >&2
        tail -80 "$log.services" >&2
        return 1
    fi
    grep -E '^trainer[_-].*\| (training|check|done|calls per worker)' "$log" | sed 's/^[^|]*| /  trainer: /'
}

# -- main ----------------------------------------------------------------------------------

[ "$(id -u)" -eq 0 ] || no_engine "dockerd needs root (this is uid $(id -u))"
command -v flock >/dev/null || no_engine "flock (util-linux) is missing"
# One run at a time on this host: the lock is the data root (kept between runs anyway).
mkdir -p "$DATA_ROOT"
exec 9<"$DATA_ROOT"
if ! flock -n 9; then
    say "another compose-test run holds $DATA_ROOT; waiting for it"
    flock -w 2700 9 || fail "$DATA_ROOT still locked after 45 min"
fi
for dir in /tmp/pytorch2jax-compose-test.*; do  # a killed run's; none is in use now
    [ -d "$dir" ] && { unmount_under "$dir"; rm -rf "$dir"; }
done
WORK="$(mktemp -d /tmp/pytorch2jax-compose-test.XXXXXX)"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -d "$STATE" ]; then  # a run was killed before its teardown
    say "a killed run left dockerd's state; stopping it and restoring the host first"
    stop_dockerd
    restore_host
fi

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || no_engine "${missing[*]} missing, and no apt-get to install them"
    step "installing ${missing[*]} with apt" install_packages "${missing[@]}" \
        || no_engine "apt-get could not install ${missing[*]}"
fi
DOCKER_BIN="$(if [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else command -v docker; fi)"
say "engine: $(dockerd --version), $(docker-compose version --short 2>/dev/null | head -1 | sed 's/^/docker-compose /')"

save_host
step "starting dockerd (data root $DATA_ROOT, socket $SOCKET)" start_dockerd \
    || no_engine "dockerd did not come up (its log is above)"

step "choosing the base image" choose_base
WHEELS="$CACHE/wheelhouse-py$PYTHON_VERSION"
step "wheels for the air-gapped builds" make_wheels
stage_context
step "building both images air-gapped (no network, pip --no-index, base $BASE)" build_images \
    || fail "the images did not build"
say "images built: $(image_line pytorch2jax-worker:cpu), $(image_line pytorch2jax-trainer:cpu)"

start=$SECONDS
say "docker-compose up: worker and trainer over a unix socket and shared memory ..."
rc=0; up "$WORK/up-shm.log" 1 "${files_shm[@]}" || rc=$?
check_up "docker-compose up" "$WORK/up-shm.log" "$rc" || fail "the compose deployment did not train"
grep -q '(shm)' "$WORK/up-shm.log" || fail "the trainer did not use shared memory"
say "trainer check passed over shared memory: done in $((SECONDS - start)) s"

start=$SECONDS
say "docker-compose up --scale worker=2: the trainer on dns:///worker:50051 ..."
rc=0; PYTORCH2JAX_REPLICAS=2 up "$WORK/up-replicas.log" 2 "${files_replicas[@]}" || rc=$?
check_up "replicas" "$WORK/up-replicas.log" "$rc" || fail "the two-worker deployment did not train"
calls="$(grep -E '^trainer[_-].*\| calls per worker: ' "$WORK/up-replicas.log" | sed 's/.*calls per worker: //')"
[ "$(tr ',' '\n' <<<"$calls" | awk '$2 > 0' | wc -l)" -ge 2 ] || fail "calls did not reach both workers: $calls"
say "both replicas got calls: $calls; trainer check passed: done in $((SECONDS - start)) s"
