"""Import layering of megatron_lite, checked statically (``ast``; nothing is imported).

Every module under ``megatron_lite/`` is parsed and *every* ``import`` / ``from ... import``
in it counts -- module level, inside functions and methods, under ``if TYPE_CHECKING:``,
inside ``try/except ImportError`` -- with relative imports resolved. From that the import
graph over ``megatron_lite.*`` modules is built:

* ``import megatron_lite.a.b`` -> ``megatron_lite.a.b`` (the longest prefix that is a module).
* ``from megatron_lite.a import b`` -> ``megatron_lite.a.b`` where that is a module (file or
  package), else ``megatron_lite.a`` (``b`` is then a name defined in ``a``).
* A package is the node of its ``__init__.py``. Importing ``megatron_lite.a.b`` also runs the
  ``__init__.py`` of every package on the way (``megatron_lite.a``), so the importer also gets
  an edge to each such package -- except the packages that contain the importer itself: those
  have already started executing before the importer runs, so importing them runs nothing.

The test fails on

1. any import cycle (function-local imports included), reported as ``a -> b -> a`` with the
   file:line of each edge, and
2. any upward import between layers (see ``LAYER_RULES``), reported as file:line and the
   imported module. ``megatron_lite.errors`` and ``megatron_lite.io_utils`` are allowed
   everywhere.

The checker itself is exercised on a synthetic package (``test_checker_*``), so a green run
means the rules were really applied, not that the finder is blind.
"""
from __future__ import annotations

import ast
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "megatron_lite"
PACKAGE_DIR = REPO_ROOT / PACKAGE

# Modules any layer may import.
ALLOWED_EVERYWHERE = ("megatron_lite.errors", "megatron_lite.io_utils")

_LOW_LEVEL_FORBIDDEN = (
    "megatron_lite.model", "megatron_lite.data", "megatron_lite.optim", "megatron_lite.distributed",
    "megatron_lite.training", "megatron_lite.inference",
    "megatron_lite.config", "megatron_lite.arguments", "megatron_lite.pretrain_gpt",
    "megatron_lite.finetune_gpt",
)

# importer prefix -> imported prefixes it must not reach (a prefix matches the module itself and
# everything below it).
LAYER_RULES: Dict[str, Tuple[str, ...]] = {
    "megatron_lite.parallel": _LOW_LEVEL_FORBIDDEN,
    "megatron_lite.kernels": _LOW_LEVEL_FORBIDDEN,
    "megatron_lite.model": (
        "megatron_lite.data", "megatron_lite.training", "megatron_lite.inference",
        "megatron_lite.pretrain_gpt", "megatron_lite.finetune_gpt",
    ),
    "megatron_lite.data": (
        "megatron_lite.model", "megatron_lite.parallel", "megatron_lite.training", "megatron_lite.optim",
        "megatron_lite.distributed", "megatron_lite.inference", "megatron_lite.config",
    ),
}


# --------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Edge:
    src: str        # importing module
    dst: str        # imported module (a megatron_lite.* module or package)
    path: str       # file of the importer, relative to the scan root's parent
    lineno: int
    implicit: bool  # True: a package __init__ run on the way to the imported module

    @property
    def where(self) -> str:
        return f"{self.path}:{self.lineno}"


def _in(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def discover_modules(package_dir: Path, package: str) -> Dict[str, Path]:
    """Dotted module name -> file, for every .py under package_dir (packages: their __init__)."""
    modules: Dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(package_dir):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        rel = Path(dirpath).relative_to(package_dir)
        parts = [package] + [p for p in rel.parts if p != "."]
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            stem = fn[:-3]
            name = ".".join(parts if stem == "__init__" else parts + [stem])
            modules[name] = Path(dirpath) / fn
    return modules


def _is_package(modules: Dict[str, Path], name: str) -> bool:
    return modules[name].name == "__init__.py"


def _longest_known_prefix(name: str, modules: Dict[str, Path]) -> Optional[str]:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in modules:
            return cand
    return None


def _ancestors(name: str) -> List[str]:
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def _resolve_import(node: ast.AST, importer: str, modules: Dict[str, Path], package: str) -> List[str]:
    """The megatron_lite modules one Import/ImportFrom statement names directly."""
    targets: List[str] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if _in(alias.name, package):
                t = _longest_known_prefix(alias.name, modules)
                if t is not None:
                    targets.append(t)
        return targets
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        pkg_parts = importer.split(".") if _is_package(modules, importer) else importer.split(".")[:-1]
        keep = len(pkg_parts) - (node.level - 1)
        if keep <= 0:
            return targets  # beyond the top-level package: not ours
        base = ".".join(pkg_parts[:keep])
        full = f"{base}.{node.module}" if node.module else base
    else:
        full = node.module or ""
    if not _in(full, package):
        return targets
    for alias in node.names:
        sub = f"{full}.{alias.name}"
        if alias.name != "*" and sub in modules:
            targets.append(sub)
        else:
            t = _longest_known_prefix(full, modules)
            if t is not None:
                targets.append(t)
    return targets


def build_graph(package_dir: Path, package: str) -> Tuple[Dict[str, Path], List[Edge]]:
    """All import edges between modules of `package` (rooted at package_dir), in file order."""
    modules = discover_modules(package_dir, package)
    root = package_dir.parent
    edges: List[Edge] = []
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(root).as_posix()
        own_packages = set(_ancestors(importer))
        if _is_package(modules, importer):
            own_packages.add(importer)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _resolve_import(node, importer, modules, package):
                # Packages on the way to the target run their __init__ first (unless the importer
                # lives inside them: they are already executing).
                for anc in _ancestors(target):
                    if anc in modules and anc not in own_packages:
                        edges.append(Edge(importer, anc, rel, node.lineno, implicit=True))
                edges.append(Edge(importer, target, rel, node.lineno, implicit=False))
    # One edge per (statement line, target): `from x import a, b` names x once.
    edges = sorted(set(edges), key=lambda e: (e.path, e.lineno, e.dst, e.implicit))
    return modules, edges


def _strongly_connected(nodes: Iterable[str], succ: Dict[str, List[str]]) -> List[List[str]]:
    """Tarjan's SCCs (iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    out: List[List[str]] = []
    counter = 0
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(succ.get(start, ())))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(succ.get(w, ()))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return out


def _shortest_cycle(start: str, members: Set[str], succ: Dict[str, List[str]]) -> List[str]:
    """Shortest path start -> ... -> start inside `members` (BFS)."""
    prev: Dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w in succ.get(v, ()):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [start]
                if w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in an SCC but on no cycle")  # pragma: no cover


@dataclass
class Cycle:
    chain: List[str]             # a -> b -> a
    edges: List[Edge]            # one edge (its first import line) per hop of the chain
    component: List[str]         # every module in the strongly connected component
    component_edges: List[Edge]  # every import inside the component (all must be considered)

    def describe(self) -> str:
        lines = [" -> ".join(self.chain)]
        for e in self.edges:
            how = " (runs the package __init__.py)" if e.implicit else ""
            lines.append(f"    {e.src} -> {e.dst}: {e.where}{how}")
        if len(self.component) > len(self.chain) - 1 or len(self.component_edges) > len(self.edges):
            lines.append(f"    whole cycle group ({len(self.component)} modules): {', '.join(self.component)}")
            lines.append("    every import inside that group:")
            for e in self.component_edges:
                lines.append(f"      {e.where}: {e.src} -> {e.dst}")
        return "\n".join(lines)


def find_cycles(edges: Sequence[Edge]) -> List[Cycle]:
    succ: Dict[str, List[str]] = {}
    first_edge: Dict[Tuple[str, str], Edge] = {}
    for e in edges:
        if (e.src, e.dst) not in first_edge:
            first_edge[(e.src, e.dst)] = e
            succ.setdefault(e.src, []).append(e.dst)
    nodes = set(succ) | {d for ds in succ.values() for d in ds}
    cycles = []
    for comp in _strongly_connected(nodes, succ):
        members = set(comp)
        if len(comp) == 1 and comp[0] not in succ.get(comp[0], ()):
            continue
        chain = _shortest_cycle(comp[0], members, succ)
        hop_edges = [first_edge[(a, b)] for a, b in zip(chain, chain[1:])]
        inner = [e for e in edges if e.src in members and e.dst in members]
        cycles.append(Cycle(chain, hop_edges, comp, inner))
    return cycles


def find_layer_violations(edges: Sequence[Edge], rules: Dict[str, Tuple[str, ...]] = LAYER_RULES,
                          allowed: Sequence[str] = ALLOWED_EVERYWHERE) -> List[str]:
    out = []
    for e in edges:
        if e.implicit:
            continue  # the explicit edge to the imported module itself is what gets reported
        if any(_in(e.dst, a) for a in allowed):
            continue
        for layer, forbidden in rules.items():
            if not _in(e.src, layer):
                continue
            hit = next((f for f in forbidden if _in(e.dst, f)), None)
            if hit is not None:
                out.append(f"{e.where}: {e.src} imports {e.dst} "
                           f"({layer.split('.')[-1]}/ must not import {hit})")
    return out


# --------------------------------------------------------------------------------------------
# The checks on the real tree
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _real_graph():
    return build_graph(PACKAGE_DIR, PACKAGE)


def test_package_is_scanned():
    modules, edges = _real_graph()
    # Guard against a checker that silently scans nothing.
    assert len(modules) > 20, sorted(modules)
    assert "megatron_lite.parallel.state" in modules and "megatron_lite.model.gpt" in modules
    assert any(e.src == "megatron_lite.model.gpt" and e.dst == "megatron_lite.parallel.state" for e in edges)


def test_no_import_cycles():
    _, edges = _real_graph()
    cycles = find_cycles(edges)
    assert not cycles, ("import cycles among megatron_lite modules (function-local imports count):\n"
                        + "\n".join(c.describe() for c in cycles))


def test_no_upward_imports_between_layers():
    _, edges = _real_graph()
    violations = find_layer_violations(edges)
    assert not violations, "upward imports between layers:\n" + "\n".join(violations)


# --------------------------------------------------------------------------------------------
# Self-test of the checker on a synthetic megatron_lite tree
# --------------------------------------------------------------------------------------------

def _write(root: Path, files: Dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root / PACKAGE


_SYNTHETIC = {
    "megatron_lite/__init__.py": "",
    "megatron_lite/errors.py": "class E(Exception):\n    pass\n",
    "megatron_lite/io_utils.py": "",
    "megatron_lite/config.py": "",
    "megatron_lite/parallel/__init__.py": "",
    # a.py -> b.py through a relative import ...
    "megatron_lite/parallel/a.py": "from . import b\nfrom megatron_lite.errors import E\n",
    # ... and b.py -> a.py only from inside a function: still a cycle.
    "megatron_lite/parallel/b.py": "def f():\n    from megatron_lite.parallel.a import x\n    return x\n",
    "megatron_lite/kernels/__init__.py": "",
    # upward import hidden under TYPE_CHECKING, resolved to the submodule gpt.
    "megatron_lite/kernels/k.py": ("from typing import TYPE_CHECKING\n"
                                   "if TYPE_CHECKING:\n"
                                   "    from megatron_lite.model import gpt\n"),
    "megatron_lite/model/__init__.py": "from megatron_lite.model.gpt import GPTModel\n",
    # model -> training via a plain `import a.b.c as t`, in a method.
    "megatron_lite/model/gpt.py": ("class GPTModel:\n"
                                   "    def go(self):\n"
                                   "        import megatron_lite.training.trainer as t\n"
                                   "        return t\n"),
    "megatron_lite/training/__init__.py": "",
    "megatron_lite/training/trainer.py": "from megatron_lite.model import GPTModel\n",
    "megatron_lite/data/__init__.py": "",
    # data -> config (forbidden), errors and io_utils (allowed; one of them relative, level 2).
    "megatron_lite/data/d.py": ("from megatron_lite import config\n"
                                "from megatron_lite.errors import E\n"
                                "from ..io_utils import something\n"
                                "import os, json\n"),
}


def test_checker_resolves_imports(tmp_path):
    modules, edges = build_graph(_write(tmp_path, _SYNTHETIC), PACKAGE)
    got = {(e.src, e.dst, e.lineno, e.implicit) for e in edges}
    # relative `from . import b` -> the submodule
    assert ("megatron_lite.parallel.a", "megatron_lite.parallel.b", 1, False) in got
    # function-local import of a name -> the module that defines it
    assert ("megatron_lite.parallel.b", "megatron_lite.parallel.a", 2, False) in got
    # TYPE_CHECKING import of a submodule, plus the package __init__ it runs on the way
    assert ("megatron_lite.kernels.k", "megatron_lite.model.gpt", 3, False) in got
    assert ("megatron_lite.kernels.k", "megatron_lite.model", 3, True) in got
    # a name from a package -> the package's __init__.py
    assert ("megatron_lite.training.trainer", "megatron_lite.model", 1, False) in got
    # `from megatron_lite import config` -> the module config; `from ..io_utils import x` resolved
    assert ("megatron_lite.data.d", "megatron_lite.config", 1, False) in got
    assert ("megatron_lite.data.d", "megatron_lite.io_utils", 3, False) in got
    # the importer's own packages are not re-run: no edge data.d -> megatron_lite / data
    assert not any(e.src == "megatron_lite.data.d" and e.dst in (PACKAGE, "megatron_lite.data") for e in edges)
    # nothing outside the package
    assert all(_in(e.dst, PACKAGE) for e in edges)


def test_checker_finds_cycles(tmp_path):
    _, edges = build_graph(_write(tmp_path, _SYNTHETIC), PACKAGE)
    cycles = find_cycles(edges)
    chains = sorted(" -> ".join(c.chain) for c in cycles)
    assert "megatron_lite.parallel.a -> megatron_lite.parallel.b -> megatron_lite.parallel.a" in chains
    # model/__init__ -> gpt -(function-local)-> training.trainer -> model/__init__
    big = [c for c in cycles if "megatron_lite.training.trainer" in c.component]
    assert len(big) == 1 and set(big[0].component) >= {
        "megatron_lite.model", "megatron_lite.model.gpt", "megatron_lite.training.trainer"}
    text = "\n".join(c.describe() for c in cycles)
    assert "megatron_lite/parallel/b.py:2" in text and "megatron_lite/model/gpt.py:3" in text
    assert len(cycles) == 2, text


def test_checker_finds_layer_violations(tmp_path):
    _, edges = build_graph(_write(tmp_path, _SYNTHETIC), PACKAGE)
    violations = find_layer_violations(edges)
    assert len(violations) == 3, violations
    assert any(v.startswith("megatron_lite/kernels/k.py:3: ") and "megatron_lite.model.gpt" in v
               for v in violations)
    assert any(v.startswith("megatron_lite/model/gpt.py:3: ") and "megatron_lite.training.trainer" in v
               for v in violations)
    assert any(v.startswith("megatron_lite/data/d.py:1: ") and "imports megatron_lite.config" in v
               for v in violations)
    # errors / io_utils are allowed from every layer
    assert not any("errors" in v or "io_utils" in v for v in violations)


def test_checker_clean_tree_passes(tmp_path):
    files = {
        "megatron_lite/__init__.py": "",
        "megatron_lite/errors.py": "",
        "megatron_lite/parallel/__init__.py": "",
        "megatron_lite/parallel/state.py": "from megatron_lite.errors import E\n",
        "megatron_lite/model/__init__.py": "from megatron_lite.model.gpt import GPTModel\n",
        "megatron_lite/model/gpt.py": ("from megatron_lite.model import heads\n"
                                       "from megatron_lite.parallel.state import S\n"
                                       "def f():\n    from .heads import H\n"),
        "megatron_lite/model/heads.py": "from megatron_lite.parallel import state\n",
        "megatron_lite/training/__init__.py": "",
        "megatron_lite/training/trainer.py": "from megatron_lite.model import GPTModel\n",
    }
    _, edges = build_graph(_write(tmp_path, files), PACKAGE)
    assert find_cycles(edges) == []
    assert find_layer_violations(edges) == []
