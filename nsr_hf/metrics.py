"""Metrics of a report against the truth, in activation units: numpy and scipy only (``evaluate.load`` fails offline).

The one rule for degenerate cases
---------------------------------
Every figure in the package (training logs, the evaluation and its bootstrap, the baselines, the drift monitor, the
causal test, the analyses, the pipeline's neuron selection) is computed here, so two figures of the same rows agree.

* **Constant targets** (including a single row): R^2 is 1.0 when every prediction is exact, else 0.0 (scikit-learn's
  ``r2_score(force_finite=True)``); Pearson r and Spearman rho are 0.0.
* **Constant predictions**: r and rho are 0.0; the calibration (``true`` regressed on ``pred``) has slope 0.0 and
  intercept ``mean(true)``. R^2 and the errors need no rule (R^2 of the training mean is 0 on train, as it should be).
* **No rows**: a ``ValueError`` (there is nothing to measure; callers that may meet an empty split say so themselves).

Degenerate figures come with a ``RuntimeWarning`` (and a log line) from the scalar functions; the row-wise variants
(``r2_rows`` ...) apply the same rule silently, since a bootstrap meets constant resamples by design.

Why defined values and not NaN: the Trainer compares ``eval_r2`` between checkpoints (``metric_for_best_model``) and
NaN makes every comparison false; a percentile bootstrap over values that can be NaN has no interval; and a constant
predictor (the training mean, a dead report) is a real result whose r is honestly "no linear relation". JSON written
through ``nsr_hf.utils.write_json`` never holds NaN either way.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
from scipy.stats import rankdata, spearmanr

logger = logging.getLogger(__name__)

CONSTANT_TARGETS = "The targets are constant: R^2 is set to 1.0 if every prediction is exact, else 0.0; r and rho to 0.0."
CONSTANT_PREDICTIONS = ("The predictions are constant: r and rho are set to 0.0, "
                        "the calibration slope to 0.0 and its intercept to mean(true).")


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    logger.warning(message)


def _vectors(*arrays) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]
    if out[0].size == 0:
        raise ValueError("No rows to compute metrics on.")
    if any(a.size != out[0].size for a in out):
        raise ValueError(f"Predictions and targets differ in length ({[a.size for a in out]}): they must be the same rows.")
    return out


# ----------------------------------------------------------------------------------------------------------
# Row-wise: (resamples, rows) arrays -> (resamples,) values, the rule applied per row without a warning


def r2_rows(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """R^2 of each row pair of ``(k, n)`` arrays; constant targets: 1.0 when exact, else 0.0."""
    sse = ((pred - true) ** 2).sum(-1)
    sst = ((true - true.mean(-1, keepdims=True)) ** 2).sum(-1)
    constant = np.ptp(true, axis=-1) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1.0 - sse / sst
    return np.where(constant, np.where(sse == 0, 1.0, 0.0), r2)


def pearson_rows(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of ``(k, n)`` arrays; 0.0 where either side is constant."""
    pc, tc = pred - pred.mean(-1, keepdims=True), true - true.mean(-1, keepdims=True)
    constant = (np.ptp(pred, axis=-1) == 0) | (np.ptp(true, axis=-1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pc * tc).sum(-1) / np.sqrt((pc**2).sum(-1) * (tc**2).sum(-1))
    return np.where(constant, 0.0, np.clip(r, -1.0, 1.0))


def spearman_rows(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Spearman rho (Pearson r of the ranks, ties averaged) of each row pair; 0.0 where either side is constant."""
    return pearson_rows(rankdata(pred, axis=-1), rankdata(true, axis=-1))


def mse_rows(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Mean squared error of each row pair."""
    return ((pred - true) ** 2).mean(-1)


def mae_rows(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Mean absolute error of each row pair."""
    return np.abs(pred - true).mean(-1)


ROW_METRICS = {"r2": r2_rows, "pearson": pearson_rows, "spearman": spearman_rows, "mse": mse_rows, "mae": mae_rows}


# ----------------------------------------------------------------------------------------------------------
# Scalars


def r2_score(y_true, y_pred) -> float:
    """Coefficient of determination ``1 - SSE/SST``; for constant targets 1.0 when every prediction is exact, else 0.0
    (with a warning). No rows: ``ValueError``."""
    y_true, y_pred = _vectors(y_true, y_pred)
    if np.ptp(y_true) == 0:
        _warn(CONSTANT_TARGETS)
    return float(r2_rows(y_pred, y_true))


def pearson_r(x, y, what: str = "") -> float:
    """Pearson r of ``x`` and ``y``; 0.0 with a warning when either side is constant. ``what`` names the pair in it."""
    x, y = _vectors(x, y)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        _warn(f"{what + ': ' if what else ''}one side is constant, so the correlation is undefined; set to 0.0.")
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def calibration(pred, true) -> tuple[float, float]:
    """``(slope, intercept)`` of ``true`` regressed on ``pred`` (OLS); ``(0.0, mean(true))`` for constant predictions."""
    pred, true = _vectors(pred, true)
    if np.ptp(pred) == 0:
        return 0.0, float(true.mean())
    slope = float(np.sum((pred - pred.mean()) * (true - true.mean())) / np.sum((pred - pred.mean()) ** 2))
    return slope, float(true.mean() - slope * pred.mean())


def regression_metrics(pred, true) -> dict[str, float]:
    """Pearson r, Spearman rho, R^2, MSE, MAE and calibration (slope and intercept of ``true`` regressed on
    ``pred``) of one neuron, in activation units, by the rule of the module docstring: never NaN; constant
    predictions or targets warn once each."""
    pred, true = _vectors(pred, true)
    const_pred, const_true = np.ptp(pred) == 0, np.ptp(true) == 0
    if const_true:
        _warn(CONSTANT_TARGETS)
    if const_pred:
        _warn(CONSTANT_PREDICTIONS)
    if const_pred or const_true:
        pearson = spearman = 0.0
    else:  # np.corrcoef, as pearson_r: the scalar figures agree to the last bit
        pearson = float(np.corrcoef(pred, true)[0, 1])
        spearman = float(spearmanr(pred, true).statistic)
    slope, intercept = calibration(pred, true)
    return {"pearson": pearson, "spearman": spearman, "r2": float(r2_rows(pred, true)), "mse": float(mse_rows(pred, true)),
            "mae": float(mae_rows(pred, true)), "calibration_slope": slope, "calibration_intercept": intercept}


def quadratic_weighted_kappa(true_bins, pred_bins, num_bins: int) -> float:
    """Cohen's kappa with quadratic weights over ``num_bins`` ordered bins. When the expected disagreement is
    zero (every true and predicted bin the same single bin) it is 1.0 if they agree, with a warning."""
    true_bins, pred_bins = np.asarray(true_bins, dtype=np.int64), np.asarray(pred_bins, dtype=np.int64)
    observed = np.zeros((num_bins, num_bins))
    np.add.at(observed, (true_bins, pred_bins), 1)
    observed /= observed.sum()
    expected = np.outer(observed.sum(1), observed.sum(0))
    i, j = np.indices((num_bins, num_bins))
    weights = (i - j) ** 2 / (num_bins - 1) ** 2
    denominator = float((weights * expected).sum())
    if denominator == 0:
        _warn("Quadratic-weighted kappa is undefined (one bin only): set to 1.0 if the bins agree, else 0.0.")
        return 1.0 if float((weights * observed).sum()) == 0 else 0.0
    return float(1.0 - (weights * observed).sum() / denominator)


def bin_metrics(pred_bins, true_bins, num_bins: int) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over the bins present in the targets) and quadratic-weighted kappa."""
    pred_bins, true_bins = np.asarray(pred_bins).reshape(-1), np.asarray(true_bins).reshape(-1)
    recalls = [float(np.mean(pred_bins[true_bins == b] == b)) for b in np.unique(true_bins)]
    return {"accuracy": float(np.mean(pred_bins == true_bins)), "balanced_accuracy": float(np.mean(recalls)),
            "qwk": quadratic_weighted_kappa(true_bins, pred_bins, num_bins)}


def finite_median(values) -> float | None:
    """The median of the finite numbers among ``values`` (None and NaN left out); None when there are none."""
    values = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.median(values)) if values else None
