"""Token merging and pruning: ToMe bipartite soft matching (plain and padded batches), PiToMe
energy and merge, top-k pruning.  See :mod:`tokops.merge.ops` and ``DESIGN.md``."""

from . import reference
from .ops import (Matching, bipartite_soft_matching, merge, merge_source, merge_wavg, pitome_energy, pitome_merge,
                  prune_topk, scatter_back, unmerge)

__all__ = ["Matching", "bipartite_soft_matching", "merge", "merge_wavg", "merge_source", "unmerge", "pitome_energy",
           "pitome_merge", "prune_topk", "scatter_back", "reference"]
