"""The loraflow command end to end on the tiny model: help everywhere, train -> publish -> load in PEFT, errors."""

from __future__ import annotations

import json
import shutil

import click
import pytest

from tests.conftest import PIRATE, run_loraflow


def _all_commands(command: click.Command, path=()):
    yield path
    if hasattr(command, "list_commands"):  # a group, from click or Typer's bundled copy of it
        context = click.Context(command)
        for name in command.list_commands(context):
            yield from _all_commands(command.get_command(context, name), path + (name,))


def test_every_command_has_help(capsys):
    from loraflow.hub.cli import build_cli

    root = build_cli()
    paths = list(_all_commands(root))
    assert ("train", "lora") in paths and ("registry", "publish") in paths
    for path in paths:
        try:
            root.main([*path, "--help"], prog_name="loraflow", standalone_mode=False)
        except BaseException as exit_:  # click's Exit or SystemExit, depending on the group's click copy
            assert getattr(exit_, "exit_code", getattr(exit_, "code", 0)) in (0, None), path
        output = capsys.readouterr().out
        assert "Usage: " in output and "--help" in output, path
    assert "Train an adapter" in run_loraflow("--help").stdout  # and once through the real entry point


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """One CLI training run on the tiny model, shared by the tests below."""
    registry = tmp_path_factory.mktemp("cli") / "registry.json"
    config = registry.parent / "lora.yaml"
    config.write_text("learning_rate: 0.001\nlora_r: 4\nmax_steps: 3\n")
    result = run_loraflow(
        "--registry",
        str(registry),
        "train",
        "lora",
        "--data",
        str(PIRATE / "train.jsonl"),
        "--name",
        "pirate",
        "--base",
        str(tiny_base.path),
        "--config",
        str(config),
        "--max-steps",
        "2",
        "--max-length",
        "64",
        env={"LORAFLOW_CACHE": str(registry.parent / "cache")},
    )
    return registry, result


def test_train_publishes_version_one_with_metrics(trained):
    registry_path, result = trained
    assert "published pirate@1" in result.stdout
    from loraflow.hub.registry import Registry

    version = Registry(registry_path).get("pirate")
    assert version.version == 1 and version.trainer["name"] == "lora"
    assert version.metrics["train_steps"] == 2  # the flag beat the YAML file's max_steps: 3
    assert version.lora["r"] == 4  # the YAML file beat the default rank
    assert version.metrics["eval_loss"] > 0
    folder = Registry(registry_path).folder(version)
    assert (folder / "loss_curve.png").stat().st_size > 1000
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card and "learning_rate: 0.001" in card and "loss_curve.png" in card


def test_published_adapter_loads_in_plain_peft_and_generates(trained, tiny_base):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.hub.registry import Registry

    registry = Registry(trained[0])
    folder = registry.folder(registry.get("pirate@1"))
    base_model = AutoModelForCausalLM.from_pretrained(tiny_base.path)
    model = PeftModel.from_pretrained(base_model, folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    inputs = tokenizer("Ahoy", return_tensors="pt")
    with torch.no_grad():
        adapted = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        with model.disable_adapter():
            plain = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert adapted.shape[1] > inputs["input_ids"].shape[1]
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # training moved the adapter away from identity
    assert isinstance(tokenizer.decode(adapted[0]), str) and plain.shape == adapted.shape


def test_registry_commands(trained, tiny_base, tiny_adapter):
    registry = str(trained[0])
    published = run_loraflow(
        "--registry",
        registry,
        "registry",
        "publish",
        str(tiny_adapter),
        "--name",
        "pirate",
        "--base",
        str(tiny_base.path),
        "--parent",
        "pirate@1",
    ).stdout
    assert "published pirate@2 (candidate)" in published and "loraflow promote pirate@2" in published
    listing = run_loraflow("--registry", registry, "registry", "list").stdout
    assert "pirate" in listing and "1 live, 2 candidate" in listing
    shown = json.loads(run_loraflow("--registry", registry, "registry", "show", "pirate@2").stdout)
    assert (
        shown["parent"] == "pirate@1" and shown["lineage"] == ["pirate@1", "pirate@2"] and shown["state"] == "candidate"
    )
    run_loraflow("--registry", registry, "registry", "alias", "pirate@1", "production")
    assert (
        json.loads(run_loraflow("--registry", registry, "registry", "show", "pirate@production").stdout)["version"] == 1
    )
    run_loraflow("--registry", registry, "registry", "rm", "pirate@2")
    assert "2 candidate" not in run_loraflow("--registry", registry, "registry", "list").stdout


def test_promote_rollback_and_history_commands(tmp_path, tiny_base, tiny_adapter):
    registry = ["--registry", str(tmp_path / "registry.json")]
    for _ in range(2):
        run_loraflow(
            *registry, "registry", "publish", str(tiny_adapter), "--name", "tone", "--base", str(tiny_base.path)
        )
    assert (
        "tone → tone@2 (live), was tone@1" in run_loraflow(*registry, "promote", "tone@2", "--reason", "better").stdout
    )
    assert "tone@2 rejected" in run_loraflow(*registry, "rollback", "tone", "--reason", "users complained").stdout
    history = run_loraflow(*registry, "registry", "history", "tone").stdout
    for expected in ("promote", "better", "rollback", "users complained", "tone@2"):
        assert expected in history
    refused = run_loraflow(*registry, "rollback", "tone", check=False)
    assert refused.returncode == 2 and "no earlier live version" in refused.stderr
    latest = run_loraflow(*registry, "registry", "alias", "tone@1", "latest", check=False)
    assert latest.returncode == 2 and "reserved" in latest.stderr
    promoted = run_loraflow(
        *registry,
        "registry",
        "publish",
        str(tiny_adapter),
        "--name",
        "tone",
        "--base",
        str(tiny_base.path),
        "--promote",
    )
    assert "published tone@3 (live)" in promoted.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["registry", "show", "ghost"], "no adapter named 'ghost'"),
        (["registry", "show", "../etc"], "not allowed"),
        (["train", "lora", "--data", str(PIRATE / "prefs.jsonl"), "--name", "x"], "this is preference data"),
        (
            ["train", "lora", "--data", str(PIRATE / "train.jsonl"), "--name", "x", "--learning-rate", "-1"],
            "learning_rate must be positive",
        ),
        (["train", "lora", "--data", str(PIRATE / "train.jsonl"), "--name", "../x"], "not allowed"),
    ],
)
def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, args, message):
    result = run_loraflow("--registry", str(tmp_path / "registry.json"), *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "registry.json").exists()


def test_pickle_adapter_refused_from_cli(tmp_path, tiny_base, tiny_adapter):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_adapter, folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    result = run_loraflow(
        "--registry",
        str(tmp_path / "r.json"),
        "registry",
        "publish",
        str(folder),
        "--name",
        "p",
        "--base",
        str(tiny_base.path),
        check=False,
    )
    assert result.returncode == 2 and "pickle weights are refused" in result.stderr
