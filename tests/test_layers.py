"""The import layers of the installed `hybrid_core` package: no import cycle, and the core never imports the apps.

The graph is read from source, not from a running interpreter: every module of the installed
package is found with `importlib.util.find_spec` / `pkgutil.iter_modules` (including
`hybrid_core.adapters`, `hybrid_core.kernels` and `hybrid_core.conformance`, which setuptools'
``package-dir`` maps to the top-level folders adapters/, kernels/ and conformance/), and each
module's ``import`` / ``from … import`` statements are parsed with `ast`, relative imports
resolved, at every level of the module (inside functions too).

For cycles only load-time imports count: the module-level ones (in classes, ``try`` and ``if``
blocks too). An import inside a function runs when the function is called, after every module
has finished loading, and one under ``if TYPE_CHECKING:`` never runs, so neither can create a
load-time cycle. Importing ``a.b.c`` from outside ``a.b`` also loads the package ``a.b`` first,
so that package counts as imported too. For the apps boundary every import counts, wherever it
stands: `hybrid_core.apps` holds the applications built on the core, and nothing outside it may
import it.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import pathlib
import pkgutil
import re
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "hybrid_core"
APPS = "hybrid_core.apps"


class Import(NamedTuple):
    """One imported module: who imports it, where, and whether it runs while the importer loads."""

    importer: str
    target: str
    line: int
    load_time: bool


def _listed_packages() -> list[str]:
    """The ``[tool.setuptools] packages`` of pyproject.toml (the mapped ones are not under hybrid_core/)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10: the list is simple enough for a regular expression
        block = re.search(r"^packages\s*=\s*\[(.*?)\]", text, flags=re.M | re.S)
        return re.findall(r'"([^"]+)"', block.group(1)) if block else []
    return list(tomllib.loads(text).get("tool", {}).get("setuptools", {}).get("packages", []))


def _walk(package: str, found: dict[str, tuple[pathlib.Path, bool]]) -> None:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not an installed package"
    found[package] = (pathlib.Path(spec.origin), True)
    for info in pkgutil.iter_modules(list(spec.submodule_search_locations), prefix=f"{package}."):
        if info.ispkg:
            _walk(info.name, found)
        else:
            sub = importlib.util.find_spec(info.name)
            found[info.name] = (pathlib.Path(sub.origin), False)


def installed_modules() -> dict[str, tuple[pathlib.Path, bool]]:
    """Every module of the installed package: name -> (source file, is a package)."""
    found: dict[str, tuple[pathlib.Path, bool]] = {}
    for package in [PACKAGE, *_listed_packages()]:
        if package not in found:
            _walk(package, found)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    """Raw import statements of one module: (level, module, names or None for ``import``, line, load time)."""

    def __init__(self) -> None:
        self.deferred = 0
        self.found: list[tuple[int, str, list[str] | None, int, bool]] = []

    def _deferred(self, nodes: list[ast.stmt]) -> None:
        self.deferred += 1
        for node in nodes:
            self.visit(node)
        self.deferred -= 1

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._deferred(node.body)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self._deferred(node.body)
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((0, alias.name, None, node.lineno, self.deferred == 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        names = [alias.name for alias in node.names]
        self.found.append((node.level, node.module or "", names, node.lineno, self.deferred == 0))


def imports_of(name: str, is_package: bool, source: str, known: set[str]) -> list[Import]:
    """The modules ``name`` imports (absolute names), each with its line and whether it is a load-time import."""
    collector = _Collector()
    collector.visit(ast.parse(source))
    here = name if is_package else name.rpartition(".")[0]
    out = []
    for level, module, names, line, load_time in collector.found:
        if level:
            parts = here.split(".")
            base = ".".join(parts[: len(parts) - (level - 1)])
            base = f"{base}.{module}" if module else base
        else:
            base = module
        if names is None:  # import a.b.c
            targets = [base]
        else:  # from base import x: the submodule base.x if there is one, else base itself
            targets = [f"{base}.{n}" if f"{base}.{n}" in known else base for n in names]
        for target in dict.fromkeys(targets):
            # Loading a.b.c first loads a and a.b; those that enclose the importer are already loading.
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                encloses = name == prefix or name.startswith(prefix + ".")
                if prefix == target or not encloses:
                    out.append(Import(name, prefix, line, load_time))
    return out


def import_graph() -> tuple[dict[str, tuple[pathlib.Path, bool]], list[Import]]:
    """The modules of the installed package and every import among them (or of `hybrid_core.apps`)."""
    modules = installed_modules()
    known = set(modules)
    edges = []
    for name, (path, is_package) in sorted(modules.items()):
        for imp in imports_of(name, is_package, path.read_text(encoding="utf-8"), known):
            if imp.target in known or imp.target == APPS or imp.target.startswith(APPS + "."):
                if imp.target != name:
                    edges.append(imp)
    return modules, edges


def find_cycles(edges: list[Import]) -> list[list[Import]]:
    """One cycle of load-time imports per strongly connected component that has one, as its chain of imports."""
    graph: dict[str, dict[str, Import]] = {}
    for e in edges:
        if e.load_time:
            graph.setdefault(e.importer, {}).setdefault(e.target, e)
    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    nodes = sorted(set(graph) | {t for targets in graph.values() for t in targets})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, {})))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    cycles = []
    for component in components:
        members = set(component)
        start = min(component)
        if len(component) == 1 and start not in graph.get(start, {}):
            continue
        # Shortest way back to `start` inside the component (breadth first).
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            nxt = []
            for node in frontier:
                for child in sorted(graph.get(node, {})):
                    if child in members and child not in previous:
                        previous[child] = node
                        nxt.append(child)
            frontier = nxt
        chain = [start]
        while len(chain) == 1 or chain[-1] != start:
            chain.append(previous[chain[-1]])
        chain.reverse()
        cycles.append([graph[a][b] for a, b in itertools.pairwise(chain)])
    return cycles


def _describe(cycle: list[Import], modules: dict[str, tuple[pathlib.Path, bool]]) -> str:
    names = " -> ".join([cycle[0].importer, *(e.target for e in cycle)])
    steps = "; ".join(f"{_where(e, modules)} imports {e.target}" for e in cycle)
    return f"{names} ({steps})"


def _where(imp: Import, modules: dict[str, tuple[pathlib.Path, bool]]) -> str:
    path = modules[imp.importer][0] if imp.importer in modules else pathlib.Path(imp.importer)
    try:
        path = path.relative_to(ROOT)
    except ValueError:
        pass
    return f"{path}:{imp.line}"


# --- the package -------------------------------------------------------------------------------------------


def test_the_walk_finds_the_mapped_packages_and_the_apps():
    modules = installed_modules()
    for name in ("hybrid_core._trainer", "hybrid_core.dynamics._rssm", "hybrid_core.adapters.torch",
                 "hybrid_core.kernels.reference", "hybrid_core.conformance.plugin", "hybrid_core.apps.cli",
                 "hybrid_core.apps.bench._runner"):
        assert name in modules, name
    # Every package on disk is listed in pyproject.toml, or a non-editable install would lack it.
    listed = set(_listed_packages())
    assert {name for name, (_, is_package) in modules.items() if is_package} <= listed


def test_no_import_cycle_among_hybrid_core_modules():
    """Module-level imports only: imports inside functions or under ``if TYPE_CHECKING:`` run after loading."""
    modules, edges = import_graph()
    cycles = find_cycles(edges)
    if cycles:
        pytest.fail("import cycle(s):\n" + "\n".join(_describe(c, modules) for c in cycles), pytrace=False)


def test_nothing_outside_the_apps_imports_the_apps():
    """At any level, inside functions and under ``if TYPE_CHECKING:`` too."""
    modules, edges = import_graph()
    bad = [e for e in edges
           if (e.target == APPS or e.target.startswith(APPS + "."))
           and not (e.importer == APPS or e.importer.startswith(APPS + "."))]
    if bad:
        pytest.fail("the core imports the apps:\n" + "\n".join(f"{_where(e, modules)} imports {e.target}" for e in bad),
                    pytrace=False)


def test_dynamics_exports_both_models_and_the_package_reexports_trend():
    import hybrid_core
    import hybrid_core.dynamics as dynamics

    assert {"RSSMDynamics", "TrendDynamics"} <= set(dynamics.__all__)
    assert dynamics.RSSMDynamics.__module__ == "hybrid_core.dynamics._rssm"
    assert dynamics.TrendDynamics.__module__ == "hybrid_core.dynamics._trend"
    assert hybrid_core.TrendDynamics is hybrid_core.dynamics.TrendDynamics
    assert "TrendDynamics" in hybrid_core.__all__


# --- the checker itself: it must be able to fail --------------------------------------------------------------

KNOWN = {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.apps", "pkg.apps.x"}


def _edges(sources: dict[str, str]) -> list[Import]:
    return [e for name, src in sources.items()
            for e in imports_of(name, name in ("pkg", "pkg.sub", "pkg.apps"), src, KNOWN)
            if e.target in KNOWN and e.target != name]


def test_the_collector_tells_load_time_imports_from_deferred_ones():
    source = (
        "from __future__ import annotations\n"
        "import typing\n"
        "from typing import TYPE_CHECKING\n"
        "from . import b\n"
        "from .sub.c import thing\n"
        "if TYPE_CHECKING:\n"
        "    from .apps import x\n"
        "else:\n"
        "    import pkg.sub\n"
        "try:\n"
        "    from .. import nothing\n"
        "except ImportError:\n"
        "    pass\n"
        "class K:\n"
        "    from . import a\n"
        "def f():\n"
        "    from .apps.x import y\n"
        "    if typing.TYPE_CHECKING:\n"
        "        import pkg.apps\n"
    )
    got = {(e.target, e.line, e.load_time) for e in imports_of("pkg.a", False, source, KNOWN)
           if e.target.startswith("pkg")}
    assert got == {
        ("pkg.b", 4, True),
        ("pkg.sub", 5, True), ("pkg.sub.c", 5, True),  # loading pkg.sub.c loads pkg.sub first
        ("pkg.apps.x", 7, False), ("pkg.apps", 7, False),
        ("pkg.sub", 9, True),
        ("pkg.a", 15, True),
        ("pkg.apps.x", 17, False), ("pkg.apps", 17, False),
        ("pkg.apps", 19, False),
    }


def test_a_cycle_is_found_and_named_and_deferred_imports_break_none():
    cyclic = _edges({"pkg": "from .a import A\n", "pkg.a": "from .b import B\n", "pkg.b": "from pkg.a import A\n"})
    (cycle,) = find_cycles(cyclic)
    assert [cycle[0].importer, *(e.target for e in cycle)] == ["pkg.a", "pkg.b", "pkg.a"]
    assert "pkg.a -> pkg.b -> pkg.a" in _describe(cycle, {})
    deferred = _edges({"pkg.a": "from .b import B\n",
                       "pkg.b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n"
                                "def f():\n    from . import a\n"})
    assert not find_cycles(deferred)
    # Importing a module of another package loads that package's __init__ first.
    through_init = _edges({"pkg.sub": "from . import c\n", "pkg.sub.c": "import pkg.a\n",
                           "pkg.a": "from pkg.sub.c import C\n"})
    assert find_cycles(through_init)


@pytest.mark.parametrize("importer", ["pkg", "pkg.a", "pkg.sub.c"])
def test_an_import_of_the_apps_from_outside_is_caught_even_in_a_function(importer):
    edges = [e for e in imports_of(importer, importer == "pkg", "def f():\n    from pkg.apps import x\n", KNOWN)
             if e.target.startswith("pkg.apps")]
    assert sorted(e.target for e in edges) == ["pkg.apps", "pkg.apps.x"]
    assert not any(e.load_time for e in edges)
