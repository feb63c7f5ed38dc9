"""The house's shape (CONTRIBUTING: which core file owns what): one idea a file, imports that flow one way, one timer
behind every comparison, no parameter taken and never read, no module imported twice in one file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core" / "model_opt"
SOURCES = sorted([*CORE.rglob("*.py"), *(ROOT / "model_opt_cli").rglob("*.py")])
#: Parameters a signature imposed from outside must keep, though the function does not read them.
IMPOSED = {
    ("exported.py", "state_dict", "keep_vars"): "torch's Module.state_dict signature (called by keyword)",
    ("exported.py", "load_state_dict", "assign"): "torch's Module.load_state_dict signature (called by keyword)",
}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _functions(tree: ast.Module):
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _top_imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_no_function_imports_a_module_its_file_imports_at_the_top() -> None:
    found = []
    for path in SOURCES:
        tree = _tree(path)
        top = _top_imports(tree)
        for function in _functions(tree):
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    found += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names if a.name in top]
                elif isinstance(node, ast.ImportFrom) and "." * node.level + (node.module or "") in top:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} from {'.' * node.level}{node.module}")
    assert found == []


def test_no_function_takes_a_parameter_it_never_reads() -> None:
    found = []
    for path in SOURCES:
        for function in _functions(_tree(path)):
            stub = all(isinstance(statement, (ast.Expr, ast.Pass)) for statement in function.body)
            used = {node.id for node in ast.walk(function) if isinstance(node, ast.Name)}
            args = function.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
                name = arg.arg
                if stub or name in ("self", "cls") or name.startswith("_") or name in used:
                    continue
                if (path.name, function.name, name) not in IMPOSED:
                    found.append(f"{path.relative_to(ROOT)}:{function.lineno} {function.name}({name})")
    assert found == []


def _imports_of(path: Path) -> set[str]:
    """The core modules ``path`` imports (anywhere in the file), as dotted names under model_opt."""
    package = ".".join(path.relative_to(CORE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            submodules = {a.name for a in node.names if module == "model_opt" and (
                (CORE / f"{a.name}.py").exists() or (CORE / a.name).is_dir())}
            if len(submodules) < len(node.names):  # (``from . import hookspecs`` imports a module, not the face)
                found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m == "model_opt" or m.startswith("model_opt.")}


def test_imports_flow_one_way() -> None:
    """No core module imports the package's face; the tuner uses steps, compare and outputs, not the optimize
    pipeline."""
    into_face = [str(p.relative_to(ROOT)) for p in CORE.rglob("*.py")
                 if p.name != "__init__.py" or p.parent != CORE
                 if "model_opt" in _imports_of(p) or "model_opt.__version__" in _imports_of(p)]
    assert into_face == []
    tuner = set().union(*(_imports_of(CORE / f"{name}.py") for name in ("autotune", "tuning_trials",
                                                                         "tuning_result")))
    assert not any(m == "model_opt.pipeline" or m.startswith("model_opt.pipeline.") for m in tuner)
    assert {"model_opt.steps", "model_opt.compare", "model_opt.outputs"} <= tuner


def test_no_core_file_is_a_house_of_several_ideas() -> None:
    """job.py and pipeline.py stay at most 250 lines; no core file grows past 450 (split it by idea)."""
    sizes = {p.relative_to(CORE).as_posix(): len(p.read_text().splitlines()) for p in CORE.rglob("*.py")}
    assert sizes["job.py"] <= 250 and sizes["pipeline.py"] <= 250
    assert {name: n for name, n in sizes.items() if n > 450} == {}


def test_contributing_maps_every_core_file() -> None:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    for path in CORE.glob("*.py"):
        assert f"`{path.name}`" in text, f"CONTRIBUTING's map of the core does not name {path.name}"


@pytest.mark.slow
def test_in_process_and_per_process_timing_take_their_rounds_from_the_one_timer(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """Two models timed in this process and each in a process of its own, on the same input: both get their rounds
    from measure.rotating_rounds (the per-process path asks its workers for the blocks)."""
    import model_opt.measure as measure
    import model_opt.timing as timing
    from model_opt.compare import time_models

    calls = []
    real = measure.rotating_rounds

    def spy(blocks, **kwargs):
        timed = real(blocks, **kwargs)
        calls.append({name: len(t.rounds_ms) for name, t in timed.items()})
        return timed

    monkeypatch.setattr(measure, "rotating_rounds", spy)
    monkeypatch.setattr(timing, "rotating_rounds", spy)
    small, big = torch.nn.Linear(8, 8).eval(), torch.nn.Sequential(torch.nn.Linear(8, 512), torch.nn.Linear(512, 8))
    x = torch.randn(4, 8)
    timed_here = time_models({"before": (small, "eager"), "after": (big.eval(), "eager")}, x, "cpu")
    before, after = timed_here["before"], timed_here["after"]
    for name, model in (("small", small), ("big", big)):
        torch.jit.save(torch.jit.script(model.eval()), tmp_path / f"{name}.pt")
    timed = timing.time_deployed({name: timing.Deployed(str(tmp_path / f"{name}.pt")) for name in ("small", "big")},
                                 x, rounds=4, min_rounds=4)
    assert len(calls) == 2
    assert calls[0] == {"before": len(before.rounds_ms), "after": len(after.rounds_ms)}
    assert calls[1] == {"small": 4, "big": 4} and len(timed["small"].rounds_ms) == 4
    assert before.interleaved and timed["big"].latency().interleaved


@pytest.mark.parametrize("name", ["ORDER", "Recommendation"])
def test_one_name_for_one_idea(name: str) -> None:
    """The pipeline order is registry.KINDS (no ORDER alias); a recommendation is registry.Recommended."""
    import model_opt.pipeline
    import model_opt.recommend

    assert not hasattr(model_opt.pipeline, name) and not hasattr(model_opt.recommend, name)
