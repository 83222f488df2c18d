"""Each built-in trainer on the real SmolLM2-135M and the pirate task, measured on the 40 held-out prompts.

    python bench/train_quality.py [--methods lora,qlora,sft,dpo,ppo]

The metric is the fraction of greedy answers that open with "Arr" (the base: none), through PEFT, and again through
vLLM (`LLM(enable_lora=True)` with a `LoRARequest` per adapter, the unquantized base in the dtype `loraflow serve`
picks) on 8 of the prompts; ppo reports the mean reward its reward model gives before and after. Each method's
figure is printed beside the base's, from the same run. The README's quality table comes from here; the test suite
keeps the lora run (tests/plugins/test_quality_e2e.py) and checks every method's output in vLLM on the tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loraflow.arena.judge import is_pirate, prompts_from  # noqa: E402
from loraflow.hub.base import DEFAULT_BASE, resolve_base  # noqa: E402
from loraflow.hub.registry import Registry  # noqa: E402
from loraflow.hub.training import load_config, run_training  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PIRATE = REPO / "data" / "pirate"
VLLM_ANSWERS = REPO / "tests" / "plugins" / "vllm_generate.py"  # the script the vLLM test of every trainer runs
COMMON = dict(
    per_device_train_batch_size=8, max_length=128, eval_split=0.05, lr_scheduler_type="constant", warmup_ratio=0.0
)
RUNS = {
    "lora": ("train.jsonl", dict(COMMON, max_steps=12, learning_rate=1e-3)),
    "qlora": ("train.jsonl", dict(COMMON, max_steps=12, learning_rate=1e-3)),
    "sft": ("train.jsonl", dict(COMMON, max_steps=12, learning_rate=5e-5)),
    # The paper's sigmoid loss mostly pushes the rejected answers down here (pirate-ish "Aye, matey" answers, few
    # opening "Arr": 0.0 to 0.33 in our runs); apo_zero also pulls the chosen answers up.
    "dpo": ("prefs.jsonl", dict(COMMON, max_steps=16, learning_rate=1e-3, beta=0.1, loss_type="apo_zero")),
    "ppo": (
        "prefs.jsonl",
        dict(
            COMMON,
            reward_max_steps=12,
            reward_learning_rate=1e-3,
            total_episodes=48,
            num_ppo_epochs=4,
            response_length=8,
            learning_rate=1e-3,
            kl_coef=0.02,
        ),
    ),
}


def arr_rate(answers: list[str]) -> float:
    return sum(map(is_pirate, answers)) / len(answers)


def peft_answers(base, prompts: list[str], adapter_folder: Path | None) -> list[str]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.plugins.common import generate_answers

    model = AutoModelForCausalLM.from_pretrained(base.path)
    if adapter_folder is not None:
        model = PeftModel.from_pretrained(model, str(adapter_folder))
    return generate_answers(model, AutoTokenizer.from_pretrained(base.path), prompts, max_new_tokens=6)


def vllm_rates(base, prompts: list[str], folders: dict[str, Path]) -> dict[str, float]:
    """Greedy answers from the base and each adapter in one vLLM engine, in a fresh interpreter (vLLM spawns)."""
    result = subprocess.run(
        [sys.executable, str(VLLM_ANSWERS), str(base.path), json.dumps(prompts)]
        + [f"{name}={folder}" for name, folder in folders.items()],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    answers = json.loads(result.stdout.split("ANSWERS ", 1)[1].splitlines()[0])
    return {name: arr_rate(texts) for name, texts in answers.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(RUNS))
    args = parser.parse_args()
    from loraflow.hub.plugins import get_plugins

    base = resolve_base(DEFAULT_BASE)
    prompts = prompts_from(PIRATE / "heldout.jsonl")
    base_rate = arr_rate(peft_answers(base, prompts, None))
    print(f"base: {base_rate:.2f} of {len(prompts)} held-out answers open with 'Arr'", flush=True)
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-") as scratch:
        registry = Registry(Path(scratch) / "registry.json")
        folders = {}
        for method in args.methods.split(","):
            data, settings = RUNS[method]
            config = load_config(get_plugins().trainer(method).trainer_class.config_class, overrides=settings)
            started = time.perf_counter()
            version = run_training(
                method,
                data=PIRATE / data,
                name=f"pirate-{method}",
                base_spec=DEFAULT_BASE,
                registry=registry,
                config=config,
            )
            seconds = time.perf_counter() - started
            folders[method] = registry.folder(version)
            metrics = version.metrics
            if method == "ppo":
                figure = f"mean reward {metrics['mean_reward_before']:.3f} -> {metrics['mean_reward_after']:.3f}"
            else:
                rate = arr_rate(peft_answers(base, prompts, folders[method]))
                figure = f"'Arr' rate {rate:.2f} (base {base_rate:.2f})"
            print(f"{method}: {figure}; {seconds:.0f} s; metrics {json.dumps(metrics)}", flush=True)
        rates = vllm_rates(base, prompts[:8], folders)
    print(f"result: vLLM 'Arr' rate on 8 prompts: {json.dumps(rates)}")


if __name__ == "__main__":
    main()
