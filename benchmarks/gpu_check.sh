#!/usr/bin/env bash
# The GPU figures in one prepared run: CUDA tests, the bound benchmark, a CIFAR-10 recipe run.
#
#   bash benchmarks/gpu_check.sh STEP [DATA_DIR]
#
# STEP is one of
#   tests    the CUDA tests (tests/test_cuda.py and the GPU test of certify), about a minute
#   bounds   python benchmarks/bounds.py --device cuda --compile (all sections)
#   cifar10  the cifar10 recipe within TRAIN_BUDGET seconds of training (default 420), then
#            its certification and an APGD audit of 500 test points
#   all      tests, bounds and cifar10 in that order
#
# Written for the device machines of docs/benchmarks.md (torch preinstalled, no network):
# lipnet is used from the checkout through PYTHONPATH, so nothing is installed. Results go to
# $OUT (the device tool's folder) or runs/gpu. DATA_DIR holds CIFAR-10 as train-K-of-3.npz and
# test.npz (see "Taking the GPU figures" in docs/benchmarks.md for getting it there).
set -uo pipefail
step=${1:?usage: gpu_check.sh tests|bounds|cifar10|all [DATA_DIR]}
data=${2:-${LIPNET_DATA_DIR:-.data/cifar10}}
out=${OUT:-runs/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# pyautoattack (for the audit) can travel as its source folder: see docs/benchmarks.md.
[ -d .data/site ] && export PYTHONPATH="$PYTHONPATH:$PWD/.data/site"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"

run_tests() {
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/certify/test_accuracy.py -k "cuda or gpu" \
        2>&1 | tee "$out/tests.txt"
}

run_bounds() {
    python3 benchmarks/bounds.py --device cuda --compile --json "$out/bounds.json" 2>&1 | tee "$out/bounds.txt"
}

run_cifar10() {
    local budget=${TRAIN_BUDGET:-420}
    python3 -m recipes.train cifar10 --data-dir "$data" --out-dir "$out/cifar10" --time-budget "$budget" \
        --progress false 2>&1 | tee "$out/cifar10.txt"
    if python3 -c "import pyautoattack" 2>/dev/null; then
        python3 -m lipnet.certify --checkpoint "$out/cifar10/model.pt" --data cifar10 --data-dir "$data" \
            --autoattack --attack-version apgd --attack-limit 500 --out "$out/cifar10-audit" --no-progress \
            2>&1 | tee "$out/audit.txt"
    else
        echo "pyautoattack is not importable: no audit (see docs/benchmarks.md)" | tee "$out/audit.txt"
    fi
}

case "$step" in
    tests) run_tests ;;
    bounds) run_bounds ;;
    cifar10) run_cifar10 ;;
    all) run_tests; run_bounds; run_cifar10 ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
esac
