"""Balancing the train split: drop rows from over-full bins (of the first neuron) down to a common cap, never below a
floor, with a seeded draw.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def balance_indices(bins, num_bins: int, min_keep: float, seed: int) -> tuple[np.ndarray, list[int], list[int]]:
    """Rows to keep so that bins are as equal as the floor allows: every bin is cut to a common cap ``t``
    (rows drawn with ``numpy.random.default_rng(seed)``), ``t`` being the smallest cap that keeps at least
    ``ceil(min_keep * n)`` rows. Returns ``(sorted row indices, counts before, counts after)``."""
    bins = np.asarray(bins, dtype=np.int64).reshape(-1)
    if not 0 < min_keep <= 1:
        raise ValueError(f"min_keep must be in (0, 1], got {min_keep}")
    counts = np.bincount(bins, minlength=num_bins)
    if len(bins) == 0:
        return np.zeros(0, dtype=np.int64), counts.tolist(), counts.tolist()
    floor = math.ceil(min_keep * len(bins))
    lo, hi = int(counts[counts > 0].min()), int(counts.max())
    while lo < hi:  # smallest cap whose kept total reaches the floor (the total grows with the cap)
        mid = (lo + hi) // 2
        if np.minimum(counts, mid).sum() >= floor:
            hi = mid
        else:
            lo = mid + 1
    rng = np.random.default_rng(seed)
    keep = []
    for b in range(len(counts)):
        rows = np.flatnonzero(bins == b)
        keep.append(rng.choice(rows, lo, replace=False) if len(rows) > lo else rows)
    kept = np.sort(np.concatenate(keep))
    return kept, counts.tolist(), np.bincount(bins[kept], minlength=num_bins).tolist()


def format_balance(balance: dict, report_tokens: Sequence[str]) -> str:
    """The printed table of a balancing: rows before and after, per bin with its report token."""
    lines = [(f"balancing train by the bins of {balance['neuron']} (seed {balance['seed']}, keep >= {balance['min_keep']:.0%}): "
              f"{balance['rows_before']} -> {balance['rows_after']} rows"), f"{'bin':>5} {'token':>6} {'before':>8} {'after':>8}"]
    for i, (b, a) in enumerate(zip(balance["before"], balance["after"])):
        lines.append(f"{i:>5} {report_tokens[i]!s:>6} {b:>8} {a:>8}")
    return "\n".join(lines)
