"""The package's layout: layers import downwards only, no import cycle (imports inside functions
count; only those under `if TYPE_CHECKING:` are left out), no private name imported across
modules, libp2p and the MCP SDK each behind one layer, small modules, a small top level."""

from __future__ import annotations

import ast
from pathlib import Path

import mcpp

ROOT = Path(mcpp.__file__).parent
# lowest first; a module may import its own layer and those below it
LAYERS: list[tuple[str, ...]] = [
    ("mcpp", "mcpp.config", "mcpp.errors", "mcpp.log", "mcpp.metrics"),
    ("mcpp.net",),
    ("mcpp.node",),
    ("mcpp.queue",),
    ("mcpp.workflow",),
    ("mcpp.mcp",),
    ("mcpp.runner",),
    ("mcpp.harness",),
    ("mcpp.evidence",),
    ("mcpp.cli", "mcpp.__main__"),
]
MAX_LINES = 800
MAX_TOP_LEVEL_MODULES = 12


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ["mcpp", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    best = -1
    for rank, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if module == p or (p != "mcpp" and module.startswith(p + ".")):
                best = rank
    assert best >= 0, f"{module} is in no layer: add it to LAYERS"
    return best


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every import, skipping `if TYPE_CHECKING:` blocks."""
    found: list[tuple[str, list[str], int]] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    walk(other)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    found.append((a.name, [], child.lineno))
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, [a.name for a in child.names], child.lineno))
            walk(child)

    walk(tree)
    return found


def _edges() -> dict[str, set[str]]:
    """module -> the mcpp modules importing it executes (a submodule named in `from X import
    name` counts as X.name; the packages above a target count too, but not the importer's own)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        own_parents = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
        if path.name == "__init__.py":
            own_parents.add(mod)
        for target, names, _ in _imports(ast.parse(path.read_text())):
            if not target.startswith("mcpp"):
                continue
            targets = {f"{target}.{n}" if f"{target}.{n}" in MODULES else target for n in names} or {target}
            for t in targets:
                parts = t.split(".")
                for i in range(1, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep in MODULES and dep not in own_parents and dep != mod:
                        graph[mod].add(dep)
    return graph


def test_every_module_imports_only_its_own_layer_or_lower() -> None:
    wrong = []
    for mod, deps in _edges().items():
        for dep in deps:
            if _layer(dep) > _layer(mod):
                wrong.append(f"{mod} (layer {_layer(mod)}) imports {dep} (layer {_layer(dep)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    graph = _edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_name_is_imported_from_another_module() -> None:
    wrong = []
    for mod, path in MODULES.items():
        for target, names, line in _imports(ast.parse(path.read_text())):
            if target.startswith("mcpp"):
                wrong += [f"{mod}:{line} imports {n} from {target}" for n in names if n.startswith("_") and n != "__version__"]
    assert not wrong, "\n".join(wrong)


def test_libp2p_only_in_the_network_layer_and_the_mcp_sdk_only_in_the_mcp_surface() -> None:
    wrong = []
    for mod, path in MODULES.items():
        for target, _, line in _imports(ast.parse(path.read_text())):
            top = target.split(".")[0]
            if top == "libp2p" and not mod.startswith("mcpp.net"):
                wrong.append(f"{mod}:{line} imports {target}")
            if top == "mcp" and not mod.startswith("mcpp.mcp"):
                wrong.append(f"{mod}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_modules_are_small_and_the_top_level_is_small() -> None:
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_every_subpackage_says_what_it_owns_and_may_import() -> None:
    for init in ROOT.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init} has no docstring"
        assert "import" in doc, f"{init}'s docstring does not say what the package may import"


def test_the_checks_see_a_cycle_and_a_layer_violation() -> None:
    """The checks above are not vacuous: the node must import its lower layers, and a function-level
    import is found."""
    graph = _edges()
    assert "mcpp.net.rpc" in graph["mcpp.node.core"]
    assert "mcpp.node" in graph["mcpp.runner"] and "mcpp.mcp.server" in graph["mcpp.runner"]
    # cli.py imports every verb inside its functions
    assert "mcpp.evidence.bench" in graph["mcpp.cli"]


def test_the_cli_loads_a_layer_only_when_its_verb_runs() -> None:
    """`mcpp healthcheck` runs every 5 s in each container: building the parser must not import
    the mcp SDK, libp2p or the node (a regression made it take 1.7 s of CPU instead of 0.3 s)."""
    import subprocess
    import sys

    code = ("import sys; import mcpp.cli; mcpp.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mcp', 'libp2p') "
            "or m.startswith(('mcpp.node', 'mcpp.net', 'mcpp.queue'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
