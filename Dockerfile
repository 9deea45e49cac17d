# dspo-server with CUDA. Untested here: the machines this project is built on run no Docker
# engine and have no GPU (see docs/gpu.md).
#
#   docker build -t dspo-server --build-arg CUDA_COMPUTE_CAP=80 .
#   docker run --gpus all -p 8080:8080 -v $PWD/models:/app/models -v $PWD/data:/data \
#       dspo-server serve --model sd15=/app/models/sd15

ARG CUDA_VERSION=12.4.1

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build
# candle compiles its kernels for one compute capability; nvidia-smi is not available during
# `docker build`, so it has to be given (80 = A100, 86 = RTX 30xx, 89 = L4/RTX 40xx, 90 = H100).
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:${PATH}
WORKDIR /src
COPY . .
RUN cargo build --release --features cuda && mkdir -p models

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=build /src/target/release/dspo-server /usr/local/bin/dspo-server
# models/shapes (the demo model) is served when no --model is given, if it was in the build context.
COPY --from=build /src/models /app/models
ENV DSPO_SERVER_LISTEN=0.0.0.0:8080 \
    DSPO_SERVER_DATA_DIR=/data \
    DSPO_MODELS_DEVICE=cuda:0 \
    RUST_LOG=info
VOLUME /data
EXPOSE 8080
ENTRYPOINT ["dspo-server"]
CMD ["serve"]
