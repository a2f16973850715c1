"""The paper's analyses of s-Trace results, each returning a pandas DataFrame.

See ``docs`` of each function; definitions follow the method reference, section 4.
"""

from strace_lens.analysis.phases import phases, split_core, split_refinement

__all__ = ["phases", "split_core", "split_refinement"]
