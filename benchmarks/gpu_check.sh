#!/usr/bin/env bash
# The GPU check, one script: bench.py at batch 16 and 128, eager and compiled with CUDA graphs (eff = MFU against
# the GPU's dense bf16 peak, bench.PEAK_TFLOPS), then one-epoch demo trainings in bf16 and in fp16. Every section
# has its own time limit, so that the whole stays under ten minutes of a lent GPU's time.
#
#   bash benchmarks/gpu_check.sh               # on the GPU machine; logs in $OUT if set, else gpu-check-logs/
#   DRY_RUN=1 bash benchmarks/gpu_check.sh     # the same commands on the CPU with the mini CLIP (tests/test_bench.py)
set -uo pipefail
cd "$(dirname "$0")/.."  # the repository root: the commands run from there
PY=${PYTHON:-python}
LOGS=${OUT:-gpu-check-logs}
mkdir -p "$LOGS"
if [ -n "${DRY_RUN:-}" ]; then
  BENCH=(--device cpu --tiny --amp bf16 --batch-sizes 4 --warmup 0 --iters 1 --rounds 1 --test-images 1)
  COMPILED=(--compile reduce-overhead --compile-backend eager)  # traces the graph, generates no code
  DEMO=(--batch-size 16 --log-every 1000 --method linear)  # no backward through the backbone: fp16 is emulated here
  LIMIT=(600 600 600)  # a shared CPU: no limit that matters
  export PE_RSITR_CACHE=${PE_RSITR_CACHE:-$LOGS/demo-data}
else
  BENCH=(--device cuda --batch-sizes 16 128)
  COMPILED=(--compile reduce-overhead)
  DEMO=()
  LIMIT=(150 270 60)  # seconds: bench eager, bench compiled, each demo training
fi
"$PY" -c "import clip" 2>/dev/null || BENCH+=(--skip-baseline)  # the released path needs OpenAI's reference CLIP
failed=0

section() {  # name, time limit in seconds, command...: its output goes to the screen and to $LOGS/name.log
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed=1
}

"$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$LOGS/machine.log"
section bench-eager "${LIMIT[0]}" "$PY" -m benchmarks.bench "${BENCH[@]}"
section bench-compiled "${LIMIT[1]}" "$PY" -m benchmarks.bench "${BENCH[@]}" "${COMPILED[@]}"
for amp in bf16 fp16; do
  section "train-demo-$amp" "${LIMIT[2]}" "$PY" train.py --dataset demo --epochs 1 --amp "$amp" --out "$LOGS/run-$amp" "${DEMO[@]}"
done
echo "== gpu_check: $([ $failed -eq 0 ] && echo all sections passed || echo SOME SECTIONS FAILED), logs in $LOGS"
exit $failed
