"""The adapter registry: versions, aliases, lineage, atomic locked writes and refusing bad input."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraflow.hub.adapters import hash_folder
from loraflow.hub.errors import LoraflowError
from loraflow.hub.registry import Registry
from tests.conftest import make_adapter


def test_publish_records_hashes_base_and_lineage(registry, tiny_base, tiny_adapter):
    first = registry.publish(
        tiny_adapter, "pirate", base=tiny_base, trainer={"name": "lora"}, metrics={"eval_loss": 1.5}
    )
    second = registry.publish(tiny_adapter, "pirate", base=tiny_base, parent="pirate@1")
    assert (first.version, second.version) == (1, 2)
    assert first.files == hash_folder(tiny_adapter)
    assert first.base["fingerprint"] == tiny_base.fingerprint
    assert first.lora["r"] == 4 and first.metrics == {"eval_loss": 1.5}
    assert registry.get("pirate").version == 1, "a bare NAME is the live version; a publish does not promote"
    assert registry.get("pirate@latest").version == 2
    assert (first.state, second.state) == ("live", "candidate")
    assert registry.get("pirate@1").trainer == {"name": "lora"}
    assert [v.ref for v in registry.lineage("pirate@2")] == ["pirate@1", "pirate@2"]
    assert (registry.folder(second) / "adapter_model.safetensors").is_file()


def test_aliases_and_removal(registry, tiny_base, tiny_adapter):
    for _ in range(3):
        registry.publish(tiny_adapter, "pirate", base=tiny_base)
    registry.set_alias("pirate@2", "production")
    assert registry.get("pirate@production").version == 2
    with pytest.raises(LoraflowError, match="behind alias production"):
        registry.remove("pirate@2")
    registry.remove("pirate@3")
    assert registry.get("pirate@latest").version == 2
    assert not (registry.root / "adapters" / "pirate" / "v3").exists()
    with pytest.raises(LoraflowError, match="no version 3"):
        registry.get("pirate@3")
    with pytest.raises(LoraflowError, match="no alias 'staging'"):
        registry.get("pirate@staging")


def test_unknown_name_lists_known(registry, tiny_base, tiny_adapter):
    registry.publish(tiny_adapter, "pirate", base=tiny_base)
    with pytest.raises(LoraflowError, match="known adapters: pirate"):
        registry.get("parrot")


def _registry_text(registry: Registry) -> str | None:
    return registry.path.read_text() if registry.path.exists() else None


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "UPPER", "", "-lead"])
def test_refuses_path_traversal_and_bad_names(registry, tiny_base, tiny_adapter, name):
    before = _registry_text(registry)
    with pytest.raises(LoraflowError, match="not allowed"):
        registry.publish(tiny_adapter, name, base=tiny_base)
    assert _registry_text(registry) == before
    assert not (registry.root.parent / "evil").exists()


def test_refuses_pickle_adapter(registry, tiny_base, tiny_adapter, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_adapter, folder)
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(LoraflowError, match=r"adapter_model\.bin: pickle weights are refused"):
        registry.publish(folder, "pirate", base=tiny_base)
    assert not registry.path.exists()


def test_refuses_corrupt_safetensors(registry, tiny_base, tiny_adapter, tmp_path):
    registry.publish(tiny_adapter, "pirate", base=tiny_base)
    before = _registry_text(registry)
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_adapter, folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(LoraflowError, match="adapter_model.safetensors: not a readable safetensors file"):
        registry.publish(folder, "pirate", base=tiny_base)
    assert _registry_text(registry) == before


def test_refuses_corrupt_adapter_config_with_line(registry, tiny_base, tiny_adapter, tmp_path):
    folder = tmp_path / "badconfig"
    shutil.copytree(tiny_adapter, folder)
    (folder / "adapter_config.json").write_text('{\n  "peft_type": "LORA",\n  "r": 4,,\n}')
    with pytest.raises(LoraflowError, match=r"adapter_config.json:3: not valid JSON"):
        registry.publish(folder, "pirate", base=tiny_base)


def test_refuses_adapter_for_another_base(registry, tiny_base, smollm2, tmp_path):
    other_shape = make_adapter(smollm2, tmp_path / "for-smollm2")
    with pytest.raises(LoraflowError, match="made for another base model"):
        registry.publish(other_shape, "pirate", base=tiny_base)
    named_elsewhere = make_adapter(tiny_base, tmp_path / "named")
    config_path = named_elsewhere / "adapter_config.json"
    config_path.write_text(
        json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": "meta-llama/Llama-3.1-8B"})
    )
    with pytest.raises(LoraflowError, match="meta-llama/Llama-3.1-8B"):
        registry.publish(named_elsewhere, "pirate", base=tiny_base)
    assert not registry.path.exists()


def test_unreadable_registry_names_file_line_and_column(tmp_path):
    path = tmp_path / "registry.json"
    path.write_text('{\n "schema_version": 2,\n "adapters": {\n')
    with pytest.raises(LoraflowError, match=r"registry.json:4:1: the registry is not valid JSON"):
        Registry(path).snapshot()
    path.write_text('{"schema_version": 2, "adapters": {}, "x": tru}')
    with pytest.raises(LoraflowError, match=r"registry.json:1:44: "):
        Registry(path).snapshot()


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "not a loraflow registry file .it is a JSON list"),
        ('{"adapters": [1, 2, 3]}', "not a loraflow registry file .schema_version is None"),
        ('{"schema_version": 2, "adapters": [1, 2, 3]}', "not a loraflow registry file .'adapters' is not an object"),
        (
            '{"schema_version": 2, "adapters": {"a": {"versions": {"1": 7}}}}',
            "not a loraflow registry file .a version .1. is not a version record",
        ),
        ('{"schema_version": 9, "adapters": {}}', "written by a newer loraflow"),
        ('"just a string"', "not a loraflow registry file"),
    ],
)
def test_a_foreign_registry_file_is_named_and_left_alone(tmp_path, tiny_base, tiny_adapter, content, message):
    path = tmp_path / "registry.json"
    path.write_text(content)
    registry = Registry(path)
    with pytest.raises(LoraflowError, match=message) as error:
        registry.names()
    assert str(path) in str(error.value)
    with pytest.raises(LoraflowError, match=message):
        registry.publish(tiny_adapter, "p", base=tiny_base)
    assert path.read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.json"], "a failed publish leaves nothing behind"


def test_a_registry_path_that_is_a_folder_is_a_clear_error(tmp_path, tiny_base, tiny_adapter):
    folder = tmp_path / "registry.json"
    folder.mkdir()
    with pytest.raises(LoraflowError, match="is a folder, not a registry file"):
        Registry(folder).names()
    with pytest.raises(LoraflowError, match="is a folder, not a registry file"):
        Registry(folder).publish(tiny_adapter, "p", base=tiny_base)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.json"]
    assert list(folder.iterdir()) == []


def test_lifecycle_promote_reject_rollback_with_history(registry, tiny_base, tiny_adapter):
    first = registry.publish(tiny_adapter, "tune", base=tiny_base, actor="train lora", reason="")
    revision = registry.revision
    second = registry.publish(tiny_adapter, "tune", base=tiny_base, parent="tune@1", promote=True, actor="cli")
    assert registry.revision == revision + 1, "publish and promote are one write"
    assert (first.state, second.state) == ("live", "live")
    assert registry.get("tune@1").state == "retired" and registry.get("tune").version == 2
    third = registry.publish(tiny_adapter, "tune", base=tiny_base, parent="tune@2")
    registry.reject(third.ref, actor="loop", reason="won 3 of 20 against tune@2")
    assert registry.get("tune@3").state == "rejected" and registry.get("tune").version == 2
    with pytest.raises(LoraflowError, match="was rejected; give a --reason"):
        registry.promote("tune@3")
    registry.publish(tiny_adapter, "tune", base=tiny_base, parent="tune@2")
    registry.promote("tune@4", actor="promote", reason="canary looked good")
    assert registry.rollback("tune", actor="loop", reason="lost after promotion").version == 2
    assert registry.get("tune@4").state == "rejected" and registry.live("tune").version == 2
    assert registry.rollback("tune", actor="rollback").version == 1, "a second rollback walks further back"
    with pytest.raises(LoraflowError, match="no earlier live version"):
        registry.rollback("tune")
    with pytest.raises(LoraflowError, match="is live; promote another"):
        registry.reject("tune@1")
    history = [(e.action, e.version, e.previous, e.actor, e.reason) for e in registry.history("tune")]
    assert history == [
        ("publish", 1, None, "train lora", ""),
        ("promote", 1, None, "train lora", "first version"),
        ("publish", 2, None, "cli", ""),
        ("promote", 2, 1, "cli", ""),
        ("publish", 3, None, "user", ""),
        ("reject", 3, None, "loop", "won 3 of 20 against tune@2"),
        ("publish", 4, None, "user", ""),
        ("promote", 4, 2, "promote", "canary looked good"),
        ("rollback", 2, 4, "loop", "lost after promotion"),
        ("rollback", 1, 2, "rollback", ""),
    ]
    assert all(e.time for e in registry.history("tune"))


def test_latest_live_and_main_are_reserved(registry, tiny_base, tiny_adapter):
    registry.publish(tiny_adapter, "good", base=tiny_base)
    registry.publish(tiny_adapter, "good", base=tiny_base)
    for reserved in ("latest", "live", "main"):
        with pytest.raises(LoraflowError, match=f"alias '{reserved}' is reserved"):
            registry.set_alias("good@1", reserved)
    assert registry.get("good@latest").version == 2 and registry.get("good@live").version == 1


def test_a_schema_1_registry_reads_its_live_alias_and_gate_as_states(tmp_path):
    def record(number: int, **metrics) -> dict:
        return {
            "name": "p",
            "version": number,
            "kind": "adapter",
            "path": f"adapters/p/v{number}",
            "files": {},
            "base": {},
            "trainer": {},
            "parent": None,
            "created": "2026-11-01T00:00:00+00:00",
            "metrics": metrics,
        }

    path = tmp_path / "registry.json"
    versions = {"1": record(1), "2": record(2), "3": record(3, gate="rejected"), "4": record(4)}
    path.write_text(
        json.dumps(
            {
                "schema_version": 1,
                "revision": 7,
                "adapters": {"p": {"versions": versions, "aliases": {"latest": 4, "live": 2, "production": 1}}},
            }
        )
    )
    registry = Registry(path)
    assert [v.state for v in registry.versions("p")] == ["retired", "live", "rejected", "candidate"]
    assert registry.aliases("p") == {"production": 1} and registry.get("p@3").metrics == {}
    assert json.loads(path.read_text())["schema_version"] == 1, "reading never writes"


def _publish_many(registry_path: str, adapter: str, base, worker: int, count: int, queue) -> None:
    registry = Registry(registry_path)
    for _ in range(count):
        registry.publish(adapter, f"worker-{worker % 4}", base=base)
        json.loads(Path(registry_path).read_text())  # valid after each of our steps
    queue.put(worker)


def test_eight_concurrent_writers_lose_nothing(tmp_path, tiny_base, tiny_adapter):
    path = tmp_path / "registry.json"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=_publish_many, args=(str(path), str(tiny_adapter), tiny_base, worker, 50, queue))
        for worker in range(8)
    ]
    for worker in workers:
        worker.start()
    snapshots = 0
    while any(worker.is_alive() for worker in workers):
        if path.exists():
            json.loads(path.read_text())  # a reader never sees a torn file
            snapshots += 1
        time.sleep(0.01)
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    assert sorted(queue.get() for _ in workers) == list(range(8))
    registry = Registry(path)
    versions = [v for name in registry.names() for v in registry.versions(name)]
    assert len(versions) == 400
    for name in registry.names():
        assert [v.version for v in registry.versions(name)] == list(range(1, 101))
    assert registry.revision == 400
    assert snapshots > 0


KILL_SCRIPT = """
import sys
from loraflow.hub.base import resolve_base
from loraflow.hub.registry import Registry
registry = Registry(sys.argv[1])
base = resolve_base(sys.argv[3])
while True:
    registry.publish(sys.argv[2], "victim", base=base)
    print("published", flush=True)
"""


def test_sigkill_mid_publish_leaves_valid_registry(tmp_path, tiny_base, tiny_adapter):
    path = tmp_path / "registry.json"
    seen_versions = 0
    rng = random.Random(0)
    for attempt in range(6):
        process = subprocess.Popen(
            [sys.executable, "-c", KILL_SCRIPT, str(path), str(tiny_adapter), str(tiny_base.path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout.readline().strip() == "published"
        started = time.monotonic()
        assert process.stdout.readline().strip() == "published"
        one_publish = time.monotonic() - started
        time.sleep(rng.uniform(0, one_publish))  # the kill lands somewhere inside a later publish
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        registry = Registry(path)
        versions = registry.versions("victim") if path.exists() else []
        assert len(versions) >= seen_versions  # the old state or a newer one, never less
        seen_versions = len(versions)
        for version in versions:
            assert hash_folder(registry.folder(version)) == version.files
    assert seen_versions > 0
    registry = Registry(path)
    after = registry.publish(
        tiny_adapter, "victim", base=tiny_base
    )  # a leftover folder does not block the next version
    assert after.version == seen_versions + 1


def _adapter_copy(tiny_adapter: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(tiny_adapter / name, folder / name)
    return folder


def _symlink_to_file(folder: Path, secret: Path) -> str:
    (folder / "notes.txt").symlink_to(secret)
    return "notes.txt: a symbolic link"


def _symlink_to_folder(folder: Path, secret: Path) -> str:
    (folder / "extra").symlink_to(secret.parent, target_is_directory=True)
    return "extra: a symbolic link"


def _hard_link(folder: Path, secret: Path) -> str:
    os.link(secret, folder / "notes.txt")
    return "notes.txt: a hard link"


def _fifo(folder: Path, secret: Path) -> str:
    os.mkfifo(folder / "pipe.txt")
    return "pipe.txt: not a regular file"


def _outside_allowlist(folder: Path, secret: Path) -> str:
    (folder / "optimizer.safetensors").write_bytes(b"\0" * 16)
    return "optimizer.safetensors: not part of an adapter"


def _large_text_file(folder: Path, secret: Path) -> str:
    (folder / "dump.txt").write_bytes(b"x" * (2 * 1024 * 1024))
    return "dump.txt: not part of an adapter"


def _subfolder(folder: Path, secret: Path) -> str:
    (folder / "checkpoint-1").mkdir()
    return "checkpoint-1: a folder"


@pytest.mark.parametrize(
    "plant", [_symlink_to_file, _symlink_to_folder, _hard_link, _fifo, _outside_allowlist, _large_text_file, _subfolder]
)
def test_publish_copies_only_regular_allowlisted_files(registry, tiny_base, tiny_adapter, tmp_path, plant):
    registry.publish(tiny_adapter, "good", base=tiny_base)
    before = _registry_text(registry)
    secret = tmp_path / "secret" / "host-secret.txt"
    secret.parent.mkdir()
    secret.write_text("a host secret")
    folder = _adapter_copy(tiny_adapter, tmp_path / "planted")
    expected = plant(folder, secret)
    with pytest.raises(LoraflowError, match=expected):
        registry.publish(folder, "p", base=tiny_base)
    assert _registry_text(registry) == before
    stored = [path for path in registry.store.rglob("*") if path.is_file()]
    assert not any(path.read_bytes() == b"a host secret" for path in stored)
    assert not list(registry.store.glob(".staging-*"))


def test_publish_keeps_the_card_loss_curve_and_small_text_files(registry, tiny_base, tiny_adapter, tmp_path):
    folder = _adapter_copy(tiny_adapter, tmp_path / "with-extras")
    (folder / "README.md").write_text("# card\n")
    (folder / "loss_curve.png").write_bytes(b"\x89PNG\r\n")
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    version = registry.publish(folder, "extras", base=tiny_base)
    assert sorted(version.files) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "loss_curve.png"]
    )


def test_the_committed_registry_is_an_empty_registry_of_this_schema():
    from tests.conftest import REPO

    snapshot = Registry(REPO / "registry.json").snapshot()
    assert snapshot.names() == [] and snapshot.revision == 0
    assert json.loads((REPO / "registry.json").read_text())["schema_version"] == 2


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
RECORDS = st.fixed_dictionaries(
    {key: JSON_VALUES for key in ("name", "version", "kind", "path", "files", "base")},
    optional={
        "state": st.sampled_from(["candidate", "live", "retired", "rejected", "gone"]) | JSON_VALUES,
        "metrics": JSON_VALUES,
        "parent": JSON_VALUES,
        "surprise": JSON_VALUES,
    },
)
NEARLY_VALID = st.fixed_dictionaries(
    {
        "schema_version": st.sampled_from([1, 2]),
        "adapters": st.dictionaries(
            st.sampled_from(["p", "q"]),
            st.fixed_dictionaries(
                {"versions": st.dictionaries(st.sampled_from(["1", "2", "x"]), RECORDS, max_size=3)},
                optional={"aliases": JSON_VALUES, "history": JSON_VALUES},
            ),
            max_size=2,
        ),
    },
    optional={"revision": JSON_VALUES},
)
REGISTRY_SHAPED = st.fixed_dictionaries(
    {
        "schema_version": st.sampled_from([1, 2, 3, "2", None]),
        "adapters": JSON_VALUES
        | st.dictionaries(
            st.sampled_from(["p", "q"]),
            st.dictionaries(st.sampled_from(["versions", "aliases", "history"]), JSON_VALUES),
        ),
    },
    optional={"revision": JSON_VALUES},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.binary(max_size=200)
    | JSON_VALUES.map(json.dumps).map(str.encode)
    | REGISTRY_SHAPED.map(lambda data: json.dumps(data).encode())
)
def test_any_bytes_in_the_registry_file_give_a_loraflow_error_or_a_snapshot(tmp_path, content):
    path = tmp_path / "registry.json"
    path.write_bytes(content)
    registry = Registry(path)
    try:
        snapshot = registry.snapshot()
    except LoraflowError as error:
        assert str(path) in str(error)
        return
    for name in snapshot.names():  # whatever validation let through must also be readable
        for version in snapshot.versions(name):
            assert version.state in ("candidate", "live", "retired", "rejected")
            snapshot.resolve(version.ref)
        snapshot.live(name)
        snapshot.history(name)
        snapshot.aliases(name)
    snapshot.model_ids()
    snapshot.max_rank()
