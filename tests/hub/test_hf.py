"""Model cards for the Hub and the small parsing around push and pull (the HTTP side is in test_hubserver.py)."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from loraflow.hub.errors import LoraflowError
from loraflow.hub.hf import card_for_version, parse_hub_source
from loraflow.hub.hub_protocol import build_adapter_card, card_metadata, write_adapter_card
from tests.conftest import make_adapter

TRAINER = {"name": "dpo", "package": "loraflow", "version": "0.1.0"}


def test_card_has_hub_metadata_and_loraflow_block(tiny_base, tmp_path):
    folder = make_adapter(tiny_base, tmp_path / "adapter")
    (folder / "loss_curve.png").write_bytes(b"\x89PNG")
    path = write_adapter_card(
        folder,
        name="pirate",
        base=tiny_base,
        trainer=TRAINER,
        config={"learning_rate": 5e-5, "beta": 0.1},
        metrics={"eval_loss": 0.123456},
        parent="pirate@1",
        data_summary={"file": "prefs.jsonl", "train_examples": 12},
    )
    card = ModelCard.load(path)
    assert card.data.base_model == tiny_base.hub_id
    assert card.data.library_name == "peft"
    assert {"lora", "dpo", "loraflow"} <= set(card.data.tags)
    block = card_metadata(folder)
    assert block["hyperparameters"] == {"learning_rate": 5e-5, "beta": 0.1}
    assert block["metrics"] == {"eval_loss": 0.1235}
    assert block["lineage"] == ["pirate@1"] and block["trainer"] == TRAINER
    assert "![loss curve](loss_curve.png)" in card.text and "Continues from `pirate@1`" in card.text

    (folder / "loss_curve.png").unlink()
    card = build_adapter_card(
        folder, name="p", base=tiny_base, trainer=TRAINER, config={}, metrics={}, parent=None, data_summary={}
    )
    assert "loss_curve.png" not in str(card)


def test_card_for_version_has_current_metrics_and_full_lineage(registry, tiny_base, tmp_path):
    first = make_adapter(tiny_base, tmp_path / "v1", seed=1)
    second = make_adapter(tiny_base, tmp_path / "v2", seed=2)
    write_adapter_card(
        second,
        name="pirate",
        base=tiny_base,
        trainer=TRAINER,
        config={"beta": 0.2},
        metrics={},
        parent="pirate@1",
        data_summary={"file": "prefs.jsonl"},
    )
    registry.publish(first, "pirate", base=tiny_base, trainer={"name": "lora"})
    version = registry.publish(second, "pirate", base=tiny_base, trainer=TRAINER, parent="pirate@1")
    version = registry.record_metrics(version.ref, {"arena_win_rate": 0.625})

    card = card_for_version(registry, version, "me/pirate")
    block = card.data.to_dict()["loraflow"]
    assert block["lineage"] == ["pirate@1", "pirate@2"] and block["version"] == 2
    assert block["metrics"] == {"arena_win_rate": 0.625}
    assert block["hyperparameters"] == {"beta": 0.2} and block["data"] == {"file": "prefs.jsonl"}
    base_model = f'AutoModelForCausalLM.from_pretrained("{tiny_base.hub_id}")'
    usage = f'PeftModel.from_pretrained({base_model}, "me/pirate", revision="v2")'
    assert usage in card.text
    assert "pirate@1 → pirate@2" in card.text


@pytest.mark.parametrize("source, expected", [("org/repo", ("org/repo", "main")), ("org/repo@v3", ("org/repo", "v3"))])
def test_hub_source_parsing(source, expected):
    assert parse_hub_source(source) == expected


@pytest.mark.parametrize("source", ["repo", "a/b/c", "/repo@v1", "org/"])
def test_hub_source_parsing_refuses_bad_ids(source):
    with pytest.raises(LoraflowError, match="ORG/REPO"):
        parse_hub_source(source)


def test_client_and_server_share_only_the_protocol_module():
    """hf.py (the client) and hub_server (the server) both import hub_protocol and never each other."""
    from tests.conftest import REPO

    client = (REPO / "hub" / "hf.py").read_text()
    server = "".join(path.read_text() for path in (REPO / "hub" / "hub_server").glob("*.py"))
    assert "hub_server" not in client
    assert "loraflow.hub.hf" not in server
    assert "loraflow.hub.hub_protocol" in client and "loraflow.hub.hub_protocol" in server
