"""Every figure of a set of results, and one self-contained HTML page holding them.

``strace-lens trace`` and ``strace-lens reproduce`` call :func:`report_html` (node results),
:func:`edge_report_html` (edge results) and :func:`token_report_html` (token results);
notebooks call :func:`paper_figures` / :func:`edge_figures` / :func:`token_figures` to get the
figures as objects.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from strace_lens.atomic import write_bytes
from strace_lens.edges.result import EdgeTraceResult
from strace_lens.plot._common import Results, as_labelled
from strace_lens.plot.circuit import circuit
from strace_lens.plot.composition import composition, usage
from strace_lens.plot.curves import fidelity, nucleus_recovery
from strace_lens.plot.density import density_vs_entropy
from strace_lens.plot.edge_composition import edge_composition
from strace_lens.plot.edge_fidelity import EdgeResultSet, as_edge_pairs, edge_fidelity
from strace_lens.plot.token_circuit import token_circuit
from strace_lens.plot.token_fidelity import token_fidelity
from strace_lens.plot.token_units import token_units
from strace_lens.token_trace.result import TokenTraceResult

MIN_PROMPTS_FOR_CORRELATION = 3  # Spearman over fewer prompts is undefined


def paper_figures(results: Results, core_nucleus: float = 1.0) -> dict[str, go.Figure]:
    """The circuit diagram and the paper's figures for ``results``, keyed by a file-safe name.

    ``results``: one result, a list, or ``{label: result}``; random-baseline results
    (``method == "random"``) appear only in the fidelity figure, as dashed lines. Figures
    that need what a result lacks are left out: usage needs per-input masks, the density
    correlation at least three prompts.
    """
    pairs = as_labelled(results)
    traced = [(name, r) for name, r in pairs if r.method != "random"]
    figs: dict[str, go.Figure] = {}
    for i, (_name, result) in enumerate(traced):
        suffix = f"_{i}" if len(traced) > 1 else ""
        figs[f"circuit{suffix}"] = circuit(result, core_nucleus=core_nucleus)
    figs["fidelity"] = fidelity(dict(pairs), core_nucleus=core_nucleus)
    if traced:
        named = dict(traced)
        figs["nucleus_recovery"] = nucleus_recovery(named)
        figs["composition"] = composition(named)
        figs["composition_entering"] = composition(named, entering=True)
        for i, (_name, result) in enumerate(traced):
            suffix = f"_{i}" if len(traced) > 1 else ""
            if result.per != "dataset" and result.n_prompts > 1:
                figs[f"usage{suffix}"] = usage(result)
        enough = {k: r for k, r in named.items() if r.n_prompts >= MIN_PROMPTS_FOR_CORRELATION}
        if enough:
            figs["density_vs_entropy"] = density_vs_entropy(enough)
    return figs


def report_html(
    results: Results,
    path: str | os.PathLike[str],
    title: str = "strace-lens report",
    notes: str = "",
    core_nucleus: float = 1.0,
) -> Path:
    """Write one HTML page with the circuit diagram and every figure of ``results``.

    The page embeds plotly.js once and works offline; it is written atomically. ``notes`` is
    plain text shown under the title (e.g. the command that made the results).

    Returns the path written.
    """
    pairs = as_labelled(results)
    figs = paper_figures(dict(pairs), core_nucleus=core_nucleus)
    headings = {**_HEADINGS, "fidelity": fidelity_heading(dict(pairs))}
    return _write_page(path, title, notes, _results_table(pairs), figs, headings)


def _write_page(
    path: str | os.PathLike[str],
    title: str,
    notes: str,
    table: str,
    figs: dict[str, go.Figure],
    headings: dict[str, str],
) -> Path:
    """One self-contained page: title, notes, the results table, then each figure."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:Arial,Helvetica,sans-serif;max-width:1100px;margin:24px auto;"
        "color:#222} h1{font-size:22px} h2{font-size:17px;margin-top:32px} "
        "table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:left} p.note{color:#555;font-size:13px}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if notes:
        parts.append(f"<p class='note'>{html.escape(notes)}</p>")
    parts.append(table)
    first = True
    for name, fig in figs.items():
        parts.append(f"<h2>{html.escape(headings.get(name.rstrip('_0123456789'), name))}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=first, div_id=f"fig-{name}"))
        first = False
    parts.append("</body></html>")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(target, "\n".join(parts).encode("utf-8"))
    return target


def edge_figures(
    results: EdgeResultSet, model: Any = None, tokens: Sequence[str] | None = None
) -> dict[str, go.Figure]:
    """The figures of edge results, keyed by a file-safe name: fidelity (every result), the
    composition in edge units and the token-level circuit of the first prompt (nested results:
    greedy or learned; random draws have no entry order).

    ``model`` (or ``tokens``, the first prompt's token strings) labels the circuit's axis with
    the prompt's tokens; without either it shows positions.
    """
    pairs = as_edge_pairs(results)
    figs: dict[str, go.Figure] = {"edge_fidelity": edge_fidelity(dict(pairs))}
    nested = [(name, r) for name, r in pairs if r.nested]
    if nested:
        figs["edge_composition"] = edge_composition(dict(nested))
    for i, (_name, r) in enumerate(nested):
        suffix = f"_{i}" if len(nested) > 1 else ""
        figs[f"token_circuit{suffix}"] = token_circuit(r, 0, tokens=tokens, model=model)
    return figs


def edge_report_html(
    results: EdgeResultSet,
    path: str | os.PathLike[str],
    title: str = "strace-lens edge report",
    notes: str = "",
    model: Any = None,
) -> Path:
    """Write one HTML page with the figures of edge results (:func:`edge_figures`).

    Self-contained (plotly.js embedded once), written atomically. Returns the path written.
    """
    pairs = as_edge_pairs(results)
    figs = edge_figures(dict(pairs), model=model)
    return _write_page(path, title, notes, _edge_table(pairs), figs, _EDGE_HEADINGS)


def token_figures(
    result: TokenTraceResult, model: Any = None, tokens: Sequence[str] | None = None
) -> dict[str, go.Figure]:
    """The figures of a token-granularity result, keyed by a file-safe name: fidelity against
    size and the unit map of the first prompt (``model`` or ``tokens`` label its tokens)."""
    return {
        "token_fidelity": token_fidelity(result),
        "token_units": token_units(result, 0, tokens=tokens, model=model),
    }


def token_report_html(
    result: TokenTraceResult,
    path: str | os.PathLike[str],
    title: str = "strace-lens token report",
    notes: str = "",
    model: Any = None,
) -> Path:
    """Write one HTML page with the figures of a token-granularity result
    (:func:`token_figures`). Self-contained (plotly.js embedded once), written atomically.
    Returns the path written."""
    figs = token_figures(result, model=model)
    return _write_page(path, title, notes, _token_table(result), figs, _TOKEN_HEADINGS)


def fidelity_heading(results: Results) -> str:
    """The fidelity figure's heading, naming only what its legend holds: inverse subgraphs
    (drawn for every traced result) and the random baseline (only when a result is
    ``method="random"``, e.g. ``trace(..., method="random")`` passed alongside)."""
    pairs = as_labelled(results)
    parts = []
    if any(r.method == "random" for _, r in pairs):
        parts.append("the random baseline")
    if any(r.method != "random" and "inv_tv" in r.metrics for _, r in pairs):
        parts.append("inverse subgraphs")
    return "Fidelity versus subgraph size" + (f", with {' and '.join(parts)}" if parts else "")


_TOKEN_HEADINGS = {
    "token_fidelity": "Fidelity versus size ((component, position) units)",
    "token_units": "Units of the first prompt: the smallest subgraph holding each",
}

_EDGE_HEADINGS = {
    "edge_fidelity": "Fidelity versus size (the paper's edge graph)",
    "edge_composition": "Composition in edge units: target-layer quartile and edge kind",
    "token_circuit": "Token-level circuit of the first prompt: core and refinement edges",
}

_HEADINGS = {
    "circuit": "Circuit: the subgraph drawn (its subtitle says which size and why)",
    "nucleus_recovery": "Size needed to recover the full model's nucleus",
    "composition": "Composition of the subgraphs",
    "composition_entering": "Composition of the nodes entering at each size",
    "usage": "How evenly the nodes are used across prompts",
    "density_vs_entropy": "Density follows uncertainty",
}


def _results_table(pairs: list) -> str:
    rows = [
        "<table><tr><th>result</th><th>method</th><th>masks</th><th>prompts</th>"
        "<th>nodes (candidates)</th><th>sizes</th></tr>"
    ]
    for name, r in pairs:
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>"
                for v in (
                    name,
                    r.method,
                    "per-dataset" if r.per == "dataset" else "per-input",
                    r.n_prompts,
                    f"{len(r.graph)} ({r.n_candidates})",
                    ", ".join(str(int(s)) for s in r.sizes.tolist()),
                )
            )
            + "</tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def _edge_table(pairs: list[tuple[str, EdgeTraceResult]]) -> str:
    rows = [
        "<table><tr><th>result</th><th>method</th><th>attention edges</th><th>tokens</th>"
        "<th>prompts</th><th>edges per prompt (min–max)</th><th>sizes</th></tr>"
    ]
    for name, r in pairs:
        totals = [r.n_edges(p) for p in range(r.n_prompts)]
        cells = (
            name,
            r.options.get("method", "?"),
            "kept" if r.options.get("ablate_attention_edges") is False else "ablated",
            r.options.get("tokens", "?"),
            r.n_prompts,
            f"{min(totals):,}–{max(totals):,}" if totals else "",
            f"{len(r.grid)} ({r.grid[0]:g} to {r.grid[-1]:g})",
        )
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in cells) + "</tr>")
    rows.append("</table>")
    return "".join(rows)


def _token_table(result: TokenTraceResult) -> str:
    totals = [result.n_units(p) for p in range(result.n_prompts)]
    cells = (
        result.method,
        "per-dataset" if result.per == "dataset" else "per-input",
        "nested" if result.nested else "independent",
        result.n_prompts,
        f"{min(totals):,}–{max(totals):,}",
        ", ".join(f"{s:g}" for s in result.grid),
    )
    return (
        "<table><tr><th>method</th><th>masks</th><th>family</th><th>prompts</th>"
        "<th>units per prompt (min–max)</th><th>sizes</th></tr><tr>"
        + "".join(f"<td>{html.escape(str(v))}</td>" for v in cells)
        + "</tr></table>"
    )
