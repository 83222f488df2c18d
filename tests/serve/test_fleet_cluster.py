"""`loraflow serve --replicas 1 --ray-address HOST:PORT` on a Ray cluster started with `ray start --head`, as a team
with a cluster runs it: the fleet joins the cluster and serves through it; SIGTERM removes the fleet's application
and its vLLM and leaves the cluster running. The cluster uses token authentication, and a client without the token
gets an error that says what to set.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import openai
import pytest

from tests.conftest import REPO, make_adapter, run_loraflow, start_and_read_until, write_tiny_llama

RAY = Path(sys.executable).with_name("ray")
START_TIMEOUT_S = 600


def ray_status(address: str, auth: dict) -> subprocess.CompletedProcess:
    command = [str(RAY), "status", "--address", address]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **auth})


@pytest.fixture
def cluster():
    """A one-node Ray cluster from `ray start --head --block` with token authentication, in its own process group,
    which the fixture ends; yields its address and the environment a client needs to join it."""
    from loraflow.serve.launcher import free_port

    address = f"127.0.0.1:{free_port()}"
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths live under it
    command = [str(RAY), "start", "--head", f"--port={address.split(':')[1]}", "--num-cpus=2", "--block"]
    command += ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    process, output = start_and_read_until(
        command, "Ray runtime started", START_TIMEOUT_S, start_new_session=True, env={**os.environ, **auth}
    )
    assert "Ray runtime started" in output, f"`ray start --head` did not start:\n{output}"
    yield address, auth
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
    shutil.rmtree(temp, ignore_errors=True)


def test_the_fleet_joins_a_cluster_started_with_ray_start(cluster, smollm2, tmp_path):
    from loraflow.hub.registry import Registry
    from loraflow.serve.fleet_ack import fleet_status
    from loraflow.serve.launcher import free_port

    address, auth = cluster

    base = write_tiny_llama(smollm2, tmp_path / "tiny-base", seed=0)
    registry = Registry(tmp_path / "registry" / "registry.json")
    registry.publish(make_adapter(base, tmp_path / "src" / "p1", seed=1), "pirate", base=base, promote=True)
    port = free_port()
    command = [sys.executable, "-m", "loraflow.hub.cli", "--registry", str(registry.path), "serve"]
    command += ["--base", str(base.path), "--port", str(port), "--max-model-len", "256"]
    command += ["--replicas", "1", "--ray-address", address]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH")}

    refused = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment, timeout=300)
    assert refused.returncode == 2
    assert "RAY_AUTH_MODE=token" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr

    process, output = start_and_read_until(
        command, "adapters:", START_TIMEOUT_S, cwd=REPO, env={**environment, **auth, "COLUMNS": "200"}
    )
    url = re.search(r"serving (http://\S+)/v1", output)
    assert url, f"`loraflow serve --ray-address` did not start:\n{output}"
    assert f"the Ray cluster at {address}" in output

    client = openai.OpenAI(base_url=url.group(1) + "/v1", api_key="none", max_retries=0, timeout=120)
    raw = client.completions.with_raw_response.create(model="pirate", prompt="Ahoy", max_tokens=4, temperature=0)
    assert raw.parse().model == raw.headers["x-loraflow-version"] == "pirate@1"
    (replica,) = fleet_status(url.group(1))["replicas"]
    assert replica["replica"] == raw.headers["x-loraflow-replica"]

    process.send_signal(signal.SIGTERM)
    assert process.wait(120) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(replica["vllm_pid"], 0)  # the replica's vLLM went with the fleet
    assert ray_status(address, auth).returncode == 0, "the cluster the fleet joined is still running"


def test_an_address_where_nothing_answers_is_a_one_line_error(smollm2, tmp_path):
    from loraflow.serve.launcher import free_port

    address = f"127.0.0.1:{free_port()}"
    result = run_loraflow(
        "--registry", str(tmp_path / "registry.json"), "serve", "--replicas", "1", "--ray-address", address, check=False
    )
    assert result.returncode == 2
    assert f"--ray-address {address}: nothing answers there" in result.stderr and "Traceback" not in result.stderr
