"""The package's shape, checked from its source (STYLE habits 12, 18 and 19).

* the imports between tlprisms modules form a tree of layers: no cycle, counting the imports
  made inside functions;
* no module uses another module's private names (``from x import _name``, ``x._name`` on a
  tlprisms module, or ``obj._name`` where ``_name`` is defined only in another module);
* TransformerLens is called only by the seam (``tlprisms/_seam/``): tokenising, recording a
  cache, the model's configuration; the demo and the hub loader build models and are the
  only other modules that import it;
* ``LogitPrism`` stays a thin facade.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tlprisms"
#: the facade's size budget (lines of the class, docstrings included)
FACADE_MAX_LINES = 400
#: attribute names that are TransformerLens calls or facts when read off a model
TL_ATTRIBUTES = ("to_tokens", "to_str_tokens", "run_with_cache", "run_with_hooks", "cfg")
#: modules (besides the seam) that build or load TransformerLens models
MODEL_BUILDERS = ("tlprisms.demo", "tlprisms.hub")
#: (module, receiver) pairs whose ``.cfg`` is not TransformerLens's (SAELens' SAE config)
OTHER_CFG = {("tlprisms.dictionary", "sae")}


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (f, ast.parse(f.read_text()))
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[module][0].name == "__init__.py"
    base = module.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, tree: ast.Module) -> list[tuple[str, str]]:
    """(imported module, name or '') for every import of a tlprisms module, anywhere."""
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out += [(a.name, "") for a in n.names if a.name.startswith("tlprisms")]
        elif isinstance(n, ast.ImportFrom):
            src = _resolve(module, n)
            if src.startswith("tlprisms"):
                out += [(src, a.name) for a in n.names]
    return out


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, (_, tree) in MODULES.items():
        for src, name in _imports(m, tree):
            full = f"{src}.{name}" if name else src
            target = full if full in MODULES else src if src in MODULES else None
            if target and target != m:
                edges[m].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_imports_form_a_tree_of_layers():
    """No import cycle between tlprisms modules, counting imports inside functions."""
    assert _cycles(_edges()) == []


def _private_definitions() -> dict[str, set[str]]:
    """Per module: the private names it defines (functions, classes, module and class level
    assignments, and ``self._x = ...`` attributes)."""
    out: dict[str, set[str]] = {}
    for m, (_, tree) in MODULES.items():
        names: set[str] = set()
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, (ast.Assign, ast.AnnAssign)):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        names.add(t.id)
                    elif isinstance(t, ast.Attribute):
                        names.add(t.attr)
        out[m] = {x for x in names if x.startswith("_") and not x.startswith("__")}
    return out


def test_no_private_names_across_modules():
    """What another module needs is public inside the package (no leading underscore)."""
    defined = _private_definitions()
    bad = []
    for m, (_, tree) in MODULES.items():
        aliases = {}  # local name -> tlprisms module
        for src, name in _imports(m, tree):
            full = f"{src}.{name}" if name else src
            if name.startswith("_") and not name.startswith("__") and full not in MODULES:
                bad.append(f"{m}: from {src} import {name}")
            if full in MODULES:
                aliases[name or full.split(".")[-1]] = full
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom):
                for a in n.names:
                    full = f"{_resolve(m, n)}.{a.name}"
                    if full in MODULES and a.asname:
                        aliases[a.asname] = full
            if not (isinstance(n, ast.Attribute) and n.attr.startswith("_")):
                continue
            if n.attr.startswith("__"):
                continue
            recv = n.value
            if isinstance(recv, ast.Name) and recv.id in ("self", "cls"):
                continue
            if isinstance(recv, ast.Name) and recv.id in aliases and aliases[recv.id] != m:
                bad.append(f"{m}: {recv.id}.{n.attr}")
                continue
            owners = {o for o, names in defined.items() if n.attr in names}
            if owners and m not in owners:
                bad.append(f"{m}: {ast.unparse(n)} (defined in {sorted(owners)})")
    assert bad == []


def test_transformerlens_is_called_only_by_the_seam():
    """Tokenising, recording a cache and reading the model's configuration go through the
    seam (``ModelView``); nothing else imports TransformerLens but the model builders."""
    bad = []
    for m, (_, tree) in MODULES.items():
        if m.startswith("tlprisms._seam") or m in MODEL_BUILDERS:
            continue
        for n in ast.walk(tree):
            if isinstance(n, ast.Import) and any(
                a.name.startswith("transformer_lens") for a in n.names
            ):
                bad.append(f"{m}: import transformer_lens")
            elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("transformer_lens"):
                bad.append(f"{m}: from {n.module} import ...")
            elif isinstance(n, ast.Attribute) and n.attr in TL_ATTRIBUTES:
                recv = ast.unparse(n.value)
                if (m, recv) not in OTHER_CFG:
                    bad.append(f"{m}: {recv}.{n.attr}")
    assert bad == []


def test_the_facade_is_thin():
    """``LogitPrism`` validates, builds a request, calls a prism module, finishes: at most
    :data:`FACADE_MAX_LINES` lines, docstrings included."""
    _, tree = MODULES["tlprisms.prism"]
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LogitPrism"]
    assert cls.end_lineno - cls.lineno + 1 <= FACADE_MAX_LINES


@pytest.mark.parametrize("name", ["tlprisms._core.result", "tlprisms._core.table"])
def test_results_never_import_rendering(name):
    if name not in MODULES:
        pytest.skip(f"{name} does not exist")
    targets = {t for t in _edges()[name]}
    assert not any(t.startswith("tlprisms.render") for t in targets)
