#!/usr/bin/env bash
# The checks only a CUDA GPU can make, as one call on a lent GPU machine (15 minutes of device time a session, all
# calls together, so one prepared script): the GPU tier of the tests (tests/gpu), the rest of the suite where CUDA is
# visible (the tests must pass there too), and bench_memory on Mistral-7B at 4 x 512 and 1 x 4096 tokens (the
# plan's allocated and reserved peaks and its CUDA context against torch's and NVML's figures).
# Here first: bash tools/device_kit.sh. Then the device tool: carry [".device/site.tar.xz"], command
#   bash tools/device_check.sh            (each step has a time limit: together under 8.5 minutes)
# Logs and the bench's JSON rows go to $OUT (the device tool brings them back); the last lines printed are a summary.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
python3 -c "import tarfile; tarfile.open('.device/site.tar.xz').extractall('.device', filter='data')" || exit 1
export PYTHONPATH=$PWD/.device/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
python3 -c "import torch, transformers, accelerate, bitsandbytes, peft, trl, datasets as d; print('torch', torch.__version__,
'| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| bitsandbytes',
bitsandbytes.__version__, '| peft', peft.__version__, '| trl', trl.__version__, '| datasets', d.__version__)"

summary=()
step() {  # step NAME SECONDS COMMAND...: its output in $OUT/NAME.log, the end of it printed
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
    tail -n 25 "$OUT/$name.log"
    summary+=("$name: exit $rc, $((SECONDS - start)) s: $(grep -E '(passed|failed|error)' "$OUT/$name.log" | tail -n 1)")
}

step gpu_tier 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu -rs
# The CPU-pinned suite with CUDA visible; SmolLM2 (107 MiB) cannot travel: its slow tests are left out.
step suite 240 python3 -m pytest -rf -v -p no:cacheprovider -n 12 --dist loadfile -m "not slow and not gpu" \
    --deselect tests/test_quickstart.py tests
step bench_mistral 140 python3 tools/bench_memory.py --gpu --models mistral-7b --points 512x4,4096x1
echo "== suite so far: $(grep -c ' PASSED ' "$OUT/suite.log") passed, $(grep -c ' FAILED ' "$OUT/suite.log") failed"
grep -E '^\[gw[0-9]+\].* (FAILED|ERROR) ' "$OUT/suite.log" | head -n 30
echo "== summary"
printf '%s\n' "${summary[@]}"
grep '^{' "$OUT/bench_mistral.log" | python3 -c "
import json, sys
for r in map(json.loads, sys.stdin):
    print({k: r.get(k) for k in ('max_length', 'micro_batch_size', 'train_alloc_pred', 'train_alloc_meas',
          'train_reserved_pred', 'train_reserved_meas', 'eval_alloc_pred', 'eval_alloc_meas', 'load_reserved_meas',
          'context_pred', 'context_meas', 'error')})"
