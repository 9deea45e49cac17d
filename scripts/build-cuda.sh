#!/usr/bin/env bash
# Builds `dspo-server --features cuda` on a machine with no GPU, no CUDA toolkit and no
# nvidia-smi: the compiler, headers and libraries come from NVIDIA's PyPI wheels, the driver
# (libcuda.so.1) is found at run time on the GPU machine.
#
#   scripts/build-cuda.sh                 # -> target/cuda/release/dspo-server (+ cuda-libs/)
#   FEATURES=cudnn scripts/build-cuda.sh  # convolutions through cuDNN -> target/cuda-cudnn/release/
#   FEATURES=cudnn,nccl scripts/build-cuda.sh  # + NCCL for data-parallel jobs over several GPUs
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh
#
# Knobs: CUDA_COMPUTE_CAP [90 = H100/H200], CUDA_TOOLKIT_VERSION [13.0: must not be newer than
# what the target driver supports, because candle's kernels ship as PTX that the driver
# JIT-compiles; the 580 drivers support 13.0], TOOLKIT_DIR [target/cuda-toolkit], FEATURES
# [cuda], PYTHON [python3]. Needs pip, gcc/g++ and cargo; downloads ~700 MB of wheels once.
#
# Why each step:
# - candle-kernels compiles its .cu files with nvcc at build time (PTX, plus a static library
#   for the MoE kernels that links against libcudart), so nvcc, cicc, ptxas, the CUDA headers
#   and CCCL (thrust/cub) must be present: the nvidia-cuda-{nvcc,crt,cccl} and nvidia-nvvm wheels.
# - candle-core turns on cudarc's `dynamic-linking`, so the linker wants libcuda, libcublas,
#   libcublasLt, libcurand, libnvrtc and libcudart. All but libcuda come from the wheels. libcuda
#   is the driver and ships with no wheel, so we link against a stub with the driver's soname
#   (libcuda.so.1) that exports the entry points cudarc binds to, exactly like the toolkit's own
#   lib64/stubs/libcuda.so; the real driver library replaces it when the binary starts.
# - The binary finds the CUDA runtime libraries through its rpath, $ORIGIN/cuda-libs first (the
#   script copies libcudart there; cuBLAS, cuRAND and NVRTC are ~0.8 GB and are expected on the
#   GPU machine, e.g. from PyTorch's nvidia-* wheels: set LD_LIBRARY_PATH, see bench/gpu.sh),
#   then the usual system locations.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
CAP=${CUDA_COMPUTE_CAP:-90}
VER=${CUDA_TOOLKIT_VERSION:-13.0}
TK=${TOOLKIT_DIR:-$ROOT/target/cuda-toolkit}
FEATURES=${FEATURES:-cuda}
# One target directory per feature set, so the cuDNN build does not replace the plain one.
TARGET=$ROOT/target/cuda; [ "$FEATURES" = cuda ] || TARGET=$ROOT/target/cuda-${FEATURES//,/-}
log() { echo "[build-cuda] $*" >&2; }

# Wheel versions for each toolkit release (one place to bump). cuBLAS/cuRAND version
# independently of the toolkit; any 13.x cuBLAS has the soname the binary records.
case "$VER" in
    13.0) PKGS="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85
                nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35" ;;
    *) log "no wheel list for CUDA $VER (add one to this script)"; exit 2 ;;
esac

if [ ! -x "$TK/nvidia/cu13/bin/nvcc" ]; then
    log "downloading the CUDA $VER toolkit wheels into $TK"
    mkdir -p "$TK/wheels"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
        -d "$TK/wheels" $PKGS
    for w in "$TK"/wheels/*.whl; do
        "$PYTHON" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$TK"
    done
    chmod +x "$TK"/nvidia/cu13/bin/* "$TK"/nvidia/cu13/nvvm/bin/*
fi
CUDA=$TK/nvidia/cu13
# Downloads one wheel into $TK/wheels and unpacks it into $TK.
fetch_wheel() {
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 -d "$TK/wheels" "$1"
    "$PYTHON" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
        "$TK"/wheels/"$2"-*.whl "$TK"
}
# cuDNN (only for FEATURES with cudnn): candle's conv2d then calls it instead of im2col + GEMM.
# The binary links libcudnn.so.9 and at run time takes the GPU machine's (PyTorch carries one);
# candle calls only long-standing functions, so another 9.x should do: bench/gpu.sh checks that
# the binary starts before anything else.
if [[ $FEATURES == *cudnn* ]] && [ ! -f "$TK/nvidia/cudnn/lib/libcudnn.so.9" ]; then
    log "downloading the cuDNN 9 wheel into $TK"
    fetch_wheel "nvidia-cudnn-cu13==9.28.1.4" nvidia_cudnn_cu13
fi
# NCCL (only for FEATURES with nccl): data-parallel jobs reduce gradients with it. The binary
# links libnccl.so.2 and at run time takes the GPU machine's (PyTorch carries one).
if [[ $FEATURES == *nccl* ]] && [ ! -f "$TK/nvidia/nccl/lib/libnccl.so.2" ]; then
    log "downloading the NCCL wheel into $TK"
    fetch_wheel "nvidia-nccl-cu13==2.32.6" nvidia_nccl_cu13
fi

# Link-time library directory: unversioned names for the linker, the driver stub.
LIB=$TK/link
mkdir -p "$LIB"
for so in "$CUDA"/lib/lib*.so.* "$TK"/nvidia/cudnn/lib/libcudnn.so.9 "$TK"/nvidia/nccl/lib/libnccl.so.2; do
    [ -e "$so" ] || continue
    base=$(basename "$so"); ln -sf "$so" "$LIB/${base%%.so.*}.so"
done
# The stub exports what the locked cudarc binds to (its version from Cargo.lock).
CUDARC=cudarc-$(awk '/^name = "cudarc"/ {getline; gsub(/"/, "", $3); print $3; exit}' Cargo.lock)
DRIVER_SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"$CUDARC"/src/driver/sys/mod.rs 2>/dev/null | head -1 || true)
if [ ! -f "$LIB/libcuda.so" ] || [ -n "$DRIVER_SYS" -a "$DRIVER_SYS" -nt "$LIB/libcuda.so" ]; then
    if [ -z "$DRIVER_SYS" ]; then
        cargo fetch --quiet
        DRIVER_SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"$CUDARC"/src/driver/sys/mod.rs | head -1)
    fi
    log "driver stub from $(dirname "$(dirname "$(dirname "$DRIVER_SYS")")")"
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$DRIVER_SYS" | awk '{print "void " $4 "(void) {}"}' \
        | sort -u > "$LIB/cuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LIB/libcuda.so" "$LIB/cuda_stub.c"
fi

export CUDA_HOME=$CUDA CUDA_PATH=$CUDA NVCC=$CUDA/bin/nvcc CUDA_COMPUTE_CAP=$CAP
export PATH=$CUDA/bin:$CUDA/nvvm/bin:$PATH
export LIBRARY_PATH=$LIB${LIBRARY_PATH:+:$LIBRARY_PATH}
# nvcc needs its own libraries (libnvvm) while compiling; cicc is found through nvcc.profile.
export LD_LIBRARY_PATH=$CUDA/lib:$CUDA/nvvm/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CPATH=$CUDA/include:$CUDA/include/cccl${CPATH:+:$CPATH}
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$LIB -C link-arg=-Wl,-rpath,\$ORIGIN/cuda-libs -C link-arg=-Wl,--disable-new-dtags"
"$NVCC" --version | tail -2 >&2
log "cargo build --release --features $FEATURES for sm_$CAP ($TARGET)"
cargo build --release --features "$FEATURES" --target-dir "$TARGET"

OUTDIR=$TARGET/release
mkdir -p "$OUTDIR/cuda-libs"
# The CUDA runtime (0.7 MB) travels with the binary; cuBLAS, cuBLASLt, cuRAND and NVRTC
# (~0.8 GB together) are found on the GPU machine (LD_LIBRARY_PATH), e.g. PyTorch's wheels.
cp -f "$CUDA/lib/libcudart.so.13" "$OUTDIR/cuda-libs/"
strip "$OUTDIR/dspo-server" 2>/dev/null || true
log "built $OUTDIR/dspo-server ($(du -h "$OUTDIR/dspo-server" | cut -f1)); needs at run time:"
ldd "$OUTDIR/dspo-server" 2>/dev/null | grep -E 'cuda|cublas|curand|nvrtc|cudnn' >&2 || true
