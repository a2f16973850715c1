"""Every figure of a set of results, and one self-contained HTML page holding them.

``strace-lens trace`` and ``strace-lens reproduce`` call :func:`report_html`; notebooks call
:func:`paper_figures` to get the figures as objects.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import plotly.graph_objects as go

from strace_lens.atomic import write_bytes
from strace_lens.plot._common import Results, as_labelled
from strace_lens.plot.circuit import circuit
from strace_lens.plot.composition import composition, usage
from strace_lens.plot.curves import fidelity, nucleus_recovery
from strace_lens.plot.density import density_vs_entropy

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
    parts.append(_results_table(pairs))
    headings = {**_HEADINGS, "fidelity": fidelity_heading(dict(pairs))}
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
