"""`loraflow votes push`: arena votes to a Parquet preference dataset with a card, on a real `loraflow hub serve`,
read back with `datasets.load_dataset` through HF_ENDPOINT (in a fresh interpreter, as a user would)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from loraflow.arena.votes import Vote, VoteStore
from loraflow.hub.registry import Registry
from tests.conftest import REPO, run_loraflow
from tests.hub.hub_server_support import READ_TOKEN, WRITE_TOKEN, HubServer

LOAD_BOTH = """
import json, sys
from datasets import load_dataset
pairs = load_dataset(sys.argv[1], split="train")
both_bad = load_dataset(sys.argv[1], "both_bad", split="train")
print(json.dumps({"features": {k: str(v) for k, v in pairs.features.items()}, "pairs": pairs.to_list(),
                  "both_bad": both_bad.to_list()}))
"""


def vote(store: VoteStore, outcome: str, a: str, b: str, session: str, prompt: str, same_answers: bool = False) -> Vote:
    answer_b = f"Arr from {a}" if same_answers else f"Plain from {b}"
    cast = Vote(uuid.uuid4().hex, session, prompt, f"Arr from {a}", answer_b, a, b, outcome)
    return store.record(cast).vote


@pytest.fixture(scope="module")
def hub_server(tiny_base, tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("votes-push-hub"), tiny_base.path) as server:
        yield server


@pytest.fixture(scope="module")
def voted(tiny_base, tiny_adapter, tmp_path_factory):
    """pirate@1 (sft) → pirate@2 (dpo, its child), and votes on them: two pairs, one pair with identical
    answers (set aside), a tie, a both-bad vote, and a vote on another adapter that is not pirate's."""
    root = tmp_path_factory.mktemp("votes-push")
    registry = Registry(root / "registry.json")
    registry.publish(tiny_adapter, "pirate", base=tiny_base, trainer={"name": "sft"})
    registry.publish(tiny_adapter, "pirate", base=tiny_base, trainer={"name": "dpo"}, parent="pirate@1")
    store = VoteStore(str(root / "votes.db"), rate_limit=None)
    vote(store, "a", "pirate@2", "pirate@1", "visitor-1", "Greet me.")
    vote(store, "b", "pirate@1", "base", "visitor-1", "Count to three.")
    vote(store, "a", "pirate@2", "base", "visitor-2", "Same twice?", same_answers=True)
    vote(store, "tie", "pirate@1", "base", "visitor-2", "A tie.")
    vote(store, "both_bad", "pirate@2", "base", "visitor-3", "Both bad.")
    vote(store, "a", "poet@1", "base", "visitor-3", "Not pirate's.")
    return registry, store


def _env(hub_server, tmp_path, token: str = WRITE_TOKEN) -> dict:
    return {
        "HF_ENDPOINT": hub_server.endpoint,
        "HF_TOKEN": token,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def _push(voted, hub_server, tmp_path, repo: str, *extra: str, token: str = WRITE_TOKEN, check: bool = True):
    registry, store = voted
    command = ["--registry", str(registry.path), "votes", "push", "pirate", "--to-hub", repo, "--votes", store.url]
    return run_loraflow(*command, *extra, env=_env(hub_server, tmp_path, token), check=check)


def test_push_then_load_dataset_reads_pairs_both_bad_and_the_card(voted, hub_server, tmp_path):
    from huggingface_hub import HfApi

    result = _push(voted, hub_server, tmp_path, "arena/pirate-prefs")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {key: summary[key] for key in ("votes", "pairs", "ties", "both_bad", "set_aside")} == {
        "votes": 5,
        "pairs": 2,
        "ties": 1,
        "both_bad": 1,
        "set_aside": 1,
    }
    assert (summary["first_seq"], summary["last_seq"]) == (1, 5)

    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_BOTH, "arena/pirate-prefs"],
        capture_output=True,
        text=True,
        env={**os.environ, **_env(hub_server, tmp_path, ""), "PYTHONPATH": str(REPO)},
        timeout=180,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    data = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert all(data["features"][column] == "Value('string')" for column in ("prompt", "chosen", "rejected"))
    pairs = data["pairs"]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("Greet me.", "Arr from pirate@2", "Plain from pirate@1"),
        ("Count to three.", "Plain from base", "Arr from pirate@1"),
    ]
    assert [(p["chosen_model"], p["rejected_model"], p["seq"]) for p in pairs] == [
        ("pirate@2", "pirate@1", 1),
        ("base", "pirate@1", 2),
    ]
    assert pairs[0]["session"] == pairs[1]["session"] and len(pairs[0]["session"]) == 16
    assert "visitor" not in json.dumps(data)  # no raw session id anywhere
    assert [(row["prompt"], row["model_a"], row["model_b"]) for row in data["both_bad"]] == [
        ("Both bad.", "pirate@2", "base")
    ]

    info = HfApi(endpoint=hub_server.endpoint).dataset_info("arena/pirate-prefs")
    assert info.sha == summary["commit"]
    block = info.card_data.to_dict()["loraflow"]
    assert block["adapter"] == "pirate"
    assert block["counts"] == {"votes": 5, "pairs": 2, "ties": 1, "both_bad": 1, "set_aside": 1}
    assert (block["window"]["first_seq"], block["window"]["last_seq"]) == (1, 5)
    assert block["window"]["first_vote_at"] <= block["window"]["last_vote_at"]
    assert block["contestants"]["pirate@2"]["lineage"] == ["pirate@1", "pirate@2"]
    assert block["contestants"]["pirate@2"]["trainer"] == "dpo"
    assert block["contestants"]["base"] == {"base": True}
    assert [aside["seq"] for aside in block["set_aside"]] == [3] and "identical" in block["set_aside"][0]["reason"]
    readme = HfApi(endpoint=hub_server.endpoint).hf_hub_download(
        "arena/pirate-prefs", "README.md", repo_type="dataset", cache_dir=tmp_path / "cache"
    )
    with open(readme) as card:
        assert "pirate@1 → pirate@2" in card.read()


@pytest.fixture
def push_here(voted, hub_server, monkeypatch):
    """push_votes in this process (what the command calls), with the test hub's write token."""
    import huggingface_hub.constants

    from loraflow.arena.dataset_push import push_votes

    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", huggingface_hub.constants.HF_HUB_DISABLE_XET)
    registry, store = voted

    def push(repo: str, name: str = "pirate", after_seq: int = 0):
        return push_votes(store, registry, name, repo, after_seq=after_seq, endpoint=hub_server.endpoint)

    return push


def test_a_second_push_is_a_new_revision_and_after_narrows_the_window(push_here, hub_server):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub_server.endpoint)
    first, second = push_here("arena/rolling"), push_here("arena/rolling", after_seq=1)
    assert first.commit != second.commit and (second.pairs, second.first_seq) == (1, 2)
    assert api.dataset_info("arena/rolling").sha == second.commit
    earlier = api.dataset_info("arena/rolling", revision=first.commit).card_data.to_dict()["loraflow"]
    assert earlier["counts"]["pairs"] == 2 and earlier["window"]["after_seq"] == 0
    assert api.dataset_info("arena/rolling").card_data.to_dict()["loraflow"]["window"]["after_seq"] == 1
    files = api.list_repo_files("arena/rolling", repo_type="dataset")
    assert sorted(files) == ["README.md", "data/both_bad-00000-of-00001.parquet", "data/train-00000-of-00001.parquet"]


@pytest.mark.parametrize(
    "repo, name, after_seq, token, words",
    [
        ("arena/nothing-new", "pirate", 3, WRITE_TOKEN, ["no A/B votes", "1 ties", "1 both-bad"]),
        ("not-a-repo-id", "pirate", 0, WRITE_TOKEN, ["ORG/REPO"]),
        ("arena/held@main", "pirate", 0, WRITE_TOKEN, ["main branch"]),
        ("arena/read-only", "pirate", 0, READ_TOKEN, ["HTTP 403", "write"]),
        ("arena/unknown", "nosuch", 0, WRITE_TOKEN, ["'nosuch'", "pirate, poet"]),
    ],
    ids=["nothing-to-publish", "bad-repo-id", "with-revision", "read-token", "unknown-name"],
)
def test_push_refusals_say_why_and_publish_nothing(
    push_here, hub_server, monkeypatch, repo, name, after_seq, token, words
):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from loraflow.hub.errors import LoraflowError

    monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(LoraflowError) as refused:
        push_here(repo, name=name, after_seq=after_seq)
    for word in words:
        assert word in str(refused.value)
    assert token not in str(refused.value)
    if repo.count("/") == 1 and "@" not in repo:
        with pytest.raises(HfHubHTTPError):
            HfApi(endpoint=hub_server.endpoint).dataset_info(repo)


def test_the_command_refuses_in_one_line_with_exit_2(voted, hub_server, tmp_path):
    result = _push(voted, hub_server, tmp_path, "arena/read-only", token=READ_TOKEN, check=False)
    assert result.returncode == 2, result.stderr
    assert "HTTP 403" in result.stderr and "Traceback" not in result.stderr
    assert READ_TOKEN not in result.stderr + result.stdout
