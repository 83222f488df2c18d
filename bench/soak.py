"""Soak: concurrent clients against a fleet for minutes, while a publisher keeps publishing, promoting and evicting.

    python bench/soak.py [--minutes 10] [--clients 64] [--replicas 2] [--tiny] [--kill-at MINUTE]
    python bench/soak.py --minutes 1 --clients 16 --tiny      # what bench/run_all runs

`loraflow serve --replicas 2` (the CLI, as a user starts it) serves a registry of --names adapters. Then, for
--minutes, all at once:
- --clients clients (one official AsyncOpenAI client, so one connection each) each send one request after another:
  completions and chat, streamed and not, three in four for a NAME (its live version) and one in four for the base;
- a publisher thread runs cycles, one every --cycle-s seconds (or back to back when a cycle takes longer): publish a
  new version of the next NAME, promote it, wait until every replica serves it the way `loraflow promote` waits
  (`running_fleets`, then `wait_until_fleet_serves`), and remove that NAME's retired versions beyond the newest
  --keep (evicting them from the registry and its store);
- a sampler reads each replica's vLLM pid from GET /v1/loraflow/fleet and the RSS of its process tree (API server,
  engine core, workers; psutil), and of the whole fleet (the CLI process and every process under it: Ray, the
  ingress, the replicas), every few seconds;
- with --kill-at, one replica's vLLM is killed (SIGKILL to its process group) at that minute.
It reports errors (requests that failed; goal 0, apart from requests in flight when a replica was killed), stale
answers (a NAME answered by a version older than one the fleet had acknowledged before the request started, or a
body naming another version than the x-loraflow-version header), each replica's RSS growth from the end of the
warm-up to the end (goal <= 5 %), and the p95 latency of the window after the warm-up against the last window.
The warm-up and each window last a minute, or a quarter of the run when it is shorter than four.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.arena_scale import percentile  # noqa: E402

API_KEY = "soak"
PROMPT = "Tell me about the sea."
SAMPLE_S = 5.0
START_TIMEOUT_S = 900


@dataclass
class Answer:
    started: float
    seconds: float
    asked: str
    version: str | None = None  # the version the body names
    header: str | None = None  # x-loraflow-version
    error: str | None = None


def prepare(args, folder: Path):
    """The base, a registry with NAME@1 live for each of --names names, and the adapter folders cycles publish."""
    from loraflow.hub.base import resolve_base
    from loraflow.hub.registry import Registry

    if args.tiny:
        from tests.conftest import make_adapter, write_tiny_llama

        base = write_tiny_llama(resolve_base("smollm2-135m"), folder / "tiny-llama")
        adapter = lambda path, seed: make_adapter(base, path, seed=seed)  # noqa: E731
    else:
        from bench.serve_throughput import make_adapter

        base = resolve_base(args.base)
        adapter = lambda path, seed: make_adapter(base, path, seed=seed, rank=8)  # noqa: E731
    sources = [adapter(folder / "sources" / str(seed), seed) for seed in range(6)]
    registry = Registry(folder / "registry" / "registry.json")
    names = [f"soak{number}" for number in range(args.names)]
    for number, name in enumerate(names):
        registry.publish(sources[number % len(sources)], name, base=base, trainer={"name": "soak"})
    return base, registry, names, sources


def start_fleet_cli(registry, base, args, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`loraflow serve --replicas N` in its own process; returns once it prints its adapters."""
    from loraflow.serve.launcher import free_port

    command = [sys.executable, "-m", "loraflow.hub.cli", "--registry", str(registry.path), "serve"]
    command += ["--base", str(base.path), "--port", str(free_port()), "--api-key", API_KEY]
    command += ["--max-model-len", str(args.max_model_len), "--replicas", str(args.replicas)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200"},
    )
    watchdog = threading.Timer(START_TIMEOUT_S, process.kill)
    watchdog.start()
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.strip().startswith("adapters:"):
            break
    watchdog.cancel()
    output = "".join(lines)
    log_path.write_text(output)
    url = re.search(r"serving (http://\S+)/v1", output)
    if not url:
        raise SystemExit(f"`loraflow serve --replicas {args.replicas}` did not start:\n{output}")

    def drain():
        with open(log_path, "a") as log:
            for line in process.stdout:
                log.write(line)

    threading.Thread(target=drain, daemon=True).start()
    return process, url.group(1)


class Publisher(threading.Thread):
    """publish -> promote -> wait for every fleet -> remove old retired versions, one cycle every `cycle_s`."""

    def __init__(self, registry, base, names: list[str], sources: list[Path], cycle_s: float, keep: int):
        super().__init__(daemon=True)
        self.registry, self.base, self.names, self.sources = registry, base, names, sources
        self.cycle_s, self.keep = cycle_s, keep
        self.stop = threading.Event()
        self.acks: dict[str, list[tuple[float, int]]] = defaultdict(list)  # NAME -> (acknowledged at, version)
        self.seconds: list[float] = []
        self.acked: list[float] = []  # promote -> every replica serves it
        self.removed = 0
        self.failures: list[str] = []

    def run(self) -> None:
        from loraflow.hub.registry import RETIRED
        from loraflow.serve.fleet_ack import fleet_status, running_fleets, wait_until_fleet_serves

        fleets = running_fleets(self.registry.path)  # what `loraflow promote` finds: the CLI's records
        if not fleets:
            self.failures.append("no running fleet recorded beside the registry")
            return
        number = 0
        while not self.stop.is_set():
            began = time.monotonic()
            name = self.names[number % len(self.names)]
            try:
                for fleet in fleets:
                    fleet_status(fleet.url, API_KEY)  # as the CLI does: fail before changing the registry
                version = self.registry.publish(
                    self.sources[number % len(self.sources)], name, base=self.base, trainer={"name": "soak"}
                )
                self.registry.promote(version.ref, actor="soak", reason="soak cycle")
                promoted = time.monotonic()
                revision = self.registry.revision
                for fleet in fleets:
                    wait_until_fleet_serves(fleet.url, version.ref, revision, API_KEY, timeout_s=60)
                self.acks[name].append((time.monotonic(), version.version))
                self.acked.append(time.monotonic() - promoted)
                retired = [v for v in self.registry.versions(name) if v.state == RETIRED]
                for old in retired[: max(0, len(retired) - self.keep)]:
                    self.registry.remove(old.ref)
                    self.removed += 1
                self.seconds.append(time.monotonic() - began)
            except Exception as error:  # counted and reported: a failed cycle is a finding
                self.failures.append(f"{type(error).__name__}: {error}")
            number += 1
            self.stop.wait(max(0.0, self.cycle_s - (time.monotonic() - began)))


def tree_rss(pid: int) -> dict[str, int]:
    """RSS in bytes of a process and each process under it, by process name (vLLM names its engine core and
    workers); empty when it is gone."""
    import psutil

    try:
        process = psutil.Process(pid)
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    found: dict[str, int] = defaultdict(int)
    for member in members:
        try:
            found[member.name()] += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return dict(found)


def fleet_engines(registry: str) -> list[int]:
    """The vLLM API servers serving this registry: every replica's, and any that a replaced replica left behind."""
    import psutil

    engines = []
    for process in psutil.process_iter(["cmdline"]):
        if "vllm.entrypoints.openai.api_server" not in (process.info["cmdline"] or []):
            continue
        try:
            if process.environ().get("LORAFLOW_REGISTRY") == registry:
                engines.append(process.pid)
        except psutil.Error:
            continue
    return engines


class Sampler(threading.Thread):
    """Every SAMPLE_S: each replica's vLLM process tree RSS, keyed by replica id, the whole fleet's, and how many
    vLLM engines serve the registry (more than the replicas means a replaced replica left its engine running)."""

    def __init__(self, url: str, fleet_pid: int, registry: str):
        super().__init__(daemon=True)
        self.url, self.fleet_pid, self.registry = url, fleet_pid, registry
        self.stop = threading.Event()
        self.samples: list[tuple[float, str, dict[str, int]]] = []  # (time, replica, RSS by process name)
        self.fleet: list[tuple[float, int]] = []
        self.engines: list[int] = []
        self.pids: set[int] = set()

    def sample(self) -> None:
        from loraflow.serve.fleet_ack import fleet_status

        try:
            replicas = fleet_status(self.url, API_KEY)["replicas"]
        except Exception:  # a status poll that fails while a replica restarts is skipped
            return
        now = time.monotonic()
        for replica in replicas:
            self.pids.add(replica["vllm_pid"])
            self.samples.append((now, replica["replica"], tree_rss(replica["vllm_pid"])))
        self.fleet.append((now, sum(tree_rss(self.fleet_pid).values())))
        self.engines.append(len(fleet_engines(self.registry)))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(SAMPLE_S)


async def client_loop(number: int, client, deadline: float, names: list[str], base_name: str, args, out: list):
    """One client: requests one after another until the deadline; each kept as an Answer."""
    kind = ("completion-stream", "completion", "chat-stream", "chat")[number % 4]
    stream = kind.endswith("stream")
    count = 0
    while time.monotonic() < deadline:
        model = base_name if count % 4 == 3 else names[(number + count) % len(names)]
        count += 1
        answer = Answer(time.monotonic(), 0.0, model)
        options = dict(model=model, max_tokens=args.tokens, temperature=0, stream=stream)
        try:
            if kind.startswith("chat"):
                messages = [{"role": "user", "content": f"{PROMPT} ({number}-{count})"}]
                raw = await client.chat.completions.with_raw_response.create(messages=messages, **options)
            else:
                raw = await client.completions.with_raw_response.create(
                    prompt=f"{PROMPT} ({number}-{count})", **options
                )
            answer.header = raw.headers.get("x-loraflow-version")
            body = raw.parse()  # with_raw_response's parse is not awaited, on the async client too
            if stream:
                try:
                    async for chunk in body:
                        answer.version = answer.version or chunk.model
                finally:
                    await body.close()  # a stream broken off must not keep its connection from the pool
            else:
                answer.version = body.model
        except Exception as error:  # every failure counts, whatever its type
            answer.error = f"{type(error).__name__}: {str(error)[:200]}"
        answer.seconds = time.monotonic() - answer.started
        out.append(answer)


async def drive(url: str, names: list[str], base_name: str, args, deadline: float) -> list[Answer]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
    answers: list[Answer] = []
    await asyncio.gather(
        *(client_loop(number, client, deadline, names, base_name, args, answers) for number in range(args.clients))
    )
    await client.close()
    return answers


def killer(url: str, at: float, killed: list) -> threading.Timer:
    """At `at` (monotonic), SIGKILL one replica's vLLM process group, as a crash would."""
    from loraflow.serve.fleet_ack import fleet_status

    def kill():
        victim = fleet_status(url, API_KEY)["replicas"][0]
        killed.append((time.monotonic(), victim["replica"]))
        os.killpg(victim["vllm_pid"], signal.SIGKILL)

    timer = threading.Timer(max(0.0, at - time.monotonic()), kill)
    timer.daemon = True
    timer.start()
    return timer


def stale(answers: list[Answer], acks: dict[str, list[tuple[float, int]]]) -> list[str]:
    """Answers for NAME from a version older than the fleet had acknowledged before the request started, and answers
    whose body and header name different versions."""
    found = []
    for answer in answers:
        if answer.error:
            continue
        if answer.header != answer.version:
            found.append(f"{answer.asked}: body {answer.version}, header {answer.header}")
            continue
        if "@" not in (answer.version or ""):
            continue
        name, _, number = answer.version.partition("@")
        known = [version for when, version in acks.get(name, []) if when < answer.started]
        if known and int(number) < known[-1]:
            found.append(f"{answer.asked} answered by {answer.version} after {name}@{known[-1]} was acknowledged")
    return found


def rss_growth(sampler: Sampler, warm_s: float) -> list[tuple[str, list[dict[str, int]], bool]]:
    """Per replica: (id, RSS by process at each sample from `warm_s` after it first answered to its last while alive,
    whether it was still alive at the end). A replica that replaced a killed one warms up from when it first
    answered; a killed one's engine lingers as a zombie with no RSS, and such samples are left out."""
    by_replica = defaultdict(list)
    for when, replica, rss in sampler.samples:
        if sum(rss.values()):
            by_replica[replica].append((when, rss))
    final = max((when for when, _, _ in sampler.samples), default=0.0)
    rows = []
    for replica, samples in by_replica.items():
        steady = [rss for when, rss in samples if when >= samples[0][0] + warm_s]
        if len(steady) >= 2:
            rows.append((replica, steady, samples[-1][0] >= final - 2 * SAMPLE_S))
    return rows


def growth(first: dict[str, int], last: dict[str, int]) -> float:
    return sum(last.values()) / sum(first.values()) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--names", type=int, default=4, help="adapter names the clients ask for and cycles publish")
    parser.add_argument("--tiny", action="store_true", help="a tiny random 2-layer Llama instead of --base")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=16, help="max tokens per answer")
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--cycle-s", type=float, default=0.75, help="a publish/promote/evict cycle this often")
    parser.add_argument("--keep", type=int, default=1, help="retired versions kept per name; older ones are removed")
    parser.add_argument("--kill-at", type=float, default=None, help="minute at which one replica's vLLM is killed")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="loraflow-soak-") as location:
        folder = Path(location)
        base, registry, names, sources = prepare(args, folder)
        started = time.monotonic()
        process, url = start_fleet_cli(registry, base, args, folder / "fleet.log")
        print(f"fleet of {args.replicas} ready in {time.monotonic() - started:.0f} s at {url}", flush=True)
        sampler = Sampler(url, process.pid, str(registry.path))
        try:
            result = soak(url, sampler, registry, base, names, sources, args)
        finally:
            process.send_signal(signal.SIGTERM)  # the CLI removes the fleet and every vLLM it ran
            try:
                process.wait(180)
            except subprocess.TimeoutExpired:
                process.kill()
            left = fleet_engines(str(registry.path))  # vLLM runs in its own process group, outside the CLI's
            for pid in left:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
    result["left"] = left
    report(args, result)


def soak(url: str, sampler: Sampler, registry, base, names: list[str], sources: list[Path], args) -> dict:
    duration = args.minutes * 60
    began = time.monotonic()
    publisher = Publisher(registry, base, names, sources, args.cycle_s, args.keep)
    killed: list[tuple[float, str]] = []
    timer = killer(url, began + args.kill_at * 60, killed) if args.kill_at is not None else None
    sampler.start()
    publisher.start()
    answers = asyncio.run(drive(url, names, base.served_name, args, began + duration))
    publisher.stop.set()
    publisher.join()
    sampler.stop.set()
    sampler.join()
    sampler.sample()  # one last sample at the end, before the fleet stops
    if timer:
        timer.cancel()
    return {
        "answers": answers,
        "publisher": publisher,
        "sampler": sampler,
        "killed": killed,
        "began": began,
        "end": time.monotonic(),
        "window": min(60.0, duration / 4),
    }


def report(args, result: dict) -> None:
    answers, publisher, sampler = result["answers"], result["publisher"], result["sampler"]
    began, window, killed = result["began"], result["window"], result["killed"]
    end = began + args.minutes * 60
    failed = [answer for answer in answers if answer.error]
    killed_at = killed[0][0] if killed else None
    in_flight = [a for a in failed if killed_at is not None and a.started < killed_at <= a.started + a.seconds]
    other_errors = [a for a in failed if a not in in_flight]
    wrong = stale(answers, publisher.acks)
    ok = [answer for answer in answers if not answer.error]
    start_window = [a.seconds for a in ok if began + window <= a.started < began + 2 * window]
    end_window = [a.seconds for a in ok if a.started >= end - window]
    minutes = (result["end"] - began) / 60
    model = "tiny model" if args.tiny else args.base
    print(
        f"{args.clients} clients, {args.replicas} replicas, {args.minutes:g} min ({model}, {args.tokens} tokens): "
        f"{len(answers)} requests, {len(ok) / (minutes * 60):.1f}/s"
    )
    print(
        f"cycles: {len(publisher.seconds)} publish/promote/evict cycles ({len(publisher.seconds) / minutes:.0f}/min), "
        f"{publisher.removed} versions removed, {len(publisher.failures)} failed; promote -> every replica serves it: "
        f"p50 {percentile(publisher.acked, 0.5) * 1e3:.0f} ms, p95 {percentile(publisher.acked, 0.95) * 1e3:.0f} ms"
        if publisher.acked
        else f"cycles: none completed; failures: {publisher.failures[:3]}"
    )
    for failure in sorted(set(publisher.failures))[:3]:
        print(f"  cycle failure: {failure}")
    if killed:
        print(f"killed replica {killed[0][1]}'s vLLM at minute {(killed_at - began) / 60:.1f}")
    for kind, count in Counter(a.error.split(":")[0] for a in other_errors).most_common(5):
        example = next(a.error for a in other_errors if a.error.startswith(kind))
        print(f"  error x{count}: {example}")
    for line in wrong[:3]:
        print(f"  stale: {line}")
    replicas = rss_growth(sampler, window)
    for replica, steady, alive in replicas:
        first, last = steady[0], steady[-1]
        trend = ", ".join(f"{sum(steady[round(i * (len(steady) - 1) / 4)].values()) / 2**20:.0f}" for i in range(5))
        parts = ", ".join(
            f"{name} {first.get(name, 0) / 2**20:.0f} -> {last.get(name, 0) / 2**20:.0f}" for name in sorted(last)
        )
        print(
            f"replica {replica}: vLLM RSS {sum(first.values()) / 2**20:.0f} MiB after warm-up, "
            f"{sum(last.values()) / 2**20:.0f} MiB {'at the end' if alive else 'when it was last seen alive'} "
            f"({growth(first, last):+.1%}; MiB by process: {parts}; total at 0, 1/4, 1/2, 3/4 and all of the "
            f"time after warm-up: {trend})"
        )
    engines = max(sampler.engines, default=0)
    print(
        f"vLLM engines serving the registry: at most {engines} for {args.replicas} replicas; "
        f"{len(result['left'])} left running after the fleet stopped (killed)"
    )
    steady_fleet = [rss for when, rss in sampler.fleet if when >= began + window and rss]
    fleet_growth = steady_fleet[-1] / steady_fleet[0] - 1 if len(steady_fleet) >= 2 else float("nan")
    if steady_fleet:
        print(
            f"whole fleet (Ray, ingress, replicas): {steady_fleet[0] / 2**20:.0f} MiB after warm-up, "
            f"{steady_fleet[-1] / 2**20:.0f} MiB at the end ({fleet_growth:+.1%})"
        )
    print(
        f"result: errors {len(other_errors)} (goal 0), in flight at the kill {len(in_flight)}, stale answers "
        f"{len(wrong)}, engines left behind {len(result['left'])}; {len(publisher.seconds)} cycles (goal >= 500 in "
        "10 min)"
    )
    print(
        "result: RSS growth after warm-up (goal <= 5%): "
        + (
            ", ".join(
                f"replica {replica} {growth(steady[0], steady[-1]):+.1%}{'' if alive else ' (until killed)'}"
                for replica, steady, alive in replicas
            )
            or "no steady samples"
        )
        + f"; whole fleet {fleet_growth:+.1%}"
    )
    if start_window and end_window:
        print(
            f"result: latency p95 {percentile(end_window, 0.95) * 1e3:.0f} ms in the last {window:.0f} s vs "
            f"{percentile(start_window, 0.95) * 1e3:.0f} ms after the warm-up (p50 "
            f"{percentile(end_window, 0.5) * 1e3:.0f} vs {percentile(start_window, 0.5) * 1e3:.0f} ms): ratio "
            f"{percentile(end_window, 0.95) / percentile(start_window, 0.95):.2f}"
        )
    if other_errors or wrong or publisher.failures or result["left"]:
        raise SystemExit("requests failed, answers were stale, cycles failed, or vLLM engines outlived the fleet")


if __name__ == "__main__":
    main()
