"""Throughput of 8 distinct adapters in a mixed stream vs the base alone, on one vLLM server, in one run.

    python bench/serve_throughput.py [--adapters 8] [--concurrency 32] [--tokens 64] [--rounds 2] [-- VLLM ARGS]

Each round sends `concurrency` requests of exactly `tokens` tokens (ignore_eos) to the base, then the
same number spread over the adapters; the ratio is adapter tok/s over base tok/s, summed over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loraflow.hub.base import DEFAULT_BASE, resolve_base  # noqa: E402
from loraflow.hub.registry import Registry  # noqa: E402
from loraflow.serve.launcher import start_server  # noqa: E402

PROMPT = "Write a short story about a ship that sails to a distant island."


def make_adapter(base, folder: Path, seed: int, rank: int) -> Path:
    """An untrained LoRA adapter with random B, so it really changes every q/v projection."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base.path)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


async def burst(client, models: list[str], tokens: int) -> tuple[int, float]:
    async def one(model: str) -> int:
        answer = await client.completions.create(
            model=model, prompt=PROMPT, max_tokens=tokens, temperature=0, extra_body={"ignore_eos": True}
        )
        return answer.usage.completion_tokens

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(model) for model in models))
    return sum(counts), time.perf_counter() - started


async def measure(url: str, base_name: str, adapters: list[str], concurrency: int, tokens: int, rounds: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    await burst(client, [base_name] + adapters, 4)  # load every adapter and warm the engine
    totals = {"base": [0, 0.0], "mixed": [0, 0.0]}
    for _ in range(rounds):
        for label, models in (
            ("base", [base_name] * concurrency),
            ("mixed", [adapters[i % len(adapters)] for i in range(concurrency)]),
        ):
            count, seconds = await burst(client, models, tokens)
            totals[label][0] += count
            totals[label][1] += seconds
    return {label: count / seconds for label, (count, seconds) in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--max-lora-rank", type=int, default=None)
    parser.add_argument("vllm_args", nargs="*", help="extra vLLM arguments, after --")
    args = parser.parse_args()

    base = resolve_base(args.base)
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-") as scratch:
        registry = Registry(Path(scratch) / "registry.json")
        names = []
        for index in range(args.adapters):
            folder = make_adapter(base, Path(scratch) / f"src{index}", seed=index, rank=args.rank)
            names.append(registry.publish(folder, f"bench{index}", base=base).name)
        server = start_server(
            registry.path,
            base,
            api_key="bench",
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            extra_args=args.vllm_args,
        )
        rank = server.settings.resolved_lora_rank()
        with server:
            server.wait_ready()
            rates = asyncio.run(
                measure(server.url, server.base_name, names, args.concurrency, args.tokens, args.rounds)
            )
    fast = os.environ.get("LORAFLOW_FAST_CPU_LORA", "1") != "0"
    settings = (
        f"grouped CPU LoRA path={fast} max_loras={args.max_loras} max_lora_rank={rank} rank={args.rank} "
        f"extra={args.vllm_args}"
    )
    print(f"{settings}")
    print(f"base alone: {rates['base']:.1f} tok/s   {args.adapters} adapters mixed: {rates['mixed']:.1f} tok/s")
    print(f"ratio (adapters / base): {rates['mixed'] / rates['base']:.2f}")


if __name__ == "__main__":
    main()
