"""The Gradio arena: two anonymous streamed answers, one vote handler for four buttons, and the leaderboards of
people's votes and of judges' votes, side by side and never mixed.

Per-visitor state lives in a `gr.State` (the current `Round`); everything shared (settings, registry,
vote store, openai client) hangs off one `Arena` built by the caller. Prompts and answers go into
Textboxes, which show text as text, so nothing a model writes is rendered as HTML.
"""

from __future__ import annotations

import random

import gradio as gr

from loraflow.arena.ratings import Board, plot_elo_series
from loraflow.arena.rounds import Arena, Round
from loraflow.arena.settings import AI, HUMAN, VOTER_LABELS
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


def votes_text(count: int, whose: str) -> str:
    return f"{count} {whose} vote{'' if count == 1 else 's'}"


def board_view(board: Board | None, others: Board | None) -> tuple[list[list], object, str]:
    """One voter group's table rows, Elo-over-votes figure and summary; `others` is the other group's board, which
    the summary mentions when this one is empty."""
    if board is None:
        return [], plot_elo_series({}), "Computing the ratings…"
    rows = [
        [
            r.contestant,
            round(r.bt),
            f"{r.bt_low:.0f} – {r.bt_high:.0f}",
            round(r.style_bt),
            f"{r.style_low:.0f} – {r.style_high:.0f}",
            round(r.elo),
            r.votes,
            r.wins,
            r.losses,
            r.draws,
        ]
        for r in board.ratings
    ]
    whose, other = VOTER_LABELS[board.voters], VOTER_LABELS[others.voters] if others else ""
    figure = plot_elo_series(board.elo_series, title=f"Elo per version over {whose} votes")
    if not board.votes:
        summary = f"No {whose} votes yet."
        if others is not None and others.votes:
            summary += f" The {other} board has {votes_text(others.votes, other)}; they are rated apart."
        return rows, figure, summary
    effects = ", ".join(f"{e.feature} {e.elo:+.0f} ({e.low:.0f} – {e.high:.0f})" for e in board.style)
    summary = (
        f"Ratings from {votes_text(board.votes, whose)}, refitted in the background as they arrive; "
        f"{other} votes are rated apart and never move them. Style-controlled ratings hold the style of the answers "
        f"fixed; Elo points per standard deviation of each style difference (95% CI): {effects}."
    )
    return rows, figure, summary


def leaderboard_view(arena: Arena) -> tuple:
    """The people's board and the judges' board (each: table rows, Elo-over-votes figure, summary), each adapter's
    lineage, and which fit this is. Everything comes from the last background fit, so the work does not grow with
    the votes stored."""
    boards = arena.live_leaderboard.latest_boards()
    lineage = "\n".join(" → ".join(chain) for chain in arena.lineages()) or "no adapters yet"
    people, judges = (boards[HUMAN], boards[AI]) if boards else (None, None)
    seen = boards.seen_seq if boards else None
    return *board_view(people, judges), *board_view(judges, people), lineage, seen


def leaderboard_if_changed(arena: Arena, shown: int | None):
    """The timer's tick: the view only when a newer fit finished than the one this page shows."""
    boards = arena.live_leaderboard.latest_boards()
    if boards is None or boards.seen_seq == shown:
        return (gr.skip(),) * BOARD_OUTPUTS
    return leaderboard_view(arena)


LEADERBOARD_HEADERS = [
    "contestant",
    "Bradley-Terry",
    "95% CI",
    "style-controlled",
    "style-controlled 95% CI",
    "online Elo",
    "votes",
    "wins",
    "losses",
    "draws",
]
LEADERBOARD_POLL_S = 3.0
BOARD_OUTPUTS = 8  # two boards of three, the lineage, and which fit is shown
LEADERBOARD_INTRO = (
    "People's votes and judges' votes (AI feedback, e.g. from `loraflow votes simulate --judge NAME`) are rated on "
    "separate boards: the People board ranks what people prefer, and no number of judge votes moves it."
)


def build_arena(arena: Arena) -> gr.Blocks:
    arena.live_leaderboard.wake()  # the first fit runs while the first visitor's page loads
    arena.focus()  # counts the stored votes per pair once, so the first round's pairing reads only newer ones

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

    def vote(outcome: str, current: Round | None, request: gr.Request):
        if current is None or not current.finished:
            raise gr.Error("Wait for both answers before voting.")
        try:
            recorded = arena.vote(current, outcome, session_of(request))
        except LoraflowError as error:
            raise gr.Error(str(error))
        stored = recorded.vote
        reveal = f"Model A was {stored.contestant_a}\nModel B was {stored.contestant_b}"
        # No wake here: the background fit's own poll picks the vote up, so a click never starts a refit of every vote.
        status = "Vote recorded. Thank you!" if recorded.created_now else "This round's vote was already recorded."
        return reveal, status, *vote_buttons_update(False)

    def vote_for(outcome: str):
        """One button's click: Gradio's API does not send a button's own value, so the outcome is bound here."""

        def vote_click(current: Round | None, request: gr.Request):
            return vote(outcome, current, request)

        return vote_click

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
            gr.Markdown(LEADERBOARD_INTRO)
            with gr.Tab("People", elem_id="people-tab"):
                table = gr.Dataframe(headers=LEADERBOARD_HEADERS, interactive=False, elem_id="leaderboard")
                plot = gr.Plot(label="Elo per version over people's votes", elem_id="ratings-plot")
                style = gr.Markdown(elem_id="style-effects")
            with gr.Tab("Judges (AI feedback)", elem_id="judges-tab"):
                judges_table = gr.Dataframe(
                    headers=LEADERBOARD_HEADERS, interactive=False, elem_id="judges-leaderboard"
                )
                judges_plot = gr.Plot(label="Elo per version over judges' votes", elem_id="judges-ratings-plot")
                judges_style = gr.Markdown(elem_id="judges-style-effects")
            lineage = gr.Textbox(label="Lineage", interactive=False, elem_id="lineage")
            refresh = gr.Button("Refresh", elem_id="refresh")
            shown_fit = gr.State(None)
            timer = gr.Timer(LEADERBOARD_POLL_S)

        round_outputs = [current_round, answer_a, answer_b, reveal, status, *buttons]
        send.click(ask, prompt, round_outputs)
        prompt.submit(ask, prompt, round_outputs)
        regenerate_button.click(regenerate, current_round, round_outputs)
        new_round_button.click(new_round, None, [current_round, prompt, answer_a, answer_b, reveal, status, *buttons])
        for button, outcome in zip(buttons, VOTE_BUTTONS.values()):
            button.click(vote_for(outcome), current_round, [reveal, status, *buttons], api_name=f"vote_{outcome}")
        board_outputs = [table, plot, style, judges_table, judges_plot, judges_style, lineage, shown_fit]
        refresh.click(lambda: leaderboard_view(arena), None, board_outputs, api_name="leaderboard")
        blocks.load(lambda: leaderboard_view(arena), None, board_outputs)
        timer.tick(lambda shown: leaderboard_if_changed(arena, shown), shown_fit, board_outputs, show_progress="hidden")
    return blocks
