"""The notebooks: committed without outputs, and executed top to bottom on small settings."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 900


@pytest.mark.parametrize("name", ["quickstart", "paper_figures"])
def test_notebook_is_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "a notebook without code"
    assert all(not c.outputs and c.execution_count is None for c in code), (
        f"{name}.ipynb has outputs: clear them before committing "
        "(jupyter nbconvert --clear-output --inplace)"
    )


@pytest.mark.parametrize("name", ["quickstart", "paper_figures"])
def test_notebook_figures_go_where_git_ignores_them(name):
    """A notebook run from the README (cwd notebooks/) writes its figures to its default
    folder, which git must ignore so that a run leaves the checkout clean."""
    import re
    import shutil
    import subprocess

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    match = re.search(r'OUT = Path\(os\.environ\.get\("STRACE_LENS_FIGURES", "([^"]+)"\)\)', source)
    assert match, f"{name}.ipynb does not say where its figures go (OUT = ...)"
    root = NOTEBOOKS.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    figure = (NOTEBOOKS / match.group(1) / "circuit.pdf").relative_to(root)
    check = subprocess.run(
        ["git", "-C", str(root), "check-ignore", "-q", "--no-index", str(figure)], check=False
    )
    assert check.returncode == 0, f"git does not ignore {figure}: add its folder to .gitignore"


def run_notebook(name: str, out: Path, monkeypatch) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    monkeypatch.setenv("STRACE_LENS_SMALL", "1")
    monkeypatch.setenv("STRACE_LENS_FIGURES", str(out))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
        env=dict(os.environ),
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    return nb


def figure_outputs(nb) -> int:
    return sum(
        1
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "application/vnd.plotly.v1+json" in o.get("data", {})
    )


@pytest.mark.integration
def test_quickstart_runs(tmp_path, monkeypatch):
    nb = run_notebook("quickstart", tmp_path, monkeypatch)
    assert figure_outputs(nb) == 4  # two circuits, two fidelity curves
    assert {"circuit.pdf", "fidelity.svg", "circuit.html"} <= {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "circuit.pdf").read_bytes()[:5] == b"%PDF-"


@pytest.mark.integration
def test_paper_figures_runs(tmp_path, monkeypatch):
    nb = run_notebook("paper_figures", tmp_path, monkeypatch)
    # node level: 2 circuits, 2 fidelity, recovery, 2 composition, usage, 2 density;
    # edge level (one model on small settings): fidelity, composition, 1 token circuit
    assert figure_outputs(nb) == 10 + 3
    names = {p.name for p in tmp_path.iterdir()}
    for key in (
        "circuit",
        "fidelity",
        "nucleus_recovery",
        "composition",
        "usage",
        "density_vs_entropy",
        "edge_fidelity",
        "edge_composition",
        "token_circuit_0",  # the ablated and kept runs: one circuit each
        "token_circuit_1",
    ):
        assert f"{key}.pdf" in names and f"{key}.png" in names
    assert {"report.html", "edges.html"} <= names
