"""Tensors whose *values* are known to be valid, so a per-call check need not read them (no host sync).

Issue 12: values are validated where they are built, not per call.  A builder whose output is valid by
construction (the block-mask builders, ``prune_topk``'s ``kept_idx``) marks it here; a value check that
had to read a tensor once (one host sync) marks it after it passed.  A later call that finds the mark
skips the read.

The mark is keyed by the tensor object (weakly: it never keeps a tensor alive) and records the
version counters of the tensors it covers, so a tensor edited in place after it was marked, or a
structure whose tensors were swapped (``BlockMask._replace``), is not trusted.  Inference tensors
(``torch.inference_mode``) have no version counter: for them the mark trusts the object alone (an
in-place edit of a marked inference tensor is not detected).  Nothing here runs under
``torch.compile`` (callers skip it while compiling) and nothing reads tensor values.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakTensorKeyDictionary

_MARKS = WeakTensorKeyDictionary()


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors do not track a version counter
        return None


def mark(key: torch.Tensor, *others: torch.Tensor, tag=None) -> None:
    """Record that the values of ``key`` (together with ``others``, e.g. the counts of a CSR mask) are
    valid; ``tag`` qualifies the claim (e.g. an index bound), compared by the caller."""
    _MARKS[key] = (tag, tuple(weakref.ref(t) for t in others), tuple(_version(t) for t in (key, *others)))


def lookup(key: torch.Tensor, *others: torch.Tensor):
    """``(True, tag)`` when ``key`` with exactly these ``others`` was marked and none of them changed
    since; else ``(False, None)``.  Host-side bookkeeping only (no tensor values are read)."""
    entry = _MARKS.get(key)
    if entry is None:
        return False, None
    tag, refs, versions = entry
    if len(refs) != len(others) or any(r() is not t for r, t in zip(refs, others)):
        return False, None
    if versions != tuple(_version(t) for t in (key, *others)):
        return False, None
    return True, tag
