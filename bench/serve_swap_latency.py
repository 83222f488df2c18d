"""Hot-swap latency under load: from a publish that promotes (one write) to the first token streamed by the new version.

    python bench/serve_swap_latency.py [--rate 8] [--swaps 3] [--tokens 32]

Streaming requests for NAME arrive at a steady rate (open loop: a new one every 1/rate s, whether or not
earlier ones finished), so no client waits for its batch to end. Each swap publishes a new live version of NAME
(the server is not told) and records when the first token produced by that version arrives; every streamed
chunk names the version that produced it (NAME@V). The baseline, measured in the same run, is the usual
wait for a first token under this load: half the arrival gap plus the median time to first token.
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
from loraflow.hub.base import DEFAULT_BASE, resolve_base  # noqa: E402
from loraflow.hub.registry import Registry  # noqa: E402
from loraflow.serve.launcher import start_server  # noqa: E402

NAME = "swap"
PROMPT = "Tell me about the sea."


async def run(url: str, registry: Registry, base, sources: list[Path], rate: float, tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    first_token_at: dict[str, float] = {}
    time_to_first_token: list[float] = []
    counts = {"ok": 0, "failed": 0}
    in_flight: set[asyncio.Task] = set()

    async def one():
        started = time.perf_counter()
        try:
            stream = await client.completions.create(
                model=NAME, prompt=PROMPT, max_tokens=tokens, temperature=0, stream=True
            )
            first = None
            async for chunk in stream:
                if first is None:
                    first = time.perf_counter()
                    time_to_first_token.append(first - started)
                    first_token_at.setdefault(chunk.model, first)
            counts["ok"] += 1
        except Exception:  # counted, and the benchmark reports it
            counts["failed"] += 1

    async def arrivals(stop: asyncio.Event):
        while not stop.is_set():
            task = asyncio.create_task(one())
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            await asyncio.sleep(1 / rate)

    stop = asyncio.Event()
    arriving = asyncio.create_task(arrivals(stop))
    while f"{NAME}@1" not in first_token_at:
        await asyncio.sleep(0.01)
    await asyncio.sleep(2)  # let the load settle before the first swap
    latencies = []
    for source in sources:
        version = await asyncio.to_thread(registry.publish, source, NAME, base=base, promote=True)
        published = time.perf_counter()
        while version.ref not in first_token_at:
            await asyncio.sleep(0.005)
        latencies.append(first_token_at[version.ref] - published)
        await asyncio.sleep(1)
    stop.set()
    await arriving
    await asyncio.gather(*in_flight)
    return {"latencies": latencies, "ttft": time_to_first_token, **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--rate", type=float, default=8, help="requests started per second")
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
            result = asyncio.run(run(server.url, registry, base, sources, args.rate, args.tokens))
    latencies = result["latencies"]
    usual = 0.5 / args.rate + statistics.median(result["ttft"])
    print(
        f"{args.rate:g} streaming requests/s of {args.tokens} tokens, {args.swaps} publishes: {result['ok']} requests "
        f"ok, {result['failed']} failed"
    )
    print("publish -> first token of the new version: " + ", ".join(f"{s * 1000:.0f} ms" for s in latencies))
    print(
        f"median {statistics.median(latencies) * 1000:.0f} ms, worst {max(latencies) * 1000:.0f} ms; "
        f"usual wait for a first token at this load {usual * 1000:.0f} ms; ratio swap/usual "
        f"{statistics.median(latencies) / usual:.2f}"
    )


if __name__ == "__main__":
    main()
