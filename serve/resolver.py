"""The registry-backed LoRA resolver, shipped as a vLLM general plugin (`vllm.general_plugins` entry point).

How vLLM 0.32 maps a request's `model` to a LoRARequest: `BaseServing._check_model` accepts the base
name, or a key of `OpenAIServingModels.lora_requests`, or else asks `OpenAIServingModels.resolve_lora`,
which runs every registered `LoRAResolver`, loads the result into the engine (`add_lora`) and stores
it in `lora_requests[model]`. `_maybe_get_adapters` then reads `lora_requests[model]` and attaches that
LoRARequest to the request for its whole life.

The design keeps that flow and changes one data structure. `lora_requests` becomes a `PinnedLoraTable`:
a dict keyed by pinned `NAME@V` whose lookups first resolve the client's spelling (NAME, NAME@ALIAS,
NAME@V) against the registry snapshot, re-read only when the file changed. So:
- every request resolves NAME to the live version at that moment: a promote or rollback is noticed by
  the next request on every replica, with no restart, no watcher thread and no call from the publisher;
  a candidate (published, not promoted) or a rejected version is reached only as NAME@V;
- a request keeps the LoRARequest object it was given, so in-flight requests finish on their version;
- a new version gets a new LoRARequest id and is loaded once by vLLM's own `resolve_lora`; the engine's
  LRU cache (`--max-cpu-loras`) evicts versions no longer asked for;
- the table itself is an LRU of LORAFLOW_RESOLVER_CACHE versions (default 1024; the launcher keeps it at least
  --max-cpu-loras): a forgotten version is resolved again by its next request, under a new id from vLLM's counter;
- `RegistryLoRAResolver` is the only place that turns a registry record into a LoRARequest, after the
  path guard, the safetensors-only check, the sha256 check and the base-fingerprint check.
On the CPU it also installs `loraflow.serve.punica_cpu`, a faster multi-LoRA path (LORAFLOW_FAST_CPU_LORA=0: off).
Small wraps complete it: `/v1/models` lists every registry name, a 404 lists what exists (a refused
adapter gets a 400 with the reason instead), and `/v1/loraflow/adapters` shows which versions the engine
holds now. LORAFLOW_REGISTRY may also be the URL of a `loraflow hub serve` (`loraflow.serve.remote_registry`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from http import HTTPStatus

from fastapi import FastAPI, Request  # at module level: FastAPI reads the route's annotations from here
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from loraflow.hub.errors import LoraflowError
from loraflow.serve.metrics import install as install_metrics
from loraflow.serve.naming import (
    DEFAULT_RESOLVER_CACHE,
    RegistryView,
    check_servable,
    open_registry_view,
    resolver_cache_size,
    servable,
    unknown_model_message,
)
from loraflow.serve.prompts import install as install_prompts
from loraflow.serve.prompts import prompt_refusal
from loraflow.serve.remote_registry import RemoteRegistry

RESOLVER_NAME = "loraflow registry"


@dataclass
class RequestPins:
    """What one request decided: the NAME@V each spelling means, and the LoRARequest each NAME@V answered with."""

    refs: dict[str, str] = field(default_factory=dict)
    requests: dict[str, LoRARequest] = field(default_factory=dict)


_request_pins: contextvars.ContextVar[RequestPins | None] = contextvars.ContextVar(
    "loraflow_request_pins", default=None
)


def request_pins() -> RequestPins:
    pins = _request_pins.get()
    if pins is None:
        pins = RequestPins()
        _request_pins.set(pins)  # every request runs in its own asyncio task, with its own copy of this variable
    return pins


@functools.cache
def registry_view() -> RegistryView | None:
    location = os.environ.get("LORAFLOW_REGISTRY")
    return open_registry_view(location) if location else None


class RegistryLoRAResolver(LoRAResolver):
    """Turns NAME, NAME@V or NAME@ALIAS into a LoRARequest for the verified registry folder."""

    def __init__(self, view: RegistryView, base_fingerprint: str | None, max_rank: int | None):
        self.view = view
        self.base_fingerprint = base_fingerprint
        self.max_rank = max_rank
        self.refusals: dict[str, str] = {}  # model -> why it exists but cannot be served

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        version = servable(self.view.snapshot(), pin(self.view, lora_name))
        if version is None or version.kind != "adapter":  # a prompt version has no LoRA (loraflow.serve.prompts)
            return None
        try:
            # Downloading (from a registry URL) and hashing take time; keep the event loop serving meanwhile.
            folder = await asyncio.to_thread(self.view.folder, version)
            await asyncio.to_thread(
                check_servable, version, folder, self.view.store, self.base_fingerprint, self.max_rank
            )
        except LoraflowError as error:
            if self.view.snapshot().find(version.ref) is None:
                return None  # removed while it was being checked: a 404, which the fleet's ingress sends again
            self.refusals[lora_name] = str(error)
            return None
        self.refusals.pop(lora_name, None)
        # vLLM replaces the id with its own counter before loading.
        return LoRARequest(lora_name=version.ref, lora_int_id=1, lora_path=os.path.realpath(folder))


def pin(view: RegistryView, model):
    """NAME@V for `model`, decided once per request: vLLM looks a name up several times while admitting
    a request (model check, resolver, adapter lookup) and a publish between two lookups must not split them."""
    if not isinstance(model, str):
        return model
    refs = request_pins().refs
    if model not in refs:
        version = servable(view.snapshot(), model)
        refs[model] = version.ref if version else model
    return refs[model]


class PinnedLoraTable(OrderedDict):
    """vLLM's `lora_requests`, keyed by NAME@V, answering to every spelling of a registry version.

    An LRU of at most `limit` registry versions. Evicting one is safe: vLLM numbers LoRARequests from a counter that
    never goes back (`lora_id_counter`), so a version resolved again gets a fresh id and no id ever names two
    versions; a request that already looked a version up keeps that LoRARequest until it ends; entries the registry
    cannot resolve again (vLLM's --lora-modules, its load API) are never evicted.
    """

    def __init__(self, view: RegistryView, existing: dict, limit: int = DEFAULT_RESOLVER_CACHE):
        super().__init__()
        self.view = view
        self.limit = limit
        self.store = os.path.realpath(view.store)
        for request in existing.values():
            super().__setitem__(request.lora_name, request)
        self._update_folders()  # every held version's folder, which the download cache must not delete

    def _lookup(self, model):
        """The request's LoRARequest for `model`, or None; a hit counts as a use."""
        key = pin(self.view, model)
        held = request_pins().requests
        if key in held:
            return held[key]
        request = super().get(key)
        if request is None:
            return None
        if request.lora_path.startswith(self.store + os.sep) and not os.path.isdir(request.lora_path):
            self._forget(key)  # its folder was deleted (another replica pruned a shared cache): resolve it again
            return None
        self.move_to_end(key)
        held[key] = request
        return request

    def __contains__(self, model) -> bool:
        return self._lookup(model) is not None

    def __getitem__(self, model):
        request = self._lookup(model)
        if request is None:
            raise KeyError(model)
        return request

    def get(self, model, default=None):
        request = self._lookup(model)
        return default if request is None else request

    def __setitem__(self, model, request) -> None:
        key = request.lora_name  # NAME@V for registry adapters, whatever the spelling asked
        super().__setitem__(key, request)
        self.move_to_end(key)
        request_pins().requests[key] = request
        if len(self) > self.limit:
            # Safe to forget: vLLM's lora_id_counter never goes back, so a version resolved again gets a new, unused id.
            snapshot = self.view.snapshot()
            evictable = [other for other in self.keys() if other != key and servable(snapshot, other)]
            for other in evictable[: len(self) - self.limit]:
                super().__delitem__(other)
        self._update_folders()

    def __delitem__(self, model) -> None:
        self._forget(pin(self.view, model))

    def _forget(self, key: str) -> None:
        super().__delitem__(key)
        self._update_folders()

    def _update_folders(self) -> None:
        self.folders = frozenset(os.path.realpath(request.lora_path) for request in self.values())


def _install_serving_wraps(view: RegistryView, resolver: RegistryLoRAResolver, table_limit: int) -> None:
    """Make the OpenAI serving layer use the pinned table, list registry names and explain 404s."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse, ModelCard, ModelPermission
    from vllm.entrypoints.serve.engine.serving import BaseServing

    if getattr(OpenAIServingModels, "_loraflow_wrapped", False):
        return
    OpenAIServingModels._loraflow_wrapped = True
    original_init = OpenAIServingModels.__init__
    original_models = OpenAIServingModels.show_available_models
    original_check = BaseServing._check_model

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        table = PinnedLoraTable(view, self.lora_requests, table_limit)
        self.lora_requests = table
        if isinstance(view, RemoteRegistry):
            view.in_use = lambda: table.folders  # the download cache never deletes a version the table still holds

    @functools.wraps(original_models)
    async def show_available_models(self):
        model_list = await original_models(self)
        listed = {card.id for card in model_list.data}
        base = self.base_model_paths[0].name
        for model_id in view.snapshot().model_ids():
            if model_id not in listed:
                model_list.data.append(
                    ModelCard(
                        id=model_id, root=model_id, parent=base, owned_by="loraflow", permission=[ModelPermission()]
                    )
                )
        return model_list

    @functools.wraps(original_check)
    async def _check_model(self, request):
        error = await original_check(self, request)
        if not isinstance(error, ErrorResponse) or error.error.code != HTTPStatus.NOT_FOUND.value:
            return error
        model = request.model or ""
        refusal = prompt_refusal(view, model) or resolver.refusals.get(model)
        if refusal:
            return self.create_error_response(
                refusal, err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST, param="model"
            )
        base_names = [path.name for path in self.models.base_model_paths]
        return self.create_error_response(
            unknown_model_message(view.snapshot(), model, base_names),
            err_type="NotFoundError",
            status_code=HTTPStatus.NOT_FOUND,
            param="model",
        )

    OpenAIServingModels.__init__ = __init__
    OpenAIServingModels.show_available_models = show_available_models
    BaseServing._check_model = _check_model
    _install_adapters_route(view)


def _install_adapters_route(view: RegistryView) -> None:
    """GET /v1/loraflow/adapters: each version this server has resolved, and whether the engine holds it now.

    The engine keeps at most --max-cpu-loras adapters and evicts the least recently used one to load
    another; an evicted version stays resolved and is loaded again by its next request.
    """
    from vllm.entrypoints.serve.lora import api_router

    original_attach = api_router.attach_router

    async def adapters(raw_request: Request) -> dict:
        engine = raw_request.app.state.engine_client
        resident = await engine.list_loras()
        lora_config = engine.vllm_config.lora_config
        resolved = dict.items(raw_request.app.state.openai_serving_models.lora_requests)
        return {
            "registry": view.location,
            "max_loras": lora_config.max_loras if lora_config else 0,
            "max_cpu_loras": lora_config.max_cpu_loras if lora_config else 0,
            "adapters": [
                {"model": model, "lora_int_id": request.lora_int_id, "loaded": request.lora_int_id in resident}
                for model, request in sorted(resolved, key=lambda item: item[1].lora_int_id)
            ],
        }

    @functools.wraps(original_attach)
    def attach_router(app: FastAPI) -> None:
        original_attach(app)
        app.add_api_route("/v1/loraflow/adapters", adapters, methods=["GET"])

    api_router.attach_router = attach_router


def register() -> None:
    """The vLLM general-plugin entry point; runs in every vLLM process, and does nothing without LORAFLOW_REGISTRY."""
    view = registry_view()
    if view is None:
        return
    if os.environ.get("LORAFLOW_FAST_CPU_LORA", "1") != "0":
        from loraflow.serve.punica_cpu import install

        install()
    max_rank = os.environ.get("LORAFLOW_MAX_LORA_RANK")
    resolver = RegistryLoRAResolver(
        view, os.environ.get("LORAFLOW_BASE_FINGERPRINT"), int(max_rank) if max_rank else None
    )
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver)
    _install_serving_wraps(view, resolver, resolver_cache_size())
    install_prompts(view)
    install_metrics(view)
