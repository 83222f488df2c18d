"""The CPU serving default, measured: vLLM's int8 weight-only base (which computes in bf16) against the unquantized
base in fp32, base alone and with adapters, on this machine, in one run.

    python bench/serve_dtype.py [--adapters 4] [--concurrency 16] [--tokens 32] [--rounds 1]

On a CPU with AVX512-BF16 or AMX bf16 is native and int8 is `loraflow serve`'s default there; on an AVX2-only CPU
PyTorch emulates bf16, and this prints how much faster fp32 serves, which is why `loraflow serve` picks fp32 there.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_throughput import make_adapter, measure  # noqa: E402

from loraflow.hub.base import DEFAULT_BASE, resolve_base  # noqa: E402
from loraflow.hub.devices import cpu_fast_bf16  # noqa: E402
from loraflow.hub.registry import Registry  # noqa: E402
from loraflow.serve.launcher import CPU_QUANTIZATION, default_quantization, start_server  # noqa: E402

CONFIGS = {
    "int8 weight-only, bf16": dict(quantization=CPU_QUANTIZATION, dtype="bfloat16"),
    "unquantized, fp32": dict(quantization="none", dtype="float32"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    base = resolve_base(args.base)
    rates = {}
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-") as scratch:
        registry = Registry(Path(scratch) / "registry.json")
        names = [
            registry.publish(make_adapter(base, Path(scratch) / f"src{i}", seed=i, rank=8), f"bench{i}", base=base).name
            for i in range(args.adapters)
        ]
        for label, settings in CONFIGS.items():
            started = time.perf_counter()
            with start_server(registry.path, base, api_key="bench", **settings) as server:
                server.wait_ready()
                ready_s = time.perf_counter() - started
                rates[label] = asyncio.run(
                    measure(server.url, server.base_name, names, args.concurrency, args.tokens, args.rounds)
                )
            print(
                f"{label}: base {rates[label]['base']:.1f} tok/s, {args.adapters} adapters mixed "
                f"{rates[label]['mixed']:.1f} tok/s (ready in {ready_s:.0f} s)",
                flush=True,
            )
    int8, fp32 = rates.values()
    print(
        f"native bf16 on this CPU: {cpu_fast_bf16()}; loraflow serve's default here: {default_quantization() or 'fp32'}"
    )
    base_ratio, mixed_ratio = fp32["base"] / int8["base"], fp32["mixed"] / int8["mixed"]
    print(f"ratio fp32 / int8 (bf16): base {base_ratio:.2f}x, adapters {mixed_ratio:.2f}x")


if __name__ == "__main__":
    main()
