"""Search methods: learned masks (mask_learning.py) and baselines (baselines.py), all scored
by one objective (objective.py)."""

from strace_lens.search.objective import SubgraphObjective

__all__ = ["SubgraphObjective"]
