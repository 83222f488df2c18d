"""The layout is the architecture: the data flows one way, so each package imports only the ones beneath it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

# What each package may import from loraflow: hub is the spine; serving and the arena never see each other.
ALLOWED = {
    "hub": {"hub"},
    "plugins": {"hub", "plugins"},
    "serve": {"hub", "serve"},
    "arena": {"hub", "arena"},
}


def loraflow_imports(path: Path) -> set[str]:
    """The loraflow packages a module imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        found |= {name.split(".")[1] for name in names if name.startswith("loraflow.") and name.count(".") >= 1}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_the_packages_beneath_it(package):
    for module in sorted((REPO / package).rglob("*.py")):
        wrong = loraflow_imports(module) - ALLOWED[package]
        assert not wrong, f"{module.relative_to(REPO)} imports loraflow.{', loraflow.'.join(sorted(wrong))}"


def test_the_hub_client_and_server_share_only_the_protocol_module():
    client = ast.dump(ast.parse((REPO / "hub" / "hf.py").read_text()))
    assert "hub_server" not in client
    for module in (REPO / "hub" / "hub_server").glob("*.py"):
        assert "loraflow.hub.hf" not in module.read_text(), module
