"""Throughput of 8 distinct adapters in a mixed stream vs the base alone, on one vLLM server, in one run.

    python bench/serve_throughput.py [--ranks 8,16,64] [--targets q_proj,v_proj] [--adapters 8] [--concurrency 32]
                                     [--tokens 64] [--rounds 2] [-- VLLM ARGS]

For each rank, one server (its max LoRA rank matched to the adapters'): each round sends `concurrency` requests of
exactly `tokens` tokens (ignore_eos) to the base, then the same number spread over the adapters; the ratio is
adapter tok/s over base tok/s, summed over rounds. Beside it, the arithmetic limit: the base's multiply-adds per
token over the base's plus the adapter's (r x (in + out) per adapted projection), from the base's config; attention
over the short context and sampling are left out of both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def make_adapter(base, folder: Path, seed: int, rank: int, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """An untrained LoRA adapter with random B, so it really changes every targeted projection."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base.path)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def projection_shapes(base) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear projection of one decoder layer, from the base's config.json."""
    config = json.loads((Path(base.path) / "config.json").read_text())
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    q = config["num_attention_heads"] * head_dim
    return {
        "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
        "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden),
    }  # fmt: skip


def arithmetic_limit(base, rank: int, targets: tuple[str, ...]) -> float:
    """Base multiply-adds per token over base + LoRA's: the best ratio the LoRA arithmetic allows."""
    config = json.loads((Path(base.path) / "config.json").read_text())
    shapes = projection_shapes(base)
    layers = config["num_hidden_layers"]
    base_macs = layers * sum(i * o for i, o in shapes.values()) + config["hidden_size"] * config["vocab_size"]
    lora_macs = layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)
    return base_macs / (base_macs + lora_macs)


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


def measure_rank(args, base, rank: int, targets: tuple[str, ...]) -> dict:
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-") as scratch:
        registry = Registry(Path(scratch) / "registry.json")
        names = []
        for index in range(args.adapters):
            folder = make_adapter(base, Path(scratch) / f"src{index}", seed=index, rank=rank, targets=targets)
            names.append(registry.publish(folder, f"bench{index}", base=base).name)
        server = start_server(
            registry.path,
            base,
            api_key="bench",
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            extra_args=args.vllm_args,
        )
        with server:
            server.wait_ready()
            rates = asyncio.run(
                measure(server.url, server.base_name, names, args.concurrency, args.tokens, args.rounds)
            )
        return {**rates, "max_lora_rank": server.settings.resolved_lora_rank(), "settings": server.settings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--ranks", default="8,16,64", help="comma-separated LoRA ranks, one server each")
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated projections the adapters adapt")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--max-lora-rank", type=int, default=None)
    parser.add_argument("vllm_args", nargs="*", help="extra vLLM arguments, after --")
    args = parser.parse_args()

    base = resolve_base(args.base)
    targets = tuple(args.targets.split(","))
    fast = os.environ.get("LORAFLOW_FAST_CPU_LORA", "1") != "0"
    for rank in (int(value) for value in args.ranks.split(",")):
        rates = measure_rank(args, base, rank, targets)
        served = rates["settings"]
        print(
            f"rank={rank} targets={args.targets} grouped CPU LoRA path={fast} max_loras={args.max_loras} "
            f"max_lora_rank={rates['max_lora_rank']} quantization={served.resolved_quantization()} "
            f"dtype={served.resolved_dtype()} extra={args.vllm_args}"
        )
        print(f"  base alone: {rates['base']:.1f} tok/s   {args.adapters} adapters mixed: {rates['mixed']:.1f} tok/s")
        print(
            f"ratio (adapters / base) rank {rank}: {rates['mixed'] / rates['base']:.2f} "
            f"(arithmetic limit {arithmetic_limit(base, rank, targets):.3f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
