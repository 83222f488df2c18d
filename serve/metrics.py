"""Prometheus metrics per adapter version and per replica, on the API's own `/metrics`.

Every series carries `version` (the NAME@V a request answered with, or the served base name) and `replica` (the
LORAFLOW_REPLICA the launcher sets: HOST:PORT for one server, the Ray replica id in a fleet):
- loraflow_requests_total, loraflow_request_errors_total: requests to the generation routes, and those answered
  with an HTTP error status or that failed while streaming. A request that named no model this server serves (an
  unknown name, a missing API key, a malformed body) counts under version="(unresolved)": a client's string never
  becomes a label, so the series stay as many as the registry's versions;
- loraflow_generated_tokens_total: tokens the engine generated, the sum of the answers' usage.completion_tokens;
- loraflow_time_to_first_token_seconds: from the request's arrival (adapter loading included) to its first token;
- loraflow_adapter_resident: 1 while the engine holds a version the server has resolved, 0 once its LRU
  (--max-cpu-loras) evicted it; read from the engine at each scrape.

In the vLLM server three small parts measure: `MetricsMiddleware` (the launcher passes it as vLLM's --middleware)
times and counts each request; `install`, called by the `loraflow.serve.resolver` plugin, wraps vLLM's model check
to name the request's version and the engine client's `generate` to count its tokens. vLLM serves the process's
default prometheus registry on /metrics, so these series appear beside its own. A fleet's ingress merges each
replica's loraflow_* families into one exposition (`merge_expositions`).
"""

from __future__ import annotations

import contextvars
import functools
import os
import socket
import time
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from loraflow.serve.naming import VERSION_HEADER

REPLICA_ENV = "LORAFLOW_REPLICA"
METRIC_PREFIX = "loraflow_"
UNRESOLVED = "(unresolved)"  # never a registry name (NAME_PATTERN starts with [a-z0-9])
GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses"})
LABELS = ("version", "replica")
# From a warm adapter on a GPU (tens of ms) to a cold load on a busy CPU (tens of seconds).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("loraflow_requests", "Requests to the generation routes, per version and replica.", LABELS)
ERRORS = Counter(
    "loraflow_request_errors",
    "Requests answered with an HTTP error status, or that failed while streaming, per version and replica.",
    LABELS,
)
GENERATED_TOKENS = Counter("loraflow_generated_tokens", "Tokens generated, per version and replica.", LABELS)
TIME_TO_FIRST_TOKEN = Histogram(
    "loraflow_time_to_first_token_seconds",
    "Seconds from a request's arrival to its first generated token, per version and replica.",
    LABELS,
    buckets=TTFT_BUCKETS,
)
ADAPTER_RESIDENT = Gauge(
    "loraflow_adapter_resident",
    "1 while the engine holds a resolved adapter version, 0 once its LRU evicted it; per version and replica.",
    LABELS,
)


def replica_label() -> str:
    return os.environ.get(REPLICA_ENV) or socket.gethostname()


@dataclass
class RequestRecord:
    """One request as the metrics see it; shared by the middleware, the model check and the engine's generate."""

    started: float  # time.monotonic() at arrival
    version: str | None = None
    first_token: bool = False
    failed: bool = False


_current_request: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "loraflow_metrics_request", default=None
)


class MetricsMiddleware:
    """Pure ASGI middleware: names the version that answers each request to a generation route in the
    `x-loraflow-version` header, counts the request under it once the answer is sent (for a stream, after its last
    chunk), and refreshes the resident gauge before `/metrics` answers."""

    def __init__(self, app):
        self.app = app
        self.replica = replica_label()
        self.resident: set[str] = set()  # versions the gauge has a series for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path == "/metrics":
            await self._refresh_resident(scope["app"].state)  # Starlette puts the app in the scope
            return await self.app(scope, receive, send)
        if path not in GENERATION_ROUTES:
            return await self.app(scope, receive, send)
        record = RequestRecord(time.monotonic())
        token = _current_request.set(record)  # tasks the request starts copy the context, so they share `record`
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if status < 400 and record.version:  # the model check named it before any answer starts
                    message = {**message, "headers": [*message.get("headers", []), self._version_header(record)]}
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except BaseException:
            record.failed = True
            raise
        finally:
            _current_request.reset(token)
            version = record.version or UNRESOLVED
            REQUESTS.labels(version, self.replica).inc()
            if status >= 400 or record.failed:
                ERRORS.labels(version, self.replica).inc()

    @staticmethod
    def _version_header(record: RequestRecord) -> tuple[bytes, bytes]:
        return VERSION_HEADER.encode(), record.version.encode()

    async def _refresh_resident(self, state) -> None:
        engine = getattr(state, "engine_client", None)
        models = getattr(state, "openai_serving_models", None)
        if engine is None or models is None:
            return
        loaded = await engine.list_loras()
        # dict.values: the table's own lookups would resolve names; this reads what it holds
        resident = {request.lora_name: request.lora_int_id in loaded for request in dict.values(models.lora_requests)}
        for version in self.resident - resident.keys():
            ADAPTER_RESIDENT.remove(version, self.replica)
        for version, held in resident.items():
            ADAPTER_RESIDENT.labels(version, self.replica).set(1 if held else 0)
        self.resident = set(resident)


def install(view) -> None:
    """Wrap vLLM's model check (which names the request's version) and the engine client's `generate` (which counts
    tokens and times the first one). Runs in every vLLM process from the resolver plugin; only the API server's
    requests pass through them."""
    from vllm.entrypoints.serve.engine.serving import BaseServing
    from vllm.v1.engine.async_llm import AsyncLLM

    from loraflow.serve.naming import servable
    from loraflow.serve.resolver import pin, request_pins

    if getattr(AsyncLLM, "_loraflow_metrics", False):
        return
    AsyncLLM._loraflow_metrics = True
    original_check = BaseServing._check_model
    original_generate = AsyncLLM.generate
    replica = replica_label()

    @functools.wraps(original_check)
    async def _check_model(self, request):
        error = await original_check(self, request)
        record = _current_request.get()
        if record is not None and record.version is None:
            model = getattr(request, "model", None)
            base = not model or self.models.is_base_model(model)
            if not base:
                pin(view, model)  # the NAME@V this request resolves to, decided once per request
            # Every spelling the request looked up, so also a name a wrap rewrote to the base (a prompt version).
            snapshot = view.snapshot()
            versions = [ref for ref in request_pins().refs.values() if "@" in ref and servable(snapshot, ref)]
            if versions:
                record.version = versions[0]
            elif base:
                record.version = model or self.models.base_model_paths[0].name
        return error

    @functools.wraps(original_generate)
    async def generate(self, *args, **kwargs):
        from vllm.sampling_params import RequestOutputKind

        record = _current_request.get() or RequestRecord(time.monotonic())
        lora_request = kwargs.get("lora_request")
        # A registry adapter's LoRARequest is named NAME@V; without one, the model check's choice, or the base.
        record.version = (
            lora_request.lora_name if lora_request else (record.version or self.model_config.served_model_name)
        )
        sampling_params = args[1] if len(args) > 1 else kwargs.get("sampling_params")
        deltas = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        tokens = GENERATED_TOKENS.labels(record.version, replica)
        seen: dict[int, int] = {}  # tokens counted so far, per choice, when outputs are cumulative
        outputs = original_generate(self, *args, **kwargs)
        try:
            async for output in outputs:
                new = 0
                for choice in output.outputs:
                    count = len(choice.token_ids)  # a delta, or every token so far
                    new += count if deltas else count - seen.get(choice.index, 0)
                    seen[choice.index] = count
                    record.failed |= choice.finish_reason == "error"
                if new:
                    tokens.inc(new)
                    if not record.first_token:
                        record.first_token = True
                        TIME_TO_FIRST_TOKEN.labels(record.version, replica).observe(time.monotonic() - record.started)
                yield output
        except Exception:
            record.failed = True
            raise
        finally:
            await outputs.aclose()

    BaseServing._check_model = _check_model
    AsyncLLM.generate = generate


class _Families:
    """A collector over parsed metric families, so prometheus_client renders them."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def merge_expositions(texts: list[str], prefix: str = METRIC_PREFIX) -> bytes:
    """One exposition of the `prefix` families in `texts` (each replica's /metrics): each family once, with every
    replica's samples; their `replica` labels keep them apart."""
    merged = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(prefix):
                continue
            if family.name in merged:
                merged[family.name].samples.extend(family.samples)
            else:
                merged[family.name] = family
    return generate_latest(_Families(list(merged.values())))
