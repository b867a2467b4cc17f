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

