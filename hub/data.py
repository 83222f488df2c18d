"""Loading and validating training data before any model loads.

Two formats, one JSON object per line (JSON Lines: UTF-8, lines end at "\\n"):
- messages:   {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
- preference: {"prompt": "...", "chosen": "...", "rejected": "..."}
Every malformed line is reported as `file:line: what is wrong`, up to MAX_REPORTED; bad input never raises
anything but a LoraflowError.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from loraflow.hub.errors import LoraflowError

FORMATS = ("messages", "preference")
ROLES = ("system", "user", "assistant")
MAX_REPORTED = 20
MAX_LINE_BYTES = 16 * 1024 * 1024
UTF8_BOM = b"\xef\xbb\xbf"
EXAMPLES = {
    "messages": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
    "preference": '{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}',
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one line; `column` (1-based, as Python's json counts) when the parser gave one."""

    line: int
    message: str
    column: int | None = None

    def located(self, path: Path) -> str:
        where = f"{path}:{self.line}" + (f":{self.column}" if self.column else "")
        return f"{where}: {self.message}"


class DataError(LoraflowError):
    """Holds every problem found, so the user fixes them all in one pass."""

    def __init__(self, path: Path, problems: list[Problem]):
        self.problems = problems
        shown = [problem.located(path) for problem in problems[:MAX_REPORTED]]
        if len(problems) > MAX_REPORTED:
            shown.append(f"... and {len(problems) - MAX_REPORTED} more problems in {path}")
        super().__init__("\n".join(shown))


def _json_kind(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "a number"


def _text_problem(value: object, what: str) -> str | None:
    if not isinstance(value, str):
        return f"{what} must be a non-empty string, not {_json_kind(value)}"
    if not value.strip():
        return f"{what} must be a non-empty string, not a blank one"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # JSON's \ud800 escapes decode to half of a UTF-16 pair that no tokenizer takes
        return f"{what} holds an unpaired surrogate \\u{ord(value[error.start]):04x}; write the whole character instead"
    return None


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
        role = message["role"]
        if not isinstance(role, str) or role not in ROLES:
            shown = repr(role[:40]) if isinstance(role, str) else _json_kind(role)
            return f"messages[{index}].role is {shown}; use one of {', '.join(ROLES)}"
        problem = _text_problem(message.get("content"), f"messages[{index}].content")
        if problem:
            return problem
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's answer, which is what the model learns"
    if not any(message["role"] == "user" for message in messages):
        return "there is no user message"
    return None


def _check_preference(record: dict) -> str | None:
    for key in ("prompt", "chosen", "rejected"):
        problem = _text_problem(record.get(key), f'"{key}"')
        if problem:
            return problem
    if record["chosen"] == record["rejected"]:
        return '"chosen" and "rejected" are identical, so the pair teaches nothing'
    return None


CHECKS = {"messages": _check_messages, "preference": _check_preference}


def _read_line(stream: BinaryIO) -> tuple[bytes | None, int]:
    """The next line's bytes (None when over MAX_LINE_BYTES) and its size; a size of 0 is the end of the file."""
    raw = stream.readline(MAX_LINE_BYTES + 1)
    if len(raw) <= MAX_LINE_BYTES or raw.endswith(b"\n"):
        return raw, len(raw)
    size = len(raw)
    while raw and not raw.endswith(b"\n"):  # skip the rest in chunks, never holding the whole line
        raw = stream.readline(1 << 20)
        size += len(raw)
    return None, size


def _parse_json(number: int, text: str) -> object:
    """The line's JSON value, or a Problem placed where Python's json parser places it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        return Problem(number, f"not valid JSON: {error.msg}", column=error.colno)
    except RecursionError:
        return Problem(number, "not valid JSON: nested too deeply for Python's json parser")
    except ValueError as error:  # e.g. an integer over Python's 4300-digit limit
        return Problem(number, f"not valid JSON: {str(error).split(':')[0]}")


def _parsed_lines(stream: BinaryIO) -> Iterator[tuple[int, object]]:
    """(line number, JSON value or Problem) for each non-blank line; stops at the first byte that is not UTF-8."""
    offset = 0
    number = 0
    while True:
        raw, size = _read_line(stream)
        if not size:
            return
        number, start, offset = number + 1, offset, offset + size
        if raw is None:
            limit = f"{MAX_LINE_BYTES:,} bytes"
            yield number, Problem(number, f"the line is longer than {limit}; put one JSON object per line")
            continue
        skip = len(UTF8_BOM) if start == 0 and raw.startswith(UTF8_BOM) else 0
        try:
            text = raw[skip:].decode("utf-8")
        except UnicodeDecodeError as error:
            position = skip + error.start
            yield number, Problem(
                number,
                f"byte {start + position} (0x{raw[position]:02x}, counting from 0) is not UTF-8; "
                "training data is UTF-8 text, one JSON object per line. Is this a binary file, or another encoding? "
                "Convert it, e.g. iconv -f latin1 -t utf-8",
            )
            return
        if text.strip(" \t\r\n"):  # JSON's own whitespace, so a line of other control characters is still checked
            yield number, _parse_json(number, text)


def load_records(path: str | Path, data_format: str) -> list[dict]:
    """Read a JSONL file, validating every line against `data_format`."""
    path = Path(path)
    if data_format not in FORMATS:
        raise LoraflowError(f"unknown data format {data_format!r}; use one of {', '.join(FORMATS)}")
    wanted = f"Give a JSONL file with one {data_format} example per line."
    if path.is_dir():
        raise LoraflowError(f"{path}: is a folder. {wanted}")
    if not path.is_file():
        raise LoraflowError(f"{path}: no such file. {wanted}")
    records, problems, first_line_of = [], [], {}
    try:
        with open(path, "rb") as stream:
            for number, value in _parsed_lines(stream):
                if isinstance(value, Problem):
                    problems.append(value)
                    continue
                if not isinstance(value, dict):
                    problems.append(Problem(number, f"each line must be a JSON object, not {_json_kind(value)}"))
                    continue
                seen = _detect(value)
                first_line_of.setdefault(seen, number)
                problem = _wrong_format(seen, data_format) if seen != data_format else CHECKS[data_format](value)
                if problem:
                    problems.append(Problem(number, problem))
                    continue
                records.append({**value, "_line": number})
    except OSError as error:
        raise LoraflowError(f"{path}: cannot read it ({error.strerror or error}). {wanted}") from None
    if first_line_of and None not in first_line_of and data_format not in first_line_of:
        other, line = next(iter(first_line_of.items()))
        message = f"this is {other} data, but this trainer takes {data_format} data. {_example(data_format)}"
        raise LoraflowError(Problem(line, message).located(path))
    if problems:
        raise DataError(path, problems)
    if not records:
        raise LoraflowError(f"{path}: the dataset is empty (no line holds an example). {_example(data_format)}")
    return records


def _wrong_format(seen: str | None, wanted: str) -> str:
    if seen is None:
        return f"unrecognised record; expected {wanted} data. {_example(wanted)}"
    return f"this line is {seen} data, expected {wanted}"


def _example(data_format: str) -> str:
    return f"Each line looks like {EXAMPLES[data_format]}."


def _token_count(record: dict, tokenizer, data_format: str) -> int:
    if data_format == "messages":
        return len(tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=True)["input_ids"])
    return max(
        len(tokenizer(record["prompt"] + record[answer])["input_ids"]) for answer in ("chosen", "rejected")
    )


def check_lengths(records: list[dict], path: str | Path, tokenizer, max_length: int, data_format: str) -> None:
    """Refuse examples longer than max_length tokens, naming each line."""
    problems = []
    for record in records:
        length = _token_count(record, tokenizer, data_format)
        if length > max_length:
            message = f"example is {length} tokens, over max_length {max_length}; shorten it or raise --max-length"
            problems.append(Problem(record["_line"], message))
    if problems:
        raise DataError(Path(path), problems)


def split_records(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A deterministic train/eval split; eval gets at least one example when asked for any."""
    if eval_fraction <= 0 or len(records) < 2:
        return list(records), []
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    eval_count = max(1, round(len(shuffled) * eval_fraction))
    return shuffled[eval_count:], shuffled[:eval_count]


def strip_line_numbers(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "_line"} for record in records]
