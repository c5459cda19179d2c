#!/usr/bin/env bash
# Everything the GPU must show, in one call on a machine with an NVIDIA GPU and CuPy:
#   1. the step and decode benchmarks vs PyTorch, each alone on the GPU (benchmarks/*.py --json), and
#      where the small step's host time goes (benchmarks/host_costs.py, benchmarks/profile_step.py);
#   2. then, side by side: the whole test suite on CuPy, and a `minitransformer train` run on the GPU
#      with its PyTorch twin (benchmarks/train_translator_torch.py) trained for the same steps, both
#      scored by the same decoder (BLEU, chrF).
# Logs go to $OUT (default ./gpu-check). The corpus comes from $MINITRANSFORMER_CACHE (no network needed
# when spa.tsv is already there). STEPS (default 1500) sets the length of the training runs, SEEDS
# (default "0") how many pairs of runs (e.g. SEEDS="0 1 2": three, side by side on one GPU; each run's
# checkpoint is then evaluated on the whole test split eagerly and with --cuda-graph, EVAL_GRAPH=0 skips it); TRAIN=0
# leaves them out, DECODE=0 the decode benchmark, TWIN=0 the twins, TRAIN_ARGS adds options to our runs (e.g. --cuda-graph),
# EXTRA=1 adds our unfused step, the per-op profile and where a replayed decoding step's time goes;
# BASELINE=<dir> times an earlier checkout's small eager step alternately with ours. The step benchmarks time our step eagerly and
# replayed as a CUDA graph (--cuda-graph: a third side).
# With TRAIN=0 the test suite runs first, alone, then the benchmarks, most wanted first (the fp32
# steps, where the host time goes, the baseline, TF32, decoding); DEADLINE=<seconds> starts nothing after that many seconds and cuts
# each benchmark's time limit to what is left, so a short device lease still ends with a summary.
#     bash benchmarks/gpu_check.sh
#     TRAIN=0 DEADLINE=470 bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}; mkdir -p "$OUT"
STEPS=${STEPS:-1500}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
# limit <seconds>: the time limit for the next item, cut to what DEADLINE leaves (0: do not start it)
limit() {
  local left
  [ -n "${DEADLINE:-}" ] || { echo "$1"; return; }
  left=$(( DEADLINE - ($(date +%s) - t0) ))
  if [ "$left" -lt 30 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
run_tests() {
  local t; t=$(limit 900)
  [ "$t" = 0 ] && { echo "pytest not started: past DEADLINE" > "$OUT/pytest.txt"; return; }
  timeout "$t" $PY -m pytest -q -rfEs -n 6 -p no:cacheprovider > "$OUT/pytest.txt" 2>&1; echo "pytest exit $?" >> "$OUT/pytest.txt"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import sys, numpy, cupy, torch; print(sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

DEVICE=${DEVICE:-cuda}     # DEVICE=cpu BENCH=0 TESTS=0 checks this script's plumbing on a laptop

# 0. without training runs beside it, the test suite first, alone
TESTS_DONE=0
if [ "${TRAIN:-1}" != 1 ] && [ "${TESTS:-1}" = 1 ]; then
  stamp "tests"; run_tests; TESTS_DONE=1
fi

# 1. benchmarks, alone on the GPU, most wanted first
bench() {   # bench <script> <args>
  local t; t=$(limit 240)
  if [ "$t" = 0 ]; then echo "SKIPPED (past DEADLINE): $1 $2" >> "$OUT/bench.err"; return; fi
  stamp "$1 $2"
  timeout "$t" $PY "benchmarks/$1.py" --device cuda $2 --json >> "$OUT/bench.jsonl" 2>> "$OUT/bench.err" \
    || echo "FAILED: $1 $2" >> "$OUT/bench.err"
}
BENCHES=()
# --three-products: our eager step also with Q, K, V by three products (what one product saves);
# --own-handle: also with its 2-D products on our own cuBLAS handle instead of CuPy's @ (an A/B).
# fp32 first: the eager small step is the must-show still open, base fp32 the one with least margin
[ "${BENCH:-1}" = 1 ] && BENCHES=("--config small --cuda-graph --three-products --own-handle"
                                  "--config base --cuda-graph --three-products --own-handle")
for args in "${BENCHES[@]}"; do
  bench train_step "$args --rounds 5"
done
# where the eager step's host time goes: the host cost of each kind of call (benchmarks/host_costs.py,
# to multiply with benchmarks/launch_count.py's counts) and a cProfile of the small step ($OUT/host.txt)
if [ "${BENCH:-1}" = 1 ]; then
  t=$(limit 90)
  if [ "$t" = 0 ]; then echo "SKIPPED (past DEADLINE): host costs" >> "$OUT/bench.err"; else
    stamp "host costs, profile of the small step"
    { timeout "$t" $PY benchmarks/host_costs.py; timeout 60 $PY benchmarks/profile_step.py --config small --steps 10; } \
      > "$OUT/host.txt" 2>&1
  fi
fi
# BASELINE=<dir>: the files of an earlier commit (`mkdir bench-base && git archive <rev> | tar -x -C
# bench-base`: no .git inside, in a folder git does not ignore, so that it travels with the tree): its
# small eager step and ours, alternating in separate processes, each against its own PyTorch side
# ($OUT/baseline.jsonl has the baseline's)
if [ "${BENCH:-1}" = 1 ] && [ -n "${BASELINE:-}" ]; then
  for round in 1 2; do
    bench train_step "--config small --rounds 5"
    t=$(limit 240)
    if [ "$t" = 0 ]; then echo "SKIPPED (past DEADLINE): baseline $round" >> "$OUT/bench.err"; break; fi
    stamp "baseline $BASELINE train_step --config small"
    PYTHONPATH="$BASELINE" timeout "$t" $PY "$BASELINE/benchmarks/train_step.py" --device cuda --config small \
      --rounds 5 --json >> "$OUT/baseline.jsonl" 2>> "$OUT/bench.err" || echo "FAILED: baseline $round" >> "$OUT/bench.err"
  done
fi
# then what is already shown (TF32, decoding's KV cache), while time is left
BENCHES=()
[ "${BENCH:-1}" = 1 ] && BENCHES=("--config base --tf32 --cuda-graph" "--config small --tf32 --cuda-graph")
[ "${BENCH:-1}" = 1 ] && [ "${EXTRA:-0}" = 1 ] && BENCHES+=("--config small --unfused" "--config base --unfused")
for args in "${BENCHES[@]}"; do
  bench train_step "$args --rounds 5"
done
if [ "${BENCH:-1}" = 1 ] && [ "${DECODE:-1}" = 1 ]; then
  for args in "--config small --batch 8" "--config small --batch 64" "--config base --batch 64"; do
    bench decode "$args --cuda-graph"
  done
fi

if [ "${EXTRA:-0}" = 1 ]; then
  stamp "profile"
  for cfg in small base; do timeout 120 $PY benchmarks/profile_step.py --config $cfg --ops >> "$OUT/profile.txt" 2>&1; done
  for args in "--config small --batch 8" "--config small --batch 64" "--config base --batch 64"; do
    timeout 90 $PY benchmarks/decode_parts.py $args >> "$OUT/profile.txt" 2>&1
  done
fi

# 2. the test suite on CuPy next to training runs (one per seed in SEEDS) and their twins
stamp "tests + training"
pids=()
if [ "${TESTS:-1}" = 1 ] && [ "$TESTS_DONE" = 0 ]; then
  ( run_tests ) &
  pids+=($!)
fi
if [ "${TRAIN:-1}" = 1 ]; then
  mkdir -p runs
  for seed in ${SEEDS:-0}; do
    rm -rf "runs/gpu-s$seed" "runs/gpu-torch-s$seed"
    ( /usr/bin/time -f "wall %e s" timeout 900 $PY -m minitransformer train --device "$DEVICE" --preset small \
        --steps "$STEPS" --seed "$seed" --out "runs/gpu-s$seed" --no-progress ${TRAIN_ARGS:-} > "runs/train-s$seed.log" 2>&1
      echo "train exit $?" >> "runs/train-s$seed.log"
      if [ "${EVAL_GRAPH:-1}" = 1 ]; then   # the whole test split decoded eagerly and replayed: same BLEU?
        for graph in "" --cuda-graph; do
          /usr/bin/time -f "wall %e s" timeout 600 $PY -m minitransformer evaluate --checkpoint "runs/gpu-s$seed" \
            --device "$DEVICE" --no-progress $graph > "runs/eval${graph:+-graph}-s$seed.log" 2>&1
        done
      fi ) &
    pids+=($!)
    for _ in $(seq 600); do   # the twin starts once the run has written its config and tokenizer
      [ -f "runs/gpu-s$seed/tokenizer.model" ] || ! kill -0 "${pids[-1]}" 2>/dev/null && break; sleep 1
    done
    [ "${TWIN:-1}" = 1 ] || continue
    ( /usr/bin/time -f "wall %e s" timeout 900 $PY benchmarks/train_translator_torch.py --run "runs/gpu-s$seed" \
        --out "runs/gpu-torch-s$seed" --device "$DEVICE" --steps "$STEPS" > "runs/twin-s$seed.log" 2>&1 \
      && timeout 600 $PY -m minitransformer evaluate --checkpoint "runs/gpu-torch-s$seed" --device "$DEVICE" \
        --no-progress ${EVAL_ARGS:-} >> "runs/twin-s$seed.log" 2>&1
      echo "twin exit $?" >> "runs/twin-s$seed.log" ) &
    pids+=($!)
  done
fi
wait "${pids[@]}"
stamp "done"

echo "== benchmarks (full JSON in $OUT/bench.jsonl)"; tail -5 "$OUT/bench.err" 2>/dev/null
[ -f "$OUT/bench.jsonl" ] && $PY benchmarks/summarize.py "$OUT/bench.jsonl"
[ -f "$OUT/baseline.jsonl" ] && { echo "== baseline $BASELINE"; $PY benchmarks/summarize.py "$OUT/baseline.jsonl"; }
[ -f "$OUT/host.txt" ] && { echo "== host costs (whole: $OUT/host.txt)"; head -48 "$OUT/host.txt"; }
echo "== tests"; tail -25 "$OUT/pytest.txt" 2>/dev/null
[ "${TRAIN:-1}" = 1 ] || exit 0
for seed in ${SEEDS:-0}; do
  { echo "== seed $seed"; cat "runs/train-s$seed.log"; } >> "$OUT/train.txt"
  [ -f "runs/twin-s$seed.log" ] && { echo "== seed $seed"; cat "runs/twin-s$seed.log"; } >> "$OUT/twin.txt"
done
SEEDS="${SEEDS:-0}" $PY - <<'PY' | tee "$OUT/bleu.txt"
import json, os, re, statistics
rows = []
for seed in os.environ["SEEDS"].split():
    ours = json.load(open(f"runs/gpu-s{seed}/bleu.json")) if os.path.exists(f"runs/gpu-s{seed}/bleu.json") else {}
    twin_log = f"runs/twin-s{seed}.log"
    twin = re.findall(r"^BLEU = ([0-9.]+)", open(twin_log).read(), re.M) if os.path.exists(twin_log) else []
    wall = re.findall(r"^wall ([0-9.]+) s", open(f"runs/train-s{seed}.log").read(), re.M)
    rows.append((seed, ours.get("bleu"), float(twin[-1]) if twin else None, wall[-1] if wall else "?"))
    print(f"seed {seed}: ours BLEU {ours.get('bleu')}  chrF {ours.get('chrf')}  (train command {rows[-1][3]} s)  "
          f"twin BLEU {rows[-1][2]}")
    for name in ("eval", "eval-graph"):      # all test sentences, eagerly and replayed (EVAL_GRAPH)
        log = f"runs/{name}-s{seed}.log"
        if os.path.exists(log):
            text = open(log).read()
            found = [re.findall(p, text, re.M) for p in (r"^BLEU = ([0-9.]+)", r"^wall ([0-9.]+) s")]
            print(f"  evaluate{' --cuda-graph' if name == 'eval-graph' else ''}: BLEU "
                  f"{found[0][-1] if found[0] else '?'} in {found[1][-1] if found[1] else '?'} s")
pairs = [(o, t) for _, o, t, _ in rows if o is not None and t is not None]
if pairs:
    diffs = [o - t for o, t in pairs]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    print(f"ours - twin over {len(diffs)} seed(s): mean {statistics.mean(diffs):+.2f} BLEU, sd {sd:.2f}")
PY
