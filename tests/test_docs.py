"""The docs name real things: every path, module, Python file and link in README.md and docs/*.md exists in the
checkout, so a renamed module or a moved script fails here rather than in a reader's hands. Reads files only: no
import of dglocal, no model."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

PATH = re.compile(r"(?<![\w./-])((?:dglocal|scripts|tests|docs|patches)/[\w./*-]*)")  # from the checkout's root
PY_FILE = re.compile(r"`([\w/]+\.py)`")  # `convert/hub.py` (in the package), `views.py` (anywhere)
MODULE = re.compile(r"\bdglocal(?:\.\w+)+")  # dglocal.runtime.checks, dglocal.sudoku.core.guide_for
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target#anchor)


def problems(doc: Path, root: Path = ROOT) -> list[str]:
    """One line for each thing `doc` names that `root` lacks."""
    text = doc.read_text(encoding="utf-8")
    out = []
    for path in sorted(set(PATH.findall(text))):
        path = path.rstrip(".")  # a sentence's full stop
        if not _exists(root, path) and not _ignored(root, path):
            out.append(f"{doc.name}: no {path}")
    for name in sorted(set(PY_FILE.findall(text))):
        if not PATH.fullmatch(name) and not _python_file(root, name):
            out.append(f"{doc.name}: no Python file {name}")
    for name in sorted(set(MODULE.findall(text))):
        if not _module_name(root, name):
            out.append(f"{doc.name}: {name} is neither a module nor a name defined in one")
    for target in sorted(set(LINK.findall(text))):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        path = doc.parent / file if file else doc
        if not path.exists():
            out.append(f"{doc.name}: link to missing {file}")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            out.append(f"{doc.name}: link to missing section {target}")
    return out


def _exists(root: Path, path: str) -> bool:
    return any(root.glob(path)) if "*" in path else (root / path).exists()


def _ignored(root: Path, path: str) -> bool:
    """A path the checkout's .gitignore covers (a training run's output folder, say): named, never committed."""
    gitignore = root / ".gitignore"
    patterns = [p.strip().strip("/") for p in gitignore.read_text().splitlines()] if gitignore.exists() else []
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p and not p.startswith("#") and fnmatch.fnmatch(prefix, p) for p in patterns for prefix in prefixes)


def _python_file(root: Path, name: str) -> bool:
    """`a/b.py` inside the package, or a bare `b.py` anywhere in the package, scripts/ or tests/."""
    if "/" in name:
        return (root / "dglocal" / name).is_file()
    return any(any((root / top).rglob(name)) for top in ("dglocal", "scripts", "tests") if (root / top).is_dir())


def _module_name(root: Path, dotted: str) -> bool:
    """A module or package of the checkout, or a name its module defines at the top level (def, class,
    assignment or import): dglocal.runtime.checks.model_file."""
    base, module, parts = root, None, dotted.split(".")
    while parts:
        package, file = base / parts[0], base / f"{parts[0]}.py"
        if (package / "__init__.py").is_file():
            base, module, parts = package, package / "__init__.py", parts[1:]
        elif file.is_file():
            module, parts = file, parts[1:]
            break
        else:
            break
    if module is None:
        return False
    return not parts or parts[0] in _top_level_names(module)


def _top_level_names(module: Path) -> set[str]:
    names = set()
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _anchors(doc: Path) -> set[str]:
    """The section anchors GitHub makes of a markdown file's headings: lower case, punctuation dropped, spaces to
    hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", doc.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.replace("`", "").strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_name_in_the_docs_exists(doc):
    assert problems(doc) == []


def test_a_missing_name_is_reported(tmp_path):
    (tmp_path / "dglocal" / "runtime").mkdir(parents=True)
    (tmp_path / "dglocal" / "__init__.py").write_text("def load(): pass\n")
    (tmp_path / "dglocal" / "runtime" / "__init__.py").write_text("from .checks import integer\n")
    (tmp_path / "dglocal" / "runtime" / "checks.py").write_text("MAX = 1\n\ndef integer(): pass\n")
    (tmp_path / ".gitignore").write_text("scripts/run*/\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## The part\n")
    doc = tmp_path / "docs" / "a.md"
    doc.write_text("Real: dglocal/runtime/checks.py, `runtime/checks.py`, `checks.py`, dglocal.load,\n"
                   "dglocal.runtime.checks.MAX, dglocal.runtime.integer, scripts/run2/out.txt (ignored),\n"
                   "[a link](other.md#the-part).\n")
    assert problems(doc, tmp_path) == []
    doc.write_text("Gone: dglocal/runtime/model.py, `runtime/model.py`, `model.py`, dglocal.runtime.model,\n"
                   "dglocal.runtime.checks.MIN, scripts/build.py, [a link](missing.md), [another](other.md#nope).\n")
    assert problems(doc, tmp_path) == [
        "a.md: no dglocal/runtime/model.py",
        "a.md: no scripts/build.py",
        "a.md: no Python file model.py",
        "a.md: no Python file runtime/model.py",
        "a.md: dglocal.runtime.checks.MIN is neither a module nor a name defined in one",
        "a.md: dglocal.runtime.model is neither a module nor a name defined in one",
        "a.md: link to missing missing.md",
        "a.md: link to missing section other.md#nope",
    ]
