"""Figures of s-Trace results, every one a ``plotly.graph_objects.Figure``.

- :func:`circuit`: every node of the model by layer and head, the early core and the late
  refinement told apart (the project's own figure; :func:`default_size`: the size it draws
  unless told).
- :func:`fidelity`: TV (or KL) versus relative size with phase bands, inverse subgraphs,
  and a random baseline when one of the results is ``method="random"`` (figures 1 and 6).
- :func:`nucleus_recovery` (figure 2), :func:`composition` (figures 3 and 4),
  :func:`usage` (figure 5), :func:`density_vs_entropy` (figure 7).
- :func:`token_circuit`: one prompt's edge subgraph (``strace_lens.edges``) over its tokens
  and graph layers, core and refinement edges coloured; :func:`edge_composition`: the
  composition figure in edge units (quartile and attention / MLP / residual shares, the
  paper's phase bands shaded); :func:`edge_fidelity`: median TV and top-1 agreement of edge
  subgraphs against size.
- :func:`token_fidelity` and :func:`token_units`: token-granularity results (units are
  (component, position) pairs): fidelity against size, and one prompt's unit map coloured by
  the smallest subgraph holding each unit.
- :func:`save`: .html / .png / .svg / .pdf by suffix, paper presets; :func:`report_html` /
  :func:`edge_report_html` / :func:`token_report_html`: one self-contained HTML page with all
  of them.

All figures use the ``"strace_lens"`` plotly template (Okabe-Ito colours); the numbers they
draw come from :mod:`strace_lens.analysis`.
"""

from strace_lens.plot.circuit import circuit, default_size
from strace_lens.plot.composition import composition, usage
from strace_lens.plot.curves import fidelity, nucleus_recovery
from strace_lens.plot.density import density_vs_entropy
from strace_lens.plot.edge_composition import edge_composition
from strace_lens.plot.edge_fidelity import edge_fidelity
from strace_lens.plot.export import PRESETS, apply_preset, export_session, save, to_image
from strace_lens.plot.html_report import (
    edge_figures,
    edge_report_html,
    fidelity_heading,
    paper_figures,
    report_html,
    token_figures,
    token_report_html,
)
from strace_lens.plot.style import OKABE_ITO, TEMPLATE
from strace_lens.plot.token_circuit import token_circuit
from strace_lens.plot.token_fidelity import token_fidelity
from strace_lens.plot.token_units import token_units

__all__ = [
    "OKABE_ITO",
    "PRESETS",
    "TEMPLATE",
    "apply_preset",
    "circuit",
    "composition",
    "default_size",
    "density_vs_entropy",
    "edge_composition",
    "edge_fidelity",
    "edge_figures",
    "edge_report_html",
    "export_session",
    "fidelity",
    "fidelity_heading",
    "nucleus_recovery",
    "paper_figures",
    "report_html",
    "save",
    "to_image",
    "token_circuit",
    "token_fidelity",
    "token_figures",
    "token_report_html",
    "token_units",
    "usage",
]
