"""fastaspp/reference.py is the tests' ground truth and nothing else (issue 15, item 6): no production
module imports it, and it imports no fastaspp module, so a bug in production cannot reach the oracle
that is meant to catch it. Source text is scanned (ast), so function-local imports count too."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastaspp"
ORACLE = "fastaspp.reference"
# The only modules allowed to import the oracle, and why.
ALLOWED = {
    "__init__.py": "exposes fastaspp.reference as a public submodule; uses nothing from it",
    "cli.py": "the demo's self-check compares the fused ops against the oracle",
    "bench/aspp.py": "the eager baseline of the ASPP benchmark",
    "bench/overhead.py": "the eager baseline of the overhead benchmark",
}


def imported_modules(path: Path, root: Path = PACKAGE):
    """Every module an import statement in `path` (under the package directory `root`) names, made
    absolute; `from a import b` names both a and a.b (b may be a submodule)."""
    package = list(path.relative_to(root.parent).parts[:-1])  # a/b/c.py and a/b/__init__.py: package a.b
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # level 1 is path's package, each further level one package up.
            prefix = package[:len(package) - node.level + 1] if node.level else []
            base = ".".join(prefix + ([node.module] if node.module else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "reference.py")


def _imports_oracle(path: Path, root: Path = PACKAGE) -> bool:
    return any(m == ORACLE or m.startswith(ORACLE + ".") for m in imported_modules(path, root))


def test_scanner_sees_every_import_form(tmp_path):
    """The scan must catch absolute, aliased, from- and relative imports, at any depth."""
    fake = tmp_path / "fastaspp"
    (fake / "models").mkdir(parents=True)
    forms = ["import fastaspp.reference", "import fastaspp.reference as r", "from fastaspp import reference",
             "from fastaspp.reference import ASPP", "from .. import reference", "from ..reference import ASPP",
             "def f():\n    from fastaspp import reference"]
    for i, text in enumerate(forms):
        (fake / "models" / f"m{i}.py").write_text(text + "\n")
        assert _imports_oracle(fake / "models" / f"m{i}.py", fake), text
    (fake / "top.py").write_text("from . import reference\n")
    assert _imports_oracle(fake / "top.py", fake)
    (fake / "models" / "ok.py").write_text("from fastaspp.nn import ASPP\nfrom . import heads\n")
    assert not _imports_oracle(fake / "models" / "ok.py", fake)


def test_no_production_module_imports_the_reference():
    importers = {p.relative_to(PACKAGE).as_posix() for p in _sources() if _imports_oracle(p)}
    assert importers <= set(ALLOWED), f"production modules importing {ORACLE}: {sorted(importers - set(ALLOWED))}"
    assert all((PACKAGE / p).is_file() for p in ALLOWED)  # a stale entry would silently widen the allowance


def test_reference_imports_no_fastaspp_module():
    path = PACKAGE / "reference.py"
    own = sorted(m for m in imported_modules(path) if m == "fastaspp" or m.startswith("fastaspp."))
    assert not own, f"reference.py must stay plain PyTorch, but imports {own}"

