"""`loraflow serve`: the vLLM OpenAI-compatible server for one quantized base and every registry adapter."""

from __future__ import annotations

import signal
from typing import List, Optional

import click
import typer

from loraflow.hub.base import DEFAULT_BASE
from loraflow.hub.cli_common import default_of
from loraflow.hub.hookspecs import hookimpl
from loraflow.serve.launcher import ServerSettings


def serve(
    ctx: typer.Context,
    base: str = typer.Option(DEFAULT_BASE, "--base", help="Base model: alias, folder, .gguf or Hub id."),
    host: str = typer.Option(
        default_of(ServerSettings, "host"), "--host", help="Address to listen on (0.0.0.0 for every interface)."
    ),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="LORAFLOW_API_KEY", help="Require this bearer key on every request."
    ),
    quantization: Optional[str] = typer.Option(
        None,
        "--quantization",
        help="vLLM quantization (default: fp8 on CUDA; int8_per_channel_weight_only on a CPU with AVX512-BF16 or AMX; "
        "none on other CPUs, where int8's bf16 arithmetic is emulated and fp32 serves 3.4x faster; 'none': off).",
    ),
    dtype: Optional[str] = typer.Option(
        None,
        "--dtype",
        help="vLLM activation dtype (default: the checkpoint's on CUDA; bfloat16 on a CPU with AVX512-BF16 or AMX, "
        "or when quantized; float32 otherwise).",
    ),
    max_lora_rank: Optional[int] = typer.Option(
        None,
        "--max-lora-rank",
        help="LoRA rank to reserve (default: the registry's largest, rounded up to one vLLM accepts).",
    ),
    max_loras: int = typer.Option(
        default_of(ServerSettings, "max_loras"), "--max-loras", help="Adapters in one batch at once."
    ),
    max_cpu_loras: Optional[int] = typer.Option(
        None, "--max-cpu-loras", help="Adapters kept loaded (LRU) (default: 2 x --max-loras)."
    ),
    max_model_len: Optional[int] = typer.Option(
        None, "--max-model-len", help="Longest prompt + answer in tokens (default: the model's)."
    ),
    kv_cache_gib: int = typer.Option(
        default_of(ServerSettings, "kv_cache_gib"),
        "--kv-cache-gib",
        help="CPU KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE).",
    ),
    gpu_memory_utilization: float = typer.Option(
        default_of(ServerSettings, "gpu_memory_utilization"),
        "--gpu-memory-utilization",
        help="Fraction of device memory vLLM may take.",
    ),
    tensor_parallel_size: int = typer.Option(
        default_of(ServerSettings, "tensor_parallel_size"),
        "--tensor-parallel-size",
        help="Split the base over this many GPUs.",
    ),
    ready_timeout: float = typer.Option(900, "--ready-timeout", help="Seconds to wait for the engine to become ready."),
    vllm_args: Optional[List[str]] = typer.Argument(None, help="Extra vLLM arguments, after `--`."),
):
    """Serve the base and every registry adapter through vLLM's OpenAI API: NAME is the live version, NAME@V and
    NAME@ALIAS any other; a promote or rollback takes effect from the next request, with no restart."""
    from rich.console import Console

    from loraflow.serve.launcher import start_server

    console = Console()
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _stop_serving)  # also where a parent shell left SIGINT ignored
    registry = ctx.find_root().obj.get("registry")
    server = start_server(
        registry,
        base,
        port,
        host=host,
        api_key=api_key,
        quantization=quantization,
        dtype=dtype,
        max_lora_rank=max_lora_rank,
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        max_model_len=max_model_len,
        kv_cache_gib=kv_cache_gib,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size,
        extra_args=list(vllm_args or []),
    )
    settings = server.settings
    if quantization is None and settings.resolved_quantization() is None and settings.resolved_dtype() == "float32":
        console.print(
            "this CPU has no native bf16 (AVX512-BF16 or AMX), which vLLM's int8 path computes in: serving the base "
            "unquantized in fp32, several times faster here (--quantization int8_per_channel_weight_only forces int8)"
        )
    console.print(
        f"starting vLLM: base {server.base_name}, quantization {settings.resolved_quantization() or 'none'}, "
        f"dtype {settings.resolved_dtype() or 'auto'}, "
        f"max-lora-rank {settings.resolved_lora_rank()}, max-loras {max_loras}; log: {server.log_path}"
    )
    try:
        with console.status("waiting for the engine (polling /health) ..."):
            server.wait_ready(ready_timeout)
        names = [name for name in server.models() if name != server.base_name and "@" not in name]
        console.print(f"[green]serving[/] {server.url}  (OpenAI base_url; registry {settings.registry})")
        console.print(f"  base:     {server.base_name}")
        console.print(f"  adapters: {', '.join(names) or 'none yet (published ones are picked up without a restart)'}")
        console.print("  address a version as NAME@V or NAME@ALIAS; GET /v1/models lists them all. Ctrl-C stops.")
        server.process.wait()
    except KeyboardInterrupt:
        console.print("stopping vLLM ...")  # Ctrl-C or SIGTERM
    finally:
        server.stop()
    if server.process.returncode not in (0, -15, None):
        raise click.ClickException(f"vLLM exited with code {server.process.returncode}; see {server.log_path}")


def _stop_serving(signum, frame):
    raise KeyboardInterrupt


@hookimpl
def register_commands(cli: click.Group) -> None:
    app = typer.Typer()
    app.command("serve", context_settings={"allow_extra_args": True})(serve)
    cli.add_command(typer.main.get_command(app), "serve")
