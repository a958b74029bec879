#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, in one call of a lent GPU machine (about 8 minutes):
# the CUDA tests, embedding cells/s for ViT-S/B/L against the model card loop, and
# pretraining steps/s and model FLOP utilisation for ViT-S and ViT-L.
#
#     bash benchmarks/gpu.sh            # logs in $OUT (the device tool's folder) or /tmp/gpu-checks
#
# Such a machine has python3 with torch, torchvision, timm, scikit-image and pytest, but not
# this package, napari or ../shared/data: the package runs from src/, the smears come from
# tests/data, and every model is a randomly initialised ViT of RedDino's sizes (the speed is
# the same). Each step has its own time limit, so one that fails leaves the others their time.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-checks}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

step() {  # step NAME SECONDS COMMAND...: run, keep the log, go on whatever it returns
    local name=$1 limit=$2
    shift 2
    echo "## $name"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    echo "## $name: exit ${PIPESTATUS[0]}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.csv"
python3 -c 'import sys, torch, torchvision, timm; print(sys.version.split()[0], torch.__version__,
    torchvision.__version__, timm.__version__, torch.cuda.get_device_name())'

# -o filterwarnings=: pyproject's filters name pydantic, which such a machine need not have.
step cuda_tests 120 python3 -m pytest -q -p no:cacheprovider -o filterwarnings= tests/test_cuda.py
step embedding 300 python3 benchmarks/embedding.py --device cuda --sizes small base large \
    --cells 4000 --chunk 0 --card-cells 256 --smears 'tests/data/chula_rbc12/*.jpg'
step training_vits14 90 python3 benchmarks/training.py --device cuda --model vits14 --json "$out/training_vits14.json"
step training_vitl14 90 python3 benchmarks/training.py --device cuda --model vitl14 --json "$out/training_vitl14.json"
