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
#   tests      the CUDA tests (tests/test_cuda.py, the GPU test of lipnet.certify), one line per
#              test as it ends (-v), so that a cut-off log still says which passed
#   bounds     python benchmarks/bounds.py --device cuda $BOUNDS_ARGS (accuracy, layer, network;
#              BOUNDS_ARGS=--compile adds the compiled network)
#   compiled   the network section again with --compile
#   cifar10    the cifar10 recipe with --time-budget $TRAIN_BUDGET (default 300 s) on the
#              data in $DATA_DIR, its float64 certification, then an APGD audit of the first
#              $ATTACK_LIMIT (default 500) test points, cut off after $AUDIT_TIMEOUT s (default 240)
#              ($TRAIN_ARGS is added to the recipe's command line, split on spaces, so JSON in it
#              has none: TRAIN_ARGS='--model-kwargs {"width":128}'; $AUDIT_ARGS to the audit's,
#              e.g. --eps 36/255,72/255). If only the second half of a WebP-staged training set
#              is there (the machine went back between the two calls), it trains on that half
#              (20,000 images), says so at the top of cifar10.txt, and does not stop.
#
# Docs: "Taking the GPU figures" in docs/benchmarks.md. lipnet runs from the checkout
# (PYTHONPATH); nothing is installed. Runs are written under $RUNS (default /root/lipnet-runs,
# outside the checkout) and the key files are copied flat to $OUT (at most 8 come back):
# gpu.txt (card, torch, commit) and steps.txt (seconds per step) always, then per step
# tests.txt; bounds.txt, bounds.json; profile.txt; compiled.txt, compiled.json; cifar10.txt,
# report.json, metrics.jsonl, audit.txt, audit.json.
set -uo pipefail
out=${OUT:-runs/gpu}
runs=${RUNS:-/root/lipnet-runs}
data=${DATA_DIR:-/root/cifar10}
mkdir -p "$out" "$runs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# pyautoattack (for the audit) travels as its source folder in .data/site (see the docs).
[ -d .data/site ] && export PYTHONPATH="$PYTHONPATH:$PWD/.data/site"

for step in "$@"; do  # a misspelt step fails before anything runs, not after minutes of others
    case "$step" in
        stage|profile|tests|bounds|compiled|cifar10) ;;
        *) echo "unknown step $step (stage, profile, tests, bounds, compiled, cifar10)" >&2; exit 2 ;;
    esac
done

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')" 2>&1
    if commit=$(git rev-parse --short HEAD 2>/dev/null); then
        echo "checkout $commit, $(git status --porcelain 2>/dev/null | wc -l) changed or untracked paths"
    else
        echo "checkout: no git here"
    fi
} > "$out/gpu.txt"
cat "$out/gpu.txt"
# The working tree travels as it is here, uncommitted changes included: a tree that cannot
# import lipnet (another session's half-done change) would waste every step.
if ! python3 -c "import lipnet, lipnet.certify, recipes.train" > "$out/import-error.txt" 2>&1; then
    echo "import lipnet failed: the working tree sent is broken; nothing was run" | tee -a "$out/gpu.txt"
    cat "$out/import-error.txt"
    exit 3
fi
rm -f "$out/import-error.txt"

started=$SECONDS
failed=0
: > "$out/steps.txt"
for step in "$@"; do
    t0=$SECONDS
    case "$step" in
        stage)
            # A plain shard is copied; a WebP pack (pack_cifar10.py --webp) is decoded and checked.
            # A failure is reported (exit status 1 at the end) but the other steps still run: the
            # tests and benchmarks need no data, and a cifar10 step without it fails in seconds.
            mkdir -p "$data"
            for f in "${STAGE:-.data/stage}"/*.npz; do
                [ -e "$f" ] || { echo "STAGE FAILED: no shards in ${STAGE:-.data/stage} (carry it)" | tee -a "$out/steps.txt" >&2; failed=1; break; }
                case "$(basename "$f")" in
                    webp-*) python3 benchmarks/pack_cifar10.py --unpack "$f" "$data" ;;
                    *) cp -v "$f" "$data"/ ;;
                esac || { echo "STAGE FAILED: $f" | tee -a "$out/steps.txt" >&2; failed=1; break; }
            done
            ls -la "$data" ;;
        profile)
            timeout "${PROFILE_TIMEOUT:-120}" python3 benchmarks/profile_step.py ${PROFILE_ARGS:-} 2>&1 | tee "$out/profile.txt"
            [ "${PIPESTATUS[0]}" = 124 ] && echo "CUT OFF after ${PROFILE_TIMEOUT:-120} s" | tee -a "$out/profile.txt"
            timeout 60 python3 benchmarks/activations.py --dtype bfloat16 --shapes 512x64x32x32,512x128x8x8 2>&1 \
                | tee -a "$out/profile.txt"
            [ "${PIPESTATUS[0]}" = 124 ] && echo "CUT OFF after 60 s (activations)" | tee -a "$out/profile.txt" ;;
        tests)
            timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest -v -p no:cacheprovider tests/test_cuda.py \
                tests/certify/test_accuracy.py -k "cuda or gpu" 2>&1 | tee "$out/tests.txt"
            [ "${PIPESTATUS[0]}" = 124 ] && echo "CUT OFF after ${TESTS_TIMEOUT:-300} s" | tee -a "$out/tests.txt" ;;
        bounds)
            timeout "${BOUNDS_TIMEOUT:-300}" python3 benchmarks/bounds.py --device cuda ${BOUNDS_ARGS:-} --json "$out/bounds.json" 2>&1 \
                | tee "$out/bounds.txt"
            [ "${PIPESTATUS[0]}" = 124 ] && echo "CUT OFF after ${BOUNDS_TIMEOUT:-300} s" | tee -a "$out/bounds.txt" ;;
        compiled)
            timeout 400 python3 benchmarks/bounds.py --device cuda --sections network --compile \
                --json "$out/compiled.json" 2>&1 | tee "$out/compiled.txt"
            [ "${PIPESTATUS[0]}" = 124 ] && echo "CUT OFF after 400 s" | tee -a "$out/compiled.txt" ;;
        cifar10)
            rm -rf "$runs/cifar10" "$runs/cifar10-audit"
            train_data=$data
            : > "$out/cifar10.txt"
            if [ -f "$data/train-2-of-2.npz" ] && [ -f "$data/test.npz" ] && [ ! -e "$data/train-1-of-2.npz" ]; then
                # Call 1's half went back with its machine: train on the half this call brought.
                train_data="$data-half"
                mkdir -p "$train_data"
                ln -sf "$data/train-2-of-2.npz" "$train_data/train.npz"
                ln -sf "$data/test.npz" "$train_data/test.npz"
                echo "PARTIAL DATA: $data lacks train-1-of-2.npz (staged by the first call, whose machine went back);" \
                     "training on train-2-of-2.npz alone (20,000 of the 50,000 training images). Not a recipe figure." \
                    | tee "$out/cifar10.txt"
            fi
            python3 -m recipes.train cifar10 --data-dir "$train_data" --out-dir "$runs/cifar10" \
                --time-budget "${TRAIN_BUDGET:-300}" --progress false ${TRAIN_ARGS:-} 2>&1 | tee -a "$out/cifar10.txt"
            echo "recipe: $((SECONDS - t0)) s" >> "$out/steps.txt"
            cp "$runs/cifar10/report.json" "$runs/cifar10/metrics.jsonl" "$out"/ 2>/dev/null
            if [ ! -f "$runs/cifar10/model.pt" ]; then
                echo "no model.pt: the recipe failed (see cifar10.txt); no audit" | tee "$out/audit.txt"
            elif python3 -c "import pyautoattack" 2>/dev/null; then
                # SIGINT at the limit: the CLI then prints and writes the certification and the radii audited.
                timeout -s INT -k 10 "${AUDIT_TIMEOUT:-240}" python3 -m lipnet.certify --checkpoint "$runs/cifar10/model.pt" \
                    --data cifar10 --data-dir "$train_data" --autoattack --attack-version apgd \
                    --attack-limit "${ATTACK_LIMIT:-500}" ${AUDIT_ARGS:-} \
                    --out "$runs/cifar10-audit" --no-progress 2>&1 | tee "$out/audit.txt"
                [ "${PIPESTATUS[0]}" = 124 ] && echo "CUT OFF after ${AUDIT_TIMEOUT:-240} s: the table above has the" \
                    "radii audited before (lower ATTACK_LIMIT or raise AUDIT_TIMEOUT for all)" | tee -a "$out/audit.txt"
                cp "$runs/cifar10-audit/certify.json" "$out/audit.json" 2>/dev/null
            else
                echo "pyautoattack is not importable: no audit (see docs/benchmarks.md)" | tee "$out/audit.txt"
            fi ;;
    esac
    echo "$step: $((SECONDS - t0)) s" >> "$out/steps.txt"
done
echo "all steps: $((SECONDS - started)) s" >> "$out/steps.txt"
cat "$out/steps.txt"
exit $failed
