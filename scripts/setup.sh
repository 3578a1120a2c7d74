#!/usr/bin/env bash
# argus set-up: everything `make demo` and `make test` need, idempotent and quick when done.
#
# What it changes OUTSIDE the repository (all as root, each only when missing):
#   1. Debian packages: python3-bpfcc bpfcc-tools (bcc 0.26 + libbcc), python3-venv, gcc, make,
#      linux-headers-amd64 (kernel headers bcc compiles against), tmux (live-view tests),
#      prometheus (the daemon test scrapes argus with a real server; its own service is not used).
#   2. When /lib/modules/$(uname -r)/build is missing (kernels without their own headers, e.g.
#      Firecracker VMs): two symlinks, /lib/modules/$(uname -r)/build -> the newest
#      /usr/src/linux-headers-*-amd64 and .../source -> the matching *-common dir.
#   3. tracefs mounted at /sys/kernel/tracing when it is not.
# Inside the repository: .venv (Debian python3 with --system-site-packages so `import bcc`
# works), the project installed editable with its test extras, and build/ (stand-ins).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }
PKGS=(python3-bpfcc bpfcc-tools python3-venv python3-pip gcc make linux-headers-amd64 tmux prometheus)

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "this step needs root: $1 (re-run as root: sudo make setup)"
    exit 1
  fi
}

# 1. Debian packages.
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  need_root "apt-get install ${missing[*]}"
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. Kernel headers for bcc.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include/linux/kconfig.h" ] && [ ! -e "$kdir/source/include/linux/kconfig.h" ]; then
  need_root "link kernel headers into $kdir"
  amd64=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$amd64" ]; then
    log "no /usr/src/linux-headers-*-amd64 after installing linux-headers-amd64; cannot give bcc kernel headers"
    exit 1
  fi
  common="${amd64%-amd64}-common"
  mkdir -p "$kdir"
  ln -sfn "$amd64" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
  log "linked $kdir/build -> $amd64 and $kdir/source -> $common (this kernel ships no headers)"
fi

# 3. tracefs.
if [ ! -e /sys/kernel/tracing/uprobe_events ] && [ ! -e /sys/kernel/debug/tracing/uprobe_events ]; then
  need_root "mount tracefs"
  mount -t tracefs tracefs /sys/kernel/tracing
  log "mounted tracefs at /sys/kernel/tracing"
fi

# 4. The virtual environment and the project.
if [ ! -x .venv/bin/python ]; then
  log "creating .venv (Debian python3, system site packages for bcc)"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.argus-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing argus (editable) with test extras into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import argus, polars, click, rich, elftools, pynvml, perfetto"
  touch "$stamp"
fi
.venv/bin/python -c "import bcc" 2>/dev/null || { log ".venv cannot import bcc (python3-bpfcc missing?)"; exit 1; }

# 5. Real PyTorch (CPU build, from the wheel on this machine's disk) for the framework-channel
#    tests: a real torchrun DDP job with the gloo backend.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  log "installing torch==2.13.0 (CPU) into .venv"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
fi

# 6. Real libcudart.so.12, libnccl.so.2 and libcupti.so.12 from NVIDIA's PyPI wheels, unpacked
#    into build/real (symbol resolution and probe attachment are tested on the real binaries;
#    they cannot run kernels here). NCCL 2.18.3 is the smallest wheel (218 MB) that has
#    ncclCommSplit. CUPTI (13.8 MB wheel): the GPU agent dlopens it (ARGUS_GPU_CUPTI); the
#    unit tier checks it defines what the agent resolves, the gpu tier falls back on it.
real=build/real
fetch_wheel() {  # fetch_wheel DIST==VERSION FILE-INSIDE
  if [ ! -f "$real/$2" ]; then
    log "fetching $1 into $real"
    mkdir -p "$real/wheels"
    .venv/bin/pip download -q --disable-pip-version-check --no-deps -d "$real/wheels" "$1" 2>&1 | grep -v "^WARNING: Location" || true
    whl=$(ls "$real"/wheels/"$(echo "${1%%==*}" | tr - _)"-*.whl | head -n 1)
    .venv/bin/python -m zipfile -e "$whl" "$real"
    rm -f "$whl"
    [ -f "$real/$2" ] || { log "$1 did not contain $2"; exit 1; }
  fi
}
fetch_wheel nvidia-cuda-runtime-cu12==12.4.127 nvidia/cuda_runtime/lib/libcudart.so.12
fetch_wheel nvidia-nccl-cu12==2.18.3 nvidia/nccl/lib/libnccl.so.2
fetch_wheel nvidia-cuda-cupti-cu12==12.4.127 nvidia/cuda_cupti/lib/libcupti.so.12
