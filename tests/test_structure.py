"""The package's structure: no module imports itself through others, no part of it (a sub-package or a module)
does, and importing the explainer pulls in neither training nor the evaluations."""

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ipag"
#: Training lives in `ipag/synthetic/` beside the scenes, but uses the explainer and the ground-truth benchmark,
#: which use the scenes: its imports are the only ones that tie `synthetic` into loops with them. (Moving it out,
#: e.g. to `ipag/training.py`, removes this exception.)
TRAINING = "ipag.synthetic.train"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere: at the top, in functions, under TYPE_CHECKING."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
            base = ".".join(part for part in (base, node.module) if part)
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return (found & modules) - {name}


def module_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(paths)) for name, path in paths.items()}


def part(module: str) -> str:
    """`ipag.maps.gradcam` → `ipag.maps`; `ipag.word` → itself."""
    return ".".join(module.split(".")[:2])


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return err.args[1]
    return None


def test_the_cycle_check_sees_lazy_imports_and_finds_a_loop():
    graph = module_graph()
    assert "ipag.synthetic.models" in graph["ipag.explainer"]  # imported inside `Explainer.synthetic` only
    assert cycle({**graph, "ipag.settings": graph["ipag.settings"] | {"ipag.word"}}) is not None


def test_no_module_imports_itself_through_others():
    assert cycle(module_graph()) is None


def test_no_part_of_the_package_imports_itself_through_others():
    parts: dict[str, set[str]] = {}
    for module, imported in module_graph().items():
        if module != TRAINING:
            parts.setdefault(part(module), set()).update(part(other) for other in imported if part(other) != part(module))
    assert cycle(parts) is None


def test_the_explainer_imports_neither_training_nor_the_evaluations():
    code = ("import sys, ipag.explainer; print(sorted(m for m in sys.modules if m.startswith(('ipag.synthetic', "
            "'ipag.evaluation', 'ipag.ui', 'ipag.cli'))))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
