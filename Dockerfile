# LoRAX-compatible multi-LoRA inference server: `lorax-launcher` downloads the model, starts the
# Python shards (`lorax-server`) and the Rust HTTP router (`lorax-router`).
#
#   docker build -t lorax .
#   docker run --gpus all --shm-size 1g -p 8080:80 -v $PWD/data:/data \
#       -e HUGGING_FACE_HUB_TOKEN=$HUGGING_FACE_HUB_TOKEN lorax --model-id $MODEL_ID
#
# Any launcher flag can follow the image name, or be set as its environment variable (-e PORT=...).

ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu22.04

# ---- Rust: lorax-router and lorax-launcher, release builds --------------------------------------
# Built on the runtime's Ubuntu release so the binaries need no newer glibc than it has.
FROM ubuntu:22.04 AS rust-builder
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
    && cargo build --release --locked --manifest-path launcher/Cargo.toml

# ---- Python: torch and the shard package in a virtualenv ----------------------------------------
FROM ${CUDA_IMAGE} AS python-builder
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/lorax
ENV PATH=/opt/lorax/bin:$PATH
# CUDA build of torch first (the default PyPI build may need a newer driver than the host has).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
RUN pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir torch --index-url ${TORCH_INDEX_URL}
WORKDIR /src
COPY proto proto
COPY server server
# gRPC stubs are generated, never committed (as `make install` does): grpc_tools writes an
# absolute import of generate_pb2, made relative so it resolves inside the package.
RUN pip install --no-cache-dir grpcio-tools \
    && python -m grpc_tools.protoc -I proto \
        --python_out=server/lorax_server/pb --pyi_out=server/lorax_server/pb \
        --grpc_python_out=server/lorax_server/pb proto/generate.proto \
    && sed -i 's/^import generate_pb2 as/from . import generate_pb2 as/' \
        server/lorax_server/pb/generate_pb2_grpc.py \
    && pip install --no-cache-dir ./server

# ---- Runtime ------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=python-builder /opt/lorax /opt/lorax
COPY --from=rust-builder /src/router/target/release/lorax-router /opt/lorax/bin/
COPY --from=rust-builder /src/launcher/target/release/lorax-launcher /opt/lorax/bin/
# Models and adapters are cached in /data (mount a volume there to keep them between runs).
# HUGGING_FACE_HUB_TOKEN (private models) is passed with `docker run -e` and reaches every child.
ENV PATH=/opt/lorax/bin:$PATH \
    HUGGINGFACE_HUB_CACHE=/data \
    PORT=80
WORKDIR /data
EXPOSE 80
ENTRYPOINT ["lorax-launcher"]
