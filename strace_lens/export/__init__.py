"""Export a :class:`~strace_lens.result.TraceResult` in the formats other tools read.

- :func:`to_eap_ig`: one subgraph as an EAP-IG / MIB graph JSON (``cfg``, ``nodes``,
  ``edges``), the file ``eap.graph.Graph.from_json`` and MIB's circuit loader read.
- :func:`to_mib`: a MIB circuit-localization submission folder, ``{task}_{model}/`` with one
  circuit per MIB edge percentage (0.1 % ... 50 %).
- :func:`to_table` / :func:`save_table`: one row per prompt x size x node, as a pandas
  DataFrame, saved as Parquet or Arrow when ``pyarrow`` is installed, else CSV.

- :func:`to_circuit_tracer`: an edge-level result's subgraph (:mod:`strace_lens.edges`) as a
  circuit-tracer attribution-graph JSON (nodes with layer and ctx_idx, links with weights),
  which circuit-tracer's viewer loads.

(Figures are exported by :mod:`strace_lens.plot`, not here.)
"""

from strace_lens.export.circuit_tracer import circuit_tracer_graph, to_circuit_tracer
from strace_lens.export.eap_ig import (
    EAP_IG_FORMAT_NOTE,
    count_edges,
    eap_ig_edges,
    eap_ig_graph,
    edge_name,
    to_eap_ig,
)
from strace_lens.export.mib import MIB_MODELS, MIB_PERCENTAGES, MIB_TASKS, to_mib
from strace_lens.export.table import TABLE_COLUMNS, save_table, to_table

__all__ = [
    "EAP_IG_FORMAT_NOTE",
    "MIB_MODELS",
    "MIB_PERCENTAGES",
    "MIB_TASKS",
    "TABLE_COLUMNS",
    "circuit_tracer_graph",
    "count_edges",
    "eap_ig_edges",
    "eap_ig_graph",
    "edge_name",
    "save_table",
    "to_circuit_tracer",
    "to_eap_ig",
    "to_mib",
    "to_table",
]
