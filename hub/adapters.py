"""Checking a PEFT LoRA adapter folder before anything trusts it: safetensors only, a readable
config, tensors that fit the base model, and the sha256 of every file."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from loraflow.hub.errors import LoraflowError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "README.md"
LOSS_CURVE_FILE = "loss_curve.png"
# Formats that unpickle on load and can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# What a published adapter folder may hold: the PEFT files, the card, the loss curve, and small text files
# beside them (a tokenizer config, a chat template, notes). Nothing else is copied into the store or served.
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, LOSS_CURVE_FILE)
TEXT_SUFFIXES = (".json", ".md", ".txt", ".jinja", ".yaml", ".yml")
TEXT_MAX_BYTES = 1024 * 1024


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter folder declares about itself."""

    rank: int
    alpha: float
    target_modules: list[str]
    declared_base: str | None
    task_type: str | None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_files(folder: Path) -> list[str]:
    """The names of the files a publish may copy from `folder`, after refusing anything else.

    Only regular files directly in the folder, each with one link and on the allowlist: a symlink or a hard link
    could point at any file the publishing user can read, and the store serves what it holds to every client.
    """
    folder = Path(folder)
    names = []
    for entry in sorted(os.scandir(folder), key=lambda item: item.name):
        path = folder / entry.name
        info = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            raise LoraflowError(
                f"{path}: a symbolic link; publish copies regular files only, so a link cannot carry a file from "
                "elsewhere "
                "into the registry. Replace it with the file itself, or remove it."
            )
        if stat.S_ISDIR(info.st_mode):
            raise LoraflowError(
                f"{path}: a folder; an adapter folder holds files only ({', '.join(ADAPTER_FILES)}). Remove it."
            )
        if not stat.S_ISREG(info.st_mode):
            raise LoraflowError(
                f"{path}: not a regular file (a FIFO, socket or device); remove it from the adapter folder."
            )
        if info.st_nlink > 1:
            raise LoraflowError(
                f"{path}: a hard link ({info.st_nlink} names for one file); publish refuses it because it can share a "
                "file "
                "from elsewhere. Copy it into place instead (cp, not ln)."
            )
        if entry.name in PICKLE_SUFFIXES or path.suffix.lower() in PICKLE_SUFFIXES:
            raise LoraflowError(
                f"{path}: pickle weights are refused because loading them can run arbitrary code. "
                "Re-save the adapter with safetensors: PeftModel.save_pretrained(folder, safe_serialization=True)."
            )
        small_text = path.suffix.lower() in TEXT_SUFFIXES and info.st_size <= TEXT_MAX_BYTES
        if entry.name not in ADAPTER_FILES and not small_text:
            raise LoraflowError(
                f"{path}: not part of an adapter. A published folder holds {', '.join(ADAPTER_FILES)} and text files "
                f"({', '.join(TEXT_SUFFIXES)}) up to {TEXT_MAX_BYTES // 1024} KiB. Remove the file or move it "
                "elsewhere."
            )
        names.append(entry.name)
    return names


def copy_adapter_files(source: Path, target: Path, names: list[str]) -> None:
    """Copy the checked files, opening each without following links: a file swapped for a link meanwhile is refused."""
    for name in names:
        try:
            descriptor = os.open(Path(source) / name, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as error:
            raise LoraflowError(
                f"{Path(source) / name}: changed while publishing ({error.strerror}); publish again."
            ) from None
        with os.fdopen(descriptor, "rb") as reader:
            info = os.fstat(reader.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
                raise LoraflowError(f"{Path(source) / name}: changed while publishing; publish again.")
            with open(Path(target) / name, "wb") as writer:
                for chunk in iter(lambda: reader.read(1 << 20), b""):
                    writer.write(chunk)


def hash_folder(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under folder, keyed by its relative POSIX path."""
    return {
        path.relative_to(folder).as_posix(): sha256_file(path) for path in sorted(folder.rglob("*")) if path.is_file()
    }


def verify_hashes(folder: Path, expected: dict[str, str]) -> None:
    """Raise if any recorded file is missing or changed since it was published."""
    for relative, digest in expected.items():
        path = folder / relative
        if not path.is_file():
            raise LoraflowError(f"{path}: missing; the registry recorded it at publish time. Re-publish the adapter.")
        if sha256_file(path) != digest:
            raise LoraflowError(
                f"{path}: sha256 differs from the registry's record; the file was changed or corrupted after "
                "publishing. Re-publish the adapter or restore the file."
            )


def inspect_adapter(folder: Path) -> AdapterInfo:
    """Validate an adapter folder and return what it declares. Refuses pickle weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoraflowError(f"{folder}: not a folder. Give the folder a trainer wrote (it holds {CONFIG_FILE}).")
    for path in folder.rglob("*"):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise LoraflowError(
                f"{path}: pickle weights are refused because loading them can run arbitrary code. "
                f"Re-save the adapter with safetensors: PeftModel.save_pretrained(folder, safe_serialization=True)."
            )
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise LoraflowError(
            f"{config_path}: missing. A PEFT LoRA adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}."
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise LoraflowError(
            f"{config_path}:{error.lineno}: not valid JSON ({error.msg}). Fix or regenerate the file."
        ) from None
    if config.get("peft_type") != "LORA":
        raise LoraflowError(
            f"{config_path}: peft_type is {config.get('peft_type')!r}; loraflow serves LoRA adapters only."
        )
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise LoraflowError(f"{weights_path}: missing. Save the adapter with safetensors.")
    try:
        with safe_open(str(weights_path), framework="pt") as weights:
            keys = list(weights.keys())
    except Exception as error:  # safetensors raises several types for a damaged file
        raise LoraflowError(
            f"{weights_path}: not a readable safetensors file ({error}). The file is corrupt; re-save it."
        ) from None
    if not any("lora_A" in key for key in keys):
        raise LoraflowError(f"{weights_path}: holds no lora_A tensors; it is not a LoRA adapter.")
    targets = config.get("target_modules") or []
    return AdapterInfo(
        rank=int(config.get("r", 8)),
        alpha=float(config.get("lora_alpha", 8)),
        target_modules=sorted(targets) if isinstance(targets, list) else [str(targets)],
        declared_base=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
    )


def lora_input_sizes(folder: Path) -> dict[str, tuple[int, int]]:
    """Map each adapted module to (in_features, out_features) as its LoRA tensors imply."""
    sizes: dict[str, list[int]] = {}
    with safe_open(str(Path(folder) / WEIGHTS_FILE), framework="pt") as weights:
        for key in weights.keys():
            if ".lora_" not in key:  # modules_to_save (a reward head, say) are whole layers, not LoRA factors
                continue
            shape = weights.get_slice(key).get_shape()
            module = key.split(".lora_")[0]
            entry = sizes.setdefault(module, [0, 0])
            if ".lora_A" in key:
                entry[0] = shape[1]
            elif ".lora_B" in key:
                entry[1] = shape[0]
    return {module: (sizes[module][0], sizes[module][1]) for module in sizes}
