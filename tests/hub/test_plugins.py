"""The plugin spine: built-in and third-party trainers are found, broken plugins are reported, hooks are covered."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow.hub import hookspecs
from loraflow.hub.plugins import get_plugins
from tests.conftest import FIXTURES, PIRATE, REPO, run_loraflow

BUILT_IN = {"sft", "lora", "qlora", "dpo", "ppo", "kto", "cpt"}


def source_copy(package: Path, tmp_path: Path) -> Path:
    """pip builds in the source folder; a copy keeps the repository clean."""
    return Path(shutil.copytree(package, tmp_path / package.name))


def pip_install_target(package: Path, target: Path) -> Path:
    """Install a plugin package into its own folder, leaving the project's venv untouched."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source_copy(package, target.parent / f"{target.name}-source")),
        ],
        check=True,
        capture_output=True,
    )
    return target


@pytest.fixture(scope="module")
def identity_plugin(tmp_path_factory) -> Path:
    return pip_install_target(FIXTURES / "loraflow-identity", tmp_path_factory.mktemp("identity-plugin"))


@pytest.fixture(scope="module")
def broken_plugin(tmp_path_factory) -> Path:
    return pip_install_target(FIXTURES / "loraflow-broken", tmp_path_factory.mktemp("broken-plugin"))


def test_built_in_trainers_come_from_our_entry_points():
    plugins = get_plugins()
    assert BUILT_IN <= set(plugins.trainers)
    for name in BUILT_IN:
        info = plugins.trainers[name]
        assert info.source.package == "loraflow"
        assert info.description
    assert plugins.failures == []


def test_plugins_are_loaded_once():
    assert get_plugins() is get_plugins()


def test_third_party_plugin_is_listed_and_trains(identity_plugin, tiny_base, tmp_path):
    env = {"PYTHONPATH": f"{identity_plugin}:{REPO}"}
    listing = run_loraflow("plugins", "list", env=env).stdout
    assert "identity" in listing and "loraflow-identity" in listing and "0.3.0" in listing
    registry = tmp_path / "registry.json"
    run_loraflow(
        "--registry",
        str(registry),
        "train",
        "identity",
        "--data",
        str(PIRATE / "train.jsonl"),
        "--name",
        "baseline",
        "--base",
        str(tiny_base.path),
        "--lora-r",
        "2",
        env=env,
    )
    shown = run_loraflow("--registry", str(registry), "registry", "show", "baseline@1", env=env).stdout
    assert '"name": "identity"' in shown and '"package": "loraflow-identity"' in shown and '"r": 2' in shown


def test_allowlist_limits_external_plugins(identity_plugin):
    env = {"PYTHONPATH": f"{identity_plugin}:{REPO}", "LORAFLOW_PLUGINS": "some-other-plugin"}
    listing = run_loraflow("plugins", "list", env=env).stdout
    assert "identity" not in listing
    assert "lora" in listing  # built-ins always load
    allowed = run_loraflow("plugins", "list", env={**env, "LORAFLOW_PLUGINS": "loraflow-identity"}).stdout
    assert "identity" in allowed


def test_broken_plugin_is_reported_and_others_still_work(broken_plugin):
    result = run_loraflow("plugins", "list", env={"PYTHONPATH": f"{broken_plugin}:{REPO}"})
    assert "lora" in result.stdout
    assert "broken" in result.stderr and "loraflow-broken" in result.stderr
    assert "a_module_that_does_not_exist" in result.stderr


def test_plugins_install_discovers_new_trainer(tmp_path):
    """`loraflow plugins install` in a throwaway venv that sees our packages, so the project venv stays untouched."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site, venv_site = (purelib(interpreter) for interpreter in (sys.executable, python))
    # addsitedir runs the project venv's own .pth files too, among them the editable install's `loraflow` finder.
    Path(venv_site, "project-venv.pth").write_text(f"import site; site.addsitedir({site!r})\n")
    result = subprocess.run(
        [
            str(python),
            "-m",
            "loraflow.hub.cli",
            "plugins",
            "install",
            "--",
            "--no-deps",
            "--no-build-isolation",
            str(source_copy(FIXTURES / "loraflow-identity", tmp_path)),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "new trainers: identity" in result.stdout
    assert not list(Path(site).glob("loraflow_identity*"))


def purelib(python) -> str:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def _hook_names() -> list[str]:
    return [name for name, value in inspect.getmembers(hookspecs) if getattr(value, "loraflow_spec", None)]


def test_every_hook_is_documented():
    for name in _hook_names():
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "Receives" in doc and "Returns" in doc, f"hook {name} must say what it receives and returns"


def test_every_hook_has_a_test():
    tests = "".join(path.read_text() for path in (REPO / "tests").rglob("test_*.py"))
    for name in _hook_names():
        assert f"hook_{name}" in tests or f"test_{name}" in tests, f"no test mentions hook {name}"


def test_register_trainers():
    assert "lora" in get_plugins().trainers


def test_register_commands():
    help_text = run_loraflow("--help").stdout
    for command in ("train", "registry", "plugins", "base"):
        assert command in help_text


def test_readme_shows_the_fixture_plugin_verbatim():
    readme = (REPO / "README.md").read_text()
    module = (FIXTURES / "loraflow-identity" / "loraflow_identity.py").read_text()
    assert module in readme
    assert '[project.entry-points.loraflow]\nidentity = "loraflow_identity"' in readme
    assert len(module.splitlines()) + 2 < 30


def test_every_public_name_is_documented_in_the_package_docstring():
    import loraflow

    for name in loraflow.__all__:
        assert f"\n    {name} " in loraflow.__doc__, f"loraflow.{name} is exported but loraflow/__init__.py omits it"


def test_the_fixture_plugin_imports_only_the_public_api():
    import ast

    module = ast.parse((FIXTURES / "loraflow-identity" / "loraflow_identity.py").read_text())
    imported = {node.module for node in ast.walk(module) if isinstance(node, ast.ImportFrom) and node.module}
    assert {name for name in imported if name.startswith("loraflow")} == {"loraflow"}


def test_an_allowlisted_name_that_matches_nothing_is_reported(identity_plugin):
    env = {"PYTHONPATH": f"{identity_plugin}:{REPO}", "LORAFLOW_PLUGINS": "doesnotexist, loraflow_identity"}
    result = run_loraflow("plugins", "list", env=env)
    assert "identity" in result.stdout, "a distribution name matches however it spells - and _"
    assert "'doesnotexist'" in result.stderr and "no installed distribution or loraflow entry point" in result.stderr
    assert "loraflow_identity" not in result.stderr


def test_an_installed_distribution_without_entry_points_is_named_as_such(monkeypatch):
    from loraflow.hub import plugins

    monkeypatch.setenv("LORAFLOW_PLUGINS", "pluggy")
    failures = plugins.get_plugins.__wrapped__().failures
    assert [failure.source.entry_point for failure in failures] == ["pluggy"]
    assert "pluggy is installed but declares no [project.entry-points.loraflow] entry point" in failures[0].error
