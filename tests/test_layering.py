"""The package's layering, read from the source (pure AST: nothing is imported, so this runs in well under a second).

- Front doors (command lines, the demo, the prediction writer) live in ``cfseg/apps/``; no building block (any
  other module of ``cfseg``) imports from ``cfseg.apps``, not even inside a function, and every console script
  of setup.cfg points into it.
- No import cycle among cfseg modules at module level (imports under ``if TYPE_CHECKING:`` are annotations only
  and do not count).
- A function-local ``cfseg`` import says why it is one (a ``# function-local: ...`` comment on the line before
  or on the line itself) and does not hide a cycle: moved to the top of its module it would make none.
- No module imports another module's private (leading underscore) names.
- No module is over :data:`MAX_LINES` lines.
"""

from __future__ import annotations

import ast
import configparser
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cfseg"
FRONT_DOORS = "cfseg.apps"
MAX_LINES = 800
#: modules allowed over MAX_LINES for now (none)
TOO_LONG_FOR_NOW: set[str] = set()


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the cfseg module imported (a package's __init__ where the name is not a submodule)
    names: tuple[str, ...]  # names taken with `from target import ...` (empty for `import target`)
    line: int
    local: bool  # inside a function
    type_checking: bool  # under `if TYPE_CHECKING:`


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = all_modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(module: str, path: Path) -> list[Import]:
    """Every import of a cfseg module in ``path``, with where it sits."""
    found: list[Import] = []

    def visit(node: ast.AST, local: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True, type_checking)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                visit(child, local, True)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "cfseg":
                        found.append(Import(module, alias.name, (), child.lineno, local, type_checking))
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, path, child)
                if base.split(".")[0] != "cfseg":
                    continue
                names = tuple(a.name for a in child.names)
                submodules = [n for n in names if f"{base}.{n}" in MODULES]
                for n in submodules:  # `from cfseg.continual import experts`: the submodule itself
                    found.append(Import(module, f"{base}.{n}", (), child.lineno, local, type_checking))
                rest = tuple(n for n in names if n not in submodules)
                if rest or not submodules:
                    found.append(Import(module, base, rest, child.lineno, local, type_checking))
            else:
                visit(child, local, type_checking)

    visit(ast.parse(path.read_text(), str(path)), False, False)
    return found


IMPORTS = [imp for m, p in MODULES.items() for imp in imports_of(m, p)]


def _where(imp: Import) -> str:
    return f"{MODULES[imp.module].relative_to(ROOT)}:{imp.line}"


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_package_is_parsed():
    assert {"cfseg", "cfseg.module", "cfseg.apps.cli", "cfseg.segmentation", "cfseg.experiments.protocol"} <= set(
        MODULES)
    assert any(imp.module == "cfseg.apps.cli" and imp.target == "cfseg.module" for imp in IMPORTS)


def test_no_building_block_imports_a_front_door():
    bad = [f"{_where(i)}: {i.module} imports {i.target}" for i in IMPORTS
           if not _in(i.module, FRONT_DOORS) and _in(i.target, FRONT_DOORS)]
    assert not bad, "building blocks must not import front doors (cfseg.apps):\n" + "\n".join(bad)
    for package in ("cfseg.continual", "cfseg.experiments"):  # said twice: these two are most tempted
        assert not [i for i in IMPORTS if _in(i.module, package) and _in(i.target, FRONT_DOORS)]


def test_console_scripts_are_front_doors():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = [line.split("=", 1) for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines()]
    assert {name.strip() for name, _ in scripts} >= {"cfseg", "cfseg-synth", "cfseg-data-summary", "cfseg-demo",
                                                     "cfseg-protocol", "cfseg-segment", "cfseg-correct"}
    for name, target in scripts:
        module, _, function = target.strip().partition(":")
        assert _in(module, FRONT_DOORS), f"{name.strip()} = {target.strip()}: front doors live in cfseg/apps/"
        tree = ast.parse(MODULES[module].read_text())
        assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, target


def _graph(extra: list[Import] = ()) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in [*IMPORTS, *extra]:
        if (not imp.local or imp in extra) and not imp.type_checking and imp.target != imp.module:
            graph[imp.module].add(imp.target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycle_at_module_level():
    assert not _cycles(_graph()), "module-level import cycles among cfseg modules"


def test_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_function_local_imports_say_why_and_hide_no_cycle():
    undocumented, hiding = [], []
    for imp in IMPORTS:
        if not imp.local or imp.type_checking:
            continue
        lines = MODULES[imp.module].read_text().splitlines()
        said = lines[imp.line - 1] + "\n" + (lines[imp.line - 2] if imp.line > 1 else "")
        if "# function-local:" not in said:
            undocumented.append(f"{_where(imp)}: {imp.module} imports {imp.target}")
        if imp.target != imp.module and _cycles(_graph([imp])):
            hiding.append(f"{_where(imp)}: {imp.module} imports {imp.target}")
    assert not hiding, "function-local imports hiding an import cycle:\n" + "\n".join(hiding)
    assert not undocumented, ("move these imports to the top of their module, or say why they stay in the "
                              "function (`# function-local: <reason>`):\n" + "\n".join(undocumented))


def test_no_private_names_across_modules():
    bad = [f"{_where(i)}: {i.module} takes {n} from {i.target}" for i in IMPORTS if i.target != i.module
           for n in i.names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "make these names public (or keep them in their module):\n" + "\n".join(bad)


def test_no_private_attributes_of_other_modules():
    """``from cfseg import cosine`` then ``cosine._x``: the same thing as importing ``_x``."""
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in MODULES})
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                                if f"{node.module}.{a.name}" in MODULES})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and aliases[node.value.id] != module and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert not bad, "make these names public:\n" + "\n".join(bad)


def test_no_module_is_too_long():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in MODULES.values()}
    long = {f: n for f, n in lengths.items() if n > MAX_LINES and f not in TOO_LONG_FOR_NOW}
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"
