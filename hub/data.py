"""Loading and validating training data before any model loads.

Four formats, shown as one JSON object each:
- messages:   {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
- preference: {"prompt": "...", "chosen": "...", "rejected": "..."}
- unpaired:   {"prompt": "...", "completion": "...", "label": true}, one answer judged desirable (true) or not
              (false), TRL's unpaired preference format; a file needs answers of both labels
- text:       {"text": "..."}, one document of raw text, for continued pre-training
`--data` is what the `datasets` library reads: a JSONL, JSON, CSV or Parquet file, a folder of them (and of .txt
documents, for text), or a Hub dataset id ORG/NAME with a split and a subset. Common public schemas (SCHEMAS:
ShareGPT, Alpaca, UltraFeedback-style message lists, TRL's conversational unpaired records) map onto ours, and the
mapping used is named in LoadedData.

JSONL (UTF-8, lines end at "\\n") is read here, line by line, so each problem is `file:line[:column]`; JSON, CSV and
Parquet go through datasets' builders and a problem is `file:row`, rows counted from 1 (a CSV header is not a row);
on the Hub it is `ORG/NAME[split]:row`. Every problem is reported, up to MAX_REPORTED; bad input never raises
anything but a LoraflowError.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from loraflow.hub.errors import LoraflowError

FORMATS = ("messages", "preference", "unpaired", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
MAX_REPORTED = 20
MAX_LINE_BYTES = 16 * 1024 * 1024
UTF8_BOM = b"\xef\xbb\xbf"
NUL = b"\x00"
DEFAULT_SPLIT = "train"
JSONL_SUFFIX, TEXT_SUFFIX = ".jsonl", ".txt"
TABLE_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}  # datasets' packaged builders
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
PRIVATE_KEYS = ("_line", "_source")  # where a record came from, for errors; stripped before training
EXAMPLES = {
    "messages": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
    "preference": '{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}',
    "unpaired": '{"prompt": "Hi", "completion": "Hello!", "label": true} (label false for an undesirable answer)',
    "text": '{"text": "The mainsail is the largest sail on the mainmast."} (or a .txt file per document)',
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one line or row; `column` (1-based, as Python's json counts) when the parser gave one.

    `line` is None for a problem with a whole file; `source` names the file when it is not the one loaded."""

    line: int | None
    message: str
    column: int | None = None
    source: str | None = None

    def located(self, path: str | Path) -> str:
        where = (
            f"{self.source or path}"
            + (f":{self.line}" if self.line else "")
            + (f":{self.column}" if self.column else "")
        )
        return f"{where}: {self.message}"


class DataError(LoraflowError):
    """Holds every problem found, so the user fixes them all in one pass."""

    def __init__(self, path: str | Path, problems: list[Problem]):
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


def _turns_problem(turns: object, name: str) -> str | None:
    """What is wrong with a list of {"role", "content"} chat turns held in the field `name`, if anything."""
    if not isinstance(turns, list) or not turns:
        return f'"{name}" must be a non-empty list of {{"role", "content"}} objects'
    for index, message in enumerate(turns):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            return f'{name}[{index}] must be an object with "role" and "content"'
        role = message["role"]
        if not isinstance(role, str) or role not in ROLES:
            shown = repr(role[:40]) if isinstance(role, str) else _json_kind(role)
            return f"{name}[{index}].role is {shown}; use one of {', '.join(ROLES)}"
        problem = _text_problem(message.get("content"), f"{name}[{index}].content")
        if problem:
            return problem
    return None


def _check_messages(record: dict) -> str | None:
    messages = record.get("messages")
    problem = _turns_problem(messages, "messages")
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


def _check_unpaired(record: dict) -> str | None:
    for key in ("prompt", "completion"):
        problem = _text_problem(record.get(key), f'"{key}"')
        if problem:
            return problem
    label = record.get("label")
    if not isinstance(label, bool):
        return f'"label" must be true (a desirable answer) or false (an undesirable one), not {_json_kind(label)}'
    return None


def _check_text(record: dict) -> str | None:
    return _text_problem(record.get("text"), '"text"')


CHECKS = {
    "messages": _check_messages,
    "preference": _check_preference,
    "unpaired": _check_unpaired,
    "text": _check_text,
}


def _both_labels_problem(records: list[dict]) -> str | None:
    """Unpaired data teaches by contrast (KTO weighs each answer against the others), so it needs both labels."""
    desirable = sum(record["label"] for record in records)
    if 0 < desirable < len(records):
        return None
    present, missing = ("desirable", "undesirable") if desirable else ("undesirable", "desirable")
    return (
        f"all {len(records)} examples are {present} (label {str(bool(desirable)).lower()}); unpaired data needs "
        f"{missing} answers (label {str(not desirable).lower()}) too. Add some. {_example('unpaired')}"
    )


DATASET_CHECKS = {"unpaired": _both_labels_problem}  # what a whole dataset of a format needs beyond valid records


def _from_sharegpt(record: dict) -> dict | str:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        return '"conversations" must be a non-empty list of {"from", "value"} objects'
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return f'conversations[{index}] must be an object with "from" and "value"'
        speaker = turn["from"]
        if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
            shown = repr(speaker[:40]) if isinstance(speaker, str) else _json_kind(speaker)
            return f"conversations[{index}].from is {shown}; use one of human, gpt, system"
        problem = _text_problem(turn["value"], f"conversations[{index}].value")
        if problem:
            return problem
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return {"messages": messages}


def _from_alpaca(record: dict) -> dict | str:
    for key in ("instruction", "output"):
        problem = _text_problem(record[key], f'"{key}"')
        if problem:
            return problem
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        return f'"input" must be a string, not {_json_kind(extra)}'
    prompt = f"{record['instruction']}\n\n{extra}" if extra.strip() else record["instruction"]
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]}


def _from_chat_preference(record: dict) -> dict | str:
    """chosen/rejected as conversations that end with the two answers; the prompt a string, turns, or their start."""
    for key in ("chosen", "rejected"):
        problem = _turns_problem(record.get(key), key)
        if problem:
            return problem
        if record[key][-1]["role"] != "assistant":
            return f"{key} must end with the assistant's answer"
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    answers = {"chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}
    if isinstance(prompt, str):  # UltraFeedback binarized: the prompt apart, the lists repeat it
        return {"prompt": prompt, **answers}
    if prompt is None:
        if chosen[:-1] != rejected[:-1]:
            return "chosen and rejected start from different turns; the turns before the two answers must match"
        prompt = chosen[:-1]
    problem = _turns_problem(prompt, "prompt")
    if problem:
        return problem
    if [turn["role"] for turn in prompt] != ["user"]:
        roles = ", ".join(turn["role"] for turn in prompt)
        return f"the prompt is {len(prompt)} turns ({roles}); preference data here is one user prompt and two answers"
    return {"prompt": prompt[0]["content"], **answers}


def _from_chat_unpaired(record: dict) -> dict | str:
    """TRL's conversational unpaired record: the completion a list ending with the answer; the prompt a string, turns,
    or (when absent) the turns before the answer."""
    completion, prompt = record["completion"], record.get("prompt")
    problem = _turns_problem(completion, "completion")
    if problem:
        return problem
    if completion[-1]["role"] != "assistant":
        return "completion must end with the assistant's answer"
    if prompt is None:
        prompt, completion = completion[:-1], completion[-1:]
    if len(completion) != 1:
        return f"completion is {len(completion)} turns; unpaired data here is one user prompt and one answer"
    answer = {"completion": completion[0]["content"], "label": record.get("label")}
    if isinstance(prompt, str):
        return {"prompt": prompt, **answer}
    problem = _turns_problem(prompt, "prompt")
    if problem:
        return problem
    if [turn["role"] for turn in prompt] != ["user"]:
        roles = ", ".join(turn["role"] for turn in prompt)
        return f"the prompt is {len(prompt)} turns ({roles}); unpaired data here is one user prompt and one answer"
    return {"prompt": prompt[0]["content"], **answer}


@dataclass(frozen=True)
class Schema:
    """A record layout we read: the format it becomes and how one record becomes ours, or what is wrong with it."""

    name: str
    data_format: str
    description: str
    convert: Callable[[dict], dict | str] = lambda record: record


MESSAGES = Schema("none", "messages", "already loraflow's messages format")
SHAREGPT = Schema("sharegpt", "messages", "ShareGPT conversations (from: human/gpt/system, value)", _from_sharegpt)
ALPACA = Schema("alpaca", "messages", "Alpaca instruction/input/output as one user turn and the answer", _from_alpaca)
PREFERENCE = Schema("none", "preference", "already loraflow's preference format")
CHAT_PREFERENCE = Schema(
    "ultrafeedback", "preference", "UltraFeedback-style chosen/rejected message lists", _from_chat_preference
)
UNPAIRED = Schema("none", "unpaired", "already loraflow's unpaired format")
CHAT_UNPAIRED = Schema(
    "conversational", "unpaired", "TRL's conversational prompt/completion message lists", _from_chat_unpaired
)
TEXT = Schema("none", "text", "already loraflow's text format")
SCHEMAS = (MESSAGES, SHAREGPT, ALPACA, PREFERENCE, CHAT_PREFERENCE, UNPAIRED, CHAT_UNPAIRED, TEXT)


def _schema_of(record: dict, wanted: str) -> Schema | None:
    """The layout a record (or a table's columns, as a dict of Nones) is in; a `text` field is text when asked."""
    keys = set(record)
    if wanted == "text" and "text" in keys:
        return TEXT
    if "messages" in keys:
        return MESSAGES
    if "conversations" in keys:
        return SHAREGPT
    if {"instruction", "output"} <= keys:
        return ALPACA
    if isinstance(record.get("chosen"), list) and isinstance(record.get("rejected"), list):
        return CHAT_PREFERENCE
    if isinstance(record.get("completion"), list):
        return CHAT_UNPAIRED
    # A prompt alone is an unpaired record missing its answer when unpaired data is asked for.
    if {"completion", "label"} & keys or (
        wanted == "unpaired" and "prompt" in keys and not {"chosen", "rejected"} & keys
    ):
        return UNPAIRED
    if {"prompt", "chosen", "rejected"} & keys:
        return PREFERENCE
    if "text" in keys:
        return TEXT
    return None


@dataclass(frozen=True)
class LoadedData:
    """Validated records in our format, what errors call their source, and the schema mappings that made them."""

    records: list[dict]
    source: str
    data_format: str
    mapping: str
    from_hub: bool = False

    def summary(self) -> dict:
        """For the model card and the registry's provenance; a card never holds a machine-local path."""
        described = {schema.name: schema.description for schema in SCHEMAS if schema.data_format == self.data_format}
        return {
            "source": self.source if self.from_hub else Path(self.source).name,
            "format": self.data_format,
            "mapping": "; ".join(f"{name} ({described[name]})" for name in self.mapping.split(", ")),
        }


@dataclass
class _Reading:
    """Records and problems gathered over every file (or the one split) of a source."""

    wanted: str
    records: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    first_of: dict = field(default_factory=dict)  # each format seen -> (source, line, schema) of its first record
    mappings: dict = field(default_factory=dict)  # an ordered set of the schema names used

    def add(self, source: str, line: int | None, value: object) -> None:
        if isinstance(value, Problem):
            self.problems.append(value if value.source else dataclasses.replace(value, source=source))
            return
        if not isinstance(value, dict):
            self.problems.append(
                Problem(line, f"each line must be a JSON object, not {_json_kind(value)}", None, source)
            )
            return
        schema = _schema_of(value, self.wanted)
        seen = schema.data_format if schema else None
        self.first_of.setdefault(seen, (source, line, schema))
        if seen != self.wanted:
            self.problems.append(Problem(line, _wrong_format(schema, self.wanted), None, source))
            return
        if seen == "text" and (
            value.get("text") is None or (isinstance(value["text"], str) and not value["text"].strip())
        ):
            return  # real corpora hold many blank rows; a blank .txt file is refused where it is read
        converted = schema.convert(value)
        problem = converted if isinstance(converted, str) else CHECKS[seen](converted)
        if problem:
            self.problems.append(Problem(line, problem, None, source))
            return
        self.mappings.setdefault(schema.name)
        self.records.append({**converted, "_line": line, "_source": source})

    def loaded(self, label: str, from_hub: bool = False) -> LoadedData:
        if self.first_of and None not in self.first_of and self.wanted not in self.first_of:
            source, line, schema = next(iter(self.first_of.values()))
            message = f"this is {_kind(schema)}, but this trainer takes {self.wanted} data. {_example(self.wanted)}"
            raise LoraflowError(Problem(line, message, None, source).located(label))
        if self.problems:
            raise DataError(label, self.problems)
        if not self.records:
            raise LoraflowError(
                f"{label}: the dataset is empty (no line or row holds an example). {_example(self.wanted)}"
            )
        problem = DATASET_CHECKS.get(self.wanted, lambda records: None)(self.records)
        if problem:
            raise LoraflowError(f"{label}: {problem}")
        return LoadedData(self.records, label, self.wanted, ", ".join(self.mappings), from_hub)


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
            yield (
                number,
                Problem(
                    number,
                    f"byte {start + position} (0x{raw[position]:02x}, counting from 0) is not UTF-8; "
                    "training data is UTF-8 text, one JSON object per line. "
                    "Is this a binary file, or another encoding? Convert it, e.g. iconv -f latin1 -t utf-8",
                ),
            )
            return
        if text.strip(" \t\r\n"):  # JSON's own whitespace, so a line of other control characters is still checked
            yield number, _parse_json(number, text)


def _jsonl_values(path: Path) -> Iterator[tuple[int | None, object]]:
    try:
        with open(path, "rb") as stream:
            yield from _parsed_lines(stream)
    except OSError as error:
        yield None, Problem(None, f"cannot read it ({error.strerror or error})")


def _document(path: Path) -> Iterator[tuple[int | None, object]]:
    """A .txt file is one document: {"text": its contents}."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        yield None, Problem(None, f"cannot read it ({error.strerror or error})")
        return
    if NUL in raw:  # UTF-8 text never holds a NUL byte; binary files nearly always do
        yield None, Problem(None, f"byte {raw.index(NUL)} is NUL, so this is a binary file, not text")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:  # decoded whole (not utf-8-sig) so the offset counts a BOM too
        message = (
            f"byte {error.start} (0x{raw[error.start]:02x}, counting from 0) is not UTF-8. Is this another encoding? "
            "Convert it, e.g. iconv -f latin1 -t utf-8"
        )
        line = raw[: error.start].count(b"\n") + 1
        yield line, Problem(line, message)
        return
    text = text.removeprefix("\ufeff")
    if not text.strip():
        yield None, Problem(None, "the file is empty (no text to train on)")
        return
    yield None, {"text": text}


def _first_line(error: BaseException) -> str:
    """datasets wraps the reader's error (Arrow, JSON, CSV) in its own; the reader's first line says what is wrong."""
    lines = str(error.__cause__ or error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def _table_values(path: Path, wanted: str) -> Iterator[tuple[int | None, object]]:
    """Each row of a JSON, CSV or Parquet file as read by datasets' builder for it, numbered from 1."""
    import tempfile

    import datasets

    builder = TABLE_BUILDERS[path.suffix.lower()]
    if path.stat().st_size == 0:
        yield None, Problem(None, "the file is empty")
        return
    # A throwaway cache, held in memory: reading a user's file leaves nothing behind in ~/.cache.
    with tempfile.TemporaryDirectory(prefix="loraflow-data-") as cache:
        try:
            table = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
            )
        except Exception as error:  # datasets raises many types (Arrow, JSON, CSV, generation errors) for bad files
            yield None, Problem(None, f"datasets cannot read it as {builder.upper()} ({_first_line(error)})")
            return
    yield from _rows(table, wanted)


def _rows(table, wanted: str) -> Iterator[tuple[int | None, object]]:
    if _schema_of(dict.fromkeys(table.column_names), wanted) is None:
        columns = ", ".join(table.column_names) or "none"
        yield None, Problem(None, f"no column that {wanted} data is read from (columns: {columns}). {_example(wanted)}")
        return
    for row, values in enumerate(table, 1):
        record = _without_nulls(values)
        if wanted == "text" and "text" in values:  # a null text is a blank row, skipped as an empty one is
            record["text"] = values["text"]
        yield row, record


def _without_nulls(value: object) -> object:
    """Arrow gives every row every column (and every message every key), null where the row had none: drop them."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _suffixes(data_format: str) -> tuple[str, ...]:
    return (JSONL_SUFFIX, *TABLE_BUILDERS, *((TEXT_SUFFIX,) if data_format == "text" else ()))


def data_sources(data_format: str) -> str:
    """What --data takes for a trainer of this format: for the CLI's help and for errors."""
    files = ", ".join(_suffixes(data_format))
    return f"a {files} file or a folder of them, or a Hub dataset id ORG/NAME, of {data_format} examples"


def _wanted(data_format: str) -> str:
    return f"Give {data_sources(data_format)}."


def _file_values(path: Path, data_format: str) -> Iterator[tuple[int | None, object]]:
    suffix = path.suffix.lower()
    if suffix == JSONL_SUFFIX:
        return _jsonl_values(path)
    if suffix == TEXT_SUFFIX:
        return _document(path)
    return _table_values(path, data_format)


def _local_files(path: Path, data_format: str) -> list[Path]:
    suffixes = _suffixes(data_format)
    if path.is_dir():
        files = sorted(
            file
            for file in path.rglob("*")
            if file.suffix.lower() in suffixes
            and file.is_file()
            and not any(part.startswith(".") for part in file.relative_to(path).parts)
        )
        if not files:
            raise LoraflowError(f"{path}: the folder holds no {', '.join(suffixes)} files. {_wanted(data_format)}")
        return files
    if path.suffix.lower() == TEXT_SUFFIX and data_format != "text":
        raise LoraflowError(
            f"{path}: a .txt file is raw text, which trainers of text data (continued pre-training, e.g. cpt) take; "
            f"this trainer takes {data_format} data. {_wanted(data_format)}"
        )
    if path.suffix.lower() not in suffixes:
        raise LoraflowError(
            f"{path}: cannot tell how to read a {path.suffix or 'suffix-less'} file. {_wanted(data_format)}"
        )
    return [path]


def _hub_table(repo_id: str, split: str, subset: str | None):
    """The split of a Hub dataset (from HF_ENDPOINT); a wrong id or an unreachable Hub fails with one request."""
    import datasets
    from huggingface_hub import HfApi, constants

    from loraflow.hub.hf import hub_errors

    what = f"{repo_id} (a Hub dataset id, as no local file or folder has this name)"
    with hub_errors(what, f"{constants.ENDPOINT} (HF_ENDPOINT)"):
        HfApi().dataset_info(repo_id)  # datasets itself retries an unreachable Hub for half a minute
    try:
        return datasets.load_dataset(repo_id, name=subset, split=split)
    except Exception as error:  # a wrong split or subset, or data files its builder cannot read
        raise LoraflowError(
            f"{repo_id}: datasets cannot load split {split!r}"
            + (f" of subset {subset!r}" if subset else "")
            + f" ({_first_line(error)}). Pass --split and --subset as the dataset's card names them."
        ) from None


def load_data(data: str | Path, data_format: str, split: str = DEFAULT_SPLIT, subset: str | None = None) -> LoadedData:
    """Read a local file or folder, or a Hub dataset id, validating every record against `data_format`."""
    if data_format not in FORMATS:
        raise LoraflowError(f"unknown data format {data_format!r}; use one of {', '.join(FORMATS)}")
    path, reading = Path(data), _Reading(data_format)
    if path.exists():
        if split != DEFAULT_SPLIT or subset:
            raise LoraflowError(
                f"{path}: --split and --subset choose part of a Hub dataset; a local file or folder is read whole."
            )
        for file in _local_files(path, data_format):
            for line, value in _file_values(file, data_format):
                reading.add(str(file), line, value)
        return reading.loaded(str(path))
    if HUB_ID.fullmatch(str(data)) and path.suffix.lower() not in (JSONL_SUFFIX, TEXT_SUFFIX, *TABLE_BUILDERS):
        label = f"{data}[{subset + '/' if subset else ''}{split}]"
        for row, value in _rows(_hub_table(str(data), split, subset), data_format):
            reading.add(label, row, value)
        return reading.loaded(label, from_hub=True)
    raise LoraflowError(f"{path}: no such file or folder. {_wanted(data_format)}")


def load_records(
    data: str | Path, data_format: str, split: str = DEFAULT_SPLIT, subset: str | None = None
) -> list[dict]:
    """The validated records of `data` (see load_data), each with where it came from, for check_lengths."""
    return load_data(data, data_format, split, subset).records


def _wrong_format(schema: Schema | None, wanted: str) -> str:
    if schema is None:
        return f"unrecognised record; expected {wanted} data. {_example(wanted)}"
    return f"this record is {_kind(schema)}, expected {wanted}"


def _kind(schema: Schema) -> str:
    return f"{schema.data_format} data" + (f" ({schema.description})" if schema.name != "none" else "")


def _example(data_format: str) -> str:
    return f"Each example looks like {EXAMPLES[data_format]}."


def _token_count(record: dict, tokenizer, data_format: str) -> int:
    if data_format == "messages":
        return len(tokenizer.apply_chat_template(record["messages"], tokenize=True, return_dict=True)["input_ids"])
    if data_format == "unpaired":
        return len(tokenizer(record["prompt"] + record["completion"])["input_ids"])
    return max(len(tokenizer(record["prompt"] + record[answer])["input_ids"]) for answer in ("chosen", "rejected"))


def check_lengths(records: list[dict], path: str | Path, tokenizer, max_length: int, data_format: str) -> None:
    """Refuse examples longer than max_length tokens, naming each line; text is packed into blocks, so never."""
    if data_format == "text":
        return
    problems = []
    for record in records:
        length = _token_count(record, tokenizer, data_format)
        if length > max_length:
            message = f"example is {length} tokens, over max_length {max_length}; shorten it or raise --max-length"
            problems.append(Problem(record["_line"], message, source=record.get("_source")))
    if problems:
        raise DataError(path, problems)


def split_records(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A deterministic train/eval split; eval gets at least one example when asked for any."""
    if eval_fraction <= 0 or len(records) < 2:
        return list(records), []
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    eval_count = max(1, round(len(shuffled) * eval_fraction))
    return shuffled[eval_count:], shuffled[:eval_count]


def strip_line_numbers(records: list[dict]) -> list[dict]:
    """The records as trainers take them, without where each came from."""
    return [{key: value for key, value in record.items() if key not in PRIVATE_KEYS} for record in records]
