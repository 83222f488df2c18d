"""Data validation: every bad line is reported as file:line before any model loads."""

from __future__ import annotations

import json

import pytest

from hub.data import DataError, check_lengths, load_records, split_records
from hub.errors import LoraflowError
from tests.conftest import PIRATE


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_shipped_datasets_are_valid():
    assert len(load_records(PIRATE / "train.jsonl", "messages")) == 320
    assert len(load_records(PIRATE / "prefs.jsonl", "preference")) == 320


def test_every_malformed_line_is_reported_with_its_number(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]})
    path = write_lines(tmp_path / "train.jsonl", [
        good,
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "Hi"}]}),
        json.dumps({"messages": [{"role": "pirate", "content": "Hi"}, {"role": "assistant", "content": "x"}]}),
        "",
        json.dumps([1, 2]),
        json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}),
    ])
    with pytest.raises(DataError) as caught:
        load_records(path, "messages")
    message = str(caught.value)
    assert f"{path}:2: not valid JSON" in message
    assert f"{path}:3: the last message must be the assistant's answer" in message
    assert f"{path}:4: messages[0].role is 'pirate'" in message
    assert f"{path}:6: each line must be a JSON object" in message
    assert f"{path}:7: messages[0].content must be a non-empty string" in message
    assert [line for line, _ in caught.value.problems] == [2, 3, 4, 6, 7]


def test_report_is_capped(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["{"] * 50)
    with pytest.raises(DataError, match="and 30 more problems"):
        load_records(path, "messages")


def test_wrong_format_for_the_method():
    with pytest.raises(LoraflowError, match="this is messages data, but this trainer takes preference data"):
        load_records(PIRATE / "train.jsonl", "preference")


def test_empty_dataset(tmp_path):
    with pytest.raises(LoraflowError, match="the dataset is empty"):
        load_records(write_lines(tmp_path / "empty.jsonl", ["", "  "]), "messages")


def test_missing_file(tmp_path):
    with pytest.raises(LoraflowError, match="no such file"):
        load_records(tmp_path / "nope.jsonl", "messages")


def test_identical_chosen_and_rejected(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", [json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"})])
    with pytest.raises(DataError, match=r"prefs.jsonl:1: \"chosen\" and \"rejected\" are identical"):
        load_records(path, "preference")


def test_too_long_examples_are_refused(tmp_path, tiny_base):
    from transformers import AutoTokenizer

    long_answer = "Arr! " + "matey " * 300
    path = write_lines(tmp_path / "long.jsonl", [
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}),
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": long_answer}]}),
    ])
    records = load_records(path, "messages")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    with pytest.raises(DataError, match=r"long.jsonl:2: example is \d+ tokens, over max_length 64"):
        check_lengths(records, path, tokenizer, 64, "messages")
    check_lengths(records[:1], path, tokenizer, 64, "messages")


def test_split_is_deterministic_and_disjoint():
    records = load_records(PIRATE / "train.jsonl", "messages")
    train, evaluation = split_records(records, 0.1, seed=1)
    again, _ = split_records(records, 0.1, seed=1)
    assert train == again
    assert len(evaluation) == 32 and len(train) == 288
    assert not {r["_line"] for r in train} & {r["_line"] for r in evaluation}
