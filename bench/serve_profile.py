"""Where serving time goes with 8 adapters in a mixed batch: PyTorch's profiler around vLLM, in one process.

vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) with loraflow's CPU LoRA path installed and the
base in the quantization and dtype `loraflow serve` picks on this machine. After a warm-up, the same 32 requests
(`--tokens` each, ignore_eos) run alternately for the base alone and spread over the adapters; then one run of
each under the profiler. The LoRA path's calls are marked with `record_function("loraflow LoRA")` for the profile
only, so its share of the wall time is measured directly; the top operators of both runs are printed beside it.

    .venv/bin/python bench/serve_profile.py [--rank 8] [--targets q_proj,v_proj] [--tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, where the profiler sees it
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_throughput import PROMPT, arithmetic_limit, make_adapter  # noqa: E402

from loraflow.hub.base import DEFAULT_BASE, resolve_base  # noqa: E402
from loraflow.serve.launcher import default_dtype, default_quantization  # noqa: E402

MARK = "loraflow LoRA"


def mark_lora_calls() -> None:
    """Wrap the LoRA path's entry points in a profiler range (only in this benchmark's process)."""
    import torch

    from loraflow.serve.punica_cpu import GroupedPunicaWrapperCPU, install

    install()
    for method in ("add_lora_linear", "add_lora_logits"):
        original = getattr(GroupedPunicaWrapperCPU, method)

        @functools.wraps(original)
        def marked(self, *args, _original=original, **kwargs):
            with torch.profiler.record_function(MARK):
                return _original(self, *args, **kwargs)

        setattr(GroupedPunicaWrapperCPU, method, marked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    base = resolve_base(DEFAULT_BASE)
    targets = tuple(args.targets.split(","))
    mark_lora_calls()
    scratch = Path(tempfile.mkdtemp(prefix="loraflow-bench-"))
    folders = [make_adapter(base, scratch / f"a{i}", i, args.rank, targets) for i in range(8)]
    quantization = default_quantization()
    dtype = default_dtype(quantization) or "auto"
    llm = LLM(
        model=str(base.path),
        quantization=quantization,
        dtype=dtype,
        enable_lora=True,
        max_loras=8,
        max_lora_rank=args.rank,
        max_model_len=512,
        gpu_memory_utilization=0.3,
    )
    sampling = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    prompts = [PROMPT] * 32
    adapters = [LoRARequest(f"a{i}", i + 1, str(folder)) for i, folder in enumerate(folders)]
    runs = {"base": None, "mixed": [adapters[i % 8] for i in range(32)]}

    def generate(label: str) -> float:
        started = time.perf_counter()
        llm.generate(prompts, sampling, lora_request=runs[label], use_tqdm=False)
        return time.perf_counter() - started

    for label in runs:  # warm-up: loads every adapter
        generate(label)
    seconds = {label: [] for label in runs}
    for round_index in range(args.rounds):
        for label in runs if round_index % 2 == 0 else reversed(list(runs)):
            seconds[label].append(generate(label))
    wall = {label: statistics.median(values) for label, values in seconds.items()}
    print(f"rank {args.rank}, targets {args.targets}, quantization {quantization}, dtype {dtype}")
    print(f"  median of {args.rounds}: base {wall['base']:.2f} s, mixed {wall['mixed']:.2f} s for 32 x {args.tokens}")
    for label in runs:
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            profiled = generate(label)
        averages = profiler.key_averages()
        lora = sum(event.cpu_time_total for event in averages if event.key == MARK) / 1e6
        print(f"== {label}: {profiled:.2f} s under the profiler; LoRA path {lora:.2f} s ({lora / profiled:.1%})")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=12))
    print(
        f"ratio (adapters / base) rank {args.rank}: {wall['base'] / wall['mixed']:.2f} "
        f"(arithmetic limit {arithmetic_limit(base, args.rank, targets):.3f})"
    )


if __name__ == "__main__":
    main()
