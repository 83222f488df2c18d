"""Many adapters on one server: cold and warm time to first token, a cold load under decoding load, 8 hot adapters'
throughput against the base, and the registry's publish and resolve cost as it grows, measured side by side in one run.

    python bench/serve_many_adapters.py [--adapters 1000] [--versions 5000] [--cold 60] [--background 8]
    python bench/serve_many_adapters.py --quick          # what bench/run_all runs: 40 adapters, 400 versions

The adapters are PEFT LoRA adapters of the real base, distinct (random A as PEFT initialises it, random nonzero B),
saved in fp32 as the trainers save them, and published one by one with `Registry.publish`. Their mix (MIX): 80 %
rank 8 on q/v, 10 % rank 16 on q/k/v/o, 7 % rank 32 and 3 % rank 64 on all seven projections (1,000 of them and
the 5,000 versions take about 8 GB; the run checks free disk first). One vLLM server (`start_server`, its defaults:
max-loras 8, max-cpu-loras 16, max-lora-rank from the registry, so 64) serves them all, and each phase compares two
things in it:
- cold vs warm, idle: for each of --cold adapters never asked for before, a streamed completion (seconds until its
  first token's chunk), then the same adapter again (warm). Every prompt is new, so no prefix cache helps either;
- the same while --background streaming clients keep decoding on the base and three hot adapters; beside it, the
  longest gap between two of their chunks during each probe (how long a cold load stalls the others);
- throughput: 32 concurrent 64-token requests spread over 8 hot adapters (every kind of the mix) vs the base alone,
  as bench/serve_throughput.py measures it; then the same with 8 hot adapters of the commonest kind (rank 8, q/v),
  which the server serves with its max-lora-rank sized for the mix's rank 64;
- the registry: publish time of the first 20 publishes against the last 20 (at --adapters names), then the
  registry grows to --versions versions (small rank-1 q_proj versions of the same names) and is measured again:
  publish, and the resolve a server pays per request (`Registry.snapshot()` after a change, which re-reads the
  file, and `RegistrySnapshot.find`); last, the server's warm time to first token right after a publish (it
  re-reads the registry) against with no publish in between.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.arena_scale import percentile  # noqa: E402
from bench.serve_throughput import measure as throughput  # noqa: E402
from bench.serve_throughput import projection_shapes  # noqa: E402
from loraflow.hub.base import DEFAULT_BASE, resolve_base  # noqa: E402
from loraflow.hub.registry import Registry  # noqa: E402
from loraflow.serve.launcher import start_server  # noqa: E402

PROMPT = "Write a short story about a ship that sails to a distant island."
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_SEVEN = ATTENTION + ("gate_proj", "up_proj", "down_proj")
WINDOW = 20  # publishes timed at each end of a registry's growth


@dataclass(frozen=True)
class Kind:
    share: float
    rank: int
    targets: tuple[str, ...]

    @property
    def label(self) -> str:
        where = "q/v" if self.targets == ("q_proj", "v_proj") else "qkvo" if self.targets == ATTENTION else "all 7"
        return f"r{self.rank} {where}"


MIX = (
    Kind(0.80, 8, ("q_proj", "v_proj")),
    Kind(0.10, 16, ATTENTION),
    Kind(0.07, 32, ALL_SEVEN),
    Kind(0.03, 64, ALL_SEVEN),
)
FILLER = Kind(0.0, 1, ("q_proj",))  # the extra versions that grow the registry: only their records matter


def spread(samples: list[float]) -> str:
    return f"p50 {percentile(samples, 0.5) * 1e3:6.1f} ms  p95 {percentile(samples, 0.95) * 1e3:6.1f} ms"


def kinds_for(count: int, seed: int = 0) -> list[Kind]:
    """`count` kinds in MIX's proportions (largest remainder, at least one of each when there is room), shuffled."""
    exact = [kind.share * count for kind in MIX]
    counts = [max(int(value), 1 if count >= len(MIX) else 0) for value in exact]
    by_remainder = sorted(range(len(MIX)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for index in by_remainder[: max(0, count - sum(counts))]:
        counts[index] += 1
    while sum(counts) > count:
        counts[counts.index(max(counts))] -= 1
    kinds = [kind for kind, number in zip(MIX, counts) for _ in range(number)]
    random.Random(seed).shuffle(kinds)
    return kinds


def adapter_bytes(base, kind: Kind) -> int:
    """fp32 bytes of one adapter of this kind: r x (in + out) per adapted projection per layer."""
    shapes = projection_shapes(base)
    layers = json.loads((Path(base.path) / "config.json").read_text())["num_hidden_layers"]
    return 4 * layers * sum(kind.rank * sum(shapes[target]) for target in kind.targets)


class AdapterMaker:
    """One PEFT model per kind, re-randomised and saved for each adapter: loading the base once per kind, not per
    adapter, is what makes a thousand of them take minutes."""

    def __init__(self, base):
        self.base = base
        self.models = {}

    def make(self, kind: Kind, folder: Path, seed: int) -> Path:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = self.models.get(kind)
        if model is None:
            config = LoraConfig(r=kind.rank, lora_alpha=kind.rank, target_modules=list(kind.targets))
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(self.base.path), config)
            self.models[kind] = model
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".lora_A." in name:  # nn.Linear's own initialisation, as PEFT gives A
                    bound = 1 / math.sqrt(parameter.shape[1])
                    parameter.uniform_(-bound, bound, generator=generator)
                elif ".lora_B." in name:  # nonzero, so every adapter changes the answers and differs from the others
                    parameter.normal_(0.0, 0.02, generator=generator)
        model.save_pretrained(folder)
        return folder


def publish_all(registry: Registry, maker: AdapterMaker, kinds: list[Kind], scratch: Path, prefix: str) -> list[float]:
    """Make and publish one adapter per kind as PREFIX0, PREFIX1, ...; the seconds each publish took."""
    seconds = []
    for index, kind in enumerate(kinds):
        folder = maker.make(kind, scratch / "source", seed=index)
        started = time.perf_counter()
        registry.publish(folder, f"{prefix}{index}", base=maker.base, trainer={"name": "bench"})
        seconds.append(time.perf_counter() - started)
        shutil.rmtree(folder)  # the store holds its own copy
        if (index + 1) % 100 == 0:
            print(f"  published {index + 1} of {len(kinds)}", file=sys.stderr, flush=True)
    return seconds


async def first_token(client, model: str, prompt: str, tokens: int = 8) -> float:
    """Seconds from sending a streamed completion until the chunk of its first token; reads the rest."""
    started = time.perf_counter()
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=tokens, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    first = None
    async for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter() - started
    return first


class Background:
    """Streaming clients that keep decoding; every chunk's arrival is kept, to find the gaps around a probe."""

    def __init__(self, client, models: list[str], clients: int, tokens: int = 64):
        self.client, self.models, self.tokens = client, models, tokens
        self.arrivals: list[list[float]] = [[] for _ in range(clients)]
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.failed = 0

    async def _keep_decoding(self, number: int) -> None:
        times = self.arrivals[number]
        while not self.stop.is_set():
            try:
                stream = await self.client.completions.create(
                    model=self.models[number % len(self.models)],
                    prompt=f"Background {number}-{len(times)}. {PROMPT}",
                    max_tokens=self.tokens,
                    temperature=0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                async for chunk in stream:
                    if chunk.choices:
                        times.append(time.perf_counter())
            except Exception:  # counted and reported
                self.failed += 1
            times.append(math.nan)  # a new request starts: no gap across requests

    def longest_gap(self, start: float, end: float) -> float:
        """The longest wait between two consecutive chunks of one stream that overlaps [start, end]."""
        longest = 0.0
        for times in self.arrivals:
            for earlier, later in zip(times, times[1:]):
                if later >= start and earlier <= end:  # NaN compares false, so gaps across requests drop out
                    longest = max(longest, later - earlier)
        return longest

    async def __aenter__(self) -> "Background":
        self.tasks = [asyncio.create_task(self._keep_decoding(n)) for n in range(len(self.arrivals))]
        while sum(len(times) for times in self.arrivals) < 4 * len(self.arrivals):
            await asyncio.sleep(0.05)  # every stream is decoding before the first probe
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


async def probes(client, names: list[str], label: str, background: Background | None = None) -> dict:
    """For each never-asked adapter: cold time to first token, then warm (same adapter, new prompt)."""
    found = {"cold": [], "warm": [], "cold_gap": [], "warm_gap": []}
    for number, name in enumerate(names):
        for phase in ("cold", "warm"):
            started = time.perf_counter()
            found[phase].append(await first_token(client, name, f"{label} {number} {phase}. {PROMPT}"))
            if background:
                found[f"{phase}_gap"].append(background.longest_gap(started, time.perf_counter()))
    return found


async def serving_phases(server, hot: list[str], hot_small: list[str], cold: list[str], args) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.url, api_key="bench", max_retries=0, timeout=600)
    await asyncio.gather(
        *(first_token(client, model, f"Warm-up {model}. {PROMPT}") for model in [server.base_name] + hot)
    )
    half = len(cold) // 2
    idle = await probes(client, cold[:half], "Idle")
    print(f"idle: cold {spread(idle['cold'])}   warm {spread(idle['warm'])}", flush=True)
    decoding = [server.base_name] + hot[:3]  # with a probe, at most 5 adapters in a batch: below --max-loras 8
    async with Background(client, decoding, args.background) as background:
        loaded = await probes(client, cold[half:], "Loaded", background)
    print(
        f"under load ({args.background} streams decoding): cold {spread(loaded['cold'])}   warm "
        f"{spread(loaded['warm'])}; longest stall of a decoding stream: during a cold probe "
        f"{spread(loaded['cold_gap'])}, during a warm one {spread(loaded['warm_gap'])}; "
        f"background errors {background.failed}",
        flush=True,
    )
    rates = await throughput(server.url, server.base_name, hot, args.concurrency, args.tokens, args.rounds)
    small = await throughput(server.url, server.base_name, hot_small, args.concurrency, args.tokens, args.rounds)
    return {"idle": idle, "loaded": loaded, "rates": rates, "small": small, "background_failed": background.failed}


def grow(registry: Registry, maker: AdapterMaker, names: list[str], target: int, scratch: Path) -> None:
    """New candidate versions of the names, round robin, until the registry holds `target` versions."""
    folder = maker.make(FILLER, scratch / "filler", seed=0)
    total = sum(len(registry.versions(name)) for name in registry.names())
    while total < target:
        registry.publish(folder, names[total % len(names)], base=maker.base, trainer={"name": "bench"})
        total += 1
        if total % 500 == 0:
            print(f"  {total} versions", file=sys.stderr, flush=True)


def registry_costs(registry: Registry, names: list[str], maker: AdapterMaker, scratch: Path) -> dict:
    """WINDOW publishes of a small version (after one untimed); after each, a reader's `snapshot()` (it re-reads the
    changed file, as a server does on its next request), an unchanged `snapshot()` (one stat) and `find` of a NAME,
    as per request."""
    reader = Registry(registry.path)  # another process's view, like a server's
    reader.snapshot()
    folder = maker.make(FILLER, scratch / "filler", seed=1)
    registry.publish(folder, names[-1], base=maker.base, trainer={"name": "bench"})  # untimed: first-use imports
    found = {"publish": [], "reread": [], "unchanged": [], "find": []}
    for number in range(WINDOW):
        started = time.perf_counter()
        registry.publish(folder, names[number % len(names)], base=maker.base, trainer={"name": "bench"})
        found["publish"].append(time.perf_counter() - started)
        started = time.perf_counter()
        snapshot = reader.snapshot()
        found["reread"].append(time.perf_counter() - started)
        started = time.perf_counter()
        reader.snapshot()
        found["unchanged"].append(time.perf_counter() - started)
        sample = random.Random(number).sample(names, min(100, len(names)))
        started = time.perf_counter()
        for name in sample:
            snapshot.find(name)
        found["find"].append((time.perf_counter() - started) / len(sample))
    found["versions"] = sum(len(registry.versions(name)) for name in registry.names())
    found["names"] = len(registry.names())
    found["bytes"] = registry.path.stat().st_size
    return found


async def republished_ttft(server, registry: Registry, maker: AdapterMaker, hot: list[str], scratch: Path) -> dict:
    """Warm time to first token of a hot adapter right after a publish of another name, against with none between."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.url, api_key="bench", max_retries=0, timeout=600)
    folder = maker.make(FILLER, scratch / "filler", seed=2)
    other = registry.names()[-1]
    found = {"after_publish": [], "steady": []}
    for number in range(WINDOW):
        await asyncio.to_thread(registry.publish, folder, other, base=maker.base, trainer={"name": "bench"})
        found["after_publish"].append(await first_token(client, hot[0], f"Republished {number}. {PROMPT}"))
        found["steady"].append(await first_token(client, hot[0], f"Steady {number}. {PROMPT}"))
    return found


def pick_hot(names: list[str], kinds: list[Kind], count: int) -> list[str]:
    """One adapter of every kind in MIX, then more of the commonest, so the hot stream mixes ranks and targets."""
    wanted = list(MIX[:count]) + [MIX[0]] * max(0, count - len(MIX))
    hot = []
    for kind in wanted:
        hot.append(next(name for name, its in zip(names, kinds) if its == kind and name not in hot))
    return hot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--adapters", type=int, default=1000, help="distinct adapters published and served")
    parser.add_argument("--versions", type=int, default=5000, help="registry size for the publish and resolve cost")
    parser.add_argument("--cold", type=int, default=60, help="cold adapters probed, idle and under load (half each)")
    parser.add_argument("--background", type=int, default=8, help="streams decoding during the loaded probes")
    parser.add_argument("--hot", type=int, default=8, help="adapters in the throughput stream")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scratch", default=None, help="folder for the registries and stores (default: temp dir)")
    parser.add_argument("--quick", action="store_true", help="40 adapters, 400 versions, 16 cold probes, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.adapters, args.versions, args.cold, args.background, args.rounds = 40, 400, 16, 4, 1
    if args.adapters < 2 * args.hot + args.cold or args.versions < args.adapters + 2 * WINDOW + 2:
        parser.error("--adapters must be at least 2 x --hot + --cold, and --versions at least --adapters + 42")

    base = resolve_base(args.base)
    kinds = kinds_for(args.adapters)
    names = [f"many{index}" for index in range(args.adapters)]
    hot = pick_hot(names, kinds, args.hot)
    hot_small = [name for name, kind in zip(names, kinds) if kind == MIX[0] and name not in hot][: args.hot]
    cold = random.Random(1).sample([name for name in names if name not in hot + hot_small], args.cold)
    with tempfile.TemporaryDirectory(prefix="loraflow-many-", dir=args.scratch) as location:
        scratch = Path(location)
        needed = sum(adapter_bytes(base, kind) for kind in kinds) + args.versions * adapter_bytes(base, FILLER)
        free = shutil.disk_usage(scratch).free
        mix = ", ".join(
            f"{kinds.count(kind)} x {kind.label} ({adapter_bytes(base, kind) / 1e6:.1f} MB)" for kind in MIX
        )
        print(f"{args.adapters} adapters: {mix}; {needed / 1e9:.2f} GB on disk, {free / 1e9:.0f} GB free", flush=True)
        if needed > 0.8 * free:
            raise SystemExit(f"not enough disk: the adapters need {needed / 1e9:.1f} GB, {free / 1e9:.1f} GB are free")
        maker = AdapterMaker(base)
        costs = {"small": registry_costs(Registry(scratch / "small" / "registry.json"), ["small"], maker, scratch)}
        registry = Registry(scratch / "registry" / "registry.json")
        started = time.perf_counter()
        publishes = publish_all(registry, maker, kinds, scratch, "many")
        print(
            f"published {args.adapters} adapters in {time.perf_counter() - started:.0f} s; publish: first "
            f"{WINDOW} {spread(publishes[:WINDOW])}, last {WINDOW} {spread(publishes[-WINDOW:])}",
            flush=True,
        )
        with start_server(registry.path, base, api_key="bench") as server:
            server.wait_ready()
            settings = server.settings
            print(
                f"server: max_loras {settings.max_loras}, max_cpu_loras {settings.resolved_max_cpu_loras()}, "
                f"max_lora_rank {settings.resolved_lora_rank()}, quantization {settings.resolved_quantization()}, "
                f"dtype {settings.resolved_dtype()}; hot: "
                + ", ".join(f"{name} ({kinds[names.index(name)].label})" for name in hot),
                flush=True,
            )
            served = asyncio.run(serving_phases(server, hot, hot_small, cold, args))
            costs["names"] = registry_costs(registry, names, maker, scratch)
            started = time.perf_counter()
            grow(registry, maker, names, args.versions - WINDOW - 1, scratch)
            print(f"registry grown to {args.versions - WINDOW - 1} versions in {time.perf_counter() - started:.0f} s")
            costs["versions"] = registry_costs(registry, names, maker, scratch)
            republished = asyncio.run(republished_ttft(server, registry, maker, hot, scratch))
    report(args, served, publishes, costs, republished)


def report(args, served: dict, publishes: list[float], costs: dict, republished: dict) -> None:
    idle, loaded, rates, small_rates = served["idle"], served["loaded"], served["rates"], served["small"]
    for cost in costs.values():
        print(
            f"registry of {cost['names']} names, {cost['versions']} versions ({cost['bytes'] / 1e6:.2f} MB JSON): "
            f"publish {spread(cost['publish'])}; a reader's snapshot() after it {spread(cost['reread'])}; unchanged "
            f"snapshot() {statistics.median(cost['unchanged']) * 1e6:.0f} us; find() "
            f"{statistics.median(cost['find']) * 1e6:.1f} us"
        )
    print(
        f"result: cold TTFT at {args.adapters} adapters, idle: {spread(idle['cold'])} vs warm {spread(idle['warm'])}; "
        f"ratio p50 {ratio(idle['cold'], idle['warm'], 0.5):.2f}x p95 {ratio(idle['cold'], idle['warm'], 0.95):.2f}x "
        "(goal p95 <= 250 ms)"
    )
    print(
        f"result: under load, cold {spread(loaded['cold'])} vs warm {spread(loaded['warm'])}; ratio p50 "
        f"{ratio(loaded['cold'], loaded['warm'], 0.5):.2f}x p95 {ratio(loaded['cold'], loaded['warm'], 0.95):.2f}x "
        f"(goal <= 2x); decoding streams' longest stall p95 {percentile(loaded['cold_gap'], 0.95) * 1e3:.0f} ms "
        f"in a cold probe vs {percentile(loaded['warm_gap'], 0.95) * 1e3:.0f} ms in a warm one"
    )
    print(
        f"result: throughput of {args.hot} hot adapters among {args.adapters}: {rates['mixed']:.1f} tok/s vs base "
        f"{rates['base']:.1f} tok/s; ratio {rates['mixed'] / rates['base']:.2f} (goal >= 0.8); {args.hot} hot rank-8 "
        f"q/v ones {small_rates['mixed']:.1f} vs {small_rates['base']:.1f}: ratio "
        f"{small_rates['mixed'] / small_rates['base']:.2f}"
    )
    small, large = costs["small"], costs["versions"]
    print(
        f"result: publish p95 at {large['names']} names, {large['versions']} versions "
        f"{percentile(large['publish'], 0.95) * 1e3:.0f} ms vs {small['versions']} versions "
        f"{percentile(small['publish'], 0.95) * 1e3:.0f} ms ({ratio(large['publish'], small['publish'], 0.95):.1f}x); "
        f"re-read after a publish p95 {percentile(large['reread'], 0.95) * 1e3:.0f} ms vs "
        f"{percentile(small['reread'], 0.95) * 1e3:.1f} ms ({ratio(large['reread'], small['reread'], 0.95):.0f}x); "
        f"warm TTFT right after a publish {spread(republished['after_publish'])} vs {spread(republished['steady'])}"
    )
    if served["background_failed"]:
        raise SystemExit(f"{served['background_failed']} background requests failed")


def ratio(samples: list[float], baseline: list[float], share: float) -> float:
    return percentile(samples, share) / percentile(baseline, share)


if __name__ == "__main__":
    main()
