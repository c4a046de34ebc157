# syntax=docker/dockerfile:1
# LoRAX-compatible multi-LoRA inference server: `lorax-launcher` downloads the model, starts the
# Python shards (`lorax-server`) and the Rust HTTP router (`lorax-router`).
#
# GPU image (the default build args):
#   docker build -t lorax .        # podman: podman build --build-arg RUST_BINARIES=rust-builder ...
#   docker run --gpus all --shm-size 1g -p 8080:80 -v $PWD/data:/data \
#       -e HUGGING_FACE_HUB_TOKEN=$HUGGING_FACE_HUB_TOKEN lorax --model-id $MODEL_ID
#
# CPU image on a locally made Debian base, with Rust binaries built on the host (what
# scripts/check_image.sh builds and runs; see docs/docker.md):
#   podman build --isolation chroot --network host -t lorax-cpu \
#       --build-arg BASE_IMAGE=localhost/debian:bookworm --build-arg TORCH_INDEX_URL= \
#       --build-arg RUST_BINARIES=rust-prebuilt --build-arg DEVICE=cpu .
#
# Any launcher flag can follow the image name, or be set as its environment variable (-e PORT=...).
#
# Build arguments (all base images are arguments, so that a mirror or a locally made image can
# stand in for a registry):
#   BASE_IMAGE          the Python builder's and the runtime's base: a Debian or Ubuntu image
#                       (default: the CUDA runtime image)
#   RUST_BUILDER_IMAGE  the image the Rust binaries are compiled in, with rustup (default ubuntu:22.04)
#   RUST_BINARIES       where lorax-router and lorax-launcher come from: `rust-builder` (compiled
#                       here, needs sh.rustup.rs) or `rust-prebuilt` (taken from .cache/image/bin/
#                       in the build context; they must be built on the same Debian/Ubuntu release
#                       as BASE_IMAGE, or an older one, so that its glibc is new enough)
#   TORCH_INDEX_URL     pip index for torch (default: the CUDA 12.6 builds); empty: plain PyPI
#   DEVICE              `cuda` (default) or `cpu`. cpu: g++ and ninja in the image and the shard's
#                       CPU kernels compiled at build time (server/lorax_server/utils/cpu_extension.py:
#                       torch runs ninja again at each load, a no-op then, so the compiler stays;
#                       without it the shard logs a warning and uses its slower torch reference
#                       path), and no triton (1 GB; the shard uses it on CUDA GPUs only)
#   PIP_CERT            CA bundle for pip inside the build (a TLS-intercepting proxy; see below)

ARG BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu22.04
ARG RUST_BUILDER_IMAGE=ubuntu:22.04
ARG RUST_BINARIES=rust-builder

# ---- Rust, option 1: lorax-router and lorax-launcher compiled here, release builds -------------
# Built on the runtime's Ubuntu release so the binaries need no newer glibc than it has.
FROM ${RUST_BUILDER_IMAGE} AS rust-builder
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
ARG RUST_TOOLCHAIN=stable
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain ${RUST_TOOLCHAIN}
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
# Sources only (no local target/ directories). The router's build script compiles
# ../proto/generate.proto with the protoc that the protoc-bin-vendored crate ships.
COPY proto proto
COPY router/Cargo.toml router/Cargo.lock router/build.rs router/
COPY router/src router/src
COPY launcher/Cargo.toml launcher/Cargo.lock launcher/
COPY launcher/src launcher/src
RUN cargo build --release --manifest-path router/Cargo.toml \
    && cargo build --release --locked --manifest-path launcher/Cargo.toml \
    && mkdir /out \
    && cp router/target/release/lorax-router launcher/target/release/lorax-launcher /out/

# ---- Rust, option 2: binaries built outside, copied from the build context ----------------------
# For builders that cannot reach rustup (scripts/check_image.sh copies the host's release builds
# to .cache/image/bin/, the only part of .cache/ that .dockerignore lets through).
FROM scratch AS rust-prebuilt
COPY .cache/image/bin/lorax-router .cache/image/bin/lorax-launcher /out/

# The option chosen by RUST_BINARIES; builders skip the stage that is not used (BuildKit, and
# buildah/podman, whose --skip-unused-stages is on by default). buildah (1.28) decides which stages
# are used from the command line's build args only, not from ARG defaults: with podman or buildah,
# pass --build-arg RUST_BINARIES=... explicitly (without it, it skips both options and then fails
# with `short-name "rust-builder" did not resolve to an alias`).
FROM ${RUST_BINARIES} AS rust-binaries

# ---- Python: torch and the shard package in a virtualenv ----------------------------------------
FROM ${BASE_IMAGE} AS python-builder
ENV DEBIAN_FRONTEND=noninteractive
ARG DEVICE=cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
        $(if [ "$DEVICE" = cpu ]; then echo g++ ninja-build; fi) \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/lorax
ENV PATH=/opt/lorax/bin:$PATH
# torch first, from TORCH_INDEX_URL: the CUDA build matching the base image (the default PyPI build
# may need a newer driver than the host has). pip's cache is a build cache mount: it stays out of
# the image, and a rebuild does not download torch's gigabytes again.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# Behind a TLS-intercepting proxy, pip needs the proxy's CA: mount a bundle into the build and name
# it here, e.g. `podman build --volume /etc/ssl/certs/ca-certificates.crt:/run/build-ca.crt:ro
# --build-arg PIP_CERT=/run/build-ca.crt` (check_image.sh does this when the host's pip has one).
# A build argument, not ENV: nothing of it stays in the image.
ARG PIP_CERT
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --upgrade pip \
    && pip install torch ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
WORKDIR /src
COPY proto proto
COPY server server
# gRPC stubs are generated, never committed (as `make install` does): grpc_tools writes an
# absolute import of generate_pb2, made relative so it resolves inside the package. grpcio-tools
# is only needed for that, and is removed again; so is triton on CPU (a dependency of PyPI's torch
# that serves GPUs only: the shard imports it for CUDA tensors alone).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install grpcio-tools \
    && python -m grpc_tools.protoc -I proto \
        --python_out=server/lorax_server/pb --pyi_out=server/lorax_server/pb \
        --grpc_python_out=server/lorax_server/pb proto/generate.proto \
    && sed -i 's/^import generate_pb2 as/from . import generate_pb2 as/' \
        server/lorax_server/pb/generate_pb2_grpc.py \
    && pip install ./server \
    && pip uninstall -y grpcio-tools \
    && if [ "$DEVICE" = cpu ]; then pip uninstall -y triton; fi
# The CPU kernels compiled now into /opt/lorax/torch_extensions (the runtime points
# TORCH_EXTENSIONS_DIR there), so that the first start does not spend a minute compiling. torch
# still runs ninja on each load (a no-op when nothing changed), hence the compiler in the runtime.
ENV TORCH_EXTENSIONS_DIR=/opt/lorax/torch_extensions
RUN if [ "$DEVICE" = cpu ]; then python -m lorax_server.utils.cpu_extension --build; fi

# ---- Runtime ------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
ARG DEVICE=cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
        $(if [ "$DEVICE" = cpu ]; then echo g++ ninja-build; fi) \
    && rm -rf /var/lib/apt/lists/*
COPY --from=python-builder /opt/lorax /opt/lorax
COPY --from=rust-binaries /out/lorax-router /out/lorax-launcher /opt/lorax/bin/
# Models and adapters are cached in /data (mount a volume there to keep them between runs; a local
# model mounted there is served with --model-id /data). HUGGING_FACE_HUB_TOKEN (private models) is
# passed with `docker run -e` and reaches every child.
ENV PATH=/opt/lorax/bin:$PATH \
    HUGGINGFACE_HUB_CACHE=/data \
    TORCH_EXTENSIONS_DIR=/opt/lorax/torch_extensions \
    PORT=80
WORKDIR /data
EXPOSE 80
ENTRYPOINT ["lorax-launcher"]
