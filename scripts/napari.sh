#!/usr/bin/env bash
# Set up (if needed) and open napari with the Chula sample smear and the RedDino widgets docked.
# Extra arguments go to `python -m napari_reddino` (e.g. --sample aslan, --image smear1.png smear2.png).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/python" -m napari_reddino "$@"  # from here: paths given are read from where you are
