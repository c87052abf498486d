"""The package's import structure: the engine never imports the methods (it is handed a method
class), and no module imports itself back through others, counting imports inside functions."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "ctxseg"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The ctxseg modules ``path`` imports anywhere in it (top level or inside functions), with the
    packages whose ``__init__`` such an import runs."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # ``from pkg import mod`` imports the submodule when there is one
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("ctxseg"):
                parts = name.split(".")
                found.update(".".join(parts[:k]) for k in range(2, len(parts) + 1))
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    # A module's own packages have run their __init__ before it: not an edge of the graph.
    own = {".".join(package.split(".")[:k]) for k in range(1, len(package.split(".")) + 1)}
    return {m for m in found if m in modules and m != this and m not in own}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imported(p) for p in PACKAGE.rglob("*.py")}


def test_engine_never_imports_methods():
    graph = import_graph()
    engine = {m: deps for m, deps in graph.items() if m.startswith("ctxseg.engine")}
    assert engine, "no engine modules found"
    offenders = {m: sorted(d for d in deps if d.startswith("ctxseg.methods")) for m, deps in engine.items()}
    assert not any(offenders.values()), offenders
    # Nor through another module: nothing the engine reaches, directly or not, is a method module.
    reached, todo = set(), [m for m in engine]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in reached:
                reached.add(dep)
                todo.append(dep)
    assert not {m for m in reached if m.startswith("ctxseg.methods")}, sorted(reached)


def test_engine_imports_in_a_fresh_process_load_no_method():
    code = ("import sys\nimport ctxseg.engine.trainer, ctxseg.engine.evaluate, ctxseg.engine.checkpoint\n"
            "print(sorted(m for m in sys.modules if m.startswith('ctxseg.methods')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_import_circles():
    graph = import_graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_imports_inside_functions():
    """The scanner itself: a lazy import counts, and so does the package whose __init__ it runs."""
    graph = import_graph()
    assert "ctxseg.runs" in graph["ctxseg.viz.embeddings"]  # imported inside pixel_embeddings
    assert {"ctxseg.methods", "ctxseg.engine.trainer", "ctxseg.engine"} <= graph["ctxseg.runs"]
