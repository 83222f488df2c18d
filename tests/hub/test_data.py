"""Data validation: every bad line is reported as file:line before any model loads."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraflow.hub import data
from loraflow.hub.data import DataError, check_lengths, load_records, split_records
from loraflow.hub.errors import LoraflowError
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
    assert f"{path}:2:2: not valid JSON: Expecting property name enclosed in double quotes" in message
    assert f"{path}:3: the last message must be the assistant's answer" in message
    assert f"{path}:4: messages[0].role is 'pirate'" in message
    assert f"{path}:6: each line must be a JSON object" in message
    assert f"{path}:7: messages[0].content must be a non-empty string" in message
    assert f"{path}:6: each line must be a JSON object, not an array" in message
    assert [problem.line for problem in caught.value.problems] == [2, 3, 4, 6, 7]


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


def test_a_binary_file_names_the_line_and_byte(tmp_path):
    path = tmp_path / "image.jsonl"
    path.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n\x89PNG\r\n\x1a\n\x00\x00')
    with pytest.raises(LoraflowError) as caught:
        load_records(path, "preference")
    assert str(caught.value).startswith(f"{path}:2: byte 48 (0x89, counting from 0) is not UTF-8;")
    assert "\n" not in str(caught.value)


def test_a_latin1_character_inside_a_line_gives_its_byte_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "Hi", "chosen": "Arr!", "rejected": "Hello"}) + "\n"
    path.write_bytes(good.encode() + '{"prompt": "caf\u00e9", "chosen": "x", "rejected": "y"}\n'.encode("latin-1"))
    offset = len(good) + len('{"prompt": "caf')
    with pytest.raises(LoraflowError, match=rf"latin1.jsonl:2: byte {offset} \(0xe9, counting from 0\) is not UTF-8"):
        load_records(path, "preference")


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "Hi", "chosen": "Arr!", "rejected": "Hello"}).encode())
    assert load_records(path, "preference")[0]["prompt"] == "Hi"


def test_json_errors_are_placed_where_pythons_parser_places_them(tmp_path):
    """A carriage return inside a line is one JSON error on that line, not a line split in two."""
    line = '{"prompt": "a\rb", "chosen": "x", "rejected": "y"}'
    with pytest.raises(json.JSONDecodeError) as python:
        json.loads(line)
    path = tmp_path / "cr.jsonl"
    path.write_bytes(line.encode() + b"\n")
    with pytest.raises(DataError) as caught:
        load_records(path, "preference")
    assert [(p.line, p.column) for p in caught.value.problems] == [(1, python.value.colno)] == [(1, 14)]
    assert str(caught.value) == f"{path}:1:14: not valid JSON: {python.value.msg}"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('"just a string"', "each line must be a JSON object, not a string"),
        ("null", "each line must be a JSON object, not null"),
        ('{"prompt": 3, "chosen": "x", "rejected": "y"}', '"prompt" must be a non-empty string, not a number'),
        ('{"prompt": "p", "chosen": ["x"], "rejected": "y"}', '"chosen" must be a non-empty string, not an array'),
        ('{"prompt": "p", "chosen": "x", "rejected": {}}', '"rejected" must be a non-empty string, not an object'),
        ('{"prompt": "\\ud800", "chosen": "x", "rejected": "y"}', "unpaired surrogate \\ud800"),
        ("[" * 100_000, "nested too deeply"),
        ("1" * 5000, "not valid JSON: Exceeds the limit"),
        ('{"hello": "there"}', "unrecognised record; expected preference data"),
    ],
)
def test_bad_preference_lines_are_one_line_errors(tmp_path, line, message):
    path = write_lines(tmp_path / "prefs.jsonl", [line])
    with pytest.raises(DataError) as caught:
        load_records(path, "preference")
    assert str(caught.value).startswith(f"{path}:1")
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hi", '"messages" must be a non-empty list'),
        ([["user", "hi"]], 'messages[0] must be an object with "role" and "content"'),
        ([{"role": ["user"], "content": "hi"}], "messages[0].role is an array; use one of"),
        ([{"role": "user", "content": 5}], "messages[0].content must be a non-empty string, not a number"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}], "messages[1].content"),
    ],
)
def test_wrong_field_types_in_messages_are_named(tmp_path, messages, message):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps({"messages": messages})])
    with pytest.raises(DataError, match=f"train.jsonl:1: {message}".replace("[", r"\[").replace("]", r"\]")):
        load_records(path, "messages")


def test_a_folder_is_refused_by_name(tmp_path):
    with pytest.raises(LoraflowError, match=f"{tmp_path}: is a folder. Give a JSONL file"):
        load_records(tmp_path, "messages")


def test_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    with pytest.raises(LoraflowError, match=r"empty.jsonl: the dataset is empty"):
        load_records(path, "messages")


def test_a_huge_line_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 1000)
    good = json.dumps({"prompt": "Hi", "chosen": "Arr!", "rejected": "Hello"})
    path = write_lines(tmp_path / "huge.jsonl", [good, '{"prompt": "' + "x" * 5000 + '"}', good, "{"])
    with pytest.raises(DataError) as caught:
        load_records(path, "preference")
    assert [problem.line for problem in caught.value.problems] == [2, 4]
    assert f"{path}:2: the line is longer than 1,000 bytes" in str(caught.value)


def test_the_wrong_format_names_the_first_line_of_it(tmp_path):
    lines = ["", json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]})]
    with pytest.raises(LoraflowError, match=r"train.jsonl:2: this is messages data, but this trainer takes preference"):
        load_records(write_lines(tmp_path / "train.jsonl", lines), "preference")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
TEXT_OR_ANY = st.text(max_size=20) | JSON_VALUES
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(data.ROLES) | JSON_VALUES}, optional={"content": TEXT_OR_ANY})
NEAR_RECORDS = (
    st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=4) | JSON_VALUES})
    | st.fixed_dictionaries({}, optional={key: TEXT_OR_ANY for key in ("prompt", "chosen", "rejected")})
    | JSON_VALUES
)
JSON_LINES = st.lists(
    st.builds(lambda value, ascii_only: json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"),
              NEAR_RECORDS, st.booleans()),
    max_size=6,
).map(b"\n".join)


@settings(max_examples=100, deadline=None)
@given(content=st.binary(max_size=300) | JSON_LINES | st.tuples(JSON_LINES, st.binary(max_size=40)).map(b"".join),
       data_format=st.sampled_from(data.FORMATS))
def test_any_bytes_give_records_or_a_loraflow_error(tmp_path_factory, content, data_format):
    path = tmp_path_factory.getbasetemp() / "fuzz.jsonl"
    path.write_bytes(content)
    try:
        records = load_records(path, data_format)
    except LoraflowError as error:
        assert all(str(path) in line for line in str(error).splitlines())
    else:
        assert records and all(isinstance(record, dict) for record in records)
