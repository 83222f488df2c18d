"""The fleet's Ray Serve application: N vLLM replicas behind one ingress that speaks vLLM's OpenAI API.

- `VLLMReplica`: each replica starts one vLLM server through `loraflow.serve.launcher.start_server` and forwards
  requests to it over HTTP, streaming the answer back. A replica holds adapter versions through Ray Serve model
  multiplexing (`@serve.multiplexed`), keyed on the pinned NAME@V; holding one means vLLM has loaded it.
- `FleetIngress`: the one place that resolves a client's NAME or NAME@ALIAS, against the registry, to NAME@V.
  It rewrites the request to that version and sends it with NAME@V as its Ray Serve session, and Ray's
  consistent-hash router sends every request of one session to the same replica, the one that loaded it first.
  The replica that owns a version is a function of the version and the set of replicas alone, so affinity does not
  wait for the replicas' multiplexing reports to reach the router. Different versions fall on different replicas;
  one replica at its `max_ongoing_requests` passes the rest of its versions' requests to the next replica on the
  ring. A promote changes the key from the next request on. Base-model requests carry no key and spread over all
  replicas.
- Every answer names its version (`x-loraflow-version`, and the body's `model` field) and its replica
  (`x-loraflow-replica`). `GET /v1/loraflow/fleet` reports the registry revision the ingress and each replica have
  applied, what each NAME serves, and what each replica holds; `loraflow.serve.fleet_ack` waits on it.
- `GET /metrics` on the ingress's address: every replica's loraflow_* series (`loraflow.serve.metrics`), each labelled
  with its replica, the id `x-loraflow-replica` names.
- A replica whose vLLM dies exits, so Ray replaces it at once; the ingress re-sends a request that failed before any
  of its answer reached the client, and Ray's router, which drops the dead replica, picks another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
from dataclasses import dataclass

import httpx
import ray
from fastapi import FastAPI, Request  # at module level: FastAPI reads the routes' annotations from here
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig

from loraflow.serve.fleet_ack import FLEET_STATUS_ROUTE
from loraflow.serve.metrics import merge_expositions
from loraflow.serve.naming import VERSION_HEADER, open_registry_view, servable

logger = logging.getLogger("loraflow.fleet")
REPLICA_HEADER = "x-loraflow-replica"
# Headers a client sends that vLLM needs; hop-by-hop and length headers are the proxies' business.
FORWARDED_HEADERS = ("authorization", "content-type", "accept")
# A request whose replica died before answering is sent again, at most this many times in all, after a pause that
# doubles from RESEND_PAUSE_S, so that Ray's router has seen the replica go before the request is routed again.
SEND_ATTEMPTS = 4
RESEND_PAUSE_S = 0.25
# How long a replica whose connection to vLLM failed waits to see whether vLLM exited.
ENGINE_EXIT_WAIT_S = 2.0
# vLLM batches many requests at once; Ray Serve's default (5) would queue them in front of the engine instead.
MAX_ONGOING_REQUESTS = 256
# Ray's consistent-hash router: experimental in ray 2.60, which pyproject pins for this reason. Each version is
# tried on its own replica, then on the next two on the ring when that one is full or gone.
CONSISTENT_HASH = RequestRouterConfig(
    request_router_class="ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
    request_router_kwargs={"num_fallback_replicas": 2},
)
# The router asks a replica for its queue length before sending, within 0.1 s by default, and counts a late answer
# as a full queue, which sends the request to the next replica. On a CPU box where vLLM takes every core an answer
# can be late without anything being wrong, so the ingress, where the router runs, waits longer.
ROUTER_ENV = {
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0",
    "RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "5.0",
}
app = FastAPI(title="loraflow fleet")


class VLLMUnavailable(RuntimeError):
    """A replica's vLLM server did not answer; the ingress may send the request to another replica."""


@dataclass
class ResponseStart:
    """The first item a replica streams back: what the ingress needs before it starts the client's response."""

    status: int
    content_type: str
    replica: str


@serve.deployment(
    ray_actor_options={"num_cpus": 0.1},
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    request_router_config=CONSISTENT_HASH,
    health_check_period_s=2,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
class VLLMReplica:
    def __init__(self, registry: str, base: str, launcher_settings: dict, ready_timeout_s: float, max_held: int):
        from loraflow.serve.launcher import start_server

        self.replica = serve.get_replica_context().replica_id.unique_id
        self.registry = open_registry_view(registry)
        self.server = start_server(registry, base, replica=self.replica, die_with_parent=True, **launcher_settings)
        self.server.wait_ready(ready_timeout_s)
        self.api_key = self.server.settings.api_key
        self.client = httpx.AsyncClient(base_url=self.server.root_url, timeout=httpx.Timeout(None, connect=10))
        self.held: set[str] = set()

        async def hold(ref: str) -> HeldVersion:
            return await self._load(ref)

        # Held versions follow vLLM's own cache (--max-cpu-loras): Ray evicts the least recently used beyond it.
        self.hold = serve.multiplexed(max_num_models_per_replica=max_held)(hold)

    async def _load(self, ref: str) -> "HeldVersion":
        """Load an adapter NAME@V into vLLM, so a replica that holds a version has it loaded: /tokenize resolves the
        model as a generation would (the resolver's checks, then vLLM's add_lora) but generates nothing, so the
        load is not a request in the metrics. A refused or unknown version is held all the same: the client's own
        request then gets vLLM's explanation. Other kinds (a prompt version) have nothing to load."""
        version = self.registry.snapshot().find(ref)
        if version is None or version.kind == "adapter":  # unknown here: this replica's view may lag the ingress's
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            try:
                await self.client.post("/tokenize", json={"model": ref, "prompt": " "}, headers=headers)
            except httpx.TransportError:
                await self._exit_if_engine_died()
        self.held.add(ref)
        return HeldVersion(ref, self.held)

    async def forward(self, method: str, path: str, body: bytes, headers: dict[str, str]):
        """Send one request to this replica's vLLM; yield a ResponseStart, then the answer's bytes as they come."""
        ref = serve.get_multiplexed_model_id()
        if ref:
            await self.hold(ref)
        request = self.client.build_request(method, path, content=body, headers=headers)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TransportError as error:
            await self._exit_if_engine_died()
            raise VLLMUnavailable(f"replica {self.replica}: vLLM did not answer ({error!r})") from None
        try:
            yield ResponseStart(response.status_code, response.headers.get("content-type", ""), self.replica)
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.TransportError as error:
            await self._exit_if_engine_died()
            raise VLLMUnavailable(f"replica {self.replica}: vLLM stopped mid-answer ({error!r})") from None
        finally:
            await response.aclose()

    async def metrics(self) -> str:
        """The loraflow_* families of this replica's vLLM /metrics, labelled with this replica's id."""
        response = await self.client.get("/metrics", timeout=30)
        response.raise_for_status()
        return merge_expositions([response.text]).decode()

    def status(self) -> dict:
        return {
            "replica": self.replica,
            "revision": self.registry.snapshot().revision,
            "holds": sorted(self.held),
            "vllm_pid": self.server.process.pid,
            "pid": os.getpid(),
            "vllm_log": str(self.server.log_path),
            "node": ray.get_runtime_context().get_node_id(),  # the Ray node whose machine runs that pid
        }

    async def check_health(self) -> None:
        """Ray calls this periodically; raising makes Ray replace the replica."""
        if self.server.process.poll() is not None:
            raise RuntimeError(f"vLLM exited with code {self.server.process.returncode}; see {self.server.log_path}")
        response = await self.client.get("/health", timeout=20)
        if response.status_code != 200:
            raise RuntimeError(f"vLLM's /health answered {response.status_code}; see {self.server.log_path}")

    async def _exit_if_engine_died(self) -> None:
        """Without vLLM this replica can serve nothing: exit, so Ray's router drops it and Ray starts a new one
        now rather than at the next health check. A refused connection comes a moment before the engine's exit
        can be seen, so wait that moment."""
        try:
            await asyncio.to_thread(self.server.process.wait, ENGINE_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            return  # vLLM runs: the failure was the connection's
        logger.error(
            "replica %s: vLLM exited with code %s; exiting so Ray replaces this replica (log: %s)",
            self.replica,
            self.server.process.returncode,
            self.server.log_path,
        )
        self.server.stop()  # engine and worker processes left in vLLM's process group
        os._exit(1)

    def __del__(self):
        if hasattr(self, "server"):
            self.server.stop()


class HeldVersion:
    """One version a replica holds; Ray Serve calls `__del__` when it evicts the least recently used one."""

    def __init__(self, ref: str, held: set[str]):
        self.ref: str | None = ref
        self.held_by = held

    def __del__(self):
        if self.ref is not None:  # once: the garbage collector calls it again after Ray did
            self.held_by.discard(self.ref)
            self.ref = None


@serve.deployment(
    ray_actor_options={"num_cpus": 0.1, "runtime_env": {"env_vars": ROUTER_ENV}},
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
)
@serve.ingress(app)
class FleetIngress:
    def __init__(self, replicas, registry: str, base_name: str, api_key: str | None, replica_count: int):
        self.replicas = replicas
        self.registry = open_registry_view(registry)
        self.base_name = base_name
        self.api_key = api_key
        self.replica_count = replica_count
        self.ingress = serve.get_replica_context().replica_id.unique_id

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self._forward(request, "/v1/models")

    @app.get("/health")
    async def health(self) -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics(self) -> Response:
        """Every replica's loraflow_* series in one exposition; a replica that does not answer is left out."""
        answers = await self.replicas.broadcast("metrics").results_async(timeout_s=30, return_exceptions=True)
        for answer in answers:
            if not isinstance(answer, str):
                logger.warning("a replica's metrics are left out of this scrape: %r", answer)
        texts = [answer for answer in answers if isinstance(answer, str)]
        return Response(merge_expositions(texts), media_type=CONTENT_TYPE_LATEST)

    @app.get(FLEET_STATUS_ROUTE)
    async def fleet_status(self, request: Request) -> Response:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        snapshot = self.registry.snapshot()
        live = {name: snapshot.live(name) for name in snapshot.names()}
        replicas = await self.replicas.broadcast("status").results_async(timeout_s=30, return_exceptions=True)
        return JSONResponse(
            {
                "registry": self.registry.location,
                "ingress": {"replica": self.ingress, "revision": snapshot.revision},
                "serves": {name: version.ref for name, version in live.items() if version is not None},
                "replicas": [replica for replica in replicas if isinstance(replica, dict)],
                "replicas_configured": self.replica_count,
            }
        )

    async def _forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        headers = {name: value for name, value in request.headers.items() if name in FORWARDED_HEADERS}
        for attempt in range(1, SEND_ATTEMPTS + 1):
            ref, pinned = self._pin(body)
            # The session routes by version; the multiplexed id tells the replica which version it now holds.
            handle = self.replicas.options(stream=True, multiplexed_model_id=ref or "", session_id=ref or "")
            answer = handle.forward.remote(request.method, path, pinned, headers)
            try:
                start = await answer.__anext__()
            except (VLLMUnavailable, RayActorError, ActorUnavailableError) as error:
                logger.warning("attempt %d of %d failed before any answer: %s", attempt, SEND_ATTEMPTS, error)
                last_error = error
                if attempt < SEND_ATTEMPTS:
                    await asyncio.sleep(RESEND_PAUSE_S * 2 ** (attempt - 1))
                continue
            if start.status == 404 and ref is not None and self.registry.snapshot().find(ref) is None:
                # The version left the registry while the request was on its way: pin the request again, to the
                # version NAME means now (or, for a client that named that version, to vLLM's own 404).
                answer.cancel()
                last_error = f"{ref} left the registry"
                continue
            response_headers = {REPLICA_HEADER: start.replica}
            if start.status < 400:
                response_headers[VERSION_HEADER] = ref or self.base_name
            return StreamingResponse(
                answer, status_code=start.status, media_type=start.content_type or None, headers=response_headers
            )
        return JSONResponse(
            {
                "error": {
                    "message": f"no replica could answer after {SEND_ATTEMPTS} attempts (last: {last_error}); "
                    "Ray is replacing the failed replicas, retry shortly.",
                    "type": "ServiceUnavailableError",
                    "code": 503,
                }
            },
            status_code=503,
        )

    def _pin(self, body: bytes) -> tuple[str | None, bytes]:
        """NAME@V for the request's model (None for the base or anything the registry does not name), and the body
        rewritten to ask for exactly that version, so the replica answers with the version the ingress chose."""
        try:
            payload = json.loads(body)
        except ValueError:
            return None, body  # vLLM answers a malformed body with its own 400
        model = payload.get("model") if isinstance(payload, dict) else None
        version = servable(self.registry.snapshot(), model) if isinstance(model, str) else None
        if version is None:
            return None, body
        payload["model"] = version.ref
        return version.ref, json.dumps(payload).encode()


def build_fleet_app(
    registry: str,
    base: str,
    base_name: str,
    replicas: int,
    launcher_settings: dict,
    ready_timeout_s: float,
    max_held: int,
    replica_cpus: float,
):
    """The application `serve.run` deploys: `replicas` vLLM replicas behind one ingress; each replica holds at most
    `max_held` versions, as many as its vLLM keeps loaded."""
    replica = VLLMReplica.options(num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus})
    return FleetIngress.bind(
        replica.bind(registry, base, launcher_settings, ready_timeout_s, max_held),
        registry,
        base_name,
        launcher_settings.get("api_key"),
        replicas,
    )
