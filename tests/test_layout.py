"""The house rules: nothing outside mergedistill/demo/ imports the demo, and the README's layout section
lists every module of the package (and nothing that is not there)."""
from __future__ import annotations

import ast
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "mergedistill"


def _imports(path: Path) -> list[str]:
    """Absolute module names imported by `path` (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]
    return out


def test_nothing_outside_the_demo_imports_the_demo():
    offenders = []
    for path in PKG.rglob("*.py"):
        if (PKG / "demo") in path.parents:
            continue
        offenders += [f"{path.relative_to(ROOT)}: {m}" for m in _imports(path)
                      if m == "mergedistill.demo" or m.startswith("mergedistill.demo.")]
    assert not offenders, offenders


def test_the_check_finds_a_demo_import(tmp_path):
    """The scan above would see an offending import, relative or absolute."""
    fake = PKG / "eval" / "_layout_probe.py"
    fake.write_text("from ..demo import pretrain\nimport mergedistill.demo.corpora\n", encoding="utf-8")
    try:
        found = [m for m in _imports(fake) if m.startswith("mergedistill.demo")]
    finally:
        fake.unlink()
    assert "mergedistill.demo" in found and "mergedistill.demo.corpora" in found


def test_readme_layout_lists_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Layout"):]
    section = section[: section.index("\n## ", 4)] if "\n## " in section[4:] else section
    listed = set(re.findall(r"`(mergedistill/[\w/]+\.py)`", section))
    modules = {str(p.relative_to(ROOT)) for p in PKG.rglob("*.py") if p.name != "__init__.py"}
    assert modules - listed == set(), f"modules missing from the README's layout: {sorted(modules - listed)}"
    assert listed - modules == set(), f"the README lists modules that do not exist: {sorted(listed - modules)}"


def _asserts(path: Path) -> list[int]:
    return [n.lineno for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))) if isinstance(n, ast.Assert)]


def test_no_check_in_the_package_is_an_assert():
    """`python -O` strips assert statements: a check of data or of an invariant must be a raise (UserError for
    bad input, ValueError / RuntimeError for the rest) so that it holds in every mode."""
    found = [f"{path.relative_to(ROOT)}:{line}" for path in sorted(PKG.rglob("*.py"))
             for line in _asserts(path)]
    assert not found, f"assert statements (gone under python -O): {found}"



# ---- the models core: no import circle, and models/ below every stage ------------------------------
STAGES = ("vocab", "data", "train", "eval", "extend", "compress", "experiments", "demo")
"""Subpackages that are stages (or rerun them, or are the demo): mergedistill/models/ imports none of them."""


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere (function-level imports included). `from pkg
    import sub` counts as importing pkg.sub when sub is a module, else pkg."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        found = set()
        for m in _imports(path):
            if m in mods:
                found.add(m)
        # a `from pkg import sub` lists both pkg and pkg.sub: keep pkg only when nothing but pkg was meant
        for m in list(found):
            if any(other.startswith(m + ".") for other in found) and (mods[m].name == "__init__.py"):
                found.discard(m)
        graph[name] = found - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import circles: the strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _models_importing_stages(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} imports {t}" for m, targets in sorted(graph.items()) if m.startswith("mergedistill.models.")
            for t in sorted(targets) if t.split(".")[1] in STAGES]


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_models_import_no_stage():
    assert _models_importing_stages(_graph()) == []


def test_the_checks_find_a_planted_circle_and_a_stage_import():
    """The two checks above see what they forbid: two probe modules importing each other, and a probe in
    models/ importing a stage."""
    a, b = PKG / "models" / "_probe_a.py", PKG / "models" / "_probe_b.py"
    a.write_text("from mergedistill.models import _probe_b\n", encoding="utf-8")
    b.write_text("def f():\n    from mergedistill.models._probe_a import x\n    from mergedistill.train.stage import run_train\n",
                 encoding="utf-8")
    try:
        graph = _graph()
        cycles, upward = _cycles(graph), _models_importing_stages(graph)
    finally:
        a.unlink()
        b.unlink()
    assert ["mergedistill.models._probe_a", "mergedistill.models._probe_b"] in cycles
    assert "mergedistill.models._probe_b imports mergedistill.train.stage" in upward
