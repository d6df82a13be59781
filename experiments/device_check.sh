#!/usr/bin/env bash
# The GPU check (issues 16 and 33): one call on a lent GPU, under 8 minutes, everything under $OUT.
#
#   1. env.txt: jax, its devices, nvidia-smi's view of the card.
#   2. tests.log: on the device, against the float64 oracle: Λ-attention's cuDNN route (cuDNN's fused
#      sliding window plus the sink branch, bf16 at its tolerance), the fused Pallas kernel compiled by
#      Triton and the single-query decode path (tests/test_attention_vendor.py,
#      tests/test_attention_pallas.py, tests/test_attention_decode.py; float32 matmuls at full
#      precision). The splash tests are left out: off a TPU they run in the Pallas interpreter, which
#      the CPU test suite covers.
#   3. benchmark.json / benchmark.png / benchmark.log: `python -m experiments.benchmark` at
#      Llama-2-7B shapes in bf16. attention at 8K, 32K, 128K: the cuDNN route, the Pallas kernel and
#      the blockwise path vs cuDNN causal and sliding window; encode at 8K, 32K, 128K: the whole
#      model, LM-Infinite vs vanilla, both "auto" (time, XLA's memory plan, the device's peak);
#      decode: Λ-cache vs full cache vs roofline at batch 1 and 8; then the targets (cuDNN route vs
#      window and causal at 32K, encoding speed-up at 128K and memory linear in T, Λ-cache decoding
#      vs roofline at 32K), printed at the end and kept under "targets" in the JSON. The JSON is
#      written after every row, so a stage stopped by its time limit keeps what it measured.
#
# On the device machine (no network; the project runs in place):
#   bash experiments/device_check.sh            # OUT defaults to results/device
# On a CPU, to check the script itself with small shapes (1 min 33 s on 2 cores when written):
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
  tests=(tests/test_attention_vendor.py tests/test_attention_pallas.py -k "oracle or bfloat16")
  sizes=(--attention-lengths 1024 2048 --encode-lengths 1024 2048 4096 --positions 1024 4096 --batches 1 --repeats 1)
else
  tests=(tests/test_attention_vendor.py tests/test_attention_pallas.py tests/test_attention_decode.py -k "not splash")
  sizes=(--attention-lengths 8192 32768 131072 --encode-lengths 8192 32768 131072 --positions 4096 32768 131072
         --batches 1 8 --repeats 2)
fi
JAX_DEFAULT_MATMUL_PRECISION=highest stage tests 180 "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}"
stage benchmark 270 "$PYTHON" -m experiments.benchmark --preset "$PRESET" "${sizes[@]}" \
  --out "$OUT/benchmark.json" --plot "$OUT/benchmark.png"
echo "device check: $([ "$status" -eq 0 ] && echo passed || echo 'FAILED (see the logs)'); files in $OUT"
exit "$status"
