#!/usr/bin/env bash
# One-shot engine check on a CUDA host (see docs/ and the closing notes): runs the engine tests there and the
# demo in bf16, writing logs under $OUT. Needs torch/transformers/peft/accelerate installed; extra wheels from .whl/.
set -uo pipefail
OUT="${OUT:-/tmp/dama-gpu-check}"
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/versions.txt"
# The demo on the GPU in bf16 (auto precision picks bf16 on CUDA).
/usr/bin/time -v python3 -m dama_engine.cli --demo --output-dir /tmp/demo-bf16 model.precision=auto > "$OUT/demo_bf16.log" 2> "$OUT/demo_bf16.err"
echo "demo rc=$?"; tail -4 "$OUT/demo_bf16.log"; grep -E "Elapsed|Maximum resident" "$OUT/demo_bf16.err"
cp /tmp/demo-bf16/adapter/training_curves.png "$OUT/demo_bf16_curves.png" 2>/dev/null
# The engine tests on a CUDA machine with that machine's library versions.
timeout 300 python3 -m pytest tests/engine -q -p no:cacheprovider --continue-on-collection-errors --ignore=tests/engine/test_distributed_training.py --timeout 240 > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; tail -25 "$OUT/pytest.log"
