"""The evaluation protocol: every figure against a hand-computed case (constant predictions and targets get a
defined value and a warning, never NaN); bootstrap intervals hold the estimate and narrow with more rows; the
paired difference separates a better predictor from an identical one; subsets hold the right rows; run_evaluate
scores the predictor and every baseline on the same rows and writes metrics.json, report.md and the PNGs; nsr evaluate."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from nsr_hf.evaluation.predictions import predict_split
from nsr_hf.evaluation.protocol import EvaluateConfig, run_evaluate
from nsr_hf.evaluation.scoring import LOW_SPREAD_RATIO, evaluate_predictions, majority_class_rate, split_spread, subset_indices
from nsr_hf.evaluation.statistics import bootstrap_ci, compare_methods, paired_bootstrap_difference, selectivity
from nsr_hf.metrics import regression_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def all_numbers(d) -> list[float]:
    if isinstance(d, dict):
        return [x for v in d.values() for x in all_numbers(v)]
    if isinstance(d, (list, tuple)):
        return [x for v in d for x in all_numbers(v)]
    return [d] if isinstance(d, (int, float)) else []


# -- figures of one method -----------------------------------------------------------------------------------------


def test_every_figure_matches_a_hand_computed_case():
    # pred [0, 1, 1, 3] against true [0, 1, 2, 3]: one error of -1
    m = evaluate_predictions([0.0, 1.0, 1.0, 3.0], [0.0, 1.0, 2.0, 3.0], greedy=[0.0, 1.0, 3.0, 3.0], bin_edges=[0.0, 1.5, 3.0],
                             n_bootstrap=50)
    assert m["rows"] == 4
    assert m["mse"] == pytest.approx(0.25) and m["mae"] == pytest.approx(0.25)
    assert m["r2"] == pytest.approx(1 - 1 / 5)  # SSE 1, SST 5
    assert m["pearson"] == pytest.approx(4.5 / math.sqrt(4.75 * 5))
    assert m["spearman"] == pytest.approx(4.5 / math.sqrt(4.5 * 5))  # ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4]
    assert m["calibration_slope"] == pytest.approx(4.5 / 4.75) and m["calibration_intercept"] == pytest.approx(1.5 - 4.5 / 4.75 * 1.25)
    # bins [0, 1.5) and [1.5, 3]: true bins [0, 0, 1, 1]; predicted [0, 0, 0, 1]
    assert m["accuracy"] == 0.75 and m["balanced_accuracy"] == pytest.approx((1 + 0.5) / 2)
    assert m["qwk"] == pytest.approx(1 - 0.25 / (0.5 * 0.25 + 0.5 * 0.75))
    assert m["majority_class_rate"] == 0.5
    # the greedy readout [0, 1, 3, 3] gets every bin right and one value wrong by +1
    assert m["greedy_accuracy"] == 1.0 and m["greedy_mse"] == pytest.approx(0.25) and m["greedy_r2"] == pytest.approx(0.8)
    assert len(m["r2_ci"]) == 2 and len(m["greedy_pearson_ci"]) == 2


def test_majority_class_rate_is_the_share_of_the_most_frequent_true_bin():
    assert majority_class_rate([2, 2, 0, 2, 1]) == pytest.approx(3 / 5)


def test_constant_predictions_get_defined_figures_and_a_warning_never_nan():
    with pytest.warns(RuntimeWarning, match="predictions are constant"):
        m = evaluate_predictions([0.5] * 8, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], bin_edges=[0.0, 4.0, 8.0], n_bootstrap=100)
    assert all(math.isfinite(x) for x in all_numbers(m))
    assert m["pearson"] == 0.0 and m["pearson_ci"] == [0.0, 0.0]
    assert m["r2"] == pytest.approx(1 - sum((0.5 - t) ** 2 for t in range(8)) / 42)
    assert m["calibration_slope"] == 0.0 and m["calibration_intercept"] == 3.5


def test_constant_targets_get_defined_figures_and_a_warning_never_nan():
    with pytest.warns(RuntimeWarning, match="targets are constant"):
        m = evaluate_predictions([0.0, 1.0, 2.0, 3.0], [1.0] * 4, n_bootstrap=100)
    assert all(math.isfinite(x) for x in all_numbers(m))
    assert m["r2"] == 0.0 and m["r2_ci"] == [0.0, 0.0] and m["pearson"] == 0.0
    with pytest.warns(RuntimeWarning, match="targets are constant"):
        exact = evaluate_predictions([1.0] * 4, [1.0] * 4, n_bootstrap=100)
    assert exact["r2"] == 1.0 and exact["r2_ci"] == [1.0, 1.0]


def test_nan_inputs_and_mismatched_lengths_are_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        evaluate_predictions([0.0, float("nan")], [0.0, 1.0])
    with pytest.raises(ValueError, match="same rows"):
        evaluate_predictions([0.0, 1.0, 2.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="Unknown metric 'rmse'"):
        bootstrap_ci([0.0, 1.0], [0.0, 1.0], "rmse")


# -- the bootstrap --------------------------------------------------------------------------------------------------


def noisy(n, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    true = rng.normal(size=n)
    return true + rng.normal(scale=noise, size=n), true


@pytest.mark.parametrize("metric", ["r2", "pearson", "spearman", "mse", "mae"])
def test_vectorised_bootstrap_equals_the_metric_computed_on_each_resample(metric):
    pred, true = noisy(40)
    fast = bootstrap_ci(pred, true, metric, n=200, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slow = bootstrap_ci(pred, true, lambda p, t: regression_metrics(p, t)[metric], n=200, seed=3)
    assert fast["estimate"] == pytest.approx(regression_metrics(pred, true)[metric])
    assert (fast["low"], fast["high"]) == pytest.approx((slow["low"], slow["high"]), abs=1e-12)


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_rows():
    widths = []
    for n in (30, 300, 3000):
        pred, true = noisy(n)
        ci = bootstrap_ci(pred, true, "r2", n=500)
        assert ci["low"] <= ci["estimate"] <= ci["high"] and ci["level"] == 0.95
        widths.append(ci["high"] - ci["low"])
    assert widths[0] > widths[1] > widths[2]
    assert widths[1] / widths[2] == pytest.approx(math.sqrt(10), rel=0.35)  # about 1/sqrt(n)


def test_bootstrap_is_reproducible_by_seed():
    pred, true = noisy(50)
    assert bootstrap_ci(pred, true, "pearson", n=100, seed=1) == bootstrap_ci(pred, true, "pearson", n=100, seed=1)
    assert bootstrap_ci(pred, true, "pearson", n=100, seed=1) != bootstrap_ci(pred, true, "pearson", n=100, seed=2)


def test_paired_difference_excludes_zero_for_a_clearly_better_predictor_and_includes_it_for_identical_ones():
    good, true = noisy(200, noise=0.3, seed=0)
    bad = true + np.random.default_rng(1).normal(scale=1.0, size=200)
    better = paired_bootstrap_difference(good, bad, true, "r2", n=500)
    assert better["low"] > 0 and better["fraction_le_zero"] == 0.0
    assert better["difference"] == pytest.approx(regression_metrics(good, true)["r2"] - regression_metrics(bad, true)["r2"])
    same = paired_bootstrap_difference(good, good.copy(), true, "r2", n=500)
    assert same["difference"] == 0.0 and same["low"] <= 0 <= same["high"] and same["fraction_le_zero"] == 1.0
    twin = true + np.random.default_rng(2).normal(scale=0.3, size=200)  # as good, different errors
    equal = paired_bootstrap_difference(good, twin, true, "r2", n=500)
    assert equal["low"] < 0 < equal["high"]


def test_comparisons_give_verdicts_in_plain_english():
    good, true = noisy(200, noise=0.3)
    bad = true + np.random.default_rng(1).normal(scale=1.5, size=200)
    out = compare_methods({"self": good, "cross:minilm": bad, "ridge_probe": good.copy()}, true, n_bootstrap=300, seed=0)
    assert out["self_vs_cross:minilm"]["verdict"].startswith("self-report beats cross-report (minilm): ΔR² = ")
    assert "does not detectably differ" in out["self_vs_ridge_probe"]["verdict"]
    worse = compare_methods({"self": bad, "cross:other": good}, true, n_bootstrap=300, seed=0)
    assert worse["self_vs_cross:other"]["verdict"].startswith("self-report is worse than cross-report (other)")


def test_selectivity_is_real_minus_shuffled_control_on_the_same_rows():
    good, true = noisy(100, noise=0.3)
    shuffled = np.random.default_rng(5).permutation(good)
    out = selectivity({"self": good, "ridge_probe": good, "shuffled_labels": shuffled}, true, n_bootstrap=200, seed=0)
    expected = regression_metrics(good, true)["r2"] - regression_metrics(shuffled, true)["r2"]
    assert out["ridge_probe"]["selectivity"] == pytest.approx(expected) and out["ridge_probe"]["control"] == "shuffled_labels"
    assert out["self"]["control"] == "shuffled_labels" and out["self"]["low"] > 0
    own = selectivity({"self": good, "self_shuffled": shuffled, "shuffled_labels": good}, true, n_bootstrap=0, seed=0)
    assert own["self"]["control"] == "self_shuffled" and own["self"]["selectivity"] == pytest.approx(expected)


# -- subsets --------------------------------------------------------------------------------------------------------


def test_subsets_are_the_top_decile_by_true_value_and_a_random_sample_of_the_same_size():
    true = np.random.default_rng(0).permutation(50).astype(float)
    pred = true + np.random.default_rng(1).normal(size=50)
    idx = subset_indices(true, seed=0)
    assert sorted(true[idx["top_decile"]]) == [45.0, 46.0, 47.0, 48.0, 49.0]
    assert idx["random_sample"].size == 5 and len(set(idx["random_sample"])) == 5
    m = evaluate_predictions(pred, true, n_bootstrap=0, seed=0)
    for name in ("top_decile", "random_sample"):
        rows = idx[name]
        assert m["subsets"][name]["rows"] == 5
        assert m["subsets"][name]["r2"] == pytest.approx(regression_metrics(pred[rows], true[rows])["r2"])
        assert m["subsets"][name]["mse"] == pytest.approx(np.mean((pred[rows] - true[rows]) ** 2))
    assert m["subsets"]["top_decile"]["true_min"] == 45.0
    assert subset_indices(true, seed=0, random_sample_size=20)["random_sample"].size == 20


def test_ties_at_the_decile_boundary_are_broken_by_row_order_and_tiny_subsets_are_noted():
    assert subset_indices([1.0, 5.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])["top_decile"].tolist() == [1, 2]
    m = evaluate_predictions(np.arange(9.0), np.arange(9.0), n_bootstrap=0)
    assert m["subsets"]["top_decile"] == {"rows": 1, "note": "too few rows (1) for figures on a subset"}


# -- a tiny trained predictor and its dataset -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_model_dirs, tmp_path_factory):
    """nsr train on a tiny Llama (scan, dataset, head_only training) and a 60-document corpus (a few seconds)."""
    from conftest import write_word_corpus

    from nsr_hf.pipeline import run_train
    from nsr_hf.training.config import TrainConfig

    tmp = tmp_path_factory.mktemp("evaluate")
    corpus = write_word_corpus(tmp / "docs.jsonl")
    config = TrainConfig(model=tiny_model_dirs["llama"], corpus=str(corpus), scan_documents=30, dataset_documents=60, max_length=32,
                         num_train_epochs=2, per_device_train_batch_size=8, learning_rate=1e-2, read_layer=2, unfreeze="head_only",
                         logging_steps=1, evaluate=False, output_dir=str(tmp / "train"))
    summary = run_train(config)
    return Path(config.output_dir), summary


FAST = {"n_bootstrap": 200, "causal_max_rows": 16, "causal_num_values": 5, "batch_size": 16}


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory, tiny_model_dirs):
    from nsr_hf.modeling.predictor import load_predictor

    train_dir, _ = trained
    out = tmp_path_factory.mktemp("evaluation")
    predictor = load_predictor(str(train_dir / "predictor"))
    log = [{"loss": 1.0 / (s + 1), "step": s} for s in range(1, 6)] + [{"eval_loss": 0.4, "eval_r2": 0.1, "eval_pearson": 0.5, "step": 5}]
    drift = {"history": [{"step": s, "drift/max_abs": 0.0, "drift/mean_abs": 0.0} for s in (0, 5)]}
    # another tiny model stands in for MiniLM as the cross-prediction model (MiniLM itself: the slow test)
    other = tiny_model_dirs["gpt2"]
    config = EvaluateConfig(predictor=str(train_dir / "predictor"), output_dir=str(out), cross_models=[other], **FAST)
    return out, run_evaluate(config, predictor=predictor, log_history=log, drift=drift), other


def test_predict_split_reads_each_rows_labelled_token_in_activation_units(trained):
    from datasets import load_from_disk

    from nsr_hf.modeling.predictor import load_predictor
    from nsr_hf.training.collator import PredictorDataCollator

    train_dir, _ = trained
    predictor = load_predictor(str(train_dir / "predictor"))
    rows = load_from_disk(str(train_dir / "dataset"))["test"]
    expected, greedy = predict_split(predictor, rows, batch_size=3)
    assert expected.shape == (len(rows), 1) and greedy is None
    one = rows.select([len(rows) - 1])
    alone = predictor(**{k: v for k, v in PredictorDataCollator(predictor.tokenizer)([one[0]]).items() if k != "labels"}).predictions
    assert expected[-1, 0] == pytest.approx(float(alone[0, 0]), abs=1e-5)  # the same value alone as in a padded batch
    assert predictor.training is False


def test_run_evaluate_scores_the_predictor_and_every_baseline_on_the_same_rows(evaluated):
    out, evaluation, other = evaluated
    saved = json.loads((out / "metrics.json").read_text())
    test = saved["metrics"]["test"]
    cross = f"cross:{other}"
    assert {"self", "mean", "token_lookup", "ridge_probe", "random_init", "shuffled_labels", cross} <= test.keys()
    rows = saved["rows"]["test"]
    assert all(m["rows"] == rows for m in test.values())
    for m in test.values():
        assert m["r2_ci"][0] <= m["r2_ci"][1] and {"pearson", "spearman", "mse", "mae", "calibration_slope", "accuracy", "qwk"} <= m.keys()
        assert {"top_decile", "random_sample"} == m["subsets"].keys()
    # the figures recomputed from predictions.json
    predictions = json.loads((out / "predictions.json").read_text())["by_neuron"][saved["neuron"]]["test"]
    assert len(predictions["true"]) == rows
    for method in ("self", "ridge_probe", cross):
        assert test[method]["r2"] == pytest.approx(regression_metrics(predictions[method], predictions["true"])["r2"])
    assert {f"self_vs_{cross}", "self_vs_ridge_probe"} == saved["comparisons"]["test"].keys()
    assert saved["selectivity"]["test"]["self"]["control"] == "shuffled_labels"
    assert set(saved["probe_by_layer"]) == {"0", "1", "2"}
    assert saved["causal"]["split"] == "test" and len(saved["causal"]["mean_report"]) == 5
    assert saved["by_neuron"][saved["neuron"]]["metrics"]["test"]["self"]["r2"] == test["self"]["r2"]
    assert evaluation["metrics"]["test"]["self"]["r2"] == test["self"]["r2"]
    assert not any(isinstance(x, float) and not math.isfinite(x) for x in all_numbers(saved))
    spread = saved["spread"]["test"]
    assert (spread["std"] == pytest.approx(np.std(predictions["true"]))
            and spread["ratio"] == pytest.approx(spread["std"] / spread["train_std"]))


def test_a_split_where_the_neuron_barely_varies_is_flagged_not_hidden():
    rng = np.random.default_rng(0)
    quiet = split_spread(rng.normal(scale=0.1, size=200), 0.64, "test")
    assert quiet["ratio"] == pytest.approx(quiet["std"] / 0.64) and quiet["ratio"] < LOW_SPREAD_RATIO
    assert "test" in quiet["warning"] and "MSE" in quiet["warning"]
    normal = split_spread(rng.normal(scale=0.6, size=200), 0.64, "test")
    assert normal["warning"] is None and normal["ratio"] > LOW_SPREAD_RATIO
    assert split_spread([1.0, 2.0], None, "test")["ratio"] is None  # no training std known: no ratio, no warning


def test_run_evaluate_writes_the_report_and_every_plot(evaluated):
    out, _, other = evaluated
    for name in ("report.md", "pred_vs_true.png", "residuals.png", "r2_by_layer.png", "training_curves.png", "drift.png", "methods.png",
                 "causal.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert ("| **self** |" in report and f"cross-report ({other})" in report and "## Causal test" in report
            and "![methods.png](methods.png)" in report)


def test_head_only_predictor_may_reuse_its_own_base_for_the_baselines(trained, tmp_path):
    from nsr_hf.modeling.predictor import load_predictor

    train_dir, _ = trained
    predictor = load_predictor(str(train_dir / "predictor"))
    config = EvaluateConfig(predictor=str(train_dir / "predictor"), output_dir=str(tmp_path), methods=["mean", "ridge_probe"],
                            base_unchanged=True, causal=False, n_bootstrap=50)
    reused = run_evaluate(config, predictor=predictor)
    reloaded = run_evaluate(EvaluateConfig(**{**config.__dict__, "base_unchanged": False, "overwrite": True}), predictor=predictor)
    # the base of head_only training is the original: the same probe either way
    assert reused["metrics"]["test"]["ridge_probe"]["r2"] == pytest.approx(reloaded["metrics"]["test"]["ridge_probe"]["r2"], abs=1e-6)


def test_several_neurons_are_each_evaluated_with_their_own_baselines(tiny, tmp_path):
    from datasets import Dataset, DatasetDict

    from nsr_hf.modeling.predictor import ActivationPredictor

    model, tok = tiny
    g = torch.Generator().manual_seed(0)

    def split(n):
        ids = [torch.randint(1, len(tok), (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
        acts = [[(r[-1] % 10) / 10, -(r[-1] % 7) / 7] for r in ids]
        return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids],
                                  "label_position": [len(r) - 1 for r in ids], "label_token_id": [r[-1] for r in ids], "activations": acts,
                                  "doc_id": [f"d{i}" for i in range(n)]})

    dataset = DatasetDict({"train": split(40), "validation": split(12), "test": split(20)})
    metadata = {"neurons": ["2.5", "1.3"]}  # the dataset's column order differs from the predictor's
    predictor = ActivationPredictor.from_base(model, tok, neurons=["1.3", "2.5"], label_transform={"mean": [0.0, 0.0], "std": [1.0, 1.0]})
    config = EvaluateConfig(output_dir=str(tmp_path), methods=["mean", "ridge_probe"], causal=False, n_bootstrap=50)
    evaluation = run_evaluate(config, predictor=predictor, dataset=dataset, metadata=metadata, base_model=model, tokenizer=tok)
    assert list(evaluation["by_neuron"]) == ["1.3", "2.5"] and evaluation["neuron"] == "1.3"
    true_13 = np.asarray(dataset["test"]["activations"])[:, 1]
    assert evaluation["by_neuron"]["1.3"]["metrics"]["test"]["mean"]["mse"] == pytest.approx(
        np.mean((np.asarray(dataset["train"]["activations"])[:, 1].mean() - true_13) ** 2))
    assert "## Every neuron" in (tmp_path / "report.md").read_text()


def test_a_bin_head_is_scored_on_both_readouts(trained, tmp_path):
    from nsr_hf.data.storage import load_activation_dataset
    from nsr_hf.modeling.predictor import ActivationPredictor, load_predictor
    from nsr_hf.models import load_model_and_tokenizer

    train_dir, _ = trained
    dataset, metadata = load_activation_dataset(train_dir / "dataset")
    base = load_predictor(str(train_dir / "predictor")).config.base_model_name_or_path
    model, tok = load_model_and_tokenizer(base)
    predictor = ActivationPredictor.from_base(model, tok, neurons=metadata["neurons"], head_type="classification", read_layer=2,
                                              label_transform=metadata["transform"])
    evaluation = run_evaluate(EvaluateConfig(output_dir=str(tmp_path), methods=["mean"], causal=False, n_bootstrap=50),
                              predictor=predictor, dataset=dataset, metadata=metadata)
    self_ = evaluation["metrics"]["test"]["self"]
    assert {"greedy_r2", "greedy_r2_ci", "greedy_accuracy", "greedy_qwk", "accuracy", "majority_class_rate"} <= self_.keys()
    greedy = json.loads((tmp_path / "predictions.json").read_text())["by_neuron"][metadata["neurons"][0]]["test"]["self_greedy"]
    centers = np.asarray(metadata["transform"]["bin_centers"][0])  # the mean of the train values in each bin
    assert all(np.isclose(centers, g).any() for g in greedy)  # the greedy readout reports bin centres
    assert "| self (greedy) |" in (tmp_path / "report.md").read_text()
    assert evaluation["predictor"]["num_bins"] == 10 and evaluation["predictor"]["bin_strategy"] == "quantile"
    assert "Bins (10 quantile bins, train-fitted edges):" in (tmp_path / "report.md").read_text()


def test_the_training_log_and_drift_json_next_to_the_predictor_are_found(trained, tmp_path):
    import shutil

    train_dir, _ = trained
    run = tmp_path / "run"
    shutil.copytree(train_dir / "predictor", run / "predictor")
    (run / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": 2.0, "step": 1}, {"loss": 1.0, "step": 2}]}))
    (run / "drift.json").write_text(json.dumps({"history": [{"step": 0, "1.3/mean_shift": 0.0}, {"step": 2, "1.3/mean_shift": 0.25}]}))
    evaluation = run_evaluate(EvaluateConfig(predictor=str(run / "predictor"), output_dir=str(run / "eval"), methods=["none"], causal=False,
                                             n_bootstrap=0))
    assert (run / "eval" / "training_curves.png").exists() and (run / "eval" / "drift.png").exists()
    assert evaluation["drift"] == {"step": 2, "1.3/mean_shift": 0.25}
    assert set(evaluation["metrics"]["test"]) == {"self"} and "r2_ci" not in evaluation["metrics"]["test"]["self"]


def test_bad_input_gets_clear_errors(tiny, tmp_path):
    from datasets import Dataset, DatasetDict

    from nsr_hf.modeling.predictor import ActivationPredictor

    model, tok = tiny
    predictor = ActivationPredictor.from_base(model, tok, neurons=["1.3"])
    rows = Dataset.from_dict({"input_ids": [[5, 6]], "attention_mask": [[1, 1]], "label_position": [1], "activations": [[0.1]]})
    with pytest.raises(ValueError, match=r"not the predictor's \['1.3'\]"):
        run_evaluate(EvaluateConfig(output_dir=str(tmp_path), methods=["none"]), predictor=predictor, dataset=DatasetDict({"test": rows}),
                     metadata={"neurons": ["2.2"]})
    with pytest.raises(ValueError, match="None of the splits"):
        run_evaluate(EvaluateConfig(output_dir=str(tmp_path), methods=["none"]), predictor=predictor, dataset=DatasetDict({"train": rows}))
    with pytest.raises(ValueError, match="Unknown method"):
        EvaluateConfig(methods=["linear_probe"])
    with pytest.raises(ValueError, match="No predictor"):
        run_evaluate(EvaluateConfig(output_dir=str(tmp_path)))


def test_nsr_evaluate_on_the_train_output(trained, tmp_path, capsys):
    from nsr_hf.cli import main

    train_dir, _ = trained
    code = main(["evaluate", "--predictor", str(train_dir / "predictor"), "--output_dir", str(tmp_path), "--methods", "mean", "ridge_probe",
                 "--n_bootstrap", "50", "--no_causal"])
    assert code == 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["metrics"]["test"]) == {"self", "mean", "ridge_probe"} and saved["causal"] is None
    assert saved["predictor"]["dataset"] == str(train_dir / "dataset")  # found through the predictor's config
    assert (tmp_path / "report.md").exists() and "evaluation of" in capsys.readouterr().out
    assert main(["evaluate", "--predictor", str(train_dir / "predictor"), "--output_dir", str(tmp_path), "--methods", "probes"]) == 2
    assert "Unknown method" in capsys.readouterr().err


# -- the real model -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_whole_protocol_on_smollm2_with_minilm_as_the_cross_model(tmp_path):
    """SmolLM2: scan, dataset and a few head_only steps, then every method including MiniLM cross-prediction."""
    from nsr_hf.pipeline import run_train
    from nsr_hf.training.config import TrainConfig

    config = TrainConfig(scan_documents=40, dataset_documents=80, max_length=32, max_steps=6, per_device_train_batch_size=8,
                         eval_strategy="no", learning_rate=1e-3, evaluate=False, output_dir=str(tmp_path / "train"))
    run_train(config)
    evaluation = run_evaluate(EvaluateConfig(predictor=str(tmp_path / "train" / "predictor"), output_dir=str(tmp_path / "eval"),
                                             base_unchanged=True, n_bootstrap=200, causal_max_rows=8, causal_num_values=3))
    test = evaluation["metrics"]["test"]
    assert {"self", "ridge_probe", "cross:minilm", "random_init", "shuffled_labels", "token_lookup", "mean"} <= test.keys()
    assert "self_vs_cross:minilm" in evaluation["comparisons"]["test"] and len(evaluation["probe_by_layer"]) == 30
    assert evaluation["causal"]["meaningful"] is False  # the head reads the last block: see nsr_hf.evaluation.causal
    assert (tmp_path / "eval" / "report.md").exists() and (tmp_path / "eval" / "methods.png").exists()
