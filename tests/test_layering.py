"""Enforce the import direction of DESIGN.md: a lower package of lmforge never imports a higher one.

Every .py file under lmforge/ is parsed with `ast` (never imported) and each `import lmforge.X`,
`from lmforge.X import ...`, `from lmforge import X`, relative import (resolved to absolute) and
`importlib.import_module("lmforge.X")` with a literal name is checked against the ALLOWED table below.

The table is data. Beyond DESIGN.md it records these decisions:
- `assets` (locating offline weights and data) sits beside `common` and may import only `common`.
- Of the top layer, `agents` may use `rag` (retrieval as a tool) and `serve` may use `rag` and `agents`
  (a server can expose both); `rag` imports neither, so the three stay acyclic.
- Importing the bare root package (`from lmforge import __version__`) is allowed everywhere except in
  `lmforge/__init__.py` itself, which imports nothing from lmforge; the root pulls in no other unit.
- Type-only imports (under `if TYPE_CHECKING:`) count too: they still couple a lower layer to a higher one.
- A unit not in the table is a violation, so a new package has to be placed in the order on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "lmforge"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE
ANY = "*"
ROOT = ""  # the unit of lmforge/__init__.py and of `import lmforge`

# unit -> units it may import (besides itself). A unit is lmforge's direct child: a subpackage or module.
ALLOWED: dict[str, frozenset[str]] = {
    ROOT: frozenset(),
    "common": frozenset(),
    "assets": frozenset({"common"}),
    "tokenizer": frozenset({"common", "assets"}),
    "model": frozenset({"common", "assets"}),
    "checkpoint": frozenset({"common", "assets", "tokenizer", "model"}),
    "data": frozenset({"common", "assets", "tokenizer"}),
    "infer": frozenset({"common", "assets", "model"}),  # ids and logits only, never the tokenizer
    # text in, text out (`lmforge generate`, later `lmforge chat`): run dir + tokenizer + infer together
    "textgen": frozenset({"common", "assets", "tokenizer", "model", "checkpoint", "data", "infer"}),
    # text in, vectors out (`lmforge embed`): an encoder run dir + its tokenizer
    "embed": frozenset({"common", "assets", "tokenizer", "model", "checkpoint", "data"}),
    "eval": frozenset({"common", "assets", "tokenizer", "model", "checkpoint", "data", "infer", "textgen",
                       "embed"}),
    "train": frozenset({"common", "assets", "tokenizer", "model", "checkpoint", "data", "infer", "textgen", "embed",
                        "eval"}),
    "compress": frozenset({"common", "assets", "tokenizer", "model", "checkpoint", "data", "infer", "textgen",
                           "embed", "eval", "train"}),
    "rag": frozenset({"common", "assets", "tokenizer", "model", "checkpoint", "data", "infer", "textgen",
                      "embed", "eval", "train", "compress"}),
    "agents": frozenset({"common", "assets", "tokenizer", "model", "checkpoint", "data", "infer", "textgen",
                         "embed", "eval", "train", "compress", "rag"}),
    "serve": frozenset({"common", "assets", "tokenizer", "model", "checkpoint", "data", "infer", "textgen",
                        "embed", "eval", "train", "compress", "rag", "agents"}),
    "cli": frozenset({ANY}),
    "__main__": frozenset({ANY}),
}


def unit_of(module: str) -> str | None:
    """'lmforge.tokenizer.bpe' -> 'tokenizer'; 'lmforge' -> ROOT; a module outside lmforge -> None."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else ROOT


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    """Absolute name of `from <level dots><name> import ...` written in `module`."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(package):
        raise ValueError(f"relative import beyond the top-level package in {module}")
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imported_modules(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in `source`; `from pkg import x` yields pkg.x."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            # `from lmforge import tokenizer` imports the unit lmforge.tokenizer; a non-module name
            # (`from lmforge import __version__`) resolves to the root, see `_target_unit`.
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
            if any(alias.name == "*" for alias in node.names):
                found.append((node.lineno, base))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and _is_import_module(node.func)):
            found.append((node.lineno, node.args[0].value))
    return found


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))


def _target_unit(imported: str) -> str | None:
    """Unit of an imported name; a dunder attribute of the root (`lmforge.__version__`) maps to ROOT."""
    unit = unit_of(imported)
    if unit and unit not in ALLOWED and unit.startswith("__") and unit.endswith("__"):
        return ROOT
    return unit


def find_violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """Import-direction violations of `module` (whose code is `source`) as readable one-line messages."""
    source_unit = unit_of(module)
    if source_unit not in ALLOWED:
        return [f"{module}: unit '{source_unit}' is not in ALLOWED of tests/test_layering.py; place it"]
    allowed = ALLOWED[source_unit]
    violations = []
    for line, imported in imported_modules(module, source, is_package):
        target = _target_unit(imported)
        if target is None or target == source_unit or ANY in allowed:
            continue
        if target == ROOT and source_unit != ROOT:
            continue
        if target not in allowed:
            violations.append(f"{module}:{line} imports {imported}: '{source_unit or PACKAGE}' may import "
                              f"only {sorted(allowed) or 'nothing from lmforge'}")
    return violations


def _module_name(path: Path) -> tuple[str, bool]:
    """Dotted module name of a file under lmforge/ and whether it is a package's __init__."""
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


SOURCE_FILES = sorted(PACKAGE_DIR.rglob("*.py"))


def test_every_file_parses():
    failures = []
    for path in SOURCE_FILES:
        try:
            ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as e:
            failures.append(f"{path}:{e.lineno}: {e.msg}")
    assert SOURCE_FILES and not failures, failures


def test_import_direction():
    violations = []
    for path in SOURCE_FILES:
        module, is_package = _module_name(path)
        try:
            violations += find_violations(module, path.read_text(encoding="utf-8"), is_package)
        except SyntaxError:
            continue  # reported by test_every_file_parses
    assert not violations, "\n".join(violations)


def test_allowed_table_is_acyclic_and_closed():
    """Every allowed unit exists, and no two units may import each other through any chain."""
    for unit, allowed in ALLOWED.items():
        assert allowed <= set(ALLOWED) - {ROOT} or allowed == {ANY}, unit
    layered = {u: a for u, a in ALLOWED.items() if ANY not in a}
    for unit in layered:
        reachable, frontier = set(), set(layered[unit])
        while frontier:
            reachable |= frontier
            frontier = set().union(*(layered[u] for u in frontier)) - reachable
        assert unit not in reachable, f"cycle through {unit}"


@pytest.mark.parametrize(
    ("module", "source", "is_package"),
    [
        ("lmforge.tokenizer.bpe", "import lmforge.model.x", False),
        ("lmforge.tokenizer.bpe", "from lmforge.model import decoder", False),
        ("lmforge.tokenizer.bpe", "from lmforge import model", False),
        ("lmforge.tokenizer.bpe", "from ..model.layers import RMSNorm", False),
        ("lmforge.tokenizer", "from ..data import sources", True),
        ("lmforge.infer.x", "import lmforge.tokenizer", False),
        ("lmforge.infer.generate", "def f():\n    from lmforge.data.sft import y\n", False),
        ("lmforge.model.decoder", "import importlib\nimportlib.import_module('lmforge.train.loop')", False),
        ("lmforge.common", "from lmforge import tokenizer", False),
        ("lmforge.rag.pipeline", "from lmforge.agents import tools", False),
        ("lmforge.rag.pipeline", "from lmforge.serve import server", False),
        ("lmforge", "from lmforge.common import LmforgeError", True),
        ("lmforge", "from . import common", True),
        ("lmforge.newthing.x", "import os", False),
        ("lmforge.tokenizer.bpe", "import lmforge.newthing", False),
    ],
)
def test_violations_are_found(module, source, is_package):
    assert find_violations(module, source, is_package)


@pytest.mark.parametrize(
    ("module", "source", "is_package"),
    [
        ("lmforge.tokenizer.bpe", "import os\nimport regex\nfrom lmforge.common import LmforgeError", False),
        ("lmforge.tokenizer.bpe", "from . import pretokenize\nfrom .formats import save", False),
        ("lmforge.tokenizer.bpe", "from .. import common\nfrom ..assets import find", False),
        ("lmforge.tokenizer", "from .bpe import BPETokenizer", True),
        ("lmforge.data.pretrain", "from lmforge.tokenizer.bpe import BPETokenizer", False),
        ("lmforge.checkpoint.run", "from lmforge import __version__\nimport lmforge.model.lora", False),
        ("lmforge.agents.react", "from lmforge.rag.pipeline import answer", False),
        ("lmforge.serve.server", "from lmforge.agents import react\nfrom lmforge.rag import index", False),
        ("lmforge.cli", "import lmforge.serve.server\nfrom lmforge.tokenizer import stats", False),
        ("lmforge.__main__", "from lmforge.cli import main", False),
        ("lmforge", "__version__ = '0.1.0'", True),
    ],
)
def test_allowed_imports_pass(module, source, is_package):
    assert find_violations(module, source, is_package) == []


def test_relative_import_beyond_top_level_is_an_error():
    with pytest.raises(ValueError, match="beyond the top-level"):
        find_violations("lmforge.common", "from .. import x")
