"""s-Trace at edge granularity: the paper's token-level graph, exact edge ablation, its greedy.

batch = edge_tokenize(model, prompts)                     # tokens.py: the paper's tokens
graph = EdgeGraph.from_model(model, n_pos)                # graph.py: edges and names
weights, logp = edge_weights(model, batch)                # weights.py: local L1 weights
order = greedy_order(graph, weights[0])                   # greedy.py: best-first ranking
logp = run_with_edge_masks(model, batch, EdgeMasks...)    # forward.py: exact ablation
result = edge_trace(model, prompts)                       # trace.py -> result.py
loss = edge_target_loss(model, result, targets)           # target_loss.py: for claim 2b
result.components(prompt, size)                           # components.py: heads and MLPs
"""

from strace_lens.edges.components import EdgeComponents, project
from strace_lens.edges.forward import EdgeMasks, edge_hooks, run_with_edge_masks
from strace_lens.edges.granularity import GRANULARITIES, graph_for
from strace_lens.edges.graph import Edge, EdgeGraph
from strace_lens.edges.greedy import greedy_order, random_order
from strace_lens.edges.result import EdgeTraceResult
from strace_lens.edges.sizes import PAPER_GRID, edge_counts, relative_sizes
from strace_lens.edges.target_loss import edge_target_loss
from strace_lens.edges.token_level import TokenGraph, run_with_token_mask
from strace_lens.edges.tokens import PAPER_BOS, edge_tokenize
from strace_lens.edges.trace import edge_trace, evaluate_subgraphs
from strace_lens.edges.weights import edge_weights, norm_linearisation

__all__ = [
    "GRANULARITIES",
    "PAPER_BOS",
    "PAPER_GRID",
    "Edge",
    "EdgeComponents",
    "EdgeGraph",
    "EdgeMasks",
    "EdgeTraceResult",
    "TokenGraph",
    "edge_counts",
    "edge_hooks",
    "edge_target_loss",
    "edge_tokenize",
    "edge_trace",
    "edge_weights",
    "evaluate_subgraphs",
    "graph_for",
    "greedy_order",
    "norm_linearisation",
    "project",
    "random_order",
    "relative_sizes",
    "run_with_edge_masks",
    "run_with_token_mask",
]
