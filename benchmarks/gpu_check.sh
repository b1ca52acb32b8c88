#!/usr/bin/env bash
# The GPU figures, in steps that fit a device session (about 15 minutes, 10 per call).
#
#   bash benchmarks/gpu_check.sh STEP...
#
# Steps (run in the order given):
#   stage      copy the carried CIFAR-10 shards ($STAGE/*.npz, default .data/stage) into $DATA_DIR,
#              decoding WebP packs (webp-*.npz, from pack_cifar10.py --webp: two calls instead of three)
#   profile    python benchmarks/profile_step.py $PROFILE_ARGS: wall vs kernel time of a training
#              step of liresnet-s (bounds stacked, per layer, plain), the top kernels; then
#              python benchmarks/activations.py --dtype bfloat16 (MaxMin vs autograd max/min)
#   tests      the CUDA tests (tests/test_cuda.py, the GPU test of lipnet.certify)
#   bounds     python benchmarks/bounds.py --device cuda $BOUNDS_ARGS (accuracy, layer, network;
#              BOUNDS_ARGS=--compile adds the compiled network)
#   compiled   the network section again with --compile
#   cifar10    the cifar10 recipe with --time-budget $TRAIN_BUDGET (default 300 s) on the
#              data in $DATA_DIR, its float64 certification, then an APGD audit of 500 points
#              ($TRAIN_ARGS is added to the recipe's command line, $AUDIT_ARGS to the audit's command line, e.g. --eps 0.1411764705882353)
#
# Docs: "Taking the GPU figures" in docs/benchmarks.md. lipnet runs from the checkout
# (PYTHONPATH); nothing is installed. Runs are written under $RUNS (default /root/lipnet-runs,
# outside the checkout) and the key files are copied flat to $OUT (at most 8 come back).
set -uo pipefail
out=${OUT:-runs/gpu}
runs=${RUNS:-/root/lipnet-runs}
data=${DATA_DIR:-/root/cifar10}
mkdir -p "$out" "$runs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# pyautoattack (for the audit) travels as its source folder in .data/site (see the docs).
[ -d .data/site ] && export PYTHONPATH="$PYTHONPATH:$PWD/.data/site"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" >> "$out/gpu.txt"
cat "$out/gpu.txt"

for step in "$@"; do
    case "$step" in
        stage)
            # A plain shard is copied; a WebP pack (pack_cifar10.py --webp) is decoded and checked.
            mkdir -p "$data"
            for f in "${STAGE:-.data/stage}"/*.npz; do
                case "$(basename "$f")" in
                    webp-*) python3 benchmarks/pack_cifar10.py --unpack "$f" "$data" || exit 1 ;;
                    *) cp -v "$f" "$data"/ || exit 1 ;;
                esac
            done
            ls -la "$data" ;;
        profile)
            timeout "${PROFILE_TIMEOUT:-120}" python3 benchmarks/profile_step.py ${PROFILE_ARGS:-} 2>&1 | tee "$out/profile.txt"
            timeout 60 python3 benchmarks/activations.py --dtype bfloat16 --shapes 512x64x32x32,512x128x8x8 2>&1 \
                | tee -a "$out/profile.txt" ;;
        tests)
            timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/certify/test_accuracy.py \
                -k "cuda or gpu" 2>&1 | tee "$out/tests.txt" ;;
        bounds)
            timeout "${BOUNDS_TIMEOUT:-300}" python3 benchmarks/bounds.py --device cuda ${BOUNDS_ARGS:-} --json "$out/bounds.json" 2>&1 \
                | tee "$out/bounds.txt" ;;
        compiled)
            timeout 400 python3 benchmarks/bounds.py --device cuda --sections network --compile \
                --json "$out/compiled.json" 2>&1 | tee "$out/compiled.txt" ;;
        cifar10)
            rm -rf "$runs/cifar10" "$runs/cifar10-audit"
            python3 -m recipes.train cifar10 --data-dir "$data" --out-dir "$runs/cifar10" \
                --time-budget "${TRAIN_BUDGET:-300}" --progress false ${TRAIN_ARGS:-} 2>&1 | tee "$out/cifar10.txt"
            cp "$runs/cifar10/report.json" "$runs/cifar10/metrics.jsonl" "$out"/ 2>/dev/null
            if python3 -c "import pyautoattack" 2>/dev/null; then
                timeout "${AUDIT_TIMEOUT:-240}" python3 -m lipnet.certify --checkpoint "$runs/cifar10/model.pt" \
                    --data cifar10 --data-dir "$data" --autoattack --attack-version apgd --attack-limit 500 ${AUDIT_ARGS:-} \
                    --out "$runs/cifar10-audit" --no-progress 2>&1 | tee "$out/audit.txt"
            else
                echo "pyautoattack is not importable: no audit (see docs/benchmarks.md)" | tee "$out/audit.txt"
            fi ;;
        *)
            echo "unknown step $step (stage, profile, tests, bounds, compiled, cifar10)" >&2; exit 2 ;;
    esac
done
