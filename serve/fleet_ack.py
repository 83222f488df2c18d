"""Fleet-consistent promotion: wait until every part of a running fleet serves NAME with the new live version.

In a fleet only the ingress resolves NAME (to NAME@V, per request, from the registry); the replicas receive the
pinned version and load it from their own view of the registry. So a fleet serves the new version once the ingress
has applied the registry revision of the promote (it resolves NAME to it) and every replica has too (it can load
it). `GET /v1/loraflow/fleet` reports both; `wait_until_fleet_serves` polls it, and names what lags on a timeout.
`loraflow serve --replicas` leaves a record beside the registry file while it runs; `running_fleets` reads them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from loraflow.hub.errors import LoraflowError

FLEET_STATUS_ROUTE = "/v1/loraflow/fleet"
FLEET_RECORDS = ".loraflow-fleets"
POLL_S = 0.05


@dataclass
class FleetRecord:
    url: str  # http://HOST:PORT, the fleet's address
    pid: int  # the `loraflow serve` process that owns it
    replicas: int


@dataclass
class FleetAck:
    url: str
    replicas: list[str]
    seconds: float  # from the call until every part of the fleet had applied the revision


def fleet_records_dir(registry: str | os.PathLike) -> Path:
    return Path(registry).parent / FLEET_RECORDS


def running_fleets(registry: str | os.PathLike) -> list[FleetRecord]:
    """The fleets serving this registry file from this machine; records left by a stopped server are skipped."""
    fleets = []
    for path in sorted(fleet_records_dir(registry).glob("*.json")):
        try:
            record = FleetRecord(**json.loads(path.read_text()))
            os.kill(record.pid, 0)
        except (OSError, ValueError, TypeError):
            continue  # unreadable, or its server is gone
        fleets.append(record)
    return fleets


def fleet_status(url: str, api_key: str | None = None, client: httpx.Client | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = (client or httpx).get(url + FLEET_STATUS_ROUTE, headers=headers, timeout=60)
    except httpx.HTTPError as error:
        raise LoraflowError(
            f"fleet {url}: cannot reach it ({error}). Is its `loraflow serve --replicas` running?"
        ) from None
    if response.status_code == 401:
        raise LoraflowError(f"fleet {url}: 401, it requires an API key; set LORAFLOW_API_KEY or pass --api-key.")
    if response.status_code != 200:
        raise LoraflowError(f"fleet {url}: {FLEET_STATUS_ROUTE} answered {response.status_code}; is this a fleet?")
    return response.json()


def lagging(status: dict, ref: str, revision: int) -> list[str]:
    """What in the fleet does not yet serve `ref` as its NAME: the ingress and each replica, with the revision."""
    name = ref.partition("@")[0]
    behind = []
    ingress, serves = status["ingress"], status["serves"].get(name) or "nothing"
    if ingress["revision"] < revision or serves != ref:
        behind.append(f"ingress {ingress['replica']} (registry revision {ingress['revision']}, {name} means {serves})")
    behind += [
        f"replica {replica['replica']} (registry revision {replica['revision']})"
        for replica in status["replicas"]
        if replica["revision"] < revision
    ]
    return behind


def wait_until_fleet_serves(
    url: str,
    ref: str,
    revision: int,
    api_key: str | None = None,
    timeout_s: float = 60,
    client: httpx.Client | None = None,
) -> FleetAck:
    """Return once the fleet at `url` answers NAME with `ref` everywhere, having applied registry `revision`; raise
    LoraflowError naming the parts that lag behind after `timeout_s`."""
    began = time.monotonic()
    while True:
        status = fleet_status(url, api_key, client)
        behind = lagging(status, ref, revision)
        if not behind:
            replicas = [replica["replica"] for replica in status["replicas"]]
            return FleetAck(url, replicas, time.monotonic() - began)
        if time.monotonic() - began > timeout_s:
            raise LoraflowError(
                f"fleet {url}: after {timeout_s:.0f} s, these still lag behind registry revision {revision} "
                f"({ref} live): {'; '.join(behind)}. The registry changed; check that they read {status['registry']}."
            )
        time.sleep(POLL_S)  # the interval between two status polls
