"""Bootstrap statistics of the evaluation: percentile intervals of a figure and paired differences between methods,
and the comparisons the report states in words (self against cross-report and the probe; selectivity).

Every resample is scored with the row-wise metrics of ``nsr_hf.metrics`` (its one rule for degenerate cases), all
resamples at once; the same ``(rows, n, seed)`` always gives the same resamples.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from nsr_hf.metrics import ROW_METRICS, r2_rows

Metric = str | Callable[[np.ndarray, np.ndarray], float]


# ----------------------------------------------------------------------------------------------------------
# The bootstrap


def _metric_rows(metric: Metric) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A function of (resamples, rows) arrays -> (resamples,) values, for a metric name or a callable."""
    if isinstance(metric, str):
        if metric not in ROW_METRICS:
            raise ValueError(f"Unknown metric {metric!r}: use one of {', '.join(ROW_METRICS)} or pass a function (pred, true) -> float.")
        return ROW_METRICS[metric]
    if not callable(metric):
        raise ValueError(f"metric must be a name ({', '.join(ROW_METRICS)}) or a function (pred, true) -> float, got {metric!r}.")  # noqa: TRY004

    def rows(p, t):
        with warnings.catch_warnings():  # constant resamples would warn once per resample
            warnings.simplefilter("ignore")
            return np.array([float(metric(p[i], t[i])) for i in range(p.shape[0])])

    return rows


def as_rows(*arrays) -> list[np.ndarray]:
    """The arrays as flat float64 vectors of one length, checked: rows, the same length, finite values."""
    out = [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]
    n = out[0].size
    if n == 0:
        raise ValueError("No rows: a bootstrap needs at least one row.")
    if any(a.size != n for a in out):
        raise ValueError(f"Predictions and targets differ in length ({[a.size for a in out]}): they must be the same rows.")
    if not all(np.all(np.isfinite(a)) for a in out):
        raise ValueError("Predictions or targets hold NaN or infinite values: remove or fix those rows before evaluating.")
    return out


def _resampled(n_rows: int, n: int, seed: int):
    """Yield (resamples, n_rows) index blocks: ``n`` resamples in all, from one seeded generator, in chunks
    that keep memory bounded. The same (n_rows, n, seed) always gives the same rows."""
    if n < 1:
        raise ValueError(f"n (bootstrap resamples) must be at least 1, got {n}.")
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n_rows)
    done = 0
    while done < n:
        size = min(chunk, n - done)
        yield rng.integers(0, n_rows, size=(size, n_rows))
        done += size


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1 (e.g. 0.95), got {level}.")
    low, high = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high)


def bootstrap_ci(pred, true, metric: Metric = "r2", n: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile-bootstrap confidence interval of ``metric(pred, true)``, resampling rows with replacement.

    ``metric`` is a name (``r2``, ``pearson``, ``spearman``, ``mse``, ``mae``: computed for all resamples at once,
    with the degenerate-case rule of ``nsr_hf.metrics``) or a function ``(pred, true) -> float``.

    >>> bootstrap_ci(pred, true, "r2")   # {'estimate': 0.81, 'low': 0.74, 'high': 0.86, 'level': 0.95, ...}

    Returns ``estimate`` (on all rows), ``low``, ``high``, ``std`` (of the resampled values), ``level``, ``n_bootstrap``.
    """
    pred, true = as_rows(pred, true)
    rows = _metric_rows(metric)
    estimate = float(rows(pred[None], true[None])[0])
    values = np.concatenate([rows(pred[idx], true[idx]) for idx in _resampled(pred.size, n, seed)])
    low, high = _interval(values, level)
    return {"estimate": estimate, "low": low, "high": high, "std": float(values.std()), "level": level, "n_bootstrap": n}


def paired_bootstrap_difference(pred_a, pred_b, true, metric: Metric = "r2", n: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Confidence interval of ``metric(pred_a, true) - metric(pred_b, true)``, both methods scored on the *same*
    resampled rows (a paired bootstrap: the row-to-row variation common to both cancels).

    Returns ``difference`` (on all rows), ``low``, ``high``, ``std``, ``fraction_le_zero`` (the share of resamples
    where the difference is <= 0: a one-sided bootstrap p-value for "a is better than b" when higher is better),
    ``level`` and ``n_bootstrap``. For error metrics (``mse``, ``mae``) lower is better: a negative difference
    favours ``a``.
    """
    pred_a, pred_b, true = as_rows(pred_a, pred_b, true)
    rows = _metric_rows(metric)
    difference = float(rows(pred_a[None], true[None])[0] - rows(pred_b[None], true[None])[0])
    values = np.concatenate([rows(pred_a[idx], true[idx]) - rows(pred_b[idx], true[idx]) for idx in _resampled(true.size, n, seed)])
    low, high = _interval(values, level)
    return {"difference": difference, "low": low, "high": high, "std": float(values.std()),
            "fraction_le_zero": float(np.mean(values <= 0)), "level": level, "n_bootstrap": n}


# ----------------------------------------------------------------------------------------------------------
# Comparisons between methods


def _verdict(name: str, what: str, comparison: dict, level: float) -> str:
    d, low, high = comparison["difference"], comparison["low"], comparison["high"]
    figure = f"ΔR² = {d:.2f} [{low:.2f}, {high:.2f}] ({level:.0%} CI)"
    if low > 0:
        return f"self-report beats {what} ({name}): {figure}"
    if high < 0:
        return f"self-report is worse than {what} ({name}): {figure}"
    return f"self-report does not detectably differ from {what} ({name}): {figure}, the interval includes 0"


def compare_methods(predictions: dict, true, *, n_bootstrap: int, seed: int, level: float = 0.95) -> dict:
    """Paired-bootstrap R^2 differences of ``self`` against each ``cross:<model>`` and the ``ridge_probe``
    present in ``predictions`` ({method: (rows,)}), each with a plain-English verdict."""
    out = {}
    others = [m for m in predictions if m.startswith("cross:")] + (["ridge_probe"] if "ridge_probe" in predictions else [])
    if "self" not in predictions or not n_bootstrap:
        return out
    for other in others:
        comparison = paired_bootstrap_difference(predictions["self"], predictions[other], true, "r2", n=n_bootstrap, seed=seed, level=level)
        what = "cross-report" if other.startswith("cross:") else "a ridge probe of the same representation"
        name = other.split(":", 1)[1] if other.startswith("cross:") else "closed form, frozen base"
        comparison.update(metric="r2", a="self", b=other, verdict=_verdict(name, what, comparison, level))
        out[f"self_vs_{other}"] = comparison
    return out


def selectivity(predictions: dict, true, *, n_bootstrap: int, seed: int, level: float = 0.95) -> dict:
    """R^2(real) - R^2(shuffled-label control) on the same rows, with a paired-bootstrap interval:
    ``ridge_probe`` against ``shuffled_labels``; ``self`` against ``self_shuffled`` when present, else against
    ``shuffled_labels`` (``control`` names the one used)."""
    out = {}
    pairs = [("ridge_probe", "shuffled_labels"), ("self", "self_shuffled" if "self_shuffled" in predictions else "shuffled_labels")]
    for real, control in pairs:
        if real not in predictions or control not in predictions:
            continue
        if n_bootstrap:
            diff = paired_bootstrap_difference(predictions[real], predictions[control], true, "r2", n=n_bootstrap, seed=seed, level=level)
        else:
            t = np.asarray(true, dtype=np.float64)[None]
            diff = {"difference": float(r2_rows(np.asarray(predictions[real])[None], t)[0]
                                        - r2_rows(np.asarray(predictions[control])[None], t)[0])}
        out[real] = {"selectivity": diff.pop("difference"), "control": control, **diff}
    return out


# ----------------------------------------------------------------------------------------------------------
# The causal test's slope ratio


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """OLS slope of ``y`` on ``x`` along the last axis of ``(resamples, m)`` arrays; NaN where ``x`` does not vary."""
    dx = x - x.mean(-1, keepdims=True)
    sxx = (dx * dx).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sxx > 0, (dx * (y - y.mean(-1, keepdims=True))).sum(-1) / sxx, np.nan)


def slope_ratio_ci(given, reports, true, natural, n: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """The causal test's slope over its natural slope, with a row-bootstrap interval.

    ``given`` and ``reports`` are ``(values, rows)``: the value each row's neuron was set to and the report under it;
    ``true`` and ``natural`` are ``(rows,)``: each row's true value and its report without intervention. A resample
    draws rows (with every value of each row), refits both slopes and takes their ratio; resamples whose natural
    slope is 0 or undefined are left out (``dropped``). ``ratio`` is None when the natural slope of all rows is."""
    given, reports = np.asarray(given, dtype=np.float64), np.asarray(reports, dtype=np.float64)
    true, natural = as_rows(true, natural)
    if given.shape != reports.shape or given.ndim != 2 or given.shape[1] != true.size:
        raise ValueError(f"given and reports must be (values, {true.size}) arrays, got {given.shape} and {reports.shape}.")
    causal = float(_slopes(given.reshape(1, -1), reports.reshape(1, -1))[0])
    nat = float(_slopes(true[None], natural[None])[0])
    out = {"ratio": None, "causal_slope": causal, "natural_slope": nat, "low": None, "high": None, "level": level,
           "n_bootstrap": n, "dropped": 0}
    if not np.isfinite(nat) or nat == 0 or not np.isfinite(causal):
        return out
    out["ratio"] = causal / nat
    if not n:
        return out
    ratios = []
    for idx in _resampled(true.size, n, seed):
        x = given[:, idx].transpose(1, 0, 2).reshape(idx.shape[0], -1)
        y = reports[:, idx].transpose(1, 0, 2).reshape(idx.shape[0], -1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios.append(_slopes(x, y) / _slopes(true[idx], natural[idx]))
    ratios = np.concatenate(ratios)
    finite = ratios[np.isfinite(ratios)]
    out["dropped"] = int(ratios.size - finite.size)
    if finite.size:
        out["low"], out["high"] = _interval(finite, level)
    return out
