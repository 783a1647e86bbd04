"""The report: the headline table and verdicts read the evaluation as it is; report.md and the PNGs are written only
from the data given (drift.png only with a drift history); metrics.json read back gives the same report; the model
card carries the headline table when an evaluation is attached, and stays as it was otherwise; the method registry
orders and describes the rows and is what the evaluation accepts."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nsr_hf.evaluation.protocol import EvaluateConfig
from nsr_hf.evaluation.report import write_report
from nsr_hf.evaluation.scoring import evaluate_predictions
from nsr_hf.evaluation.statistics import compare_methods
from nsr_hf.methods import BASELINE_METHODS, DEFAULT_BASELINES, EVALUATION_KIND, METHODS, describe, display_order, headline_table, verdicts
from nsr_hf.utils import to_jsonable

PNG = b"\x89PNG\r\n\x1a\n"


def small_evaluation(greedy: bool = False) -> tuple[dict, dict]:
    """An evaluation shaped like run_evaluate's, built from known predictions (no model needed)."""
    rng = np.random.default_rng(0)
    true = rng.normal(size=60)
    preds = {"self": true + rng.normal(scale=0.3, size=60), "ridge_probe": true + rng.normal(scale=0.6, size=60),
             "mean": np.zeros(60), "cross:minilm": true + rng.normal(scale=1.5, size=60)}
    edges = np.linspace(-3, 3, 7)
    greedy_values = np.round(preds["self"]) if greedy else None
    metrics = {}
    for method, values in preds.items():
        with pytest.warns(RuntimeWarning) if method == "mean" else _nothing():
            metrics[method] = evaluate_predictions(values, true, greedy=greedy_values if method == "self" else None, bin_edges=edges,
                                                   n_bootstrap=200)
    evaluation = {
        "kind": EVALUATION_KIND, "neurons": ["2.7"], "neuron": "2.7", "splits": ["test"], "rows": {"test": 60},
        "predictor": {"path": "p", "head_type": "classification" if greedy else "regression", "read_layer": 3, "base_model": "m",
                      "dataset": "d"},
        "bootstrap": {"n": 200, "level": 0.95, "seed": 0},
        "metrics": {"test": metrics},
        "comparisons": {"test": compare_methods(preds, true, n_bootstrap=200, seed=0)},
        "selectivity": {"test": {}},
        "probe_by_layer": {0: {"alpha": 1.0, "validation_r2": 0.1, "test_r2": 0.2},
                           3: {"alpha": 10.0, "validation_r2": 0.6, "test_r2": 0.5}},
        "causal": None,
    }
    predictions = {"test": {"true": true, **preds, **({"self_greedy": greedy_values} if greedy else {})}}
    return evaluation, predictions


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_headline_table_lists_every_method_with_its_intervals():
    evaluation, _ = small_evaluation()
    table = headline_table(evaluation).splitlines()
    assert table[0] == "| method | R² [95% CI] | r [95% CI] | MSE |"
    assert [row.split("|")[1].strip() for row in table[2:]] == ["**self**", "ridge_probe", "mean", "cross:minilm"]
    m = evaluation["metrics"]["test"]["self"]
    assert table[2] == (f"| **self** | {m['r2']:.3f} [{m['r2_ci'][0]:.3f}, {m['r2_ci'][1]:.3f}] | "
                        f"{m['pearson']:.3f} [{m['pearson_ci'][0]:.3f}, {m['pearson_ci'][1]:.3f}] | {m['mse']:.4f} |")
    with pytest.raises(ValueError, match="no split 'test_ood'"):
        headline_table(evaluation, "test_ood")


def test_the_greedy_readout_gets_its_own_row():
    evaluation, _ = small_evaluation(greedy=True)
    rows = [row.split("|")[1].strip() for row in headline_table(evaluation).splitlines()[2:]]
    assert rows[:2] == ["**self**", "self (greedy)"]
    assert f"{evaluation['metrics']['test']['self']['greedy_r2']:.3f}" in headline_table(evaluation).splitlines()[3]


def test_a_low_spread_split_gets_its_warning_in_the_report(tmp_path):
    evaluation, predictions = small_evaluation()
    evaluation["spread"] = {"test": {"std": 0.1, "train_std": 0.64, "ratio": 0.16,
                                     "warning": "On test the neuron's std is 0.1, 0.16 of its training std"}}
    write_report(evaluation, tmp_path, predictions=predictions)
    assert "- ⚠ On test the neuron's std is 0.1, 0.16 of its training std" in (tmp_path / "report.md").read_text()


def test_verdicts_name_the_comparison_and_its_interval():
    evaluation, _ = small_evaluation()
    found = verdicts(evaluation)
    assert any(v.startswith("self-report beats cross-report (minilm): ΔR² = ") for v in found)
    assert len(found) == 2


def test_write_report_writes_the_markdown_and_the_plots_it_has_data_for(tmp_path):
    evaluation, predictions = small_evaluation()
    log = [{"loss": 1.0, "step": 1}, {"loss": 0.5, "step": 2}, {"eval_loss": 0.6, "eval_r2": 0.3, "step": 2}]
    path = write_report(evaluation, tmp_path, predictions=predictions, log_history=log)
    assert path == tmp_path / "report.md"
    for name in ("pred_vs_true.png", "residuals.png", "methods.png", "r2_by_layer.png", "training_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG, name
    assert not (tmp_path / "drift.png").exists() and not (tmp_path / "causal.png").exists()
    report = path.read_text()
    assert headline_table(evaluation) in report and "## Ridge probe by layer" in report and "![drift.png]" not in report


@pytest.mark.parametrize("drift", [[{"step": 0, "drift/max_abs": 0.0}, {"step": 10, "drift/max_abs": 0.2}],
                                   {"history": [{"step": 0, "drift/max_abs": 0.0}, {"step": 10, "drift/max_abs": 0.2}]}])
def test_drift_plot_from_a_history_or_a_drift_json(tmp_path, drift):
    evaluation, _ = small_evaluation()
    write_report(evaluation, tmp_path, drift=drift)
    assert (tmp_path / "drift.png").read_bytes()[:8] == PNG
    assert "At step 10: max_abs 0.2000" in (tmp_path / "report.md").read_text()


def test_drift_json_of_the_drift_monitor_gives_the_three_panels_and_the_last_measurement(tmp_path):
    evaluation, _ = small_evaluation()
    def entry(step, shift):
        return {"step": step, "epoch": step / 10, "2.7/mean_shift": shift, "2.7/std_ratio": 1.0, "head_r_live": 0.8,
                "head_r2_reference": 0.6, "lm_loss": 3.0 + shift, "lm_loss_delta": shift, "seconds": 0.1}

    drift_json = {"neurons": ["2.7"], "history": [entry(0, 0.0), entry(10, 0.5)], "final": entry(10, 0.5)}
    write_report(evaluation, tmp_path, drift=drift_json)
    report = (tmp_path / "report.md").read_text()
    assert "At step 10: 2.7/mean_shift 0.5000, 2.7/std_ratio 1.0000, head_r_live 0.8000" in report and "seconds" not in report
    assert (tmp_path / "drift.png").read_bytes()[:8] == PNG


def test_drift_comes_from_the_training_log_when_not_given_and_a_summary_gets_no_curve(tmp_path):
    evaluation, _ = small_evaluation()
    log = [{"loss": 1.0, "step": 1}, {"drift/2.7/mean_shift": 0.1, "step": 1}, {"drift/2.7/mean_shift": 0.3, "step": 2}]
    write_report(evaluation, tmp_path / "log", log_history=log)
    assert (tmp_path / "log" / "drift.png").exists() and "At step 2: 2.7/mean_shift 0.3000" in (tmp_path / "log" / "report.md").read_text()
    write_report(evaluation, tmp_path / "summary", drift={"max_abs": 0.0, "mean_abs": 0.0, "rows": 7, "split": "test"})
    assert not (tmp_path / "summary" / "drift.png").exists()
    assert "After training: max_abs 0.0000, mean_abs 0.0000, rows 7" in (tmp_path / "summary" / "report.md").read_text()


def test_metrics_json_read_back_gives_the_same_report(tmp_path):
    evaluation, predictions = small_evaluation(greedy=True)
    first = write_report(evaluation, tmp_path / "a", predictions=predictions).read_text()
    again = json.loads(json.dumps(to_jsonable(evaluation), allow_nan=False))  # layer keys become strings
    second = write_report(again, tmp_path / "b", predictions=predictions).read_text()
    assert first.replace("(a)", "") == second.replace("(b)", "")
    assert (tmp_path / "b" / "r2_by_layer.png").exists()


def test_a_report_needs_metrics_by_split(tmp_path):
    with pytest.raises(ValueError, match="no metrics by split"):
        write_report({"neuron": "1.2"}, tmp_path)


# -- the model card ---------------------------------------------------------------------------------------------------


def predictor_of(tiny):
    from nsr_hf.modeling.predictor import ActivationPredictor

    model, tok = tiny
    return ActivationPredictor.from_base(model, tok, neurons=["1.3"], label_transform={"mean": [0.5], "std": [0.29]})


def test_the_registry_orders_the_rows_self_first_then_baselines_then_cross_models_then_the_rest():
    names = ["zeta", "cross:b", "mean", "cross:a", "self", "ridge_probe", "self (greedy)"]
    assert display_order(names) == ["self", "self (greedy)", "ridge_probe", "mean", "cross:a", "cross:b", "zeta"]


def test_every_method_of_the_registry_that_predicts_rows_has_a_description_in_the_report():
    for method in METHODS:
        if method.has_predictions:
            assert describe(method.name if method.name != "cross" else "cross:minilm")


def test_the_evaluation_runs_the_registrys_default_baselines_and_accepts_only_its_baselines():
    assert tuple(EvaluateConfig().methods) == DEFAULT_BASELINES
    assert set(DEFAULT_BASELINES) <= set(BASELINE_METHODS) and "self" not in BASELINE_METHODS
    with pytest.raises(ValueError, match="Unknown method"):
        EvaluateConfig(methods=["self"])


def test_model_card_carries_the_headline_table_of_an_attached_evaluation(tiny, tmp_path):
    evaluation, _ = small_evaluation()
    predictor = predictor_of(tiny)
    predictor.evaluation = evaluation
    predictor.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert headline_table(evaluation) in card and "self-report beats cross-report (minilm)" in card and "### test (60 rows)" in card
    assert predictor_of(tiny).model_card(evaluation) == card  # or passed as the metrics


def test_model_card_keeps_simple_metrics_next_to_the_evaluation(tiny):
    evaluation, _ = small_evaluation()
    predictor = predictor_of(tiny)
    predictor.evaluation_results = {"test": {"r2": 0.93}}
    plain = predictor.model_card()
    assert "## Evaluation" in plain and "| test/r2 | 0.9300 |" in plain and "R² [95% CI]" not in plain
    predictor.evaluation = evaluation
    both = predictor.model_card()
    assert "R² [95% CI]" in both and "## Metrics at the end of training" in both and "| test/r2 | 0.9300 |" in both
