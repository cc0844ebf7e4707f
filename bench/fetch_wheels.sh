#!/usr/bin/env bash
# On a machine with PyPI (not the GPU machine): the wheels the device calls carry, into ignored folders.
# The device has python 3.12, torch 2.11 (CUDA 13), triton 3.6; each call carries at most 64 MiB, hence
# the split: .fa4a (the CUDA 13 half of nvidia-cutlass-dsl, repacked as tar.xz, ~61 MB) travels alone and
# is unpacked to /tmp/cu13x by `bench/gpu_session.sh unpack`; the rest travel together.
#   bash bench/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dl() { python3 -m pip download -q --no-deps --python-version 3.12 --platform manylinux_2_28_x86_64 \
         --only-binary=:all: -d "$@"; }
mkdir -p .whl .fa4a .fa4b/opt .ck .fvk
dl .whl "diffusers==0.42.1" ftfy wcwidth importlib_metadata zipp                 # the parity oracle
dl .fa4b "flash-attn-4==4.0.0b36" "nvidia-cutlass-dsl==4.8.1" "nvidia-cutlass-dsl-libs-base==4.8.1" \
   "nvidia-cutlass-dsl-libs-core==4.8.1" "apache-tvm-ffi==0.1.15.post2" "torch-c-dlpack-ext==0.1.5" \
   "quack-kernels==0.6.5" cuda-bindings cuda-pathfinder
dl .fa4b/opt protobuf                                                             # only where the device lacks it
tmp=$(mktemp -d)
dl "$tmp" "nvidia-cutlass-dsl-libs-cu13==4.8.1" "comfy-kitchen==0.2.40"
(cd "$tmp" && python3 -m zipfile -e nvidia_cutlass_dsl_libs_cu13-*.whl cu13 \
   && tar cf - -C cu13 nvidia_cutlass_dsl | xz -9 -T2 > "$OLDPWD/.fa4a/cu13.tar.xz")
(cd "$tmp" && python3 -m zipfile -e comfy_kitchen-*.whl ck && rm ck/comfy_kitchen/backends/hip/_C.abi3.so \
   && tar czf "$OLDPWD/.ck/ck.tar.gz" -C ck comfy_kitchen comfy_kitchen-0.2.40.dist-info)  # HIP half: ROCm only
python3 -m pip download -q --no-deps -d "$tmp" "fastvideo-kernel==0.3.5"  # an sdist only
tar xzf "$tmp"/fastvideo_kernel-0.3.5.tar.gz -C "$tmp" --wildcards '*/dist/*x86_64*.whl'  # its sdist ships wheels
cp "$tmp"/fastvideo_kernel-0.3.5/dist/*x86_64*.whl .fvk/
rm -rf "$tmp"
du -sh .whl .fa4a .fa4b .ck .fvk
