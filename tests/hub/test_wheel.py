"""The built wheel, not the editable checkout: it installs only `loraflow` and works beside stray hub/plugins/serve."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DECOYS = ("hub", "plugins", "serve")
BUILT_IN = {"sft", "lora", "qlora", "dpo", "ppo"}


def clean_source_copy(folder: Path) -> Path:
    """Tracked and new unignored files only: the working tree as a commit would hold it, without .venv or caches."""
    listing = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout
    for name in filter(None, listing.decode().split("\0")):
        source = REPO / name
        if source.is_file():  # a file deleted or moved in the working tree is still listed from the index
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    return folder


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """`pip install --target` of the wheel, with decoy top-level packages that fail if anything imports them."""
    work = tmp_path_factory.mktemp("wheel")
    source = clean_source_copy(work / "source")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (work / "dist").glob("loraflow-*.whl")
    target = work / "target"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    for name in DECOYS:
        (target / name).mkdir()
        (target / name / "__init__.py").write_text('raise ImportError("decoy")\n')
    return target


def run_in(target: Path, *command: str) -> subprocess.CompletedProcess:
    """PYTHONPATH=target, from inside target: the wheel's `loraflow` comes first and the decoys are importable."""
    env = {**os.environ, "PYTHONPATH": str(target), "COLUMNS": "200"}
    return subprocess.run(command, capture_output=True, text=True, cwd=target, env=env, timeout=120)


def test_the_wheel_installs_only_the_loraflow_namespace(installed_wheel):
    top_level = {path.name for path in installed_wheel.iterdir() if not path.name.endswith(".dist-info")}
    assert top_level == {"loraflow", "bin", *DECOYS}


def test_plugins_list_runs_from_the_wheel_beside_decoy_packages(installed_wheel):
    result = run_in(installed_wheel, str(installed_wheel / "bin" / "loraflow"), "plugins", "list")
    assert result.returncode == 0, result.stderr
    listed = {words[0] for words in map(re.compile(r"[\w-]+").findall, result.stdout.splitlines()) if words}
    assert BUILT_IN <= listed
    assert "failed to load" not in result.stderr and "decoy" not in result.stderr


def test_the_imported_package_is_the_installed_wheel(installed_wheel):
    code = (
        "import loraflow, loraflow.hub, loraflow.plugins.lora, loraflow.serve, loraflow.arena; "
        "print(loraflow.hub.__file__); print(loraflow.plugins.lora.__file__)"
    )
    result = run_in(installed_wheel, sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    for path in result.stdout.split():
        assert Path(path).is_relative_to(installed_wheel), f"{path} is outside the installed wheel"
