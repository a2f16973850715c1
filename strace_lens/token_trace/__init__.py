"""s-Trace at token granularity: each head and MLP at each position is a unit.

result = trace(model, prompts, granularity="token")   # trace.py, through strace_lens.trace
TokenObjective(...)                                   # objective.py: the search's units
size_grid(sizes, unit_counts)                         # sizes.py: what a size list means
result.subgraph(p, j), result.masks(p)                # result.py: compact, saved and loaded
result.node_masks(p)                                  # projection to heads and MLPs
"""

from strace_lens.token_trace.objective import TokenObjective
from strace_lens.token_trace.result import TokenTraceResult
from strace_lens.token_trace.sizes import size_grid, unit_counts_of
from strace_lens.token_trace.trace import run_token_trace

__all__ = ["TokenObjective", "TokenTraceResult", "run_token_trace", "size_grid", "unit_counts_of"]
