"""Data validation: every bad line is reported as file:line before any model loads."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraflow.hub import data
from loraflow.hub.data import DataError, check_lengths, load_data, load_records, split_records
from loraflow.hub.errors import LoraflowError
from tests.conftest import PIRATE


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_file_refused(path, content: bytes, error: type[Exception], message: str) -> None:
    """A file holding exactly `content` is refused as messages data with an `error` that matches `message`."""
    path.write_bytes(content)
    with pytest.raises(error, match=message):
        load_records(path, "messages")


def test_shipped_datasets_are_valid():
    assert len(load_records(PIRATE / "train.jsonl", "messages")) == 320
    assert len(load_records(PIRATE / "prefs.jsonl", "preference")) == 320


def test_every_malformed_line_is_reported_with_its_number(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]})
    path = write_lines(
        tmp_path / "train.jsonl",
        [
            good,
            "{not json",
            json.dumps({"messages": [{"role": "user", "content": "Hi"}]}),
            json.dumps({"messages": [{"role": "pirate", "content": "Hi"}, {"role": "assistant", "content": "x"}]}),
            "",
            json.dumps([1, 2]),
            json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}),
        ],
    )
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
    path = write_lines(
        tmp_path / "long.jsonl",
        [
            json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}),
            json.dumps(
                {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": long_answer}]}
            ),
        ],
    )
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


def test_a_folder_without_data_files_is_refused_by_name(tmp_path):
    (tmp_path / "notes.md").write_text("not data")
    with pytest.raises(LoraflowError, match=f"{tmp_path}: the folder holds no .jsonl, .json, .csv, .parquet files"):
        load_records(tmp_path, "messages")


def test_an_empty_file_is_refused(tmp_path):
    assert_file_refused(tmp_path / "empty.jsonl", b"", LoraflowError, r"empty.jsonl: the dataset is empty")


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
    | st.fixed_dictionaries(
        {},
        optional={
            "prompt": TEXT_OR_ANY | st.lists(MESSAGE, max_size=3),
            "completion": TEXT_OR_ANY | st.lists(MESSAGE, max_size=3),
            "label": st.booleans() | JSON_VALUES,
        },
    )
    | JSON_VALUES
)
JSON_LINES = st.lists(
    st.builds(
        lambda value, ascii_only: json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"),
        NEAR_RECORDS,
        st.booleans(),
    ),
    max_size=6,
).map(b"\n".join)


@settings(max_examples=100, deadline=None)
@given(
    content=st.binary(max_size=300) | JSON_LINES | st.tuples(JSON_LINES, st.binary(max_size=40)).map(b"".join),
    data_format=st.sampled_from(data.FORMATS),
)
def test_any_bytes_give_records_or_a_loraflow_error(tmp_path_factory, content, data_format):
    path = tmp_path_factory.getbasetemp() / "fuzz.jsonl"
    path.write_bytes(content)
    try:
        records = load_records(path, data_format)
    except LoraflowError as error:
        assert all(str(path) in line for line in str(error).splitlines())
    else:
        assert records and all(isinstance(record, dict) for record in records)


# Beyond JSONL: anything `datasets` reads, and the public schemas that map onto ours.

HI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]
PAIR = {"prompt": "Hi", "chosen": "Arr!", "rejected": "Hello"}


def write_parquet(path, rows):
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(path))
    return path


def test_json_csv_and_parquet_files_are_read_with_datasets(tmp_path):
    (tmp_path / "pairs.json").write_text(json.dumps([PAIR, {**PAIR, "prompt": "Ahoy"}]))
    (tmp_path / "pairs.csv").write_text('prompt,chosen,rejected\nHi,Arr!,Hello\n"Two\nlines",Arr!,Hello\n')
    write_parquet(tmp_path / "chat.parquet", [{"messages": HI, "id": 1}, {"messages": HI, "id": 2}])
    assert [r["prompt"] for r in load_records(tmp_path / "pairs.json", "preference")] == ["Hi", "Ahoy"]
    assert [r["prompt"] for r in load_records(tmp_path / "pairs.csv", "preference")] == ["Hi", "Two\nlines"]
    loaded = load_data(tmp_path / "chat.parquet", "messages")
    assert [r["messages"] for r in loaded.records] == [HI, HI] and loaded.mapping == "none"
    assert loaded.summary() == {
        "source": "chat.parquet",
        "format": "messages",
        "mapping": "none (already loraflow's messages format)",
    }


def test_a_folder_of_files_is_read_in_path_order_and_errors_name_each_file_and_row(tmp_path):
    write_lines(tmp_path / "a.jsonl", [json.dumps(PAIR)])
    (tmp_path / "b.csv").write_text("prompt,chosen,rejected\nHi,Arr!,Hello\nHi,same,same\n")
    (tmp_path / "nested").mkdir()
    write_parquet(tmp_path / "nested" / "c.parquet", [PAIR, {**PAIR, "chosen": ""}])
    (tmp_path / ".cache").mkdir()
    write_lines(tmp_path / ".cache" / "hidden.jsonl", ["{"])
    (tmp_path / "README.md").write_text("# not data")
    with pytest.raises(DataError) as caught:
        load_records(tmp_path, "preference")
    assert str(caught.value).splitlines() == [
        f'{tmp_path / "b.csv"}:2: "chosen" and "rejected" are identical, so the pair teaches nothing',
        f'{tmp_path / "nested" / "c.parquet"}:2: "chosen" must be a non-empty string, not a blank one',
    ]
    (tmp_path / "b.csv").write_text("prompt,chosen,rejected\nHi,Arr!,Hello\n")
    write_parquet(tmp_path / "nested" / "c.parquet", [PAIR])
    records = load_records(tmp_path, "preference")
    assert [(r["_source"], r["_line"]) for r in records] == [
        (str(tmp_path / "a.jsonl"), 1),
        (str(tmp_path / "b.csv"), 1),
        (str(tmp_path / "nested" / "c.parquet"), 1),
    ]


def test_sharegpt_conversations_map_to_messages(tmp_path):
    conversation = [
        {"from": "system", "value": "Be a pirate."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Arr!"},
    ]
    path = write_parquet(tmp_path / "sharegpt.parquet", [{"conversations": conversation}])
    loaded = load_data(path, "messages")
    assert loaded.mapping == "sharegpt"
    assert loaded.records[0]["messages"] == [{"role": "system", "content": "Be a pirate."}, *HI]
    assert "ShareGPT" in loaded.summary()["mapping"]
    bad = write_parquet(
        tmp_path / "bad.parquet",
        [
            {"conversations": conversation},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "tool", "value": "x"}]},
            {"conversations": [{"from": "gpt", "value": "Arr!"}, {"from": "human", "value": "Hi"}]},
        ],
    )
    with pytest.raises(DataError) as caught:
        load_records(bad, "messages")
    assert str(caught.value).splitlines() == [
        f"{bad}:2: conversations[1].from is 'tool'; use one of human, gpt, system",
        f"{bad}:3: the last message must be the assistant's answer, which is what the model learns",
    ]


def test_alpaca_maps_to_one_user_turn_and_the_answer(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(
        json.dumps(
            [
                {"instruction": "Greet me", "input": "", "output": "Arr!"},
                {"instruction": "Translate", "input": "Hello", "output": "Ahoy"},
            ]
        )
    )
    loaded = load_data(path, "messages")
    assert loaded.mapping == "alpaca"
    assert [r["messages"][0]["content"] for r in loaded.records] == ["Greet me", "Translate\n\nHello"]
    assert loaded.records[1]["messages"][1] == {"role": "assistant", "content": "Ahoy"}
    path.write_text(json.dumps([{"instruction": "Greet me", "input": "", "output": ""}]))
    with pytest.raises(DataError, match=rf'{path}:1: "output" must be a non-empty string, not a blank one'):
        load_records(path, "messages")
    with pytest.raises(LoraflowError, match=r"this is messages data \(Alpaca .*\), but this trainer takes preference"):
        load_records(path, "preference")


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "Hi", "chosen": HI, "rejected": [HI[0], {"role": "assistant", "content": "Hello"}]},
        {"chosen": HI, "rejected": [HI[0], {"role": "assistant", "content": "Hello"}]},
        {"prompt": HI[:1], "chosen": HI[1:], "rejected": [{"role": "assistant", "content": "Hello"}]},
    ],
    ids=["ultrafeedback-binarized", "no-prompt-column", "prompt-as-turns"],
)
def test_chat_preference_lists_map_to_prompt_chosen_rejected(tmp_path, record):
    loaded = load_data(write_parquet(tmp_path / "prefs.parquet", [record]), "preference")
    assert loaded.mapping == "ultrafeedback"
    assert data.strip_line_numbers(loaded.records) == [PAIR]


def test_chat_preference_that_does_not_fit_one_prompt_and_two_answers_is_named(tmp_path):
    system = {"role": "system", "content": "Be a pirate."}
    lines = [
        json.dumps({"chosen": [system, *HI], "rejected": [system, HI[0], {"role": "assistant", "content": "x"}]}),
        json.dumps(
            {"chosen": HI, "rejected": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "x"}]}
        ),
        json.dumps({"chosen": HI, "rejected": HI[:1]}),
    ]
    with pytest.raises(DataError) as caught:
        load_records(write_lines(tmp_path / "prefs.jsonl", lines), "preference")
    assert [p.message for p in caught.value.problems] == [
        "the prompt is 2 turns (system, user); preference data here is one user prompt and two answers",
        "chosen and rejected start from different turns; the turns before the two answers must match",
        "rejected must end with the assistant's answer",
    ]


def test_a_table_without_known_columns_names_its_columns(tmp_path):
    path = write_parquet(tmp_path / "odd.parquet", [{"question": "Hi", "answer": "Arr!"}])
    with pytest.raises(
        DataError, match=rf"{path}: no column that messages data is read from \(columns: question, answer\)"
    ):
        load_records(path, "messages")


def test_a_file_datasets_cannot_read_is_named(tmp_path):
    path, empty = tmp_path / "broken.parquet", tmp_path / "empty.csv"
    assert_file_refused(path, b"PAR1 not really", DataError, rf"{path}: datasets cannot read it as PARQUET \(.*Parquet")
    assert_file_refused(empty, b"", DataError, rf"{empty}: the file is empty")


def test_an_unknown_suffix_and_split_on_a_local_file_are_refused(tmp_path):
    path = write_lines(tmp_path / "train.tsv", ["a\tb"])
    with pytest.raises(LoraflowError, match=r"train.tsv: cannot tell how to read a .tsv file. Give a .jsonl, .json"):
        load_records(path, "messages")
    with pytest.raises(LoraflowError, match="--split and --subset choose part of a Hub dataset"):
        load_records(PIRATE / "train.jsonl", "messages", split="test")
    with pytest.raises(LoraflowError, match="data/missing.jsonl: no such file or folder"):
        load_records("data/missing.jsonl", "messages")


def test_text_from_txt_files_folders_and_text_columns(tmp_path, tiny_base):
    from transformers import AutoTokenizer

    docs = tmp_path / "docs"
    (docs / "more").mkdir(parents=True)
    (docs / "a.txt").write_text("The mainsail is the largest sail.\n\nIt sets on the mainmast.\n")
    (docs / "more" / "b.txt").write_text("Halyards raise sails. " * 400)
    records = load_records(docs, "text")
    assert [len(r["text"]) > 0 for r in records] == [True, True] and records[0]["text"].startswith("The mainsail")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    check_lengths(records, docs, tokenizer, 64, "text")  # long documents are packed into blocks, never refused
    (tmp_path / "corpus.csv").write_text('text,source\n"Ropes are lines.",a\n,b\n"  ",c\n"Knots hold.",d\n')
    assert [r["text"] for r in load_records(tmp_path / "corpus.csv", "text")] == ["Ropes are lines.", "Knots hold."]
    chat = write_lines(tmp_path / "chat.jsonl", [json.dumps({"messages": HI, "text": "User: Hi"})])
    assert load_records(chat, "text") == [{"messages": HI, "text": "User: Hi", "_line": 1, "_source": str(chat)}]
    assert load_records(docs / "a.txt", "text") == [
        {"text": records[0]["text"], "_line": None, "_source": str(docs / "a.txt")}
    ]
    with pytest.raises(LoraflowError, match=r"a.txt: a .txt file is raw text, which trainers of text data"):
        load_records(docs / "a.txt", "messages")


def test_bad_text_documents_are_each_named(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (tmp_path / "latin1.txt").write_bytes("line one\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError) as caught:
        load_records(tmp_path, "text")
    assert str(caught.value).splitlines() == [
        f"{tmp_path / 'blank.txt'}: the file is empty (no text to train on)",
        f"{tmp_path / 'image.txt'}: byte 8 is NUL, so this is a binary file, not text",
        f"{tmp_path / 'latin1.txt'}:2: byte 12 (0xe9, counting from 0) is not UTF-8. Is this another encoding? "
        "Convert it, e.g. iconv -f latin1 -t utf-8",
    ]
    with pytest.raises(LoraflowError, match="this is preference data, but this trainer takes text data"):
        load_records(PIRATE / "prefs.jsonl", "text")


def test_an_unreachable_hub_is_one_line_naming_hf_endpoint(tmp_path):
    """Run apart: huggingface_hub reads HF_ENDPOINT once, when it is imported."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    code = (
        "from loraflow.hub.data import load_records\nfrom loraflow.hub.errors import LoraflowError\n"
        "try:\n    load_records('pirates/shanties', 'messages', split='validation')\n"
        "except LoraflowError as error:\n    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env={**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0"},
    )
    assert result.stdout.strip() == (
        "pirates/shanties (a Hub dataset id, as no local file or folder has this name): cannot reach "
        f"{endpoint} (HF_ENDPOINT) (ConnectError). Check HF_ENDPOINT and the network."
    )


HUB_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
---
# Shanty chat
"""
LOAD_FROM_HUB = """
import json, sys
from loraflow.hub.data import load_data
from loraflow.hub.errors import LoraflowError
for data, split in json.loads(sys.argv[1]):
    try:
        loaded = load_data(data, "messages", split=split)
        print(json.dumps({"source": loaded.source, "mapping": loaded.mapping, "summary": loaded.summary(),
                          "first": loaded.records[0]["messages"], "count": len(loaded.records)}))
    except LoraflowError as error:
        print(json.dumps({"error": str(error)}))
"""


def test_a_hub_dataset_id_is_read_from_hf_endpoint_with_its_split(tiny_base, tmp_path, monkeypatch):
    """`loraflow hub serve` as the Hub; load_data runs apart, as huggingface_hub reads HF_ENDPOINT at import."""
    import os
    import subprocess
    import sys

    from tests.hub.hub_server_support import HubServer, hub_api

    turn = {"from": "human", "value": "Sing"}
    good = [{"conversations": [turn, {"from": "gpt", "value": f"Yo ho {n}!"}]} for n in range(3)]
    bad = [*good[:2], {"conversations": [turn, {"from": "tool", "value": "x"}]}]
    (tmp_path / "repo" / "data").mkdir(parents=True)
    write_parquet(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet", bad)
    write_parquet(tmp_path / "repo" / "data" / "validation-00000-of-00001.parquet", good)
    (tmp_path / "repo" / "README.md").write_text(HUB_CARD)
    (tmp_path / "hub").mkdir()
    with HubServer(tmp_path / "hub", tiny_base.path) as server:
        api = hub_api(server, monkeypatch)
        api.create_repo("pirates/shanty-chat", repo_type="dataset")
        api.upload_folder(repo_id="pirates/shanty-chat", repo_type="dataset", folder_path=tmp_path / "repo")
        queries = [
            ["pirates/shanty-chat", "validation"],
            ["pirates/shanty-chat", "train"],
            ["pirates/shanty-chat", "test"],
            ["pirates/no-such-data", "train"],
        ]
        env = {**os.environ, "HF_ENDPOINT": server.endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": ""}
        result = subprocess.run(
            [sys.executable, "-c", LOAD_FROM_HUB, json.dumps(queries)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    validation, train, missing_split, missing_repo = [json.loads(line) for line in result.stdout.splitlines()]
    assert validation["source"] == "pirates/shanty-chat[validation]" and validation["count"] == 3
    assert validation["mapping"] == "sharegpt" and validation["summary"]["source"] == "pirates/shanty-chat[validation]"
    assert validation["first"] == [{"role": "user", "content": "Sing"}, {"role": "assistant", "content": "Yo ho 0!"}]
    assert (
        train["error"] == "pirates/shanty-chat[train]:3: conversations[1].from is 'tool'; use one of human, gpt, system"
    )
    assert missing_split["error"].startswith("pirates/shanty-chat: datasets cannot load split 'test' (")
    assert missing_split["error"].endswith("Pass --split and --subset as the dataset's card names them.")
    assert missing_repo["error"].startswith(
        f"pirates/no-such-data (a Hub dataset id, as no local file or folder has this name): not found at "
        f"{server.endpoint} (HF_ENDPOINT)"
    )
    assert "\n" not in missing_split["error"] + missing_repo["error"]


# Unpaired data: one answer per record, labelled desirable (true) or not (false), as TRL's KTOTrainer reads it.

ANSWER = {"prompt": "Hi", "completion": "Arr!", "label": True}
SNUB = {"prompt": "Hi", "completion": "Go away.", "label": False}


def test_unpaired_records_load_from_jsonl_and_csv(tmp_path):
    path = write_lines(tmp_path / "answers.jsonl", [json.dumps(ANSWER), "", json.dumps(SNUB)])
    loaded = load_data(path, "unpaired")
    assert data.strip_line_numbers(loaded.records) == [ANSWER, SNUB] and loaded.mapping == "none"
    assert [record["_line"] for record in loaded.records] == [1, 3]
    (tmp_path / "answers.csv").write_text("prompt,completion,label\nHi,Arr!,true\nHi,Go away.,false\n")
    assert data.strip_line_numbers(load_records(tmp_path / "answers.csv", "unpaired")) == [ANSWER, SNUB]


def test_bad_unpaired_lines_are_each_named_with_the_fix(tmp_path):
    lines = [
        json.dumps(ANSWER),
        json.dumps({**SNUB, "label": "false"}),
        json.dumps({**SNUB, "label": 0}),
        json.dumps({"prompt": "Hi", "label": False}),
        json.dumps({**SNUB, "completion": "  "}),
        json.dumps({"prompt": "Hi", "completion": "x"}),
    ]
    with pytest.raises(DataError) as caught:
        load_records(write_lines(tmp_path / "answers.jsonl", lines), "unpaired")
    fix = '"label" must be true (a desirable answer) or false (an undesirable one)'
    assert str(caught.value).splitlines() == [
        f"{tmp_path / 'answers.jsonl'}:2: {fix}, not a string",
        f"{tmp_path / 'answers.jsonl'}:3: {fix}, not a number",
        f'{tmp_path / "answers.jsonl"}:4: "completion" must be a non-empty string, not null',
        f'{tmp_path / "answers.jsonl"}:5: "completion" must be a non-empty string, not a blank one',
        f"{tmp_path / 'answers.jsonl'}:6: {fix}, not null",
    ]


def test_unpaired_data_of_one_label_is_refused_naming_what_is_missing(tmp_path):
    path = write_lines(tmp_path / "thumbs-up.jsonl", [json.dumps(ANSWER)] * 3)
    with pytest.raises(LoraflowError) as caught:
        load_records(path, "unpaired")
    assert str(caught.value).startswith(
        f"{path}: all 3 examples are desirable (label true); unpaired data needs undesirable answers (label false) too."
    )


def test_preference_pairs_are_not_unpaired_data(tmp_path):
    with pytest.raises(LoraflowError, match="this is preference data, but this trainer takes unpaired data"):
        load_records(PIRATE / "prefs.jsonl", "unpaired")
    with pytest.raises(LoraflowError, match="this is unpaired data, but this trainer takes preference data"):
        load_records(write_lines(tmp_path / "answers.jsonl", [json.dumps(ANSWER)]), "preference")


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": HI[:1], "completion": HI[1:], "label": True},
        {"prompt": "Hi", "completion": HI[1:], "label": True},
        {"completion": HI, "label": True},
    ],
    ids=["trl-conversational", "prompt-as-string", "no-prompt-column"],
)
def test_conversational_unpaired_lists_map_to_prompt_completion_label(tmp_path, record):
    lines = [json.dumps(record), json.dumps(SNUB)]
    loaded = load_data(write_lines(tmp_path / "answers.jsonl", lines), "unpaired")
    assert loaded.mapping == "conversational, none"
    assert data.strip_line_numbers(loaded.records) == [ANSWER, SNUB]


def test_conversational_unpaired_that_is_not_one_prompt_and_one_answer_is_named(tmp_path):
    system = {"role": "system", "content": "Be a pirate."}
    lines = [
        json.dumps({"prompt": [system, HI[0]], "completion": HI[1:], "label": True}),
        json.dumps({"prompt": HI[:1], "completion": HI, "label": True}),
        json.dumps({"prompt": HI[:1], "completion": HI[:1], "label": False}),
    ]
    with pytest.raises(DataError) as caught:
        load_records(write_lines(tmp_path / "answers.jsonl", lines), "unpaired")
    assert [p.message for p in caught.value.problems] == [
        "the prompt is 2 turns (system, user); unpaired data here is one user prompt and one answer",
        "completion is 2 turns; unpaired data here is one user prompt and one answer",
        "completion must end with the assistant's answer",
    ]
