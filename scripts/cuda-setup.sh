#!/usr/bin/env bash
# (A copy of the team's shared/cuda/setup.sh, so that CI on a clean clone needs nothing outside it.)
# Makes a CUDA 13.0 build environment on a machine with no GPU and no CUDA toolkit, from package
# registries only: nvcc and the CUDA libraries from PyPI's nvidia-* wheels, and a link-time
# libcuda.so from Debian's non-free `libcuda1` (the real driver library comes from the GPU machine at
# run time). Idempotent. Prints the variables to export; use it as:
#     eval "$(scripts/cuda-setup.sh)"
#     cargo build --release --features cuda
set -euo pipefail
root="${HIDREAM_CUDA_ROOT:-$HOME/.cache/hidream-cuda}"
venv="$root/venv"; home="$root/cuda"; py=python3
mkdir -p "$root"
if [ ! -x "$venv/bin/nvcc-ok" ]; then
  $py -m venv "$venv" >&2
  "$venv/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-cublas==13.0.*" "nvidia-curand" >&2
  touch "$venv/bin/nvcc-ok"
fi
nv="$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13)"
if [ ! -e "$home/lib64/libcuda.so" ]; then
  mkdir -p "$home/lib64" "$root/apt/lists/partial" "$root/deb"
  # The machine's own Debian mirror, with the non-free component that holds libcuda1.
  uri="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)"
  [ -n "$uri" ] || uri="$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null)"
  [ -n "$uri" ] || { echo "setup.sh: no Debian mirror found in /etc/apt" >&2; exit 1; }
  suite="$(. /etc/os-release && echo "$VERSION_CODENAME")"
  echo "deb $uri $suite main contrib non-free" > "$root/apt/sources.list"
  aptopts=(-o "Dir::Etc::SourceList=$root/apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null" -o "Dir::State::Lists=$root/apt/lists")
  apt-get "${aptopts[@]}" update >&2
  (cd "$root/deb" && apt-get "${aptopts[@]}" download libcuda1 >&2)
  dpkg -x "$root"/deb/libcuda1_*.deb "$root/deb/x"
  ln -sf "$(ls "$root"/deb/x/usr/lib/x86_64-linux-gnu/nvidia/current/libcuda.so.*.* | head -1)" "$home/lib64/libcuda.so"
  ln -sf libcuda.so "$home/lib64/libcuda.so.1"
fi
ln -sfn "$nv/bin" "$home/bin"; ln -sfn "$nv/include" "$home/include"
for f in "$nv"/lib/*.so.*; do b="$(basename "$f")"; ln -sf "$f" "$home/lib64/$b"; ln -sf "$f" "$home/lib64/${b%%.so.*}.so"; done
cat <<EOT
export CUDA_HOME="$home" CUDA_PATH="$home" NVCC="$home/bin/nvcc" CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export PATH="$home/bin:\$PATH" LIBRARY_PATH="$home/lib64:\${LIBRARY_PATH:-}"
EOT
