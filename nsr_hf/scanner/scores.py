"""Scores of the scanned neurons (higher is better) and their ranking; dead neurons rank behind every live one."""
from __future__ import annotations

import numpy as np

SCORES = {
    "variance": "population variance of the neuron over the scanned positions",
    "range": "max - min over the scanned positions",
    "kurtosis": "excess kurtosis (heavy tails: rare, large values)",
    "selectivity": "4 p (1 - p) with p = fraction of positions above threshold: 1 when the neuron fires half the time, "
    "0 when it never or always fires (the sparsity score)",
    "composite": "selectivity * std / max std: large swings, neither dead nor always above threshold (default)",
}


def dead_neurons(std: np.ndarray, value_range: np.ndarray, dead_std_ratio: float) -> np.ndarray:
    """Constant neurons (max == min), and those whose std is at most ``dead_std_ratio`` x the median std."""
    floor = dead_std_ratio * float(np.median(std)) if std.size else 0.0
    return (value_range <= 0) | ~np.isfinite(std) | (std <= floor)


def compute_scores(table: dict, dead: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every score of ``SCORES`` for neurons given as arrays (``variance``, ``std``, ``min``, ``max``,
    ``kurtosis``, ``frac_above``). Higher is better; dead neurons and undefined values get ``-inf``.

    * ``variance``: population variance.
    * ``range``: max - min.
    * ``kurtosis``: excess kurtosis; large for neurons that are quiet most of the time and sometimes large.
    * ``selectivity``: 4 p (1 - p), p = fraction of positions above ``threshold``: 1 when a neuron fires on
      half of the positions, 0 when it never or always does.
    * ``composite`` (default): selectivity * std / max std. Needs both a large swing and a neuron that is
      neither dead nor always above threshold; the product is 0 for one that never or always fires.
    """
    variance = np.asarray(table["variance"], dtype=np.float64)
    std = np.asarray(table["std"], dtype=np.float64)
    value_range = np.asarray(table["max"], dtype=np.float64) - np.asarray(table["min"], dtype=np.float64)
    p = np.asarray(table["frac_above"], dtype=np.float64)
    live = np.ones_like(variance, dtype=bool) if dead is None else ~np.asarray(dead)

    def normalised(x):
        top = x[live].max() if live.any() else 0.0
        return x / top if top > 0 else np.zeros_like(x)

    selectivity = 4.0 * p * (1.0 - p)
    scores = {
        "variance": variance,
        "range": value_range,
        "kurtosis": np.asarray(table["kurtosis"], dtype=np.float64),
        "selectivity": selectivity,
        "composite": selectivity * normalised(std),
    }
    return {name: np.where(live & np.isfinite(s), s, -np.inf) for name, s in scores.items()}


def rank_order(score: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Indices from best to worst: by score, ties broken by the larger std, then by (layer, neuron) order."""
    std = np.where(np.isfinite(std), std, -np.inf)
    return np.lexsort((np.arange(score.size), -std, -score))
