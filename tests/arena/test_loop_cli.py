"""`loraflow loop` fails at start on bad --set values, before waiting; a waiting step writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from loraflow.arena.votes import VoteStore
from tests.conftest import REPO, make_adapter


def loop_command(registry, *args: str, timeout_s: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "loraflow.hub.cli", "--registry", str(registry.path), "loop", "pirate", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout_s,
    )
    return result, time.monotonic() - started


@pytest.fixture(scope="module")
def start_budget_s() -> float:
    """5 s, or the bare CLI's start plus 2 s where a busy machine needs longer just to import torch."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "loraflow.hub.cli", "--help"], capture_output=True, cwd=REPO, check=True)
    return max(5.0, time.monotonic() - started + 2.0)


@pytest.mark.parametrize("once", [["--once"], []], ids=["once", "forever"])
def test_an_unknown_setting_fails_at_start_naming_the_closest(registry, tmp_path, once, start_budget_s):
    result, seconds = loop_command(registry, "--set", "max_step=3", "--votes", str(tmp_path / "votes.db"), *once)
    assert result.returncode == 2, result.stderr
    assert "max_step" in result.stderr and "Did you mean max_steps?" in result.stderr
    assert "learning_rate" in result.stderr  # the valid keys are listed
    assert "Traceback" not in result.stderr
    assert seconds < start_budget_s, f"took {seconds:.1f} s to refuse a misspelled setting"
    assert not (tmp_path / "votes.db").exists() and not registry.path.exists()


@pytest.mark.parametrize("once", [["--once"], []], ids=["once", "forever"])
def test_a_value_of_the_wrong_type_fails_at_start(registry, tmp_path, once, start_budget_s):
    votes = str(tmp_path / "votes.db")
    result, seconds = loop_command(registry, "--set", "learning_rate=fast", "--votes", votes, *once)
    assert result.returncode == 2, result.stderr
    assert "learning_rate" in result.stderr and "float" in result.stderr and "fast" in result.stderr
    assert seconds < start_budget_s
    result, _ = loop_command(registry, "--set", "max_steps=2.5", "--votes", str(tmp_path / "votes.db"), *once)
    assert result.returncode == 2 and "max_steps" in result.stderr and "int" in result.stderr


def test_a_waiting_step_leaves_the_registry_file_byte_identical(tiny_base, registry, tmp_path):
    registry.publish(make_adapter(tiny_base, tmp_path / "v1"), "pirate", base=tiny_base, trainer={"name": "external"})
    store = VoteStore(str(tmp_path / "votes.db"), rate_limit=None)
    before = registry.path.read_bytes()
    arguments = ["--once", "--votes", store.url, "--votes-needed", "3", "--base", str(tiny_base.path)]
    result, _ = loop_command(registry, *arguments)
    assert result.returncode == 0, result.stderr
    assert "[wait] pirate@1 has 0/3 new decisive votes." in result.stderr
    assert registry.path.read_bytes() == before


def test_loop_help_shows_the_settings_defaults():
    from loraflow.arena.settings import LoopSettings
    from loraflow.hub.cli_common import default_of

    result = subprocess.run(
        [sys.executable, "-m", "loraflow.hub.cli", "loop", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    assert "Head-to-head votes before the gate may decide." in result.stdout and "--no-gate" in result.stdout
    assert f"default: {default_of(LoopSettings, 'votes_needed')}" in result.stdout
