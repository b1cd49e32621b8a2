"""The application layer stays thin: the generic tasks and the critics never import the digits model (only
the option-to-objective wiring, reproduce and its report do), and the task modules import each other one way."""
from __future__ import annotations

import ast
from pathlib import Path

import adjointdpm

SRC = Path(adjointdpm.__file__).parent
GENERIC = ["tasks/guide.py", "tasks/audit.py", "tasks/stylize.py", "tasks/invert.py", "tasks/objectives.py",
           "tasks/common.py", "tasks/loop.py", "tasks/task.py", "tasks/budget.py", "tasks/checkpoint.py",
           "tasks/outputs.py", "tasks/baselines.py", "tasks/errors.py", *(f"critics/{p.name}" for p in (SRC / "critics").glob("*.py"))]


def _imports(path: Path) -> set[str]:
    """Modules imported by a file (module-level and inside functions), resolved to adjointdpm.* names."""
    package = ".".join(("adjointdpm", *path.relative_to(SRC).parent.parts))
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                out.add(f"{base}.{node.module}" if node.module else base)
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_generic_tasks_and_critics_do_not_import_the_digits_model():
    offenders = {f: sorted(m for m in _imports(SRC / f) if m.startswith("adjointdpm.embedded")) for f in GENERIC}
    assert not {f: m for f, m in offenders.items() if m}, offenders
    critics = {f: sorted(m for m in _imports(SRC / f) if m.startswith("adjointdpm.") and not m.startswith("adjointdpm.critics"))
               for f in GENERIC if f.startswith("critics/")}
    assert not {f: m for f, m in critics.items() if m}, critics  # critics: transformers / diffusers only


def test_task_modules_have_no_import_cycle():
    modules = {p.stem: _imports(p) for p in (SRC / "tasks").glob("*.py")}
    graph = {m: {i.rsplit(".", 1)[-1] for i in deps if i.startswith("adjointdpm.tasks.")} & set(modules)
             for m, deps in modules.items()}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    cycles = sorted(m for m in graph if reaches(m, m))
    assert not cycles, cycles
    assert "report" in graph["reproduce"] and "reproduce" not in graph["report"]  # (the graph is read)
