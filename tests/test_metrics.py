"""The one rule for degenerate cases (nsr_hf.metrics): constant targets give R² 1 when exact else 0 and r = 0, constant
predictions give r = 0 and a flat calibration, no rows is an error; the row-wise variants the bootstrap uses follow the
same rule silently; and every module that reports a figure gives the same number for the same rows."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from nsr_hf.evaluation.scoring import evaluate_predictions
from nsr_hf.evaluation.statistics import bootstrap_ci, selectivity
from nsr_hf.metrics import (
    ROW_METRICS,
    calibration,
    pearson_r,
    pearson_rows,
    r2_rows,
    r2_score,
    regression_metrics,
    spearman_rows,
)
from nsr_hf.training.monitoring import _agreement, neuron_drift_stats

RNG = np.random.default_rng(0)
TRUE = RNG.normal(size=40)
PRED = TRUE + RNG.normal(scale=0.5, size=40)


# -- the rule ---------------------------------------------------------------------------------------------------


def test_constant_targets_give_r2_one_when_exact_else_zero_with_a_warning():
    with pytest.warns(RuntimeWarning, match="targets are constant"):
        assert r2_score([2.0, 2.0, 2.0], [2.0, 2.0, 2.0]) == 1.0
    with pytest.warns(RuntimeWarning, match="targets are constant"):
        assert r2_score([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0


def test_constant_targets_give_zero_correlation_with_a_warning():
    with pytest.warns(RuntimeWarning, match="constant"):
        assert pearson_r([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) == 0.0


def test_constant_predictions_give_zero_correlation_and_a_flat_calibration():
    with pytest.warns(RuntimeWarning, match="constant"):
        assert pearson_r([4.0, 4.0, 4.0], [1.0, 2.0, 6.0]) == 0.0
    assert calibration([4.0, 4.0, 4.0], [1.0, 2.0, 6.0]) == (0.0, 3.0)


def test_a_single_row_is_a_constant_target():
    with pytest.warns(RuntimeWarning, match="targets are constant"):
        m = regression_metrics([1.0], [1.0])
    assert m["r2"] == 1.0 and m["pearson"] == 0.0 and m["mse"] == 0.0


def test_no_rows_is_an_error_that_says_so():
    for function in (r2_score, pearson_r, calibration, regression_metrics):
        with pytest.raises(ValueError, match="No rows"):
            function([], [])


def test_predictions_and_targets_of_different_lengths_are_an_error():
    with pytest.raises(ValueError, match="differ in length"):
        r2_score([1.0, 2.0], [1.0, 2.0, 3.0])


def test_ordinary_figures_match_numpy():
    assert r2_score(TRUE, PRED) == pytest.approx(1 - np.sum((PRED - TRUE) ** 2) / np.sum((TRUE - TRUE.mean()) ** 2))
    assert pearson_r(PRED, TRUE) == np.corrcoef(PRED, TRUE)[0, 1]
    slope, intercept = np.polyfit(PRED, TRUE, 1)
    assert calibration(PRED, TRUE) == pytest.approx((slope, intercept))


# -- row-wise variants -------------------------------------------------------------------------------------------


def test_row_wise_metrics_agree_with_the_scalar_ones_row_by_row():
    pred = np.stack([PRED, np.full(40, 0.3), TRUE])
    true = np.stack([TRUE, TRUE, np.full(40, 1.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        scalar = [regression_metrics(p, t) for p, t in zip(pred, true)]
    for name, rows in ROW_METRICS.items():
        np.testing.assert_allclose(rows(pred, true), [m[name] for m in scalar], rtol=1e-12, atol=1e-12)


def test_row_wise_metrics_apply_the_rule_without_a_warning():
    constant = np.ones((2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert r2_rows(constant, constant).tolist() == [1.0, 1.0]
        assert r2_rows(constant * 2, constant).tolist() == [0.0, 0.0]
        assert pearson_rows(constant, np.arange(10.0).reshape(2, 5)).tolist() == [0.0, 0.0]
        assert spearman_rows(np.arange(10.0).reshape(2, 5), constant).tolist() == [0.0, 0.0]


# -- every module gives the same figure for the same rows ---------------------------------------------------------


def test_the_evaluation_the_bootstrap_and_the_drift_monitor_give_the_same_r2_and_r():
    figures = evaluate_predictions(PRED, TRUE, n_bootstrap=0)
    r, r2 = _agreement(PRED, TRUE, "head vs neuron")
    assert figures["r2"] == r2 == bootstrap_ci(PRED, TRUE, "r2", n=10)["estimate"] == r2_score(TRUE, PRED)
    assert figures["pearson"] == r == pearson_r(PRED, TRUE)
    assert bootstrap_ci(PRED, TRUE, "pearson", n=10)["estimate"] == pytest.approx(r, abs=1e-12)


def test_the_modules_agree_on_a_constant_target():
    true = np.full(10, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        figures = evaluate_predictions(PRED[:10], true, n_bootstrap=0)
        r, r2 = _agreement(PRED[:10], true, "head vs neuron")
        estimate = bootstrap_ci(PRED[:10], true, "r2", n=10)["estimate"]
    assert figures["r2"] == r2 == estimate == 0.0 and figures["pearson"] == r == 0.0


def test_selectivity_without_a_bootstrap_is_the_difference_of_the_evaluations_r2():
    control = RNG.permutation(PRED)
    out = selectivity({"ridge_probe": PRED, "shuffled_labels": control}, TRUE, n_bootstrap=0, seed=0)
    expected = evaluate_predictions(PRED, TRUE, n_bootstrap=0)["r2"] - evaluate_predictions(control, TRUE, n_bootstrap=0)["r2"]
    assert out["ridge_probe"]["selectivity"] == pytest.approx(expected, abs=1e-12)


def test_the_drift_monitors_correlation_is_pearson_r():
    live = TRUE + RNG.normal(scale=0.1, size=40)
    assert neuron_drift_stats(live, TRUE)["correlation"] == pearson_r(live, TRUE)
