"""The `cpt` trainer on the tiny model: packed blocks, held-out perplexity, and every kind of text input."""

from __future__ import annotations

import json
import math

import pytest

from loraflow.hub.data import load_records, strip_line_numbers
from loraflow.hub.errors import LoraflowError
from loraflow.hub.training import TrainJob, load_config
from loraflow.plugins.cpt import CptTrainer, CptTrainingConfig, pack_blocks
from tests.conftest import REPO

CPT = REPO / "data" / "cpt"
TINY = dict(
    block_size=32,
    per_device_train_batch_size=4,
    learning_rate=3e-2,
    max_steps=6,
    lora_r=4,
    lora_alpha=8,
    eval_split=0.05,
)


def cpt_job(tiny_base, tmp_path, train_records, eval_records=(), **overrides) -> TrainJob:
    """What run_training hands a trainer, built by hand: the trainer is tested without its entry point."""
    return TrainJob(
        base=tiny_base,
        config=load_config(CptTrainingConfig, overrides={**TINY, **overrides}),
        name="tiny-cpt",
        train_records=list(train_records),
        eval_records=list(eval_records),
        output_dir=tmp_path / "run",
    )


def documents(data) -> list[dict]:
    """The records run_training hands the cpt trainer: hub/data.py's text format, without where each came from."""
    return strip_line_numbers(load_records(data, CptTrainer.data_format))


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base.path)


def test_training_on_the_shipped_text_lowers_held_out_perplexity(tiny_base, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = CptTrainer().train(cpt_job(tiny_base, tmp_path, documents(CPT / "train")))
    metrics = result.metrics
    assert metrics["perplexity_after"] < 0.95 * metrics["perplexity_before"]
    assert math.isclose(metrics["perplexity_after"], math.exp(metrics["eval_loss"]))
    assert metrics["train_steps"] == TINY["max_steps"] and metrics["train_blocks"] > metrics["eval_blocks"] >= 1
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base.path), result.adapter_dir)
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3, 4]])).logits.isfinite().all()


def test_blocks_join_documents_with_eos(tokenizer):
    blocks = pack_blocks(["Hoist the main.", "Ease the sheet."], tokenizer, block_size=4)
    tokens = [token for block in blocks["input_ids"] for token in block]
    first, second = (tokenizer(text)["input_ids"] for text in ("Hoist the main.", "Ease the sheet."))
    assert tokens == [*first, tokenizer.eos_token_id, *second, tokenizer.eos_token_id]
    assert all(len(block) == 4 for block in blocks["input_ids"][:-1])


def test_eval_split_holds_out_blocks(tiny_base, tokenizer, tmp_path):
    job = cpt_job(tiny_base, tmp_path, documents(CPT / "train"), eval_split=0.1)
    train_blocks, eval_blocks = CptTrainer().split_blocks(job, tokenizer)
    total = len(pack_blocks([record["text"] for record in job.train_records], tokenizer, 32))
    assert len(eval_blocks) == round(total * 0.1) and len(train_blocks) + len(eval_blocks) == total
    assert CptTrainer().split_blocks(job, tokenizer)[1]["input_ids"] == eval_blocks["input_ids"], "deterministic"
    _, none = CptTrainer().split_blocks(cpt_job(tiny_base, tmp_path, job.train_records, eval_split=0), tokenizer)
    assert none is None


def test_eval_documents_given_by_the_job_are_the_held_out_blocks(tiny_base, tokenizer, tmp_path):
    held_out = [{"text": (CPT / "heldout.txt").read_text()}]  # a .txt file as load_records will give it
    job = cpt_job(tiny_base, tmp_path, documents(CPT / "train"), eval_records=held_out)
    train_blocks, eval_blocks = CptTrainer().split_blocks(job, tokenizer)
    assert eval_blocks["input_ids"] == pack_blocks([held_out[0]["text"]], tokenizer, 32)["input_ids"]
    assert len(train_blocks) == len(pack_blocks([record["text"] for record in job.train_records], tokenizer, 32))


def write_dataset(path, rows: list[dict]):
    import pandas

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".csv":
        pandas.DataFrame(rows).to_csv(path, index=False)
    else:
        pandas.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_dataset_text_column_gives_one_document_per_row(tmp_path, suffix):
    rows = [
        {"text": "Reef early.", "source": "a"},
        {"text": "  ", "source": "b"},
        {"text": "Coil down.", "source": "c"},
    ]
    path = write_dataset(tmp_path / f"corpus{suffix}", rows)
    assert [record["text"] for record in documents(path)] == ["Reef early.", "Coil down."], "blank rows are skipped"


def test_a_folder_gives_one_document_per_text_file(tmp_path):
    (tmp_path / "b.txt").write_text("Second file.\n")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "c.txt").write_text("Third file.\n")
    (tmp_path / "notes.md").write_text("not training data")
    (tmp_path / "a.txt").write_bytes("\ufeffFirst file,\nsecond line.\n".encode())
    assert documents(tmp_path) == [
        {"text": "First file,\nsecond line.\n"},
        {"text": "Second file.\n"},
        {"text": "Third file.\n"},
    ], "in path order, without the BOM"
    assert len(documents(CPT / "train")) == len(list((CPT / "train").glob("*.txt")))


def test_a_text_file_is_one_document():
    assert documents(CPT / "heldout.txt") == [{"text": (CPT / "heldout.txt").read_text()}]


BAD_INPUTS = {
    "empty.txt": b"",
    "image.txt": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "latin1.txt": "Ship's log\ncaf\u00e9".encode("latin-1"),
    "columns.jsonl": b'{"body": "Hoist away."}\n',
    "empty.jsonl": b"",
    "blank.jsonl": b'{"text": " "}\n',
    "numbers.jsonl": b'{"text": 1}\n',
    "broken.jsonl": b'{"text": "ok"\n',
    "binary.jsonl": bytes(range(256)),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_a_loraflow_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BAD_INPUTS[name])
    with pytest.raises(LoraflowError) as caught:
        documents(path)
    assert str(path) in str(caught.value)


def test_config_checks_block_size_and_the_trainer_checks_it_against_the_base(tiny_base, tmp_path):
    with pytest.raises(LoraflowError, match="block_size must be at least 8"):
        CptTrainingConfig(block_size=4)
    assert CptTrainingConfig().block_size == 256
    job = cpt_job(tiny_base, tmp_path, [{"text": "Make fast."}], block_size=1024)
    with pytest.raises(LoraflowError, match="block_size 1024 is longer than .* context of 512 tokens"):
        CptTrainer().train(job)
