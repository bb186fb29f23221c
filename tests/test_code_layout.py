"""The shape of the code that keeps it easy to read and to change: checked, so it stays that way.

- the core (`chroma_pipeline/`) imports no Dagster, and nothing imports Dagster's private modules;
- no import cycle inside the core, counting imports made inside functions;
- no module reaches into another for one of its underscore names.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "chroma_pipeline"


def _imports(path: Path):
    """(module imported, names taken) for every import statement in the file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: inside the core
                module = "chroma_pipeline" + ("." + module if module else "")
            yield module, [alias.name for alias in node.names]


def _python_files():
    for folder in ("chroma_pipeline", "assets", "resources", "tests", "benchmarks"):
        yield from (REPO / folder).rglob("*.py")


def test_the_core_runs_without_dagster():
    offenders = [f"{path.name}: {module}" for path in CORE.glob("*.py") for module, _ in _imports(path)
                 if module.split(".")[0] == "dagster"]
    assert offenders == []


# Each use of a private module, and why there is no public way: Dagster exports DefaultRunLauncher
# but not the types its health check returns; its loader's context (reconstruction metadata) is
# not exported at the top level either.
ALLOWED_PRIVATE = {
    ("resources/run_launcher.py", "dagster._core.launcher"),
    ("assets/definitions.py", "dagster._core.definitions.definitions_load_context"),
}


def test_nothing_uses_dagsters_private_modules_but_the_listed_few():
    offenders = {(str(path.relative_to(REPO)), module) for path in _python_files() for module, _ in _imports(path)
                 if module.startswith("dagster._") or module.startswith("dagster_pipes._")}
    assert offenders == ALLOWED_PRIVATE


def test_no_import_cycle_in_the_core():
    graph = {}
    for path in CORE.glob("*.py"):
        name = f"chroma_pipeline.{path.stem}"
        targets = set()
        for module, names in _imports(path):
            if module == "chroma_pipeline":  # from . import grid, models
                targets |= {f"chroma_pipeline.{n}" for n in names}
            elif module.startswith("chroma_pipeline."):
                targets.add(module)
        graph[name] = targets - {name}

    def cycle_from(node, trail):
        if node in trail:
            return trail[trail.index(node):] + [node]
        for target in sorted(graph.get(node, ())):
            found = cycle_from(target, trail + [node])
            if found:
                return found
        return None

    cycles = [cycle_from(node, []) for node in sorted(graph)]
    assert [c for c in cycles if c] == []


def test_no_module_imports_another_modules_underscore_names():
    offenders = []
    for path in _python_files():
        for module, names in _imports(path):
            local = module.split(".")[0] in ("chroma_pipeline", "assets", "resources", "tests")
            offenders += [f"{path.relative_to(REPO)}: {module}.{n}" for n in names
                          if local and n.startswith("_") and not n.startswith("__")]
    assert offenders == []
