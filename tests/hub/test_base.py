"""Base models: the offline default converts from the packaged GGUF and really chats; other specs fail clearly."""

from __future__ import annotations

import json

import pytest

from loraflow.hub.base import BASE_RECORD, DEFAULT_BASE, resolve_base
from loraflow.hub.errors import LoraflowError


@pytest.mark.e2e
def test_packaged_gguf_converts_to_a_model_that_knows_paris(tmp_path, monkeypatch, smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path))
    base = resolve_base(DEFAULT_BASE)
    assert base.path == (tmp_path / "bases" / DEFAULT_BASE).resolve()
    assert base.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base.fingerprint == smollm2.fingerprint  # the conversion is reproducible
    assert json.loads((base.path / BASE_RECORD).read_text())["fingerprint"] == base.fingerprint
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_second_resolve_reuses_the_cache(smollm2):
    again = resolve_base(DEFAULT_BASE)
    assert again == smollm2


def test_local_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(LoraflowError, match="no \\*.safetensors weights"):
        resolve_base(str(tmp_path))


def test_unknown_spec_explains_the_choices():
    with pytest.raises(LoraflowError, match="not a known base"):
        resolve_base("./no-such-folder")


def test_unreachable_hub_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with pytest.raises(LoraflowError, match=r"could not download it from the Hugging Face Hub at http://127.0.0.1:9"):
        resolve_base("HuggingFaceTB/SmolLM2-360M-Instruct")
