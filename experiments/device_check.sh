#!/usr/bin/env bash
# The GPU check (issue 16): one call on a lent GPU, under 8 minutes, everything under $OUT.
#
#   1. env.txt: jax, its devices, nvidia-smi's view of the card.
#   2. tests.log: the fused Pallas kernel compiled by Triton and the single-query decode path
#      against the float64 oracle on the device (tests/test_attention_pallas.py,
#      tests/test_attention_decode.py; float32 matmuls at full precision, bf16 at its tolerance).
#   3. benchmark.json / benchmark.png / benchmark.log: `python -m experiments.benchmark` at
#      Llama-2-7B shapes in bf16 (attention: the kernel vs cuDNN causal and sliding window;
#      encode: LM-Infinite vs vanilla, whole model; decode: Λ-cache vs full cache vs roofline).
#      The JSON is written after each section, so a stage stopped by its time limit keeps what
#      it measured.
#
# On the device machine (no network; the project runs in place):
#   bash experiments/device_check.sh            # OUT defaults to results/device
# On a CPU, to check the script itself with small shapes (about 3 minutes on 2 cores):
#   DEVICE_CHECK_PRESET=tiny bash experiments/device_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/device}
PRESET=${DEVICE_CHECK_PRESET:-llama2-7b}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
status=0

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, remember a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=$?
  echo "== $name: rc $rc after $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

{
  date -u
  "$PYTHON" -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__); print(jax.devices())'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem \
    --format=csv
} 2>&1 | tee "$OUT/env.txt"

if [ "$PRESET" = tiny ]; then
  tests=(tests/test_attention_pallas.py -k "oracle or bfloat16")
  sizes=(--attention-lengths 1024 2048 --encode-lengths 1024 2048 --positions 1024 4096 --batches 1 --repeats 1)
else
  tests=(tests/test_attention_pallas.py tests/test_attention_decode.py)
  sizes=(--attention-lengths 8192 32768 131072 --encode-lengths 8192 32768 131072 --positions 4096 32768 131072
         --batches 1 8 --repeats 2)
fi
JAX_DEFAULT_MATMUL_PRECISION=highest stage tests 210 "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}"
stage benchmark 330 "$PYTHON" -m experiments.benchmark --preset "$PRESET" "${sizes[@]}" \
  --out "$OUT/benchmark.json" --plot "$OUT/benchmark.png"
echo "device check: $([ "$status" -eq 0 ] && echo passed || echo 'FAILED (see the logs)'); files in $OUT"
exit "$status"
