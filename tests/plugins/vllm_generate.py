"""Greedy answers from the base and each adapter, with vLLM in-process, in a fresh interpreter: run by
test_trainers.py and bench/train_quality.py.

Usage: python vllm_generate.py BASE_FOLDER PROMPTS_JSON NAME=ADAPTER_FOLDER...
Prints one JSON object {name: [answers]} after ANSWERS, and {name: [cumulative logprob of each answer]} after
LOGPROBS: the logprobs move when an adapter is applied, even where the greedy text does not (a random tiny model).
vLLM spawns workers, hence the __main__ guard; the CPU memory settings are the ones ENVIRONMENT.md records.
"""

import json
import os
import sys


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from loraflow.serve.launcher import default_dtype

    base, prompts = sys.argv[1], json.loads(sys.argv[2])
    adapters = dict(argument.split("=", 1) for argument in sys.argv[3:])
    llm = LLM(
        model=base,
        dtype=default_dtype(quantization=None) or "auto",  # the unquantized base, as `loraflow serve` would run it
        enable_lora=True,
        max_lora_rank=16,
        max_loras=1,
        max_model_len=512,
        gpu_memory_utilization=0.3,
    )
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    greedy = SamplingParams(temperature=0, max_tokens=8, logprobs=1)
    answers, logprobs = {}, {}
    requests = {
        "base": None,
        **{name: LoRARequest(name, i, folder) for i, (name, folder) in enumerate(adapters.items(), 1)},
    }
    for name, request in requests.items():
        outputs = llm.chat(conversations, greedy, lora_request=request, use_tqdm=False)
        answers[name] = [output.outputs[0].text for output in outputs]
        logprobs[name] = [output.outputs[0].cumulative_logprob for output in outputs]
    print("ANSWERS " + json.dumps(answers), flush=True)
    print("LOGPROBS " + json.dumps(logprobs), flush=True)


if __name__ == "__main__":
    main()
