"""The arena in a real browser (Playwright + Debian's Chromium) against `loraflow arena` and `loraflow serve`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import REPO, make_adapter

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the arena exited with {process.returncode}:\n{process.stderr.read()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)  # poll interval
    raise AssertionError(f"the arena at {url} did not answer within {timeout_s} s")


@pytest.fixture
def arena_ui(registry, tmp_path, smollm2):
    from loraflow.serve.launcher import free_port, start_server

    adapter = make_adapter(smollm2, tmp_path / "adapter", rank=4)
    registry.publish(adapter, "pirate", base=smollm2, trainer={"name": "external"})
    with start_server(registry.path, smollm2, max_model_len=512) as server:
        server.wait_ready()
        port = free_port()
        arena = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loraflow.hub.cli",
                "--registry",
                str(registry.path),
                "arena",
                "pirate",
                "--server",
                server.root_url,
                "--votes",
                str(tmp_path / "votes.db"),
                "--port",
                str(port),
                "--max-tokens",
                "16",
                "--on-policy-share",  # every round shows two different contestants, whose names the test reads
                "0",
            ],
            cwd=REPO,
            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_for_http(url, arena)
            yield url
        finally:
            arena.terminate()
            arena.wait(30)


@pytest.mark.e2e
def test_prompt_two_answers_vote_reveal_and_leaderboard(arena_ui, tmp_path):
    """In a browser, then as a script votes: through the Gradio API with gradio_client, one session per client."""
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(arena_ui)
        page.get_by_role("tab", name="Leaderboard").click()
        expect(page.locator("#leaderboard")).not_to_contain_text("pirate@1")
        page.get_by_role("tab", name="Arena").click()

        page.locator("#prompt textarea").fill("What is the capital of France? <b>not bold</b>")
        page.locator("#send").click()
        vote_a = page.locator("#vote-a")
        expect(vote_a).to_be_enabled(timeout=120_000)
        answer_a = page.locator("#answer-a textarea").input_value()
        answer_b = page.locator("#answer-b textarea").input_value()
        assert answer_a.strip() and answer_b.strip()
        expect(page.locator("#reveal textarea")).to_have_value("")
        page.screenshot(path=str(ARTIFACTS / "arena-answers.png"), full_page=True)

        vote_a.click()
        reveal = page.locator("#reveal textarea")
        revealed = re.compile(r"Model A was (base|pirate@1)\nModel B was (base|pirate@1)")
        expect(reveal).to_have_value(revealed, timeout=30_000)
        assert set(reveal.input_value().replace("\n", " ").split()) >= {"base", "pirate@1"}
        expect(page.locator("#status textarea")).to_have_value("Vote recorded. Thank you!")
        expect(vote_a).to_be_disabled()
        page.screenshot(path=str(ARTIFACTS / "arena-revealed.png"), full_page=True)

        page.get_by_role("tab", name="Leaderboard").click()
        board = page.locator("#leaderboard")
        expect(board).to_contain_text("pirate@1", timeout=30_000)
        expect(board).to_contain_text("base")
        expect(page.locator("#lineage textarea")).to_have_value("pirate@1")
        page.screenshot(path=str(ARTIFACTS / "arena-leaderboard.png"), full_page=True)
        browser.close()

    from gradio_client import Client

    from loraflow.arena.votes import VoteStore

    client = Client(arena_ui, verbose=False)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/ask", "/vote_a", "/vote_b", "/vote_tie", "/vote_both_bad"} <= set(endpoints)
    answer_a, answer_b, reveal, status, *_ = client.predict("Name a color.", api_name="/ask")
    assert answer_a.strip() and answer_b.strip() and reveal == "" and status == "Which answer is better?"
    reveal, status, *_ = client.predict(api_name="/vote_b")
    assert status == "Vote recorded. Thank you!" and reveal.startswith("Model A was ")
    assert client.predict(api_name="/vote_b")[1] == "This round's vote was already recorded."
    stored = VoteStore(str(tmp_path / "votes.db"), rate_limit=None, create=False).votes()
    assert [v.outcome for v in stored] == ["a", "b"]
    assert (stored[1].prompt, stored[1].answer_a, stored[1].answer_b) == ("Name a color.", answer_a, answer_b)
    assert stored[0].session_id != stored[1].session_id  # the browser and the script are two sessions
