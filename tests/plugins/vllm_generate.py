"""Run by test_quality_e2e in a fresh interpreter: vLLM in-process, greedy answers from the base and each adapter.

Usage: python vllm_generate.py BASE_FOLDER PROMPTS_JSON NAME=ADAPTER_FOLDER...
Prints one JSON object {name: [answers]}.
vLLM spawns workers, hence the __main__ guard; the CPU memory settings are the ones ENVIRONMENT.md records.
"""

import json
import os
import sys


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    base, prompts = sys.argv[1], json.loads(sys.argv[2])
    adapters = dict(argument.split("=", 1) for argument in sys.argv[3:])
    llm = LLM(
        model=base, enable_lora=True, max_lora_rank=16, max_loras=1, max_model_len=512, gpu_memory_utilization=0.3
    )
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    greedy = SamplingParams(temperature=0, max_tokens=8)
    answers = {"base": [o.outputs[0].text for o in llm.chat(conversations, greedy, use_tqdm=False)]}
    for index, (name, folder) in enumerate(adapters.items(), start=1):
        outputs = llm.chat(conversations, greedy, lora_request=LoRARequest(name, index, folder), use_tqdm=False)
        answers[name] = [output.outputs[0].text for output in outputs]
    print("ANSWERS " + json.dumps(answers), flush=True)


if __name__ == "__main__":
    main()
