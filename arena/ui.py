"""The Gradio arena: two anonymous streamed answers, one vote handler for four buttons, a leaderboard.

Per-visitor state lives in a `gr.State` (the current `Round`); everything shared (settings, registry,
vote store, openai client) hangs off one `Arena` built by the caller. Prompts and answers go into
Textboxes, which show text as text, so nothing a model writes is rendered as HTML.
"""

from __future__ import annotations

import random

import gradio as gr

from loraflow.arena.ratings import plot_elo_history
from loraflow.arena.rounds import Arena, Round
from loraflow.hub.errors import LoraflowError

VOTE_BUTTONS = {"A is better": "a", "B is better": "b", "Tie": "tie", "Both are bad": "both_bad"}
HIDDEN_NAMES = ("Model A", "Model B")


def session_of(request: gr.Request | None) -> str:
    """The rate-limit key: the logged-in user when auth is on, the browser session otherwise."""
    if request is None:
        return "anonymous"
    return f"{request.username or 'guest'}:{request.session_hash}"


def vote_buttons_update(enabled: bool) -> list:
    return [gr.update(interactive=enabled) for _ in VOTE_BUTTONS]


def leaderboard_view(arena: Arena) -> tuple[list[list], object, str]:
    """Rows for the table, the Elo-over-votes figure, and each adapter's lineage as text."""
    rows = [
        [
            r.contestant,
            round(r.bt),
            f"{r.bt_low:.0f} – {r.bt_high:.0f}",
            round(r.elo),
            r.votes,
            r.wins,
            r.losses,
            r.draws,
        ]
        for r in arena.leaderboard()
    ]
    votes = arena.store.votes()
    figure = plot_elo_history(votes)
    lineage = "\n".join(" → ".join(chain) for chain in arena.lineages()) or "no adapters yet"
    return rows, figure, lineage


LEADERBOARD_HEADERS = ["contestant", "Bradley-Terry", "95% CI", "online Elo", "votes", "wins", "losses", "draws"]


def build_arena(arena: Arena) -> gr.Blocks:
    def stream_round(current: Round):
        try:
            for current in arena.stream_answers(current):
                yield current, current.answers[0], current.answers[1], "", "Answering…", *vote_buttons_update(False)
        except RuntimeError as error:
            raise gr.Error(str(error))
        yield current, current.answers[0], current.answers[1], "", "Which answer is better?", *vote_buttons_update(True)

    def ask(prompt: str):
        prompt = (prompt or "").strip()
        if not prompt:
            raise gr.Error("Type a prompt first.")
        yield from stream_round(arena.new_round(prompt, random.Random()))

    def regenerate(current: Round | None):
        if current is None:
            raise gr.Error("Ask something first.")
        yield from stream_round(arena.regenerate(current))

    def vote(label: str, current: Round | None, request: gr.Request):
        if current is None or not current.finished:
            raise gr.Error("Wait for both answers before voting.")
        try:
            recorded = arena.vote(current, VOTE_BUTTONS[label], session_of(request))
        except LoraflowError as error:
            raise gr.Error(str(error))
        stored = recorded.vote
        reveal = f"Model A was {stored.contestant_a}\nModel B was {stored.contestant_b}"
        status = "Vote recorded. Thank you!" if recorded.created_now else "This round's vote was already recorded."
        rows, figure, lineage = leaderboard_view(arena)
        return reveal, status, rows, figure, lineage, *vote_buttons_update(False)

    def new_round():
        return None, "", "", "", "", "Type a prompt to start a new round.", *vote_buttons_update(False)

    with gr.Blocks(title="loraflow arena") as blocks:
        current_round = gr.State(None)
        gr.Markdown(
            "# loraflow arena\nAsk anything. Two anonymous models answer; vote for the better one to see who they were."
        )
        with gr.Tab("Arena"):
            with gr.Row():
                answer_a = gr.Textbox(label=HIDDEN_NAMES[0], lines=8, interactive=False, elem_id="answer-a")
                answer_b = gr.Textbox(label=HIDDEN_NAMES[1], lines=8, interactive=False, elem_id="answer-b")
            with gr.Row():
                buttons = [
                    gr.Button(label, interactive=False, elem_id=f"vote-{outcome}")
                    for label, outcome in VOTE_BUTTONS.items()
                ]
            reveal = gr.Textbox(label="Identities", interactive=False, elem_id="reveal")
            status = gr.Textbox(label="Status", interactive=False, elem_id="status")
            prompt = gr.Textbox(label="Prompt", placeholder="Type a prompt and press Enter", elem_id="prompt")
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="send")
                regenerate_button = gr.Button("Regenerate", elem_id="regenerate")
                new_round_button = gr.Button("New round", elem_id="new-round")
        with gr.Tab("Leaderboard", elem_id="leaderboard-tab"):
            table = gr.Dataframe(headers=LEADERBOARD_HEADERS, interactive=False, elem_id="leaderboard")
            plot = gr.Plot(label="Elo per version over votes", elem_id="ratings-plot")
            lineage = gr.Textbox(label="Lineage", interactive=False, elem_id="lineage")
            refresh = gr.Button("Refresh", elem_id="refresh")

        round_outputs = [current_round, answer_a, answer_b, reveal, status, *buttons]
        send.click(ask, prompt, round_outputs)
        prompt.submit(ask, prompt, round_outputs)
        regenerate_button.click(regenerate, current_round, round_outputs)
        new_round_button.click(new_round, None, [current_round, prompt, answer_a, answer_b, reveal, status, *buttons])
        for button in buttons:
            button.click(vote, [button, current_round], [reveal, status, table, plot, lineage, *buttons])
        refresh.click(lambda: leaderboard_view(arena), None, [table, plot, lineage])
        blocks.load(lambda: leaderboard_view(arena), None, [table, plot, lineage])
    return blocks
