#!/usr/bin/env bash
# Builds the CPU variant of the Docker image with podman and checks that it serves: the container
# runs with `-p 8080:80` and the demo model mounted at /data, answers /health, and answers a
# /generate request with the base model and with the demo adapter `answer-format`. Prints the time
# of each phase. Slow (minutes: the first build installs torch), so it is not part of `make test`.
#
#   scripts/check_image.sh               # base image, binaries, image build, run and check
#   scripts/check_image.sh --build-only  # stop after the image build (`make image`)
#
# No registry is needed: the base image is a Debian made here with debootstrap from Debian's
# mirror and imported into podman (kept, and reused when present); the Rust binaries are the
# host's release builds (built on the same Debian release, so their glibc matches the base's);
# torch and the shard's dependencies come from PyPI, through a pip cache that the build keeps.
#
# Environment (all optional):
#   IMAGE          the image to build (default localhost/lorax-cpu:latest)
#   DEBIAN_SUITE   the base's release (default: the host's, so that the host's binaries fit it)
#   DEBIAN_MIRROR  (default http://deb.debian.org/debian)
#   ROUTER_BIN, LAUNCHER_BIN   release binaries to use instead of `cargo build --release` here
#   HOST_PORT      the host port mapped to the container's port 80 (default 8080)
#   PODMAN_RUN_FLAGS  extra `podman run` flags, instead of the ones probed below
#   STARTUP_TIMEOUT   seconds to wait for /health (default 600)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD_ONLY=0
case "${1:-}" in
    --build-only) BUILD_ONLY=1 ;;
    "") ;;
    *) echo "usage: $0 [--build-only]" >&2; exit 2 ;;
esac

IMAGE=${IMAGE:-localhost/lorax-cpu:latest}
DEBIAN_SUITE=${DEBIAN_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=localhost/debian:$DEBIAN_SUITE
HOST_PORT=${HOST_PORT:-8080}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-600}
BIN_DIR=.cache/image/bin           # the one part of .cache/ in the build context (.dockerignore)
CONTAINER=lorax-check-$$
ROOTFS=""

log() { printf '\n==> %s\n' "$*"; }
die() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }
for tool in podman curl python3; do
    command -v "$tool" >/dev/null || die "$tool is needed (apt-get install $tool)"
done

# Phase times, printed at the end (also when a phase fails, up to that phase).
declare -a PHASES=()
SECONDS_AT=$(date +%s.%N)
phase_done() {
    local now; now=$(date +%s.%N)
    PHASES+=("$(awk -v a="$SECONDS_AT" -v b="$now" -v p="$1" 'BEGIN { printf "%-36s %7.1f s", p, b - a }')")
    SECONDS_AT=$now
}
summary() {
    [ ${#PHASES[@]} -gt 0 ] || return 0
    printf '\n%s\n' "---- times ----"
    printf '%s\n' "${PHASES[@]}"
}

cleanup() {
    local rc=$?
    if podman container exists "$CONTAINER" 2>/dev/null; then
        if [ $rc -ne 0 ]; then
            echo "---- container log (last 40 lines) ----"
            podman logs --tail 40 "$CONTAINER" 2>&1 || true
        fi
        podman rm -f -t 5 "$CONTAINER" >/dev/null 2>&1 || true
    fi
    [ -n "$ROOTFS" ] && rm -rf "$ROOTFS"
    summary
    exit $rc
}
trap cleanup EXIT

# ---- 1. The base image: Debian from its mirror, imported into podman -----------------------------
if podman image exists "$BASE"; then
    log "base image $BASE: present, reused"
    phase_done "base image (cached)"
else
    command -v debootstrap >/dev/null || die "debootstrap is needed (apt-get install debootstrap)"
    log "base image $BASE: debootstrap $DEBIAN_SUITE from $DEBIAN_MIRROR"
    # The root filesystem is a temporary folder outside the repository (about 200 MB); only the
    # imported image is kept.
    ROOTFS=$(mktemp -d /var/tmp/lorax-rootfs.XXXXXX)
    debootstrap --variant=minbase "$DEBIAN_SUITE" "$ROOTFS" "$DEBIAN_MIRROR"
    # The downloaded .debs and package lists are not needed in the image (the Dockerfile runs
    # apt-get update itself).
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    tar --numeric-owner -C "$ROOTFS" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE"
    rm -rf "$ROOTFS"; ROOTFS=""
    phase_done "base image (debootstrap + import)"
fi

# ---- 2. The Rust binaries, from the host ----------------------------------------------------------
mkdir -p "$BIN_DIR"
if [ -n "${ROUTER_BIN:-}" ] || [ -n "${LAUNCHER_BIN:-}" ]; then
    [ -x "${ROUTER_BIN:-}" ] && [ -x "${LAUNCHER_BIN:-}" ] \
        || die "ROUTER_BIN and LAUNCHER_BIN must both name executables"
    log "Rust binaries: $ROUTER_BIN, $LAUNCHER_BIN"
else
    command -v cargo >/dev/null || die "cargo is needed, or ROUTER_BIN and LAUNCHER_BIN"
    log "Rust binaries: cargo build --release (router, launcher)"
    cargo build --release --quiet --manifest-path router/Cargo.toml
    cargo build --release --quiet --locked --manifest-path launcher/Cargo.toml
    ROUTER_BIN=router/target/release/lorax-router
    LAUNCHER_BIN=launcher/target/release/lorax-launcher
fi
install -m 0755 "$ROUTER_BIN" "$BIN_DIR/lorax-router"
install -m 0755 "$LAUNCHER_BIN" "$BIN_DIR/lorax-launcher"
phase_done "Rust binaries"

# ---- 3. The image ---------------------------------------------------------------------------------
build_flags=(
    --build-arg "BASE_IMAGE=$BASE"
    --build-arg TORCH_INDEX_URL=          # plain PyPI (download.pytorch.org is out of reach)
    --build-arg RUST_BINARIES=rust-prebuilt
    --build-arg DEVICE=cpu              # compiler + CPU kernels, no triton
    # RUN steps in a chroot, on the host's network: no OCI runtime or container network is
    # needed to build (both can be restricted where the build runs, as they are on this machine).
    --isolation chroot --network host
)
# A host whose pip trusts an extra CA (a TLS-intercepting proxy) lends that bundle to the build's
# pip; it is mounted for the RUN steps only and is not part of any layer.
ca_bundle=${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-}}}
if [ -n "$ca_bundle" ] && [ -f "$ca_bundle" ]; then
    echo "pip in the build uses the host's CA bundle $ca_bundle"
    build_flags+=(--volume "$(readlink -f "$ca_bundle"):/run/build-ca.crt:ro"
                  --build-arg PIP_CERT=/run/build-ca.crt)
fi
log "podman build -t $IMAGE ${build_flags[*]} ."
podman build -t "$IMAGE" "${build_flags[@]}" .
phase_done "image build"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "image $IMAGE: $(( size / 1000000 )) MB"
if [ $BUILD_ONLY = 1 ]; then
    exit 0
fi

# ---- 4. Run it ------------------------------------------------------------------------------------
# `podman run` flags that work here. The defaults may not: crun refuses hybrid cgroup hierarchies
# (v1 controllers beside a v2 one holding a controller), and podman raises the container's
# RLIMIT_NOFILE/NPROC above what a root without CAP_SYS_RESOURCE may set. Each attempt is a
# container that runs `true`; the first that works is used, and every failure is shown as it is.
if [ -n "${PODMAN_RUN_FLAGS:-}" ]; then
    read -r -a run_flags <<<"$PODMAN_RUN_FLAGS"
else
    log "probing podman run flags"
    candidates=("")
    nofile=$(ulimit -Hn)
    for nproc in "$(ulimit -Hu)" 32768 4096; do
        limits="--ulimit nofile=$nofile:$nofile --ulimit nproc=$nproc:$nproc"
        candidates+=("$limits")
        if command -v runc >/dev/null; then candidates+=("--runtime runc $limits"); fi
    done
    found=0
    for flags in "${candidates[@]}"; do
        read -r -a run_flags <<<"$flags"
        if err=$(podman run --rm "${run_flags[@]}" "$BASE" true 2>&1); then
            found=1
            echo "podman run ${flags:-(no extra flags)}: works"
            break
        fi
        echo "podman run ${flags:-(no extra flags)}: $err"
    done
    [ $found = 1 ] || die "no way found to run a container here (errors above; where crun refuses the
cgroup layout, runc may work: apt-get install runc)"
fi

if curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$HOST_PORT/"; then
    die "something already listens on port $HOST_PORT (set HOST_PORT)"
fi
# The demo model is mounted read-only: the launcher serves a local directory that holds
# safetensors weights as it is (--model-id /data), and its adapters are local paths under /data.
log "podman run -p $HOST_PORT:80 -v $ROOT/models/demo:/data:ro $IMAGE --model-id /data"
podman run -d --name "$CONTAINER" "${run_flags[@]}" -p "$HOST_PORT:80" \
    -v "$ROOT/models/demo:/data:ro" "$IMAGE" --model-id /data >/dev/null
phase_done "container start (podman run)"

log "waiting for /health (at most ${STARTUP_TIMEOUT} s)"
deadline=$(( $(date +%s) + STARTUP_TIMEOUT ))
until curl -sf -o /dev/null --max-time 5 "http://127.0.0.1:$HOST_PORT/health"; do
    [ "$(podman inspect --format '{{.State.Running}}' "$CONTAINER")" = true ] \
        || die "the container exited before /health answered"
    [ "$(date +%s)" -lt "$deadline" ] || die "/health did not answer within $STARTUP_TIMEOUT s"
    sleep 1
done
phase_done "startup until /health answers"

# ---- 5. Ask it ------------------------------------------------------------------------------------
# Greedy decoding of the demo model: the base answers " 5", the answer-format adapter (a local
# adapter, addressed by its path inside the container) " Answer: 5." (README.md, docs/adapters.md).
generate() {  # $1: request body; prints generated_text, fails on an error status or another shape
    local body
    body=$(curl -sS --fail-with-body --max-time 120 "http://127.0.0.1:$HOST_PORT/generate" \
        -H 'content-type: application/json' -d "$1") || die "/generate failed: $body"
    python3 -c 'import json, sys; print(json.dumps(json.loads(sys.argv[1])["generated_text"]))' "$body" \
        || die "/generate answered without generated_text: $body"
}
check_answer() {  # $1: what, $2: expected (JSON string), $3: request body
    local got; got=$(generate "$3")
    echo "$1: $got"
    [ "$got" = "$2" ] || die "$1: expected $2, got $got"
}
log "POST /generate"
check_answer "base model" '" 5"' \
    '{"inputs": "Q: What is 2 + 3?\nA:", "parameters": {"max_new_tokens": 8}}'
phase_done "first answer (base model)"
check_answer "adapter answer-format" '" Answer: 5."' \
    '{"inputs": "Q: What is 2 + 3?\nA:", "parameters": {"max_new_tokens": 8,
      "adapter_id": "/data/adapters/answer-format", "adapter_source": "local"}}'
phase_done "answer with the adapter (loads it)"

# ---- 6. Stop it -----------------------------------------------------------------------------------
log "stopping the container"
podman stop -t 30 "$CONTAINER" >/dev/null
podman rm "$CONTAINER" >/dev/null
phase_done "stop"
echo
echo "OK: $IMAGE serves the demo model on port $HOST_PORT (base model and adapter answers checked)"
