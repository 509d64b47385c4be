"""The package's layers import downwards only, and no module imports another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cdi"

#: What each lower layer may import from cdi besides itself. The orchestration (audit, calibrate, search,
#: pipelines) and the CLI sit on top and may import any of these.
BASE = {"cdi.errors", "cdi.hashing", "cdi.text", "cdi.options"}
ALLOWED = {
    "models": BASE,
    "data": BASE,
    "stats": BASE,
    "report": BASE,
    "features": BASE | {"cdi.models", "cdi.data"},
    "tracking": BASE | {"cdi.search.config"},  # the search's config is a value the layout writes
}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_lower_layer_imports_no_higher_one(layer):
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for module, _ in _imports(path):
            if not module.startswith("cdi.") or module.startswith(f"cdi.{layer}"):
                continue
            assert any(module == ok or module.startswith(ok + ".") for ok in ALLOWED[layer]), \
                f"{path.relative_to(PACKAGE.parent)} imports {module}"


def test_no_module_imports_private_names_of_another_module():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
        for module, names in _imports(path):
            if not module.startswith("cdi"):
                continue
            for name in names:
                own_submodule = module == package and (path.parent / f"{name}.py").exists()
                if name.startswith("_") and not own_submodule:
                    found.append(f"{path.relative_to(PACKAGE.parent)}: {module}.{name}")
            parts = module.split(".")
            if any(p.startswith("_") and p != "__init__" for p in parts) and ".".join(parts[:-1]) != package:
                found.append(f"{path.relative_to(PACKAGE.parent)}: {module}")
    assert not found, found
