"""Two registry features the server reads per request: canary splits, and prompt versions (a system prompt on the
base, versioned and served by name like an adapter)."""

from __future__ import annotations

import json

import pytest

from loraflow.hub.errors import LoraflowError
from loraflow.hub.registry import PROMPT_FILE, Registry
from loraflow.serve.naming import servable
from tests.conftest import run_loraflow


@pytest.fixture
def three(registry, tiny_base, tiny_adapter):
    """pirate@1 live, pirate@2 and pirate@3 candidates."""
    for _ in range(3):
        registry.publish(tiny_adapter, "pirate", base=tiny_base)
    return registry


def draws(*values):
    values = iter(values)
    return lambda: next(values)


def test_a_canary_answers_its_share_of_bare_name_requests_only(three):
    three.start_canary("pirate@2", 10)
    snapshot = three.snapshot()
    assert (snapshot.canary("pirate").version.ref, snapshot.canary("pirate").percent) == ("pirate@2", 10)
    assert servable(snapshot, "pirate", draws(0.0999)).ref == "pirate@2"
    assert servable(snapshot, "pirate", draws(0.1)).ref == "pirate@1"
    assert servable(snapshot, "pirate@live", draws(0.0)).ref == "pirate@1", "NAME@live is the live version, always"
    assert servable(snapshot, "pirate@3", draws(0.0)).ref == "pirate@3"
    assert three.get("pirate").ref == "pirate@1" and three.get("pirate@2").state == "candidate"
    assert three.history("pirate")[-1].action == "canary"


def test_promote_ends_the_canary(three):
    three.start_canary("pirate@2", 50)
    three.promote("pirate@2")
    assert three.snapshot().canary("pirate") is None and three.get("pirate").ref == "pirate@2"
    three.start_canary("pirate@3", 50)
    three.promote("pirate@2")  # the live version again: the canary ends, nothing else changes
    assert three.snapshot().canary("pirate") is None and three.get("pirate@3").state == "candidate"


def test_rollback_during_a_canary_rejects_the_canary_and_keeps_live(three):
    three.start_canary("pirate@3", 20)
    serves = three.rollback("pirate", reason="more complaints")
    assert serves.ref == "pirate@1" and three.get("pirate").ref == "pirate@1"
    assert three.get("pirate@3").state == "rejected" and three.snapshot().canary("pirate") is None
    assert three.history("pirate")[-1].reason == "more complaints"


def test_rejecting_retiring_or_removing_the_canary_version_ends_it(three):
    for end, ref in ((three.reject, "pirate@2"), (three.retire, "pirate@3"), (three.remove, "pirate@3")):
        three.start_canary(ref, 5)
        end(ref)
        assert three.snapshot().canary("pirate") is None, end.__name__


@pytest.mark.parametrize(
    ("ref", "percent", "why"),
    [("pirate@2", 0, "between 0 and 100"), ("pirate@2", 100, "between 0 and 100"), ("pirate@1", 10, "is live")],
)
def test_a_canary_that_cannot_run_is_refused(three, ref, percent, why):
    with pytest.raises(LoraflowError, match=why):
        three.start_canary(ref, percent)
    assert three.snapshot().canary("pirate") is None


def test_a_rejected_version_gets_a_canary_only_with_a_reason(three):
    three.reject("pirate@3")
    with pytest.raises(LoraflowError, match="pirate@3 was rejected; give a --reason"):
        three.start_canary("pirate@3", 10)
    three.start_canary("pirate@3", 10, reason="fixed the data")
    assert three.snapshot().canary("pirate").version.ref == "pirate@3"


def test_a_hand_edited_canary_that_names_no_version_is_refused_on_read(three):
    data = json.loads(three.path.read_text())
    data["adapters"]["pirate"]["canary"] = {"version": 9, "percent": 10}
    three.path.write_text(json.dumps(data))
    with pytest.raises(LoraflowError, match="the canary of 'pirate'"):
        Registry(three.path).snapshot()


def test_a_prompt_is_a_servable_version_with_its_text_hashed_in_the_store(registry, tiny_base):
    first = registry.publish_prompt("Answer like a pirate.", "pirate-prompt", base=tiny_base)
    second = registry.publish_prompt("Answer in one sentence.", "pirate-prompt", base=tiny_base, parent=first.ref)
    assert (first.kind, first.state, first.system_prompt) == ("prompt", "live", "Answer like a pirate.")
    assert (registry.folder(second) / PROMPT_FILE).read_text() == "Answer in one sentence."
    assert set(second.files) == {PROMPT_FILE} and second.parent == "pirate-prompt@1"
    snapshot = registry.snapshot()
    assert servable(snapshot, "pirate-prompt").ref == "pirate-prompt@1"
    assert {"pirate-prompt", "pirate-prompt@1", "pirate-prompt@2"} <= set(snapshot.model_ids())
    assert snapshot.max_rank() == 0, "a prompt reserves no LoRA rank"


def test_prompts_and_adapters_do_not_share_a_name(registry, tiny_base, tiny_adapter):
    registry.publish(tiny_adapter, "pirate", base=tiny_base)
    with pytest.raises(LoraflowError, match="pirate holds adapter versions; a prompt needs a name of its own"):
        registry.publish_prompt("Be a pirate.", "pirate", base=tiny_base)
    registry.publish_prompt("Be a pirate.", "pirate-prompt", base=tiny_base)
    with pytest.raises(LoraflowError, match="pirate-prompt holds prompt versions"):
        registry.publish(tiny_adapter, "pirate-prompt", base=tiny_base)
    with pytest.raises(LoraflowError, match="system prompt for x is empty"):
        registry.publish_prompt("  \n", "x", base=tiny_base)
    assert registry.names() == ["pirate", "pirate-prompt"]
    assert not list(registry.store.glob(".staging-*")), "a refused publish leaves no staging folder"


def test_training_refuses_a_prompt_as_parent(registry, tiny_base, tmp_path):
    from loraflow.hub.training import run_training

    registry.publish_prompt("Be brief.", "brief", base=tiny_base)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + "\n")
    with pytest.raises(LoraflowError, match="brief@1 is a prompt"):
        run_training("lora", data=data, name="next", base_spec=str(tiny_base.path), registry=registry, parent="brief@1")


def test_cli_publishes_a_prompt_and_runs_a_canary(tmp_path, tiny_base, tiny_adapter):
    registry = tmp_path / "registry.json"
    prompt = tmp_path / "system.txt"
    prompt.write_text("Answer in one short sentence.")
    published = run_loraflow(
        "--registry", registry, "registry", "publish-prompt", "--name", "brief", "--from-file", prompt,
        "--base", tiny_base.path,
    )  # fmt: skip
    assert "published brief@1 (live)" in published.stdout
    Registry(registry).publish_prompt("Answer in two words.", "brief", base=tiny_base)
    canary = run_loraflow("--registry", registry, "promote", "brief@2", "--canary", "25")
    assert "brief@2 for 25% of requests (canary), brief@1 for the rest" in canary.stdout
    listed = run_loraflow("--registry", registry, "registry", "list")
    assert "brief@2 canary 25%" in listed.stdout
    rolled = run_loraflow("--registry", registry, "rollback", "brief")
    assert "brief → brief@1 (live); brief@2 rejected" in rolled.stdout
    refused = run_loraflow("--registry", registry, "registry", "publish-prompt", "--name", "x", check=False)
    assert refused.returncode != 0 and "exactly one of --system-prompt" in refused.stderr


def test_a_prompt_is_not_pushed_to_the_hub_as_an_adapter(registry, tiny_base):
    from loraflow.hub.hf import push_to_hub

    registry.publish_prompt("Be brief.", "brief", base=tiny_base)
    with pytest.raises(LoraflowError, match="brief@1 is a prompt .* the Hub takes adapter folders"):
        push_to_hub(registry, "brief", "org/brief", endpoint="http://127.0.0.1:9")


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (("promote", "x@2", "--canary", "150"), "Invalid value for '--canary'"),
        (("registry", "publish-prompt", "--name", "x", "--from-file", "nope.txt"), "'nope.txt' does not exist"),
    ],
)
def test_a_bad_option_value_is_a_usage_error_not_a_traceback(tmp_path, args, why):
    result = run_loraflow("--registry", tmp_path / "registry.json", *args, check=False)
    assert result.returncode == 2 and why in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [], "a refused command leaves nothing behind"
