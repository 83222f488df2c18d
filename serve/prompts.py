"""Prompt contestants: a registry version of kind "prompt" is the base model with a system prompt, served by name.

A chat request for such a NAME (or NAME@V, NAME@ALIAS) is answered by the base, with the version's system prompt put
before the conversation, and the answer names the version in its `model` field like an adapter's does. Only chat
completions take a system prompt; a plain completion for a prompt version is refused with a 400 that says so
(`prompt_refusal`, which the resolver's 404 wrap asks).
"""

from __future__ import annotations

import functools
import json
from typing import AsyncGenerator

from loraflow.hub.registry import AdapterVersion
from loraflow.serve.naming import RegistryView, servable


def prompt_version(view: RegistryView, model) -> AdapterVersion | None:
    """The prompt version a request's model names (pinned once per request), or None for anything else."""
    from loraflow.serve.resolver import pin

    version = servable(view.snapshot(), pin(view, model)) if isinstance(model, str) else None
    return version if version is not None and version.kind == "prompt" else None


def prompt_refusal(view: RegistryView, model) -> str | None:
    """Why a request that is not a chat completion cannot use `model`, when it names a prompt version."""
    version = prompt_version(view, model)
    if version is None:
        return None
    return (
        f"{version.ref} is a prompt (a system prompt on the base), so it answers chat completions only: "
        "POST /v1/chat/completions with messages."
    )


def with_system_prompt(messages: list, system_prompt: str) -> list:
    """The version's system prompt first; the client's own messages, system ones included, follow unchanged."""
    return [{"role": "system", "content": system_prompt}, *messages]


def renamed(result, base_name: str, ref: str):
    """The chat answer with `model` naming the prompt version rather than the base that computed it."""
    if hasattr(result, "model") and result.model == base_name:  # a whole ChatCompletionResponse
        result.model = ref
        return result
    if hasattr(result, "__aiter__"):  # a stream of server-sent events, each a compact JSON chunk
        return _renamed_stream(result, f'"model":{json.dumps(base_name)}', f'"model":{json.dumps(ref)}')
    return result  # an ErrorResponse


async def _renamed_stream(stream: AsyncGenerator[str, None], before: str, after: str) -> AsyncGenerator[str, None]:
    async for event in stream:
        yield event.replace(before, after, 1)


def install(view: RegistryView) -> None:
    """Answer chat requests for prompt versions with the base and the version's system prompt."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    if getattr(OpenAIServingChat, "_loraflow_prompts", False):
        return
    OpenAIServingChat._loraflow_prompts = True
    original = OpenAIServingChat.create_chat_completion

    @functools.wraps(original)
    async def create_chat_completion(self, request, raw_request=None):
        version = prompt_version(view, request.model)
        if version is None:
            return await original(self, request, raw_request)
        base_name = self.models.model_name()
        request.messages = with_system_prompt(request.messages, version.system_prompt)
        request.model = base_name
        return renamed(await original(self, request, raw_request), base_name, version.ref)

    OpenAIServingChat.create_chat_completion = create_chat_completion
