"""Loading and validating training data before any model loads.

Two formats, one JSON object per line:
- messages:   {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
- preference: {"prompt": "...", "chosen": "...", "rejected": "..."}
Every malformed line is reported as `file:line: what is wrong`, up to MAX_REPORTED.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hub.errors import LoraflowError

FORMATS = ("messages", "preference")
ROLES = ("system", "user", "assistant")
MAX_REPORTED = 20


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


class DataError(LoraflowError):
    """Holds every problem found, so the user fixes them all in one pass."""

    def __init__(self, path: Path, problems: list[tuple[int, str]]):
        self.problems = problems
        shown = [f"{path}:{line}: {message}" for line, message in problems[:MAX_REPORTED]]
        if len(problems) > MAX_REPORTED:
            shown.append(f"... and {len(problems) - MAX_REPORTED} more problems in {path}")
        super().__init__("\n".join(shown))


def _detect(record: dict) -> str | None:
    if "messages" in record:
        return "messages"
    if {"prompt", "chosen", "rejected"} & set(record):
        return "preference"
    return None


def _check_messages(record: dict) -> str | None:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list of {"role", "content"} objects'
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            return f'messages[{index}] must be an object with "role" and "content"'
        if message["role"] not in ROLES:
            return f'messages[{index}].role is {message["role"]!r}; use one of {", ".join(ROLES)}'
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            return f"messages[{index}].content must be a non-empty string"
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's answer, which is what the model learns"
    if not any(message["role"] == "user" for message in messages):
        return "there is no user message"
    return None


def _check_preference(record: dict) -> str | None:
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            return f'"{key}" must be a non-empty string'
    if record["chosen"] == record["rejected"]:
        return '"chosen" and "rejected" are identical, so the pair teaches nothing'
    return None


CHECKS = {"messages": _check_messages, "preference": _check_preference}


def load_records(path: str | Path, data_format: str) -> list[dict]:
    """Read a JSONL file, validating every line against `data_format`."""
    path = Path(path)
    if data_format not in FORMATS:
        raise LoraflowError(f"unknown data format {data_format!r}; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise LoraflowError(f"{path}: no such file. Give a JSONL file with one {data_format} example per line.")
    records, problems, formats_seen = [], [], set()
    with open(path, encoding="utf-8") as stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append((line_number, f"not valid JSON ({error.msg} at column {error.colno})"))
                continue
            if not isinstance(record, dict):
                problems.append((line_number, "each line must be a JSON object"))
                continue
            seen = _detect(record)
            formats_seen.add(seen)
            if seen != data_format:
                problems.append((line_number, _wrong_format(seen, data_format)))
                continue
            problem = CHECKS[data_format](record)
            if problem:
                problems.append((line_number, problem))
                continue
            records.append({**record, "_line": line_number})
    if formats_seen and formats_seen <= {"messages", "preference"} and data_format not in formats_seen:
        other = formats_seen.pop()
        raise LoraflowError(
            f"{path}: this is {other} data, but this trainer takes {data_format} data. {_example(data_format)}"
        )
    if problems:
        raise DataError(path, problems)
    if not records:
        raise LoraflowError(f"{path}: the dataset is empty. {_example(data_format)}")
    return records


def _wrong_format(seen: str | None, wanted: str) -> str:
    if seen is None:
        return f"unrecognised record; expected {wanted} data. {_example(wanted)}"
    return f"this line is {seen} data, expected {wanted}"


def _example(data_format: str) -> str:
    if data_format == "messages":
        return 'Each line looks like {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}.'
    return 'Each line looks like {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}.'


def check_lengths(records: list[dict], path: str | Path, tokenizer, max_length: int, data_format: str) -> None:
    """Refuse examples longer than max_length tokens, naming each line."""
    problems = []
    for record in records:
        if data_format == "messages":
            length = len(tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=True)["input_ids"])
        else:
            length = len(tokenizer(record["prompt"] + record["chosen"])["input_ids"])
            length = max(length, len(tokenizer(record["prompt"] + record["rejected"])["input_ids"]))
        if length > max_length:
            problems.append((record["_line"], f"example is {length} tokens, over max_length {max_length}; shorten it or raise --max-length"))
    if problems:
        raise DataError(Path(path), problems)


def split_records(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A deterministic train/eval split; eval gets at least one example when asked for any."""
    import random

    if eval_fraction <= 0 or len(records) < 2:
        return list(records), []
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    eval_count = max(1, round(len(shuffled) * eval_fraction))
    return shuffled[eval_count:], shuffled[:eval_count]


def strip_line_numbers(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "_line"} for record in records]
