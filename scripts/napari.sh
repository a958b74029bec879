#!/usr/bin/env bash
# Set up (if needed) and open napari with the Chula sample smear and the RedDino widgets docked.
# Extra arguments go to `python -m napari_reddino` (e.g. --sample aslan, --image smear1.png smear2.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m napari_reddino "$@"
