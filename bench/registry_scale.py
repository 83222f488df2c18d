"""The registry at 1,000 names and 5,000 versions: publish time and what a server pays to resolve, side by side with
the standard library's JSON writer as the baseline, in one run.

    python bench/registry_scale.py [--names 1000] [--versions-per-name 5] [--publishes 20]

It publishes one small adapter to a registry, then grows the file to `--names` x `--versions-per-name` version
records (copies of that record, as many publishes would leave them; no adapter files are copied, since the
registry's own cost is what is measured), and times:
- `Registry.publish` of a real adapter folder, `--publishes` times: with loraflow's writer (orjson, indented and
  sorted) and with the standard library's `json.dump(indent=2, sort_keys=True)`, alternating in one run;
- a server's resolve after a change: `Registry.snapshot()` re-reading the file, then `servable(snapshot, NAME)`;
- the resolve with nothing changed (one stat) and the lookup itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loraflow.hub.base import DEFAULT_BASE, resolve_base  # noqa: E402
from loraflow.hub.registry import Registry  # noqa: E402
from loraflow.serve.naming import servable  # noqa: E402


class StdlibJsonRegistry(Registry):
    """The baseline: the same registry, its file written by the standard library's indenting JSON encoder."""

    def _write(self, data: dict) -> None:
        descriptor, temporary = tempfile.mkstemp(prefix=".registry-", suffix=".json", dir=self.root)
        with os.fdopen(descriptor, "w") as stream:
            json.dump(data, stream, indent=2, sort_keys=True)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, self.path)


def make_adapter(base, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base.path)
    get_peft_model(model, LoraConfig(r=1, target_modules=["q_proj"])).save_pretrained(folder)
    return folder


def grow(registry: Registry, names: int, per_name: int) -> None:
    """Write `names` x `per_name` version records, copies of the one published version, in one go."""
    data = registry.snapshot().to_dict()
    (name,) = data["adapters"]
    template = data["adapters"][name]["versions"]["1"]
    for index in range(names):
        versions = {}
        for number in range(1, per_name + 1):
            state = "live" if number == 1 else "candidate"
            versions[str(number)] = {**template, "name": f"n{index}", "version": number, "state": state}
        data["adapters"][f"n{index}"] = {"versions": versions, "aliases": {}, "history": []}
    registry._write(data)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", type=int, default=1000)
    parser.add_argument("--versions-per-name", type=int, default=5)
    parser.add_argument("--publishes", type=int, default=20)
    args = parser.parse_args()

    base = resolve_base(DEFAULT_BASE)
    with tempfile.TemporaryDirectory(prefix="loraflow-registry-scale-") as scratch:
        folder = make_adapter(base, Path(scratch) / "adapter")
        ours = Registry(Path(scratch) / "ours" / "registry.json")
        baseline = StdlibJsonRegistry(Path(scratch) / "baseline" / "registry.json")
        for registry in (ours, baseline):
            registry.publish(folder, "seed", base=base)
            grow(registry, args.names, args.versions_per_name)
        versions = args.names * args.versions_per_name
        size_mb = ours.path.stat().st_size / 1e6
        publish: dict[str, list[float]] = {"ours": [], "baseline": []}
        for _ in range(args.publishes):
            for label, registry in (("ours", ours), ("baseline", baseline)):
                started = time.perf_counter()
                registry.publish(folder, "hot", base=base)
                publish[label].append(time.perf_counter() - started)

        reread, lookup, unchanged = [], [], []
        server_view = Registry(ours.path)
        for index in range(args.publishes):
            ours.record_metrics("hot@1", {"probe": index})  # any change: the server's next request re-reads
            started = time.perf_counter()
            snapshot = server_view.snapshot()
            reread.append(time.perf_counter() - started)
            started = time.perf_counter()
            assert servable(snapshot, f"n{index}") is not None
            lookup.append(time.perf_counter() - started)
            started = time.perf_counter()
            server_view.snapshot()
            unchanged.append(time.perf_counter() - started)

    print(f"registry: {args.names + 2} names, {versions + args.publishes + 1} versions, {size_mb:.1f} MB of JSON")
    for label, times in publish.items():
        p50, p95 = statistics.median(times) * 1000, percentile(times, 0.95) * 1000
        print(f"  publish ({label}): p50 {p50:.0f} ms, p95 {p95:.0f} ms")
    print(
        f"  resolve after a change: re-read p50 {statistics.median(reread) * 1000:.1f} ms, p95 "
        f"{percentile(reread, 0.95) * 1000:.1f} ms; lookup {statistics.median(lookup) * 1e6:.0f} us; "
        f"unchanged (one stat) {statistics.median(unchanged) * 1e6:.0f} us"
    )
    ratio = statistics.median(publish["baseline"]) / statistics.median(publish["ours"])
    print(f"ratio publish p50, stdlib json writer / ours: {ratio:.2f}x")


if __name__ == "__main__":
    main()
