"""The one place that starts vLLM: its OpenAI-compatible server with one base and every registry adapter.

`start_server(registry, base)` builds the command line and environment, starts
`python -m vllm.entrypoints.openai.api_server` in its own process group, and returns a `VLLMServer`
whose `wait_ready()` polls `/health` until the engine answers. The registry location reaches the
server's processes through LORAFLOW_REGISTRY, where the `loraflow.serve.resolver` vLLM plugin reads it: a file,
or the URL of a `loraflow hub serve` that replicas on other machines share. The server's /metrics carries
`loraflow.serve.metrics` per version, labelled with LORAFLOW_REPLICA (HOST:PORT unless a fleet names the replica).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loraflow.hub.base import DEFAULT_BASE, BaseModel, resolve_base
from loraflow.hub.devices import cpu_fast_bf16, on_gpu
from loraflow.hub.errors import LoraflowError
from loraflow.hub.registry import Registry, is_registry_url, registry_location
from loraflow.serve.metrics import REPLICA_ENV
from loraflow.serve.naming import open_registry_view, resolver_cache_size
from loraflow.serve.remote_registry import ADAPTER_CACHE_ENV, adapter_cache_gb

# The ranks vLLM 0.32 accepts for --max-lora-rank (vllm/config/lora.py MaxLoRARanks).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's int8 weight-only CPU path computes in bf16 (or fp16; it refuses fp32). Where the CPU runs bf16 natively
# (AVX512-BF16, AMX) that is the fast path; on an AVX2-only CPU PyTorch emulates bf16 and fp16 matmuls, and there
# SmolLM2-135M served 22.0 tok/s int8 (bf16) against 75.3 tok/s unquantized fp32 (bench/serve_dtype.py, README).
CPU_QUANTIZATION = "int8_per_channel_weight_only"
# On CUDA, vLLM's online fp8: weights quantized at load to half of bf16, with LoRA applied on top; from compute
# capability 7.5 (Marlin weight-only kernels below 8.9, native fp8 from 8.9). vLLM 0.32 dropped bitsandbytes.
GPU_QUANTIZATION = "fp8"
GPU_QUANTIZATION_MIN_CAPABILITY = (7, 5)
HEALTH_POLL_S = 0.25
KEEP_ALIVE_S = 75  # seconds an idle HTTP connection stays open; longer than any common client keeps one


def default_quantization() -> str | None:
    """The quantization `loraflow serve` uses unless told: a quantized base on GPUs (fp8) and on CPUs that compute
    bf16 natively (int8); unquantized fp32 on a CPU that would emulate the int8 path's bf16 arithmetic."""
    import torch

    if on_gpu():
        return GPU_QUANTIZATION if torch.cuda.get_device_capability() >= GPU_QUANTIZATION_MIN_CAPABILITY else None
    return CPU_QUANTIZATION if cpu_fast_bf16() else None


def default_dtype(quantization: str | None) -> str | None:
    """The activation dtype unless told: the checkpoint's (bf16) on GPUs; on a CPU bf16 where it runs natively or
    the quantization needs it, fp32 elsewhere. None leaves it to vLLM."""
    if on_gpu():
        return None
    return "bfloat16" if cpu_fast_bf16() or quantization else "float32"


def lora_rank_for(registry_rank: int) -> int:
    """The smallest rank vLLM accepts that holds every adapter; 16 (vLLM's default) for an empty registry."""
    if registry_rank <= 0:
        return 16
    for rank in VLLM_LORA_RANKS:
        if rank >= registry_rank:
            return rank
    raise LoraflowError(
        f"the registry holds an adapter of rank {registry_rank}, above vLLM's largest --max-lora-rank "
        f"{VLLM_LORA_RANKS[-1]}. Retrain it with a smaller rank (--lora-r)."
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class ServerSettings:
    """Everything that shapes one vLLM server; the defaults fit a 2-core CPU machine."""

    registry: str  # a registry file, or the URL of a `loraflow hub serve`
    base: BaseModel
    host: str = "127.0.0.1"
    port: int | None = None
    api_key: str | None = None
    quantization: str | None = None  # None: default_quantization(); "none": unquantized
    dtype: str | None = None  # None: default_dtype() for the quantization
    max_lora_rank: int | None = None  # None: the registry's largest rank, rounded up to one vLLM accepts
    max_loras: int = 8
    max_cpu_loras: int | None = None  # None: 2 x max_loras, so swapped-out versions stay warm (LRU)
    resolver_cache: int | None = None  # versions kept resolved; None: LORAFLOW_RESOLVER_CACHE or 1024
    max_model_len: int | None = None
    kv_cache_gib: int = 1
    gpu_memory_utilization: float = 0.3
    tensor_parallel_size: int = 1
    extra_args: list[str] = field(default_factory=list)
    log_path: Path | None = None
    replica: str | None = None  # the `replica` label of its metrics; None: HOST:PORT
    die_with_parent: bool = False  # vLLM ends when the process that started it ends (a fleet replica's)

    def resolved_quantization(self) -> str | None:
        if self.quantization == "none":
            return None
        return default_quantization() if self.quantization is None else self.quantization

    def resolved_dtype(self) -> str | None:
        return self.dtype or default_dtype(self.resolved_quantization())

    def resolved_max_cpu_loras(self) -> int:
        return self.max_cpu_loras or 2 * self.max_loras

    def resolved_resolver_cache(self) -> int:
        """Never below --max-cpu-loras: the table forgets a version about when the engine's LRU does, not before."""
        return max(self.resolver_cache or resolver_cache_size(), self.resolved_max_cpu_loras())

    def resolved_lora_rank(self) -> int:
        return self.max_lora_rank or lora_rank_for(open_registry_view(self.registry, poll_s=0).snapshot().max_rank())

    def command(self) -> list[str]:
        guard = (
            [sys.executable, "-m", "loraflow.serve.die_with_parent", str(os.getpid())] if self.die_with_parent else []
        )
        command = guard + [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.base.path),
            "--served-model-name",
            self.base.served_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--enable-lora",
            "--max-lora-rank",
            str(self.resolved_lora_rank()),
            "--max-loras",
            str(self.max_loras),
            "--max-cpu-loras",
            str(self.resolved_max_cpu_loras()),
            "--gpu-memory-utilization",
            str(self.gpu_memory_utilization),
            "--tensor-parallel-size",
            str(self.tensor_parallel_size),
            "--disable-uvicorn-access-log",
            "--middleware",
            "loraflow.serve.metrics.MetricsMiddleware",
        ]
        dtype = self.resolved_dtype()
        if dtype:
            command += ["--dtype", dtype]
        quantization = self.resolved_quantization()
        if quantization:
            command += ["--quantization", quantization]
        if self.max_model_len:
            command += ["--max-model-len", str(self.max_model_len)]
        if self.api_key:
            command += ["--api-key", self.api_key]
        return command + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "LORAFLOW_REGISTRY": self.registry,
            "LORAFLOW_BASE_FINGERPRINT": self.base.fingerprint,
            "LORAFLOW_MAX_LORA_RANK": str(self.resolved_lora_rank()),
            "LORAFLOW_RESOLVER_CACHE": str(self.resolved_resolver_cache()),
            REPLICA_ENV: self.replica or f"{self.host}:{self.port}",
            # Read here too, so a bad value fails `loraflow serve` at once rather than inside vLLM's plugin.
            ADAPTER_CACHE_ENV: str(adapter_cache_gb()),
            # vLLM consults LoRA resolvers only when runtime LoRA updating is allowed.
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib)),
            "TOKENIZERS_PARALLELISM": "false",
            # Idle connections outlive the clients' (httpx and the openai client drop theirs after 5 s): at vLLM's
            # own 5 s, a client can reuse a connection at the moment the server closes it, and that request fails.
            "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": os.environ.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(KEEP_ALIVE_S)),
        }


class VLLMServer:
    """A running vLLM server this process started; a context manager that stops it on exit."""

    def __init__(self, settings: ServerSettings, process: subprocess.Popen, log_path: Path):
        self.settings = settings
        self.process = process
        self.log_path = log_path
        self.base_name = settings.base.served_name

    @property
    def root_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    @property
    def url(self) -> str:
        """The OpenAI base_url: http://HOST:PORT/v1."""
        return self.root_url + "/v1"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = 600) -> "VLLMServer":
        """Poll /health until it answers 200; fail early, with the log's tail, if vLLM exits."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5) as client:
            while True:
                if self.process.poll() is not None:
                    raise LoraflowError(
                        f"vLLM exited with code {self.process.returncode} before it was ready. "
                        f"Its log ({self.log_path}) ends with:\n{self.log_tail()}"
                    )
                try:
                    if client.get(self.root_url + "/health").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    self.stop()
                    raise LoraflowError(
                        f"vLLM did not become ready within {timeout_s:.0f} s. Its log ({self.log_path}) ends with:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(HEALTH_POLL_S)  # the interval between two health polls, not a readiness guess

    def models(self) -> list[str]:
        headers = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        response = httpx.get(self.url + "/models", headers=headers, timeout=10)
        response.raise_for_status()
        return [card["id"] for card in response.json()["data"]]

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM the server's process group (API server, engine core, workers), then SIGKILL stragglers."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # workers left behind by a clean exit
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "VLLMServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    registry: str | os.PathLike | None = None,
    base: str | BaseModel = DEFAULT_BASE,
    port: int | None = None,
    **settings,
) -> VLLMServer:
    """Start vLLM for `base` with every adapter in `registry` addressable by name. Call `.wait_ready()` next."""
    base_model = base if isinstance(base, BaseModel) else resolve_base(base)
    location = registry_location(registry)
    location = location if is_registry_url(location) else str(Registry(location).path)
    server_settings = ServerSettings(registry=location, base=base_model, port=port, **settings)
    server_settings.port = server_settings.port or free_port(server_settings.host)
    server_settings.max_lora_rank = server_settings.resolved_lora_rank()  # once: a registry URL costs a fetch
    log_path = server_settings.log_path or Path(tempfile.mkstemp(prefix="loraflow-vllm-", suffix=".log")[1])
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            server_settings.command(),
            env=server_settings.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so stop() reaches the engine and worker processes
        )
    return VLLMServer(server_settings, process, Path(log_path))
