"""The layering of ARCHITECTURE.md ("Layers and homes"), checked on the source: every import between the project's
modules (ast: at the top of a file, inside functions and under ``TYPE_CHECKING`` alike) forms a graph without a
cycle; ``echo`` imports none of the other packages; ``pipelines`` and ``data_prep`` are siblings over ``echo`` and
neither imports the other (nor does ``synthetic``, the synthetic conversations and demo set, import either); an import
between the project's modules inside a function says why it is not at the top of its file (``# import here: <reason>``)."""

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


def _project_imports(name: str, tree: ast.Module, modules: dict, is_package: bool = False):
    """Each import statement of module ``name`` (parsed: ``tree``) with the project module it imports, `None` when it
    imports none."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
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
        target = next((t for c in candidates if (t := _resolve(c, modules)) is not None), None)
        yield node, target  # `from a import b`: a.b when it is a module, else a


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        imports = _project_imports(name, tree, modules, is_package=path.name == "__init__.py")
        graph[name] = {target for _, target in imports if target not in (None, name)}
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


# In a function, an import of the project's own modules says why it is not at the top of the file:
# this marker in a comment on its first line or the line above (or above the block of imports it opens), followed by
# the reason (import time, an optional dependency, an import cycle).
DEFERRED_IMPORT_MARKER = "# import here:"


def unexplained_function_imports(name: str, source: str, modules: dict) -> list[str]:
    """The imports of project modules inside functions of module ``name`` (its text: ``source``) without
    `DEFERRED_IMPORT_MARKER` on their first line or the line above, as ``"module:line: import ..."``."""
    tree = ast.parse(source, filename=name)
    lines = source.splitlines()
    in_function = {
        id(node)
        for function in ast.walk(tree)
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
    }
    marked_ends, wrong = set(), []  # last lines of marked imports: a marker above a block of imports covers it
    for node, target in sorted(_project_imports(name, tree, modules), key=lambda item: item[0].lineno):
        if id(node) not in in_function:
            continue
        nearby = lines[max(node.lineno - 2, 0) : node.lineno]
        if any(DEFERRED_IMPORT_MARKER in line for line in nearby) or node.lineno - 1 in marked_ends:
            marked_ends.add(node.end_lineno)
        elif target is not None:
            wrong.append(f"{name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return wrong


def test_unexplained_function_imports_finds_an_unmarked_one():
    modules = {"echo": None, "echo.audio": None, "echo.metrics": None, "echo.metrics.cli": None}
    source = (
        "import os\n"
        "from echo import audio\n"
        "def f():\n"
        "    import json\n"
        "    from ..audio import FPS\n"
        "    # import here: import time (a test)\n"
        "    from echo.audio import SAMPLE_RATE\n"
        "    import echo.audio  # import here: import time (a test)\n"
        "    from echo import metrics\n"
        "    x = 1\n"
        "    from echo import audio as a\n"
    )
    assert unexplained_function_imports("echo.metrics.cli", source, modules) == [
        "echo.metrics.cli:5: from ..audio import FPS",
        "echo.metrics.cli:11: from echo import audio as a",
    ]


def test_imports_between_the_projects_modules_are_at_the_top_or_say_why_not():
    modules = _modules()
    wrong = [
        line for name, path in modules.items() for line in unexplained_function_imports(name, path.read_text(), modules)
    ]
    assert not wrong, (
        f"move these imports to the top of their file, or keep them in the function with a comment "
        f"'{DEFERRED_IMPORT_MARKER} <reason>' (import time, an optional dependency, an import cycle) on the line "
        f"or the line above: {wrong}"
    )
