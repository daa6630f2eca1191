"""The layering of ARCHITECTURE.md ("Layers and homes"), checked on the source: every import between the project's
modules (ast: at the top of a file, inside functions and under ``TYPE_CHECKING`` alike) forms a graph without a
cycle; ``echo`` imports none of the other packages; ``pipelines`` and ``data_prep`` are siblings over ``echo`` and
neither imports the other (nor does ``synthetic``, the synthetic conversations and demo set, import either)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("echo", "pipelines", "training", "data_prep", "synthetic", "benchmarks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        if (ROOT / package).is_dir()
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _resolve(name: str, modules: dict) -> str | None:
    """The project module ``name`` is (or the deepest package holding it), `None` outside the project."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                candidates = [f"{source}.{alias.name}" for alias in node.names] + [source]
            else:
                continue
            for candidate in candidates:
                target = _resolve(candidate, modules)
                if target is not None and target != name:
                    targets.add(target)
                    break  # `from a import b`: a.b when it is a module, else a
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first = last), or `None`."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_the_project():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


@pytest.mark.parametrize(
    "importer, forbidden",
    [
        ("echo", ("pipelines", "training", "data_prep", "synthetic", "benchmarks")),
        ("pipelines", ("data_prep", "training", "benchmarks")),
        ("data_prep", ("pipelines", "training", "benchmarks")),
        ("synthetic", ("pipelines", "data_prep", "training", "benchmarks")),
    ],
)
def test_layers(importer, forbidden):
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if module.split(".")[0] == importer
        for target in targets
        if target.split(".")[0] in forbidden
    )
    assert not wrong, wrong
