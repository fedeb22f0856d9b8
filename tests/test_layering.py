"""Data flows one way: no capvis module imports a module of a layer above its own.

Every import counts, module-level and inside functions (parsed with ``ast``, so nothing is imported).
The layers, lowest first, are :data:`LAYERS`; a new top-level module must be placed in one, or this fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "capvis"
LAYERS: list[set[str]] = [
    {"capvis", "errors", "registry", "config", "config_checks", "storage", "distinfo"},  # capvis: __version__ (see below)
    {"data", "world"},  # world writes label files with data's writer; data never imports world
    {"models"},
    {"tasks"},
    {"train"},
    {"release", "loading"},  # checkpoint and release files -> a model
    {"eval", "interop", "hub"},
    {"demo"},
    {"commands", "cli", "__main__"},
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every ``capvis`` module ``path`` imports (``from capvis import x`` counts as ``capvis.x``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "capvis"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "capvis":
                found |= {f"capvis.{a.name}" if (ROOT / a.name).exists() or (ROOT / f"{a.name}.py").exists()
                          else "capvis" for a in node.names}
            elif node.module.split(".")[0] == "capvis":
                found.add(node.module)
    return found


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "capvis"


GRAPH = {module_name(p): imports(p) for p in sorted(ROOT.rglob("*.py"))}


def test_every_top_level_module_has_a_layer() -> None:
    assert not {top(m) for m in GRAPH} - set(LAYER_OF), "place the new module in LAYERS"


def test_package_root_imports_nothing_at_import_time() -> None:
    """``capvis/__init__`` holds ``__version__`` (what lower modules import it for) and a lazy ``capvis.load``
    facade whose import of ``hub`` runs on first use only: no capvis import at module level."""
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "capvis"))
def test_no_import_from_a_layer_above(module: str) -> None:
    upward = sorted(t for t in GRAPH[module] if LAYER_OF[top(t)] > LAYER_OF[top(module)])
    assert not upward, f"{module} (layer {LAYER_OF[top(module)]}) imports {upward}"


def test_no_cycle_between_top_level_modules() -> None:
    """Within a layer too: loading reads releases, releases never call loading (and so on)."""
    edges = {(top(m), top(t)) for m, targets in GRAPH.items() for t in targets if top(m) != top(t)}
    cycles = sorted((a, b) for a, b in edges if (b, a) in edges and a < b and "capvis" not in (a, b))
    assert not cycles, cycles
