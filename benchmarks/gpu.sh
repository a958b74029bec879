#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, in one call of a lent GPU machine (about 9.5 minutes; the
# steps run most needed first, so a call cut short at 10 minutes loses only the last steps):
# the CUDA tests, embedding cells/s for ViT-S/B/L against the model card loop, and
# pretraining steps/s and model FLOP utilisation for ViT-S and ViT-L (and ViT-L's memory with
# activation checkpointing), the Sinkhorn-Knopp targets at the ViT-S recipe's iBOT size, and a
# training run resumed from its checkpoint against the same run straight through.
#
#     bash benchmarks/gpu.sh --fetch-wheels   # first, here: wheels of what that machine lacks, in .whl/
#     bash benchmarks/gpu.sh                  # there, with .whl carried; gpu.log and training.json
#                                             # in $OUT or /tmp/gpu-checks (the lent machine returns 8 files)
#     bash benchmarks/gpu.sh embedding training_vits14   # only the steps named
#     EMBED_SIZES=small bash benchmarks/gpu.sh embedding   # and only ViT-S
#
# Such a machine has python3 (3.12) with torch, torchvision, timm, scikit-image, pandas and
# pytest, but not edt, this package, napari or ../shared/data, and reaches no package index:
# edt comes as a wheel, the package runs from src/, the smears come from tests/data, and every
# model is a randomly initialised ViT of RedDino's sizes (the speed is the same). Each step has
# its own time limit, so one that fails leaves the others their time.
set -u
cd "$(dirname "$0")/.."
WHEELS="edt==3.1.2"

if [ "${1:-}" = "--fetch-wheels" ]; then
    python=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
    exec "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
fi

out=${OUT:-/tmp/gpu-checks}
json="$out/training-steps"  # one JSON per training step, merged into $out/training.json at the end
mkdir -p "$json"  # in $out: a call cut short keeps the steps that ran
exec > >(tee -a "$out/gpu.log") 2>&1  # every step's output in one file, as it comes
tee_pid=$!
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
if ! python3 -c 'import edt' 2>/dev/null; then
    echo "edt is missing: run 'bash benchmarks/gpu.sh --fetch-wheels' here first and carry .whl" >&2
    exit 2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

wanted=" $* "
step() {  # step NAME SECONDS COMMAND...: run, log, go on whatever it returns
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    if [ -n "${wanted// /}" ] && [[ "$wanted" != *" $name "* ]]; then return; fi
    echo "## $name"
    timeout -k 10 "$limit" "$@"
    echo "## $name: exit $?, $((SECONDS - started)) s of $limit"
}

timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
timeout 60 python3 -c 'import sys, torch, torchvision, timm; print(sys.version.split()[0], torch.__version__,
    torchvision.__version__, timm.__version__, torch.cuda.get_device_name())'

# -o filterwarnings=: pyproject's filters name pydantic, which such a machine need not have.
# issue 3's one open target first: ViT-S and ViT-L cells/s end to end
step embedding 260 python3 benchmarks/embedding.py --device cuda --sizes ${EMBED_SIZES:-small large base} \
    --cells 4000 --chunk 0 --card-cells 256 --rounds 2 --smears 'tests/data/chula_rbc12/*.jpg' --compile
step cuda_tests 60 python3 -m pytest -q -p no:cacheprovider -o filterwarnings= tests/test_cuda.py
step training_vits14 80 python3 benchmarks/training.py --device cuda --model vits14 --json "$json/training_vits14.json"
step sinkhorn 25 python3 benchmarks/sinkhorn.py --device cuda --rows 21000 --repeats 3
step resume 30 python3 benchmarks/resume_check.py --precision bf16
step training_vitl14 65 python3 benchmarks/training.py --device cuda --model vitl14 --json "$json/training_vitl14.json"
step training_vitl14_checkpointed 45 python3 benchmarks/training.py --device cuda --model vitl14 --steps 8 --warmup 2 \
    --json "$json/training_vitl14_checkpointed.json" train.activation_checkpointing=true
python3 - "$json" "$out/training.json" <<'MERGE'
import json, pathlib, sys
parts = {path.stem: json.loads(path.read_text()) for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(parts, indent=1))
MERGE
exec >&- 2>&-  # tee reads to the end: gpu.log is whole before the machine collects $OUT
wait "$tee_pid"
