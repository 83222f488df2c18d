"""`loraflow serve`: the vLLM OpenAI-compatible server for one quantized base and every registry adapter."""

from __future__ import annotations

import functools
import signal
from typing import Callable, List, Optional

import click
import typer

from loraflow.hub.base import DEFAULT_BASE
from loraflow.hub.cli_common import default_of, registry_from
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
    replicas: Optional[int] = typer.Option(
        None,
        "--replicas",
        min=1,
        help="Run N vLLM replicas as a Ray Serve application behind one address, with adapter-affinity routing "
        "(default: one vLLM process, no Ray). Needs the fleet extra: pip install 'loraflow[fleet]'.",
    ),
    ray_address: Optional[str] = typer.Option(
        None,
        "--ray-address",
        help="With --replicas: join this Ray cluster (started with `ray start`; e.g. HOST:6379) instead of starting "
        "a local Ray. Every node must reach the registry and the base at the same paths, or use a registry URL.",
    ),
    vllm_args: Optional[List[str]] = typer.Argument(None, help="Extra vLLM arguments, after `--`."),
):
    """Serve the base and every registry adapter through vLLM's OpenAI API: NAME is the live version, NAME@V and
    NAME@ALIAS any other; a promote or rollback takes effect from the next request, with no restart."""
    from rich.console import Console

    from loraflow.serve.launcher import start_server

    console = Console()
    if ray_address and replicas is None:
        raise click.UsageError("--ray-address places replicas on a Ray cluster; give --replicas N as well.")
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _stop_serving)  # also where a parent shell left SIGINT ignored
    registry = ctx.find_root().obj.get("registry")
    launcher_settings = dict(
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
    if replicas is not None:
        return _serve_fleet(
            console, registry, base, replicas, host, port, ray_address, ready_timeout, launcher_settings
        )
    server = start_server(registry, base, port, host=host, **launcher_settings)
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
        console.print(f"  metrics:  {server.root_url}/metrics (Prometheus; loraflow_* per version)")
        server.process.wait()
    except KeyboardInterrupt:
        console.print("stopping vLLM ...")  # Ctrl-C or SIGTERM
    finally:
        server.stop()
    if server.process.returncode not in (0, -15, None):
        raise click.ClickException(f"vLLM exited with code {server.process.returncode}; see {server.log_path}")


def _serve_fleet(console, registry, base, replicas, host, port, ray_address, ready_timeout, launcher_settings):
    try:
        from loraflow.serve.fleet import start_fleet
    except ImportError as error:
        raise click.ClickException(
            f"--replicas needs Ray Serve ({error}). Install the fleet extra: pip install 'loraflow[fleet]'."
        ) from None
    where = f"the Ray cluster at {ray_address}" if ray_address else "a local Ray"
    console.print(f"starting {replicas} vLLM replica(s) on {where} (Ctrl-C stops) ...")
    try:
        with console.status("waiting for every replica's engine ..."):
            fleet = start_fleet(registry, base, replicas, port, host, ray_address, ready_timeout, **launcher_settings)
    except KeyboardInterrupt:
        console.print("stopped before the fleet was ready")
        return
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _stop_serving)  # again: Ray's driver replaces the handler with one that aborts
    with fleet:
        status = fleet.status()
        console.print(f"[green]serving[/] {fleet.url}  (OpenAI base_url; registry {fleet.registry})")
        for replica in status["replicas"]:
            console.print(f"  replica {replica['replica']}: vLLM log {replica['vllm_log']}")
        serves = ", ".join(f"{name} → {ref}" for name, ref in status["serves"].items())
        console.print(f"  adapters: {serves or 'none yet (published ones are picked up without a restart)'}")
        console.print(f"  metrics:  {fleet.root_url}/metrics (Prometheus; loraflow_* per version and replica)")
        console.print(
            "  each answer names its version (x-loraflow-version) and replica (x-loraflow-replica); "
            "`loraflow promote` waits until every replica serves the new version."
        )
        try:
            signal.pause()
        except KeyboardInterrupt:
            console.print("stopping the fleet ...")


def _stop_serving(signum, frame):
    raise KeyboardInterrupt


def wait_for_fleets(command: click.Command, name_of: Callable[[dict], str]) -> None:
    """Make a lifecycle command (`promote`, `rollback`) return only once every fleet that `loraflow serve --replicas`
    runs on this registry from this machine serves NAME with the new live version."""
    options = typer.main.get_command(_options_app(_fleet_options)).params
    command.params += [option for option in options if option.name in ("fleet_timeout", "api_key")]
    change_registry = command.callback

    @functools.wraps(change_registry)
    def callback(fleet_timeout: float, api_key: Optional[str], **arguments):
        from rich.console import Console

        from loraflow.serve.fleet_ack import fleet_status, running_fleets, wait_until_fleet_serves

        registry = registry_from(typer.main.get_current_context())  # typer's own click, which runs this command
        fleets = running_fleets(registry.path) if fleet_timeout > 0 else []
        for fleet in fleets:
            fleet_status(fleet.url, api_key)  # fails here, before the registry changes, if the fleet cannot answer
        result = change_registry(**arguments)
        name = name_of(arguments)
        live, revision = registry.live(name), registry.revision
        for fleet in fleets:
            ack = wait_until_fleet_serves(fleet.url, live.ref, revision, api_key, fleet_timeout)
            Console().print(
                f"  fleet {fleet.url}: every replica ({', '.join(ack.replicas)}) serves {name} as {live.ref} "
                f"({ack.seconds:.2f} s)"
            )
        return result

    command.callback = callback


def _fleet_options(
    fleet_timeout: float = typer.Option(
        60,
        "--fleet-timeout",
        help="Seconds to wait until every replica of a running `loraflow serve --replicas` fleet serves the new "
        "version; 0: do not wait.",
    ),
    api_key: Optional[str] = typer.Option(
        None,
        "--api-key",
        envvar="LORAFLOW_API_KEY",
        help="The fleet's API key (its --api-key), to ask it which version it serves.",
    ),
):
    """The options `wait_for_fleets` adds to a lifecycle command."""


def _options_app(function: Callable) -> typer.Typer:
    app = typer.Typer()
    app.command()(function)
    return app


@hookimpl
def register_commands(cli: click.Group) -> None:
    app = typer.Typer()
    app.command("serve", context_settings={"allow_extra_args": True})(serve)
    cli.add_command(typer.main.get_command(app), "serve")
    wait_for_fleets(cli.commands["promote"], lambda arguments: arguments["ref"].partition("@")[0])
    wait_for_fleets(cli.commands["rollback"], lambda arguments: arguments["name"])
