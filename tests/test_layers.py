"""The package's stages import one way only (the order in ``pipeline/__init__.py``), and without cycles."""
import ast
import subprocess
import sys
from pathlib import Path

import pipeline
from tests.conftest import ROOT

PACKAGE = ROOT / "pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The pipeline modules ``path`` imports, at any depth (``if TYPE_CHECKING:`` blocks left out)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("pipeline"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)  # from . import module
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pipeline"))
    return found


def layer_of(module: str) -> int:
    """The rank of a module's stage: plumbing 0, then ``pipeline.STAGES`` in order, then api/cli."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # the package itself: only names, imported by nobody inside
    top = parts[1]
    if top in pipeline.PLUMBING:
        return 0
    if top in pipeline.STAGES:
        return 1 + pipeline.STAGES.index(top)
    if top in ("api", "cli"):
        return 1 + len(pipeline.STAGES)
    raise AssertionError(f"{module} is in no layer: add it to pipeline.PLUMBING or pipeline.STAGES")


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {t for t in imports_of(p) if t in modules} - {m} for m, p in modules.items()}


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} imports {t}" for m, ts in g.items() for t in ts
                  if layer_of(m) >= 0 and layer_of(t) > layer_of(m))


def find_cycle(g: dict[str, set[str]]):
    """One cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_walk_sees_real_edges_and_every_module_has_a_layer():
    g = graph()
    assert "pipeline.extraction.distributed" in g["pipeline.extraction.extract"]
    assert "pipeline.heads.probe_heads" in g["pipeline.models.whole_models"]
    for m in g:
        layer_of(m)


def test_upward_imports_are_found():
    assert upward_imports({"pipeline.data.folders": {"pipeline.heads.fit_head"}}) == [
        "pipeline.data.folders imports pipeline.heads.fit_head"]
    assert upward_imports({"pipeline.heads.fit_head": {"pipeline.data.folders", "pipeline.config"}}) == []


def test_no_stage_imports_a_later_one():
    assert upward_imports(graph()) == []


def test_no_import_cycle_in_the_package():
    assert find_cycle(graph()) is None


def test_the_package_top_holds_at_most_eight_modules():
    assert len(list(PACKAGE.glob("*.py"))) <= 8
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(pipeline.STAGES)


def test_a_cache_hit_path_imports_no_torch():
    """Importing the CLI (every config, the API) must stay light: a cache hit answers without torch.
    (scikit-learn's base classes are imported: the API's Head is a scikit-learn estimator.)"""
    code = "import sys, pipeline.cli; print('torch' in sys.modules, 'torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
