#!/usr/bin/env bash
# One-shot H100 measurement of issue 6 (docs/PERFORMANCE.md): TRL's anchor and the engine, compiled and eager,
# in one run of bench_train.py --llava7b. Needs the wheels of .whl/ (docs/PERFORMANCE.md says which); writes
# under $OUT. BUDGET (seconds, default 360) bounds the benchmark itself.
set -uo pipefail
OUT="${OUT:-/tmp/dama-gpu-perf}"
BUDGET="${BUDGET:-360}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_LOGS="recompiles,graph_breaks"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/bench_train.py --llava7b --budget-s "$BUDGET" --out "$OUT/bench_llava7b.jsonl" \
    2> "$OUT/bench_llava7b.err"
echo "bench rc=$?"
echo "recompiles: $(grep -c 'Recompiling' "$OUT/bench_llava7b.err")"
grep -iE "graph break|Traceback" "$OUT/bench_llava7b.err" | head -20
