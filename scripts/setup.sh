#!/usr/bin/env bash
# Set up napari-reddino from a fresh machine: system libraries for Qt under X11/Xvfb,
# a virtual environment in .venv, pinned torch, and the package with its test extra.
# Idempotent: a second run only checks that everything is there, and needs no network.
#   PYTHON=python3.12 bash scripts/setup.sh   the interpreter for .venv (3.11 or newer; default python3)
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
#                                             torch from that index: the CPU build, 0.2 GB instead of
#                                             PyPI's CUDA build with its 4 GB of NVIDIA libraries
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="xvfb xauth libgl1 libegl1 libglx-mesa0 libgl1-mesa-dri libfontconfig1 libdbus-1-3
  libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0
  libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-xkb1"

sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
if command -v apt-get >/dev/null 2>&1; then
  missing=$(for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    $sudo apt-get update -qq
    # shellcheck disable=SC2086
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
  fi
fi

PYTHON=${PYTHON:-python3}
too_old() { ! "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }
if too_old "$PYTHON"; then
  echo "napari-reddino needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1 || echo missing)." >&2
  echo "On Ubuntu 22.04: sudo apt install python3.11 python3.11-venv, then run this again with PYTHON=python3.11." >&2
  exit 1
fi
if [ -e .venv ] && too_old .venv/bin/python; then  # made by an older python3 on a first try
  rm -rf .venv
fi
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then  # no .venv yet, or one without pip
  # Debian and Ubuntu ship venv's pip (ensurepip) apart, as pythonX.Y-venv.
  if ! "$PYTHON" -c "import ensurepip" >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "python$version-venv"
  fi
  # a working .venv gets pip; only one that a failed first run left broken is made again
  .venv/bin/python -m ensurepip -q >/dev/null 2>&1 || { rm -rf .venv; "$PYTHON" -m venv .venv; }
fi
# Installed before from this very pyproject.toml and script, and it imports: nothing to fetch.
# (napari.sh runs this at every launch, also on a lab PC without internet.)
# A TORCH_INDEX given once (the CPU build) need not be given at every launch.
stamp="$(cat pyproject.toml scripts/setup.sh | cksum)"
if [ "$(sed -n 1p .venv/.reddino-installed 2>/dev/null)" = "$stamp" ] &&
   { [ -z "${TORCH_INDEX:-}" ] || [ "$(sed -n 2p .venv/.reddino-installed)" = "$TORCH_INDEX" ]; } &&
   .venv/bin/python -c "import napari, napari_reddino, timm, torch, torchvision" >/dev/null 2>&1; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "${TORCH_INDEX:-}" ]; then
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" --index-url "$TORCH_INDEX"
fi
# torch and torchvision are pinned together: other releases pull several GB or break torchvision.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" timm -e ".[test]"
printf '%s\n%s\n' "$stamp" "${TORCH_INDEX:-}" > .venv/.reddino-installed
