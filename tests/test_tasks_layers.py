"""The application layer stays thin and its imports point one way: the engine (and the embedded model, the
families, the critics) never imports the applications package; the generic applications and the critics never
import the digits model (only the option-to-objective wiring, reproduce and its report do); the application
modules import each other without cycles; every objective implements its protocol."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import adjointdpm

SRC = Path(adjointdpm.__file__).parent
APPS = SRC / "apps"
#: the application modules that may know the digits model: the objective wiring, reproduce and its report
DIGITS_AWARE = {"choose.py", "reproduce.py", "report.py"}
GENERIC = [*(f"apps/{p.name}" for p in sorted(APPS.glob("*.py")) if p.name not in DIGITS_AWARE),
           *(f"critics/{p.name}" for p in sorted((SRC / "critics").glob("*.py")))]
ENGINE = [p for p in sorted(SRC.rglob("*.py"))
          if p.relative_to(SRC).parts[0] not in ("apps", "commands", "bench", "cli.py", "__main__.py")]


def _imports(path: Path) -> set[str]:
    """Modules imported by a file (module-level and inside functions), resolved to adjointdpm.* names (``from
    .x import y`` counts as importing both ``x`` and ``x.y``, which may be a module)."""
    package = ".".join(("adjointdpm", *path.relative_to(SRC).parent.parts))
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_nothing_below_the_applications_imports_them():
    """The engine, the families, the embedded model and the critics never import the applications, the
    commands or the CLI."""
    upward = ("adjointdpm.apps", "adjointdpm.commands", "adjointdpm.cli")
    offenders = {str(p.relative_to(SRC)): sorted(m for m in _imports(p) if m.startswith(upward)) for p in ENGINE}
    assert not {f: m for f, m in offenders.items() if m}, offenders
    assert any(p.relative_to(SRC).parts[0] == "embedded" for p in ENGINE)  # (the list is read)
    assert any(p.relative_to(SRC).parts[0] == "families" for p in ENGINE)


def test_the_engine_does_not_import_the_digits_model():
    """Components, families, solvers, gradient modes: no module outside embedded/ and the applications knows the
    digits model (the benchmarks excepted: they measure it)."""
    engine = [p for p in ENGINE if p.relative_to(SRC).parts[0] not in ("embedded",)]
    offenders = {str(p.relative_to(SRC)): sorted(m for m in _imports(p) if m.startswith("adjointdpm.embedded"))
                 for p in engine}
    assert not {f: m for f, m in offenders.items() if m}, offenders
    assert SRC / "components.py" in engine and any(p.relative_to(SRC).parts[0] == "families" for p in engine)


def test_generic_applications_and_critics_do_not_import_the_digits_model():
    offenders = {f: sorted(m for m in _imports(SRC / f) if m.startswith("adjointdpm.embedded")) for f in GENERIC}
    assert not {f: m for f, m in offenders.items() if m}, offenders
    assert "apps/guide.py" in GENERIC and "apps/choose.py" not in GENERIC
    # critics: transformers / diffusers only, and the Hub-id resolver, a leaf that imports no adjointdpm module
    leaf = ("adjointdpm.critics", "adjointdpm.hub")
    critics = {f: sorted(m for m in _imports(SRC / f) if m.startswith("adjointdpm.") and not m.startswith(leaf))
               for f in GENERIC if f.startswith("critics/")}
    assert not {f: m for f, m in critics.items() if m}, critics
    assert not {m for m in _imports(SRC / "hub.py") if m.startswith("adjointdpm")}


def test_application_modules_have_no_import_cycle():
    modules = {p.stem: _imports(p) for p in APPS.glob("*.py")}
    graph = {m: {i.split(".")[2] for i in deps if i.startswith("adjointdpm.apps.")} & set(modules)
             for m, deps in modules.items()}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    cycles = sorted(m for m in graph if reaches(m, m))
    assert not cycles, cycles
    assert "report" in graph["reproduce"] and "reproduce" not in graph["report"]  # (the graph is read)
    assert "guide" in graph["registry"] and "registry" not in graph["guide"]


def test_every_application_is_one_registered_module():
    from adjointdpm.apps.registry import APPLICATIONS

    for name, app in APPLICATIONS.items():
        module = __import__(f"adjointdpm.apps.{name}", fromlist=["APPLICATION"])
        assert module.APPLICATION is app and app.options is module.Options and app.build is module.build


def _objective_classes():
    from adjointdpm.critics import folder_objectives as generic, objectives as protocols
    from adjointdpm.embedded import digit_objectives as digits

    return [(protocols.Target, generic.ClassifierTarget), (protocols.Target, generic.ClipTarget),
            (protocols.Target, generic.PluginTarget), (protocols.Target, digits.DigitTarget),
            (protocols.Judge, generic.ClassifierJudge), (protocols.Judge, generic.ClipJudge),
            (protocols.Judge, digits.DigitJudge),
            (protocols.Attack, generic.ClassifierAttack), (protocols.Attack, generic.SafetyAttack),
            (protocols.Attack, digits.DigitClassifierAttack), (protocols.Attack, digits.DigitSafetyAttack),
            (protocols.Style, generic.BackboneStyle), (protocols.Style, generic.PluginStyle),
            (protocols.Style, digits.DigitStyle), (protocols.Loss, generic.PluginTarget)]


@pytest.mark.parametrize("protocol,cls", _objective_classes(), ids=lambda x: getattr(x, "__name__", str(x)))
def test_objectives_implement_their_protocol(protocol, cls):
    """Every method of the protocol is defined by the class, with the protocol's parameter names."""
    import inspect

    for name, member in vars(protocol).items():
        if name.startswith("_") or not callable(member):
            continue
        assert callable(getattr(cls, name, None)), (cls.__name__, name)
        want = [p for p in inspect.signature(member).parameters if p != "self"]
        have = list(inspect.signature(getattr(cls, name)).parameters)
        assert all(p in have for p in want), (cls.__name__, name, want, have)
    for attr in getattr(protocol, "__annotations__", {}):
        assert hasattr(cls, attr) or attr in inspect.signature(cls.__init__).parameters or attr == "none_valid", \
            (cls.__name__, attr)


def test_fine_tuning_libraries_know_no_application_and_no_digits_model():
    """rewards/, prompts/ and finetuning/ are libraries: they never import the applications nor the digits
    model (its rewards live in embedded/rewards.py and reach an application through ``kinds``)."""
    files = [p for part in ("rewards", "prompts", "finetuning") for p in sorted((SRC / part).glob("*.py"))]
    assert len({p.parent.name for p in files}) == 3
    banned = ("adjointdpm.embedded", "adjointdpm.apps", "adjointdpm.commands", "adjointdpm.cli")
    offenders = {str(p.relative_to(SRC)): sorted(m for m in _imports(p) if m.startswith(banned)) for p in files}
    assert not {f: m for f, m in offenders.items() if m}, offenders
