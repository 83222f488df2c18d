"""Writes the concise task's prompts: open questions whose answers can be short or long.

The task is the voter's, not the data's: `--judge concise` prefers the clearly shorter answer. The held-out
prompts ask about topics the arena's prompts never mention. Run `python data/concise/make.py` to rewrite them.
"""

import json
import random
from pathlib import Path

FORMS = ("What is {}?", "Explain {}.", "How does {} work?", "Why does {} matter?")
TOPICS = (
    "photosynthesis", "a volcano", "a rainbow", "the internet", "a bicycle gear", "a honey bee colony",
    "the water cycle", "gravity", "coffee roasting", "the game of chess", "the human heart", "electricity",
    "a glacier", "the printing press", "a vaccine", "ocean tides", "recycling", "sleep", "compound interest",
    "a compass", "bread yeast", "a solar panel", "the stock market", "an earthquake", "a library",
    "composting", "a lighthouse", "the immune system", "a thermostat", "a credit score",
)
HELD_OUT_TOPICS = (
    "a windmill", "the moon's phases", "a refrigerator", "a coral reef", "inflation", "a telescope",
    "the postal service", "a hurricane", "a battery", "a spider web",
)


def write(path: Path, topics: tuple[str, ...]) -> None:
    prompts = [form.format(topic) for topic in topics for form in FORMS]
    random.Random(0).shuffle(prompts)
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts))


if __name__ == "__main__":
    here = Path(__file__).parent
    write(here / "prompts.jsonl", TOPICS)
    write(here / "heldout.jsonl", HELD_OUT_TOPICS)
