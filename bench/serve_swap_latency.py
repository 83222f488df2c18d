"""Hot-swap latency under load: from a publish returning to the first token streamed by the new version.

    python bench/serve_swap_latency.py [--clients 8] [--swaps 3] [--tokens 32]

Clients keep streaming requests for NAME from one vLLM server. Each swap publishes a new version of
NAME (the server is not told) and records when the first streamed token produced by that version
arrives; every streamed chunk names the version that produced it (NAME@V).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_throughput import make_adapter  # noqa: E402
from hub.base import resolve_base  # noqa: E402
from hub.registry import Registry  # noqa: E402
from serve.launcher import start_server  # noqa: E402

NAME = "swap"
PROMPT = "Tell me about the sea."


async def run(url: str, registry: Registry, base, sources: list[Path], clients: int, tokens: int) -> tuple[list[float], int, int]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    first_token_at: dict[str, float] = {}
    counts = {"ok": 0, "failed": 0}
    stop = asyncio.Event()

    async def keep_streaming():
        while not stop.is_set():
            try:
                stream = await client.completions.create(model=NAME, prompt=PROMPT, max_tokens=tokens, temperature=0, stream=True)
                async for chunk in stream:
                    first_token_at.setdefault(chunk.model, time.perf_counter())
                counts["ok"] += 1
            except Exception:  # counted, and the benchmark reports it
                counts["failed"] += 1

    workers = [asyncio.create_task(keep_streaming()) for _ in range(clients)]
    while f"{NAME}@1" not in first_token_at:
        await asyncio.sleep(0.01)
    await asyncio.sleep(2)  # let the load settle before the first swap
    latencies = []
    for source in sources:
        version = await asyncio.to_thread(registry.publish, source, NAME, base=base)
        published = time.perf_counter()
        while version.ref not in first_token_at:
            await asyncio.sleep(0.005)
        latencies.append(first_token_at[version.ref] - published)
        await asyncio.sleep(1)
    stop.set()
    await asyncio.gather(*workers)
    return latencies, counts["ok"], counts["failed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    base = resolve_base(args.base)
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-") as scratch:
        registry = Registry(Path(scratch) / "registry.json")
        registry.publish(make_adapter(base, Path(scratch) / "v1", seed=0, rank=8), NAME, base=base)
        sources = [make_adapter(base, Path(scratch) / f"next{i}", seed=i + 1, rank=8) for i in range(args.swaps)]
        with start_server(registry.path, base, api_key="bench") as server:
            server.wait_ready()
            latencies, ok, failed = asyncio.run(run(server.url, registry, base, sources, args.clients, args.tokens))
    print(f"{args.clients} streaming clients, {args.swaps} publishes: {ok} requests ok, {failed} failed")
    print("publish -> first token of the new version: " + ", ".join(f"{s * 1000:.0f} ms" for s in latencies))
    print(f"median {statistics.median(latencies) * 1000:.0f} ms, worst {max(latencies) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
