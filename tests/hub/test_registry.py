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

from hub.adapters import hash_folder
from hub.errors import LoraflowError
from hub.registry import Registry
from tests.conftest import make_adapter


def test_publish_records_hashes_base_and_lineage(registry, tiny_base, tiny_adapter):
    first = registry.publish(tiny_adapter, "pirate", base=tiny_base, trainer={"name": "lora"}, metrics={"eval_loss": 1.5})
    second = registry.publish(tiny_adapter, "pirate", base=tiny_base, parent="pirate@1")
    assert (first.version, second.version) == (1, 2)
    assert first.files == hash_folder(tiny_adapter)
    assert first.base["fingerprint"] == tiny_base.fingerprint
    assert first.lora["r"] == 4 and first.metrics == {"eval_loss": 1.5}
    assert registry.get("pirate").version == 2
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
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": "meta-llama/Llama-3.1-8B"}))
    with pytest.raises(LoraflowError, match="meta-llama/Llama-3.1-8B"):
        registry.publish(named_elsewhere, "pirate", base=tiny_base)
    assert not registry.path.exists()


def test_unreadable_registry_names_file_and_line(tmp_path):
    path = tmp_path / "registry.json"
    path.write_text('{\n "schema_version": 1,\n "adapters": {\n')
    with pytest.raises(LoraflowError, match=r"registry.json:4: the registry is not valid JSON"):
        Registry(path).load()


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
from hub.base import resolve_base
from hub.registry import Registry
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
    after = registry.publish(tiny_adapter, "victim", base=tiny_base)  # a leftover folder does not block the next version
    assert after.version == seen_versions + 1
