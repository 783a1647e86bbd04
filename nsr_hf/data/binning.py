"""Bin edges of one neuron fitted on its train values: the three bin strategies of ``LabelTransform.fit``.

* ``quantile``: equal counts on train;
* ``equal_width``: train min to max in equal steps;
* ``kmeans``: 1-D k-means (Lloyd-Max), the bins whose means reproduce the train values with the least squared error.

Every strategy gives ``num_bins + 1`` strictly increasing edges from the train min to the train max; the rule that
puts a value in a bin is ``nsr_hf.data.labels.bins_of``.
"""
from __future__ import annotations

import numpy as np

BIN_STRATEGIES = ("quantile", "equal_width", "kmeans")
KMEANS_ATOMS = 2048


def fit_edges(values, num_bins: int, strategy: str = "quantile") -> np.ndarray:
    """``num_bins + 1`` strictly increasing edges of one neuron's ``values`` (1-D, not constant) by ``strategy``;
    the first is the min, the last the max."""
    if strategy not in BIN_STRATEGIES:
        raise ValueError(f"bin strategy must be one of {BIN_STRATEGIES}, got {strategy!r}")
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    lo, hi = values.min(), values.max()
    if strategy == "quantile":
        raw = np.quantile(values, np.linspace(0.0, 1.0, num_bins + 1))
    elif strategy == "kmeans":
        raw = kmeans_edges(values, num_bins)
    else:
        raw = np.linspace(lo, hi, num_bins + 1)
    raw[0], raw[-1] = lo, hi
    return _strictly_increasing(raw)


def kmeans_edges(values, num_bins: int, max_atoms: int = KMEANS_ATOMS, max_iter: int = 500) -> np.ndarray:
    """Bin edges (``num_bins + 1``, train min to max) of optimal 1-D k-means: the partition whose bin means reproduce
    ``values`` with the least squared error (the Lloyd-Max quantizer). Each inner edge is halfway between the means of
    the bins on either side. Deterministic.

    Exact (dynamic programming over the sorted values, O(num_bins * m^2) for m distinct values) when there are at most
    ``max_atoms`` distinct values. Above that, the sorted values are grouped into at most ``max_atoms`` runs, cut at
    equal counts (resolving the bulk) and at equal widths (resolving the tail), the exact optimum over cuts between
    runs is found, and Lloyd's iterations on all the values polish it (they can
    only lower the error). Lloyd's iterations alone, from quantile or equal-width bins, stall with empty bins on a
    skewed neuron with outliers, at 2-9 times the optimal error."""
    x = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    if len(x) == 0:
        raise ValueError("kmeans_edges needs at least one value")
    if not np.isfinite(x).all():
        raise ValueError("kmeans_edges: the values hold NaN or infinite values")
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    lo, hi = x[0], x[-1]
    if lo == hi:
        return np.linspace(lo, hi, num_bins + 1)
    shift, scale = x.mean(), hi - lo
    u = (x - shift) / scale  # centred and scaled: the prefix sums of squares keep their precision
    # atoms: the distinct values with their counts, or (above max_atoms) runs of the sorted values
    distinct, counts = np.unique(u, return_counts=True)
    if len(distinct) > max_atoms:  # runs cut at equal counts (the bulk) and at equal widths (the tail), half each
        by_count = np.linspace(0, len(u), max_atoms // 2 + 1).round().astype(np.int64)
        by_width = np.searchsorted(u, np.linspace(u[0], u[-1], max_atoms // 2 + 1)[1:-1], side="left")
        bounds = np.unique(np.concatenate([by_count, by_width, [0, len(u)]]))
        w = np.diff(bounds).astype(np.float64)
        s1 = np.add.reduceat(u, bounds[:-1])
    else:
        w, s1 = counts.astype(np.float64), distinct * counts
    m = len(w)
    W, S = np.concatenate([[0.0], np.cumsum(w)]), np.concatenate([[0.0], np.cumsum(s1)])
    k = min(num_bins, m)
    # cost[i, j]: squared error (less the constant within-atom part) of one bin over atoms i..j-1
    i, j = np.arange(m + 1)[:, None], np.arange(m + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(j > i, -((S[None, :] - S[:, None]) ** 2) / (W[None, :] - W[:, None]), np.inf)
    best = cost[0].copy()  # best[j]: one bin over atoms 0..j-1
    back = []
    for _ in range(1, k):
        total = best[:, None] + cost
        back.append(np.argmin(total, axis=0))
        best = total[back[-1], np.arange(m + 1)]
    cuts, end = [], m
    for b in reversed(back):
        end = int(b[end])
        cuts.append(end)
    cuts = [0, *reversed(cuts), m]
    centres = np.array([(S[b] - S[a]) / (W[b] - W[a]) for a, b in zip(cuts[:-1], cuts[1:])])
    inner = (centres[1:] + centres[:-1]) / 2
    inner = _lloyd(u, inner, max_iter) if len(distinct) > max_atoms else inner
    inner = np.concatenate([inner, np.full(num_bins - 1 - len(inner), inner[-1] if len(inner) else (u[0] + u[-1]) / 2)])
    return np.concatenate([[lo], inner * scale + shift, [hi]])


def _lloyd(x: np.ndarray, inner: np.ndarray, max_iter: int) -> np.ndarray:
    """Lloyd's iterations on sorted ``x`` from inner edges ``inner`` (bins by the rule of ``nsr_hf.data.labels.bins_of``)."""
    csum = np.concatenate([[0.0], np.cumsum(x)])
    for _ in range(max_iter):
        b = np.concatenate([[0], np.searchsorted(x, inner, side="left"), [len(x)]])
        counts = np.diff(b)
        if (counts == 0).any():
            break
        centres = (csum[b[1:]] - csum[b[:-1]]) / counts
        new = (centres[1:] + centres[:-1]) / 2
        if np.array_equal(new, inner):
            break
        inner = new
    return inner


def _strictly_increasing(edges: np.ndarray) -> np.ndarray:
    """Edges with the first and last fixed (train min and max) and the inner ones moved, by the fewest float
    steps, into the open interval (min, max) and strictly increasing. Quantiles of tied values repeat: the
    nudged bins stay empty and the tied values land in the lowest of them (or, tied at the max, in the last
    bin), so the min still falls in bin 0 and the max in the last bin."""
    edges = np.array(edges, dtype=np.float64)
    lo, hi = edges[0], edges[-1]
    top = np.nextafter(hi, -np.inf)
    inner = np.clip(edges[1:-1], np.nextafter(lo, np.inf), top)
    for i in range(1, len(inner)):
        inner[i] = max(inner[i], np.nextafter(inner[i - 1], np.inf))
    if len(inner):
        inner[-1] = min(inner[-1], top)
    for i in range(len(inner) - 2, -1, -1):
        inner[i] = min(inner[i], np.nextafter(inner[i + 1], -np.inf))
    out = np.concatenate([[lo], inner, [hi]])
    if not np.all(np.diff(out) > 0):
        raise ValueError(f"cannot place {len(edges) - 1} distinct bins between {lo!r} and {hi!r}; use fewer bins")
    return out
