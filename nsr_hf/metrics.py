"""Metrics of a report against the truth, in activation units: numpy and scipy only (``evaluate.load`` fails offline).

One rule for degenerate cases, used everywhere a figure is computed (training, evaluation, baselines, sweeps):
see ``regression_metrics``.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
from scipy.stats import spearmanr

logger = logging.getLogger(__name__)


def r2_score(y_true, y_pred) -> float:
    """Coefficient of determination ``1 - SSE/SST``; NaN when the targets are constant (or there are none)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    sst = float(((y_true - y_true.mean()) ** 2).sum()) if len(y_true) else 0.0
    if sst == 0.0:
        return float("nan")
    return 1.0 - float(((y_true - y_pred) ** 2).sum()) / sst



def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    logger.warning(message)


def regression_metrics(pred, true) -> dict[str, float]:
    """Pearson r, Spearman rho, R^2, MSE, MAE and calibration (slope and intercept of ``true`` regressed on
    ``pred``) of one neuron, in activation units. Constant predictions or targets give defined values with a
    warning: r = rho = 0, slope = 0 and intercept = mean(true) for constant predictions, and R^2 = 1 when the
    errors are all zero else 0 for constant targets. Never NaN."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    true = np.asarray(true, dtype=np.float64).reshape(-1)
    if pred.size == 0:
        raise ValueError("No rows to compute metrics on.")
    err = pred - true
    mse, mae = float(np.mean(err**2)), float(np.mean(np.abs(err)))
    sse, sst = float(np.sum(err**2)), float(np.sum((true - true.mean()) ** 2))
    const_pred, const_true = np.ptp(pred) == 0, np.ptp(true) == 0
    if const_true:
        _warn("The targets are constant: R^2 is set to 1.0 if every prediction is exact, else 0.0; r and rho to 0.0.")
        r2 = 1.0 if sse == 0 else 0.0
    else:
        r2 = 1.0 - sse / sst
    if const_pred:
        _warn("The predictions are constant: r and rho are set to 0.0, the calibration slope to 0.0 and its intercept to mean(true).")
    if const_pred or const_true:
        pearson = spearman = 0.0
    else:
        pearson = float(np.corrcoef(pred, true)[0, 1])
        spearman = float(spearmanr(pred, true).statistic)
    if const_pred:
        slope, intercept = 0.0, float(true.mean())
    else:
        slope = float(np.sum((pred - pred.mean()) * (true - true.mean())) / np.sum((pred - pred.mean()) ** 2))
        intercept = float(true.mean() - slope * pred.mean())
    return {"pearson": pearson, "spearman": spearman, "r2": float(r2), "mse": mse, "mae": mae,
            "calibration_slope": slope, "calibration_intercept": intercept}


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
