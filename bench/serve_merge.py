"""One dominant adapter: serving it as LoRA on the base vs merged into the base, in one run.

    python bench/serve_merge.py [--concurrency 32] [--tokens 64] [--rounds 2] [-- VLLM ARGS]

Server A is the normal loraflow server with the adapter `dominant`; each round sends `concurrency`
requests of exactly `tokens` tokens (ignore_eos) to the base, then to `dominant`. The adapter is then
merged into the base with PEFT, and server B serves that merged folder as its base (same quantization,
empty registry) under the same load. It also compares greedy answers of `dominant` on A and the merged base on B.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_throughput import burst, make_adapter  # noqa: E402
from loraflow.hub.base import DEFAULT_BASE, resolve_base  # noqa: E402
from loraflow.hub.registry import Registry  # noqa: E402
from loraflow.serve.launcher import start_server  # noqa: E402

CHECK_PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The best way to learn is"]


def merge(base, adapter: Path, target: Path) -> Path:
    """The adapter folded into the base weights, saved with the tokenizer in the base's own dtype."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base.path, dtype="auto")
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(target)
    AutoTokenizer.from_pretrained(base.path).save_pretrained(target)
    return target


async def measure(
    url: str, labels: dict[str, str], concurrency: int, tokens: int, rounds: int
) -> tuple[dict, list[str]]:
    """tok/s per label (label -> served model), and the greedy answers of the last label's model."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    await burst(client, list(labels.values()), 4)  # load the adapter and warm the engine
    totals = {label: [0, 0.0] for label in labels}
    for _ in range(rounds):
        for label, model in labels.items():
            count, seconds = await burst(client, [model] * concurrency, tokens)
            totals[label][0] += count
            totals[label][1] += seconds
    checked = list(labels.values())[-1]
    answers = await client.completions.create(model=checked, prompt=CHECK_PROMPTS, max_tokens=16, temperature=0)
    texts = [choice.text for choice in sorted(answers.choices, key=lambda choice: choice.index)]
    return {label: count / seconds for label, (count, seconds) in totals.items()}, texts


def serve(registry: Path, base, labels, args, **settings) -> tuple[float, dict, list[str]]:
    """Start one server, time it to ready, measure it, and stop it before the next one starts."""
    started = time.perf_counter()
    server = start_server(registry, base, api_key="bench", extra_args=args.vllm_args, **settings)
    with server:
        server.wait_ready()
        ready = time.perf_counter() - started
        named = {label: server.base_name if model is None else model for label, model in labels.items()}
        rates, texts = asyncio.run(measure(server.url, named, args.concurrency, args.tokens, args.rounds))
    return ready, rates, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("vllm_args", nargs="*", help="extra vLLM arguments, after --")
    args = parser.parse_args()

    base = resolve_base(args.base)
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-") as scratch:
        scratch = Path(scratch)
        registry = Registry(scratch / "registry.json")
        source = make_adapter(base, scratch / "dominant-src", seed=0, rank=args.rank)
        registry.publish(source, "dominant", base=base)
        rank = max(registry.max_rank(), 8)  # the same --max-lora-rank on both servers
        ready_a, rates_a, texts_a = serve(
            registry.path, base, {"base": None, "lora": "dominant"}, args, max_lora_rank=rank
        )

        started = time.perf_counter()
        merge(base, source, scratch / "merged")
        merge_s = time.perf_counter() - started
        merged = resolve_base(str(scratch / "merged"))
        ready_b, rates_b, texts_b = serve(scratch / "empty.json", merged, {"merged": None}, args, max_lora_rank=rank)

    lora, alone, fused = rates_a["lora"], rates_a["base"], rates_b["merged"]
    matching = sum(a == b for a, b in zip(texts_a, texts_b))
    print(
        f"concurrency={args.concurrency} tokens={args.tokens} rounds={args.rounds} rank={args.rank} "
        f"extra={args.vllm_args}"
    )
    print(
        f"dominant adapter via LoRA: {lora:.1f} tok/s; base alone: {alone:.1f} tok/s; ratio lora/base "
        f"{lora / alone:.2f}"
    )
    print(
        f"merged into base: {fused:.1f} tok/s; ratio merged/lora-adapter {fused / lora:.2f}; merged/base "
        f"{fused / alone:.2f}"
    )
    print(
        f"merge took {merge_s:.1f}s, merged server ready in {ready_b:.1f}s (server A: {ready_a:.1f}s), "
        "a restart per new version (compare bench/serve_swap_latency.py for a hot-swap)"
    )
    print(f"greedy answers matching: {matching}/{len(CHECK_PROMPTS)}")
    for a, b in zip(texts_a, texts_b):
        if a != b:
            print(f"  lora {a!r}\n  merged {b!r}")


if __name__ == "__main__":
    main()
