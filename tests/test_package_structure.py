"""The package's import structure: no cycle between its parts, no private name
imported across modules, and a notebook API that does not pull in the input pipeline."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ddetr_jax"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path):
    """(module imported, names taken from it) of every import in the file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, tuple(alias.name for alias in node.names)


def _part(module: str) -> str:
    """The part a module belongs to: its subpackage (ddetr_jax.train, ...) or, for a
    module at the top of the package, the module itself."""
    return ".".join(module.split(".")[:2])


def _part_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = _part(_module_name(path))
        for module, names in _imports(path):
            if not module.startswith("ddetr_jax."):
                continue
            targets = {_part(f"{module}.{n}") if module == "ddetr_jax" else _part(module)
                       for n in names} or {_part(module)}
            graph.setdefault(source, set()).update(t for t in targets if t != source)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path, or None."""
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_part_of_the_package_imports_one_that_imports_it():
    graph = _part_graph()
    assert "ddetr_jax.train" in graph and "ddetr_jax.evaluation" in graph["ddetr_jax.train"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_private_name_is_imported_across_modules():
    found = [f"{path.relative_to(ROOT)}: {module}.{name}"
             for path in [*PACKAGE.rglob("*.py"), ROOT / "train.py", ROOT / "evaluate.py"]
             for module, names in _imports(path) if module.startswith("ddetr_jax")
             for name in names if name.startswith("_")]
    assert not found, found


def test_the_notebook_api_does_not_import_the_input_pipeline():
    code = ("import sys, ddetr_jax.inference, ddetr_jax.drawing, ddetr_jax.checkpoints.loading;"
            "print(sorted(m for m in ('grain', 'tensorflow_datasets', 'tensorflow')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
