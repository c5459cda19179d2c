#!/usr/bin/env bash
# Everything the GPU must show, in one call on a machine with an NVIDIA GPU and CuPy:
#   1. the step and decode benchmarks vs PyTorch, each alone on the GPU (benchmarks/*.py --json), and
#      where our step spends its time (benchmarks/profile_step.py);
#   2. then, side by side: the whole test suite on CuPy, and a `minitransformer train` run on the GPU
#      with its PyTorch twin (benchmarks/train_translator_torch.py) trained for the same steps, both
#      scored by the same decoder (BLEU, chrF).
# Logs go to $OUT (default ./gpu-check). The corpus comes from $MINITRANSFORMER_CACHE (no network needed
# when spa.tsv is already there). STEPS (default 1500) sets the length of the training runs; TRAIN=0
# leaves them out, EXTRA=1 adds our unfused step and the per-op profile.
#     bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}; mkdir -p "$OUT"
STEPS=${STEPS:-1500}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import sys, numpy, cupy, torch; print(sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. benchmarks, alone on the GPU
BENCHES=("--config small" "--config base" "--config small --tf32" "--config base --tf32")
[ "${EXTRA:-0}" = 1 ] && BENCHES+=("--config small --unfused" "--config base --unfused")
for args in "${BENCHES[@]}"; do
  stamp "train_step $args"
  timeout 240 $PY benchmarks/train_step.py --device cuda $args --json >> "$OUT/bench.jsonl" 2>> "$OUT/bench.err" \
    || echo "FAILED: train_step $args" >> "$OUT/bench.err"
done
stamp "decode"
timeout 240 $PY benchmarks/decode.py --device cuda --config small --json >> "$OUT/bench.jsonl" 2>> "$OUT/bench.err" \
  || echo "FAILED: decode" >> "$OUT/bench.err"

if [ "${EXTRA:-0}" = 1 ]; then
  stamp "profile"
  for cfg in small base; do timeout 120 $PY benchmarks/profile_step.py --config $cfg --ops >> "$OUT/profile.txt" 2>&1; done
fi

# 2. the test suite on CuPy next to a training run and its twin
stamp "tests + training"
rm -rf runs/gpu runs/gpu-torch
ours=; twin=
( timeout 900 $PY -m pytest -q -rfEs -n 6 -p no:cacheprovider > "$OUT/pytest.txt" 2>&1; echo "pytest exit $?" >> "$OUT/pytest.txt" ) &
tests=$!
if [ "${TRAIN:-1}" = 1 ]; then
( /usr/bin/time -f "wall %e s" timeout 900 $PY -m minitransformer train --device cuda --preset small --steps "$STEPS" \
    --out runs/gpu --no-progress > "$OUT/train.txt" 2>&1; echo "train exit $?" >> "$OUT/train.txt" ) &
ours=$!
for _ in $(seq 300); do [ -f runs/gpu/config.json ] && [ -f runs/gpu/tokenizer.model ] && break; sleep 1; done
( /usr/bin/time -f "wall %e s" timeout 900 $PY benchmarks/train_translator_torch.py --run runs/gpu --out runs/gpu-torch \
    --device cuda --steps "$STEPS" > "$OUT/twin.txt" 2>&1 \
  && timeout 600 $PY -m minitransformer evaluate --checkpoint runs/gpu-torch --device cuda --no-progress >> "$OUT/twin.txt" 2>&1
  echo "twin exit $?" >> "$OUT/twin.txt" ) &
twin=$!
fi
wait $ours $twin $tests
stamp "done"

echo "== benchmarks"; cat "$OUT/bench.jsonl"; tail -5 "$OUT/bench.err" 2>/dev/null
echo "== tests"; tail -25 "$OUT/pytest.txt"
[ "${TRAIN:-1}" = 1 ] || exit 0
echo "== ours"; grep -E "trained|BLEU|chrF|wall|exit|Error|error" "$OUT/train.txt" | tail -8
echo "== twin"; grep -E "trained|BLEU|chrF|wall|exit|Error|error" "$OUT/twin.txt" | tail -8
