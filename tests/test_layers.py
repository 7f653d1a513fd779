"""The layers import one way: backbone ← engine ← tasks and data recipes ← commands.

Every import of every module is read from its syntax tree, those inside functions included, so a lazy import
cannot hide a cycle. The backbone (titans_cli/backbone/) needs torch and the standard library only.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("titans_cli.commands", "titans_cli.cli", "titans_cli.__main__")
# layer (a package prefix) -> the prefixes its modules must never import
FORBIDDEN = {
    "titans_cli.backbone": ("titans_cli.engine", "tasks", "data_recipes", *COMMANDS),
    "titans_cli.engine": ("tasks", "data_recipes", *COMMANDS),
    "tasks": COMMANDS,
    "data_recipes": ("tasks", *COMMANDS),
}
BACKBONE_THIRD_PARTY = {"torch", "triton"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file (absolute names; `from a import b` yields a and a.b)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _modules(prefix: str) -> list[Path]:
    folder = ROOT.joinpath(*prefix.split("."))
    return sorted(folder.rglob("*.py"))


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer):
    paths = _modules(layer)
    assert paths, f"no modules under {layer}"
    bad = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in paths
        for module in sorted(_imports(path))
        if any(_under(module, banned) for banned in FORBIDDEN[layer])
    ]
    assert not bad, "\n".join(bad)


def test_backbone_needs_torch_and_the_standard_library_only():
    bad = []
    for path in _modules("titans_cli.backbone"):
        for module in sorted(_imports(path)):
            top = module.split(".")[0]
            if _under(module, "titans_cli.backbone") or top in sys.stdlib_module_names or top == "__future__":
                continue
            if top not in BACKBONE_THIRD_PARTY:
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_imports_inside_functions():
    # An import cycle once hid in function bodies; the checker must read them.
    module = ROOT / "titans_cli" / "engine" / "evaluate.py"
    assert "titans_cli.engine.checkpoint" in _imports(module)  # imported inside evaluate_run
