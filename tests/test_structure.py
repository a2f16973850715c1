"""The package's structure (issue 11): the method registry, the typed run configuration, the
public evaluate, and an import graph without cycles."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from strace_lens.config import TraceConfig
from strace_lens.search.methods import REGISTRY, MaskSearch, RandomOptions, get_method
from strace_lens.types import METHODS


def test_registry_holds_exactly_the_method_names():
    assert tuple(REGISTRY) == METHODS
    for name, method in REGISTRY.items():
        assert method.name == name
        assert "node" in method.granularities


def test_config_validates_once_and_parses_method_options():
    config = TraceConfig(method="mask", method_options={"steps": 3}, nested=False)
    assert isinstance(config.options, MaskSearch)
    assert config.options.search.steps == 3 and not config.options.nested
    assert TraceConfig(method="random", method_options={"draws": 2}).options == RandomOptions(2)
    # from user input (trace's keywords): errors that list the choices
    with pytest.raises(ValueError, match="Unknown method 'beam'"):
        TraceConfig.from_kwargs({"method": "beam"})
    with pytest.raises(ValueError, match="Unknown per='token'"):
        TraceConfig.from_kwargs({"per": "token"})
    with pytest.raises(ValueError, match="Unknown ablation 'median'"):
        TraceConfig.from_kwargs({"ablation": "median"})
    # built directly, the Literal annotations are checked too (a TypeError under the tests'
    # run-time type checker, a ValueError otherwise)
    with pytest.raises((TypeError, ValueError), match=r"beam"):
        TraceConfig(method="beam")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Unknown option"):
        TraceConfig(method="greedy", method_options={"steps": 3})
    with pytest.raises(ValueError, match="draws"):
        TraceConfig(method="random", method_options={"draws": 0})
    with pytest.raises(ValueError, match="Unknown method"):
        get_method("beam")


def test_config_from_kwargs_and_identity_defaults():
    config = TraceConfig.from_kwargs({"method": "forward", "max_size": 3, "device": "cpu"})
    assert config.method == "forward" and dict(config.method_options) == {"max_size": 3}
    assert TraceConfig.identity_defaults() == {
        "sizes": None,
        "ablation": None,
        "per": "input",
        "method": "mask",
        "keep": None,
        "candidates": None,
        "seed": 0,
        "nested": True,
        "inverse": True,
    }


def test_result_keeps_its_config(tiny, tiny_tokens):
    import strace_lens as sl

    result = sl.trace(tiny, tiny_tokens[:2], sizes=[1, 3], method="random", draws=2, seed=3)
    config = result.config
    assert config.method == "random" and config.seed == 3
    assert config.options == RandomOptions(2)
    assert torch.is_tensor(result.masks)


# -- the import graph ------------------------------------------------------------------------
PACKAGE = Path(__file__).resolve().parents[1] / "strace_lens"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The strace_lens modules ``path`` imports (``if TYPE_CHECKING:`` blocks excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("strace_lens"))
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith(
                "strace_lens"
            ):
                base = child.module or ""
                for alias in child.names:  # `from strace_lens import plot` names a module
                    sub = f"{base}.{alias.name}"
                    found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).exists() else base)
            visit(child)

    visit(tree)
    return found


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path, top_level_only):
            # importing a.b.c runs a/__init__ and a/b/__init__ too, which are edges of their own
            while imported not in modules and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            targets.add(imported)
        graph[name] = targets - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == "strace_lens":  # the package root imports nothing at import time
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level", "all-imports"])
def test_no_import_cycle(top_level_only):
    """No cycle among the package's modules: neither at import time nor counting the imports
    inside functions (a module may only import what lies below it)."""
    graph = _graph(top_level_only)
    assert graph.get("strace_lens.trace")
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_private_imports_between_search_modules():
    for path in (PACKAGE / "search").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("strace_lens"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from {node.module}"


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# -- entry points ----------------------------------------------------------------------------
def _run(code: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    return subprocess.run(
        [sys.executable, *code], capture_output=True, text=True, env=env, timeout=120
    )


def test_import_is_lazy_and_submodules_load_on_first_use():
    done = _run(
        [
            "-c",
            "import sys, strace_lens as sl\n"
            "assert 'torch' not in sys.modules and 'plotly' not in sys.modules\n"
            "assert callable(sl.plot.circuit) and callable(sl.analysis.phases)\n"
            "assert callable(sl.trace) and callable(sl.load) and callable(sl.evaluate)\n"
            "print('ok')",
        ]
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_python_dash_m_help_does_not_import_torch():
    done = _run(["-X", "importtime", "-m", "strace_lens", "--help"])
    assert done.returncode == 0, done.stderr
    assert "usage: strace-lens" in done.stdout
    assert "| torch\n" not in done.stderr and "plotly" not in done.stderr


# -- evaluate and load -----------------------------------------------------------------------
def test_public_evaluate_gives_the_metrics_trace_reports(tiny, tiny_tokens, tmp_path):
    import strace_lens as sl

    result = sl.trace(tiny, tiny_tokens[:2], sizes=[2, 5], method="greedy", ablation="zero")
    scored = sl.evaluate(tiny, tiny_tokens[:2], result.masks, "zero")
    assert scored.metrics.keys() == result.metrics.keys()
    for name, values in result.metrics.items():
        assert torch.equal(scored.metrics[name], values), name
    assert torch.equal(scored.top_tokens, result.top_tokens)
    one = sl.evaluate(tiny, tiny_tokens[:2], result.masks[0, 1], "zero", inverse=False)
    assert one.metrics["kl"].shape == (2, 1) and "inv_kl" not in one.metrics
    result.save(tmp_path / "r")
    assert sl.load(tmp_path / "r").equals(result)


def test_annotations_are_checked_at_run_time():
    """The suite runs with jaxtyping + beartype (pyproject addopts): a shape that contradicts
    an annotation is a TypeError before the function body runs."""
    from strace_lens.search.ranking import top_s

    with pytest.raises(TypeError, match="row"):
        top_s(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))  # 2 rows of scores, 3 sizes


#: the input boundary, left to check its own arguments (pyproject.toml, addopts)
UNCHECKED_MODULES = {"dataset", "validate", "cli"}


def test_run_time_checks_cover_every_module_but_the_input_boundary():
    from pathlib import Path

    import tomllib

    import strace_lens

    root = Path(strace_lens.__file__).parent
    pyproject = tomllib.loads((root.parent / "pyproject.toml").read_text(encoding="utf-8"))
    addopts = pyproject["tool"]["pytest"]["ini_options"]["addopts"]
    listed = addopts.split("=", 1)[1].split(",")
    assert listed[-1] == "typecheck.typechecker"
    modules = {p.stem for p in root.glob("*.py") if not p.stem.startswith("__")}
    packages = {p.parent.name for p in root.glob("*/__init__.py")}
    assert {m.removeprefix("strace_lens.") for m in listed[:-1]} == (
        modules | packages
    ) - UNCHECKED_MODULES
