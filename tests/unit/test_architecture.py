"""The shape of the library: no import cycles, no private names borrowed across packages, Airflow only
under ``airloom.airflow``, and every module importable on its own.

The import graph is read from the source with ``ast``, so it sees every import, including those inside
functions (which hide a cycle from ``import`` but not from a reader): ``import a.b``,
``from a import b`` (an edge to the submodule ``a.b`` when ``b`` is one), relative imports at any level.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "include"


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (or the module a name is imported from)
    name: str | None  # the name imported from ``target`` when it is not a submodule
    line: int
    binds: tuple[str, str] | None = None  # (local name, module) a module import binds


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def find_modules(src: Path, top: str = "airloom") -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package) for every ``.py`` file under ``src/top``."""
    modules = {}
    for path in sorted((src / top).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _package_of(module: str, modules: dict[str, tuple[Path, bool]]) -> str:
    return module if modules[module][1] else module.rpartition(".")[0]


def _known(name: str, modules: dict) -> str | None:
    """The longest prefix of a dotted name that is one of ``modules``."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def read_imports(src: Path, top: str = "airloom") -> tuple[list[Import], list[Import]]:
    """Imports of modules under ``top`` (resolved to those modules) and of anything else (``target`` is
    the name as written), from every module under ``src/top``."""
    modules = find_modules(src, top)
    inside, outside = [], []
    for module, (path, _) in modules.items():
        package = _package_of(module, modules)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if target := _known(alias.name, modules):
                        top_name = alias.name.split(".")[0]  # `import a.b` binds `a`; `import a.b as c`, a.b
                        binds = (alias.asname, target) if alias.asname else (top_name, top_name)
                        inside.append(Import(module, target, None, node.lineno, binds))
                    else:
                        outside.append(Import(module, alias.name, None, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target not in modules:
                    outside.append(Import(module, target, None, node.lineno))
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        inside.append(
                            Import(module, sub, None, node.lineno, (alias.asname or alias.name, sub))
                        )
                    else:
                        inside.append(Import(module, target, alias.name, node.lineno))
    return inside, outside


def import_graph(src: Path, top: str = "airloom") -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in find_modules(src, top)}
    for imp in read_imports(src, top)[0]:
        if imp.target != imp.source:
            graph[imp.source].add(imp.target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def private_imports_across_packages(src: Path, top: str = "airloom") -> list[str]:
    """``from pkg.mod import _x``, ``import pkg._mod`` and ``mod._x`` (``mod`` an imported module) where
    the importer is not in the package that owns the private name."""
    modules = find_modules(src, top)
    inside, _ = read_imports(src, top)
    found = []

    def check(source: str, dotted: str, line: int) -> None:
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            if _is_private(part):
                owner = ".".join(parts[:i])
                owner_package = _package_of(owner, modules) if owner in modules else owner
                if owner_package != _package_of(source, modules):
                    found.append(f"{source}:{line} uses {dotted} (private to {owner_package})")
                return

    for imp in inside:
        check(imp.source, imp.target + (f".{imp.name}" if imp.name else ""), imp.line)
    # Attribute access on a module bound by an import: `from airloom.x import mod; mod._helper()`.
    for module, (path, _) in modules.items():
        bound = dict(imp.binds for imp in inside if imp.source == module and imp.binds)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                chain, value = [node.attr], node.value
                while isinstance(value, ast.Attribute):
                    chain.append(value.attr)
                    value = value.value
                if isinstance(value, ast.Name) and value.id in bound:
                    dotted = ".".join([bound[value.id], *reversed(chain)])
                    if _known(dotted.rpartition(".")[0], modules) == dotted.rpartition(".")[0]:
                        check(module, dotted, node.lineno)
    return found


# --- the checks ------------------------------------------------------------------------------------


def test_the_graph_reader_finds_cycles_and_private_imports(tmp_path):
    """The checks below can fail: a small tree with each kind of import they must see."""
    files = {
        "pkg/__init__.py": "",
        "pkg/a/__init__.py": "",
        "pkg/a/one.py": "def f():\n    from ..b import two\n    return two\n",  # function-level, relative
        "pkg/b/__init__.py": "",
        "pkg/b/two.py": "from pkg.a.three import X\n",
        "pkg/a/three.py": "import pkg.a.one\nfrom . import four\nX = 1\n",
        "pkg/a/four.py": "def _helper():\n    pass\n",
        "pkg/b/five.py": "from pkg.a.four import _helper\nfrom pkg.a import four\nfour._helper()\n",
        "pkg/a/six.py": "from .four import _helper\n",  # same package: fine
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a.three"] == {"pkg.a.one", "pkg.a.four"}
    assert find_cycle(graph) == ["pkg.a.one", "pkg.b.two", "pkg.a.three", "pkg.a.one"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None
    assert sorted(private_imports_across_packages(tmp_path, "pkg")) == [
        "pkg.b.five:1 uses pkg.a.four._helper (private to pkg.a)",
        "pkg.b.five:3 uses pkg.a.four._helper (private to pkg.a)",
    ]


def test_no_import_cycles():
    cycle = find_cycle(import_graph(SRC))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycles_between_packages():
    """Packages (``airloom.data``, ``airloom.evaluation``, ...) form layers: none imports one that imports it."""
    graph: dict[str, set[str]] = {}
    for imp in read_imports(SRC)[0]:
        source, target = (".".join(m.split(".")[:2]) for m in (imp.source, imp.target))
        if source != target:
            graph.setdefault(source, set()).add(target)
    cycle = find_cycle(graph)
    assert cycle is None, "packages import each other: " + " -> ".join(cycle)


def test_no_private_imports_across_packages():
    assert private_imports_across_packages(SRC) == []


def test_only_airloom_airflow_imports_airflow():
    wrong = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        for imp in read_imports(SRC)[1]
        if imp.target.split(".")[0] == "airflow" and not imp.source.startswith("airloom.airflow")
    ]
    assert wrong == []


# Imports each module named on the command line with no airloom module loaded before it: the airloom
# entries of sys.modules are dropped first. Third-party libraries stay loaded, so an interpreter pays for
# airflow, torch or evaluate once, not once per module (measured on 2 busy cores: 85 modules, one
# interpreter each, 377 s; this way a few seconds per package).
_IMPORT_ALONE = """
import importlib, sys, traceback
failed = 0
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "airloom" or m.startswith("airloom.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failed += 1
        print(f"--- import {name} alone fails:\\n{traceback.format_exc()}", file=sys.stderr)
sys.exit(failed and 1)
"""


def test_each_module_imports_alone():
    """Each module imported with no other airloom module loaded: an import that works only after another
    module was imported first (a cycle entered from the other side, a missing import) fails here, whatever
    order the suite imported things in. One fresh interpreter per top-level package, two at a time."""
    by_package: dict[str, list[str]] = {}
    for module in sorted(find_modules(SRC)):
        by_package.setdefault(".".join(module.split(".")[:2]), []).append(module)

    def run(modules: list[str]) -> str:
        proc = subprocess.run([sys.executable, "-c", _IMPORT_ALONE, *modules], capture_output=True, text=True)
        return "" if proc.returncode == 0 else proc.stderr.strip() or f"exit code {proc.returncode}"

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for f in pool.map(run, by_package.values()) if f]
    count = sum(map(len, by_package.values()))
    print(f"{count} modules imported alone in {time.monotonic() - started:.1f}s")
    assert not failures, "\n\n".join(failures)
