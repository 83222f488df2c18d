"""`loraflow votes push`: the votes on an adapter's versions, published as a preference dataset on a Hugging Face Hub.

The pairs are arena/export.py's (the same split as `votes export`). They go to one Parquet file with TRL's
prompt/chosen/rejected string columns, plus who answered each side, the vote's id, sequence number and time, and
a session hash. Both-bad votes go to a second config, `both_bad`; ties are counted and left out; a pair that the
data checks would refuse later (an empty answer, two identical answers) is set aside and listed in the card.
The dataset card's `configs` let `load_dataset(ORG/REPO, split="train")` find the split; its `loraflow` block
carries the vote window, the counts and each contestant's lineage from the registry.

Session ids are never published: each becomes an HMAC-SHA256 under a key made for this push and then forgotten,
so one visitor's votes share a value inside this dataset and link to nothing outside it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from loraflow.arena.export import PreferenceData, preference_data, votes_of
from loraflow.arena.votes import BASE_CONTESTANT, Vote, VoteStore
from loraflow.hub.data import CHECKS
from loraflow.hub.errors import LoraflowError
from loraflow.hub.hub_protocol import LIVE_BRANCH
from loraflow.hub.registry import Registry

if TYPE_CHECKING:
    from huggingface_hub import DatasetCard

TRAIN_FILE = "data/train-00000-of-00001.parquet"
BOTH_BAD_FILE = "data/both_bad-00000-of-00001.parquet"
SESSION_HASH_CHARS = 16
SET_ASIDE_LISTED = 100  # the card lists at most this many set-aside votes; the count is always exact
TRAIN_COLUMNS = (
    ("prompt", "string"),
    ("chosen", "string"),
    ("rejected", "string"),
    ("chosen_model", "string"),
    ("rejected_model", "string"),
    ("vote_id", "string"),
    ("seq", "int64"),
    ("voted_at", "string"),
    ("session", "string"),
)
BOTH_BAD_COLUMNS = (
    ("prompt", "string"),
    ("answer_a", "string"),
    ("answer_b", "string"),
    ("model_a", "string"),
    ("model_b", "string"),
    ("vote_id", "string"),
    ("seq", "int64"),
    ("voted_at", "string"),
    ("session", "string"),
)

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ pretty_name }}

Preference pairs from the loraflow arena: people saw two anonymous answers to one prompt and chose the better one.
Each row is one A/B vote on a version of `{{ name }}`, in TRL's `prompt`/`chosen`/`rejected` format.

## Votes
- window: seq {{ window.first_seq }}-{{ window.last_seq }}, {{ window.first_vote_at }} to {{ window.last_vote_at }}\
{% if window.after_seq %} (votes after seq {{ window.after_seq }}){% endif %}
- votes read: {{ counts.votes }}
- pairs (split `train`): {{ counts.pairs }}
- ties, left out: {{ counts.ties }}
- both answers bad (config `both_bad`): {{ counts.both_bad }}
- set aside (a pair a trainer would refuse): {{ counts.set_aside }}

## Contestants and lineage
{% for ref, about in contestants.items() %}- `{{ ref }}`: {% if about.lineage %}{{ about.lineage | join(" → ") }}\
{% if about.state %} ({{ about.state }}){% endif %}{% elif about.base %}the base model{% else %}not in the registry\
{% endif %}
{% endfor %}
## Columns
`prompt`, `chosen`, `rejected` (strings), `chosen_model` and `rejected_model` (the contestants, NAME@V or `base`),
`vote_id`, `seq` (the vote store's sequence number), `voted_at` (UTC), and `session`: an HMAC of the voter's
session id under a key that was made for this push and not kept. Votes of one session share it here; it links to
nothing else. Prompts and answers are published as typed and generated.

## Use

```python
from datasets import load_dataset

pairs = load_dataset("{{ repo_id }}", split="train")
```

or train on it: `loraflow train dpo --data {{ repo_id }}`.
"""


@dataclass(frozen=True)
class VotesPushReport:
    repo_id: str
    repo_url: str
    commit: str
    votes: int
    pairs: int
    ties: int
    both_bad: int
    set_aside: int
    first_seq: int
    last_seq: int


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def _session_hash(key: bytes, session_id: str) -> str:
    return hmac.new(key, session_id.encode(), hashlib.sha256).hexdigest()[:SESSION_HASH_CHARS]


def _rows(votes: Sequence[Vote], data: PreferenceData) -> tuple[list[dict], list[dict], list[dict]]:
    """The train rows, the both-bad rows and the set-aside votes (with the data checks' reasons)."""
    key = secrets.token_bytes(32)
    by_id = {vote.vote_id: vote for vote in votes}

    def about(vote_id: str) -> dict:
        vote = by_id[vote_id]
        return {"voted_at": _utc(vote.created), "session": _session_hash(key, vote.session_id)}

    train, aside = [], []
    for pair in data.pairs:
        problem = CHECKS["preference"](pair)
        if problem:
            aside.append({"vote_id": pair["vote_id"], "seq": pair["seq"], "reason": problem})
        else:
            train.append({**pair, **about(pair["vote_id"])})
    both_bad = [
        {
            "prompt": record["prompt"],
            "answer_a": record["answers"][0],
            "answer_b": record["answers"][1],
            "model_a": record["contestants"][0],
            "model_b": record["contestants"][1],
            "vote_id": record["vote_id"],
            "seq": record["seq"],
            **about(record["vote_id"]),
        }
        for record in data.both_bad
    ]
    return train, both_bad, aside


def contestant_lineage(registry: Registry, contestants: Sequence[str]) -> dict[str, dict]:
    """Each contestant's lineage (oldest first), state, trainer and base, as the registry records them."""
    described = {}
    for ref in sorted(contestants):
        if ref == BASE_CONTESTANT:
            described[ref] = {"base": True}
            continue
        try:
            version = registry.get(ref)
            lineage = [ancestor.ref for ancestor in registry.lineage(ref)]
        except LoraflowError:  # removed since the vote, or voted on in another registry
            described[ref] = {"lineage": None}
            continue
        described[ref] = {
            "lineage": lineage,
            "state": version.state,
            "trainer": (version.trainer or {}).get("name"),
            "base": (version.base or {}).get("hub_id"),
        }
    return described


def build_votes_card(
    repo_id: str, name: str, window: dict, counts: dict, contestants: dict, set_aside: list[dict], with_both_bad: bool
) -> DatasetCard:
    from huggingface_hub import DatasetCard, DatasetCardData

    configs = [{"config_name": "default", "data_files": [{"split": "train", "path": TRAIN_FILE}]}]
    if with_both_bad:
        configs.append({"config_name": "both_bad", "data_files": [{"split": "train", "path": BOTH_BAD_FILE}]})
    pretty_name = f"{name} arena preferences"
    card_data = DatasetCardData(
        pretty_name=pretty_name,
        task_categories=["text-generation"],
        tags=["loraflow", "dpo", "preference", "human-feedback", "arena"],
        configs=configs,
        loraflow={
            "adapter": name,
            "window": window,
            "counts": counts,
            "contestants": contestants,
            "set_aside": set_aside[:SET_ASIDE_LISTED],
            "session": f"HMAC-SHA256 of the session id under a key made for this push and not kept, "
            f"first {SESSION_HASH_CHARS} hex digits",
        },
    )
    return DatasetCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        pretty_name=pretty_name,
        name=name,
        repo_id=repo_id,
        window=window,
        counts=counts,
        contestants=contestants,
    )


def _write_parquet(rows: list[dict], columns: tuple, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(column, getattr(pa, kind)()) for column, kind in columns])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def push_votes(
    store: VoteStore,
    registry: Registry,
    name: str,
    repo_id: str,
    *,
    after_seq: int = 0,
    private: bool | None = None,
    endpoint: str | None = None,
) -> VotesPushReport:
    """Publish the A/B votes on NAME's versions (after `after_seq`) to dataset repo ORG/REPO's main branch.

    Refused before anything is uploaded when there is no pair to publish. HF_ENDPOINT and HF_TOKEN (or
    `hf auth login`) say where and as whom, as for `loraflow push`."""
    from loraflow.hub.hf import parse_hub_source, push_dataset_folder

    parse_hub_source(repo_id)  # a malformed ORG/REPO fails before the votes are read
    votes = votes_of(store, name, after_seq)
    data = preference_data(votes)
    train, both_bad, aside = _rows(votes, data)
    counts = {
        "votes": len(votes),
        "pairs": len(train),
        "ties": data.ties,
        "both_bad": len(both_bad),
        "set_aside": len(aside),
    }
    if not train:
        raise LoraflowError(
            f"no A/B votes on {name!r} to publish after seq {after_seq} in {store.location} "
            f"({counts['ties']} ties, {counts['both_bad']} both-bad, {counts['set_aside']} set aside); "
            "vote in the arena first, or lower --after."
        )
    window = {
        "after_seq": after_seq,
        "first_seq": votes[0].seq,
        "last_seq": votes[-1].seq,
        "first_vote_at": _utc(min(vote.created for vote in votes)),
        "last_vote_at": _utc(max(vote.created for vote in votes)),
    }
    contestants = contestant_lineage(registry, {v.contestant_a for v in votes} | {v.contestant_b for v in votes})
    card = build_votes_card(repo_id, name, window, counts, contestants, aside, with_both_bad=bool(both_bad))
    with tempfile.TemporaryDirectory(prefix="loraflow-votes-push-") as staging:
        folder = Path(staging)
        _write_parquet(train, TRAIN_COLUMNS, folder / TRAIN_FILE)
        if both_bad:
            _write_parquet(both_bad, BOTH_BAD_COLUMNS, folder / BOTH_BAD_FILE)
        card.save(folder / "README.md")
        message = f"votes on {name}, seq {window['first_seq']}-{window['last_seq']} ({counts['pairs']} pairs)"
        result = push_dataset_folder(folder, repo_id, message, private=private, endpoint=endpoint)
    return VotesPushReport(
        repo_id=repo_id,
        repo_url=result.repo_url,
        commit=result.revisions[LIVE_BRANCH],
        votes=counts["votes"],
        pairs=counts["pairs"],
        ties=counts["ties"],
        both_bad=counts["both_bad"],
        set_aside=counts["set_aside"],
        first_seq=window["first_seq"],
        last_seq=window["last_seq"],
    )
