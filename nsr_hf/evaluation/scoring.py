"""Every figure of one method on one split: regression and bin figures with bootstrap intervals, on all rows and on
two subsets of equal size, and how much the neuron varies on the split next to train (the module docstring of
``nsr_hf.evaluation.protocol`` lists them)."""
from __future__ import annotations

import contextlib
import logging
import math
import warnings

import numpy as np

from nsr_hf import metrics
from nsr_hf.data.labels import bins_of
from nsr_hf.evaluation.statistics import as_rows, bootstrap_ci
from nsr_hf.metrics import bin_metrics, regression_metrics


def subset_indices(true, seed: int = 0, random_sample_size: int | None = None) -> dict[str, np.ndarray]:
    """Row indices of the two subsets: ``top_decile`` (the ceil(n/10) rows with the largest true values, ties
    broken by row order) and ``random_sample`` (a seeded sample without replacement of ``random_sample_size``
    rows, by default as many as the top decile)."""
    true = np.asarray(true, dtype=np.float64).reshape(-1)
    k = max(1, math.ceil(true.size / 10))
    top = np.sort(np.argsort(-true, kind="stable")[:k])
    size = k if random_sample_size is None else int(random_sample_size)
    if not 1 <= size <= true.size:
        raise ValueError(f"random_sample_size must be between 1 and the number of rows ({true.size}), got {random_sample_size}.")
    sample = np.sort(np.random.default_rng(seed).choice(true.size, size=size, replace=False))
    return {"top_decile": top, "random_sample": sample}


def majority_class_rate(true_bins) -> float:
    """Share of rows whose bin is the most frequent bin among these rows (the best constant guess, in hindsight)."""
    true_bins = np.asarray(true_bins).reshape(-1)
    return float(np.bincount(true_bins).max() / true_bins.size)


def _figures(pred, true, greedy, bin_edges, n_bootstrap: int, seed: int, level: float) -> dict:
    out = {"rows": int(true.size)}
    readouts = [("", pred)] + ([("greedy_", greedy)] if greedy is not None else [])
    true_bins = None
    if bin_edges is not None:
        edges = np.asarray(bin_edges, dtype=np.float64).reshape(-1)
        true_bins = bins_of(true, edges)
        out["majority_class_rate"] = majority_class_rate(true_bins)
    for prefix, values in readouts:
        out.update({prefix + k: v for k, v in regression_metrics(values, true).items()})
        if n_bootstrap:
            for name in ("r2", "pearson"):
                ci = bootstrap_ci(values, true, name, n=n_bootstrap, seed=seed, level=level)
                out[f"{prefix}{name}_ci"] = [ci["low"], ci["high"]]
        if true_bins is not None:
            out.update({prefix + k: v for k, v in bin_metrics(bins_of(values, edges), true_bins, len(edges) - 1).items()})
    return out


def evaluate_predictions(pred, true, *, greedy=None, bin_edges=None, n_bootstrap: int = 1000, seed: int = 0,
                         random_sample_size: int | None = None, level: float = 0.95) -> dict:
    """Every figure of one method for one neuron on one split (see the module docstring).

    Args:
        pred: expected-value predictions, (rows,), activation units.
        true: the neuron's values, (rows,).
        greedy: the greedy readout of a bin or token head, (rows,); its figures get a ``greedy_`` prefix.
        bin_edges: the neuron's train-fitted bin edges (num_bins + 1): adds accuracy, balanced accuracy, qwk
            and ``majority_class_rate``.
        n_bootstrap: resamples for the ``r2_ci`` and ``pearson_ci`` intervals (0: none).
        random_sample_size: size of the ``random_sample`` subset (default: the size of the top decile).

    >>> evaluate_predictions([0.1, 0.4, 0.9], [0.0, 0.5, 1.0])["r2"]

    Constant predictions or targets give defined values with a ``RuntimeWarning`` (never NaN): the rule of ``nsr_hf.metrics``.
    """
    arrays = [pred, true] + ([greedy] if greedy is not None else [])
    arrays = as_rows(*arrays)
    pred, true = arrays[0], arrays[1]
    greedy = arrays[2] if greedy is not None else None
    out = _figures(pred, true, greedy, bin_edges, n_bootstrap, seed, level)
    out["subsets"] = {}
    for name, idx in subset_indices(true, seed, random_sample_size).items():
        if idx.size < 2:
            out["subsets"][name] = {"rows": int(idx.size), "note": f"too few rows ({idx.size}) for figures on a subset"}
            continue
        sub = _figures(pred[idx], true[idx], None if greedy is None else greedy[idx], bin_edges, n_bootstrap, seed, level)
        sub["true_min"], sub["true_max"] = float(true[idx].min()), float(true[idx].max())
        out["subsets"][name] = sub
    return out


LOW_SPREAD_RATIO = 0.5


def split_spread(true, train_std: float | None, split: str) -> dict:
    """How much the neuron varies on ``split`` next to the training split. R² divides by the split's own variance: on a
    split where a sparse neuron happens not to fire (std well below train's) small errors give a large negative R²,
    which says more about the split than about the reader. Below ``LOW_SPREAD_RATIO`` the entry carries a ``warning``."""
    true = np.asarray(true, dtype=np.float64).reshape(-1)
    std = float(true.std()) if true.size else float("nan")
    out = {"std": std, "train_std": None if train_std is None else float(train_std), "ratio": None, "warning": None}
    if train_std and math.isfinite(std):
        out["ratio"] = std / float(train_std)
        if out["ratio"] < LOW_SPREAD_RATIO:
            out["warning"] = (f"On {split} the neuron's std is {std:.3g}, {out['ratio']:.2f} of its training std ({float(train_std):.3g}): "
                              f"R² divides by this split's small variance, so read MSE and MAE (in activation units) next to it.")
    return out


@contextlib.contextmanager
def quiet_if(quiet: bool):
    """Silence the degenerate-case warnings of ``nsr_hf.metrics`` (warning and log line) inside the block."""
    if not quiet:
        yield
        return
    metrics_logger = logging.getLogger(metrics.__name__)
    level = metrics_logger.level
    metrics_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        metrics_logger.setLevel(level)
