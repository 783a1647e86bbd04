"""Faithfulness: the counterfactual R² is the report against the value that was set; a neuron whose value cannot reach
the head gets a slope ratio near 0 and a verdict that says so; the probe of intervened rows is fitted on the set values;
the section leaves the natural figures alone; the report, the headline and the sweep show it; JSON stays strict.

The known-answer models come from test_causal.py: a predictor whose report is exactly the target neuron's value.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_causal import COORD, SCALE, TARGET, known_answer, labelled_rows, linear_predictor, unit

from nsr_hf.architectures import get_neuron_module
from nsr_hf.evaluation import faithfulness
from nsr_hf.evaluation.causal import causal_test, predictor_reports
from nsr_hf.evaluation.faithfulness import faithfulness_on_rows, faithfulness_section, fit_values
from nsr_hf.evaluation.statistics import slope_ratio_ci
from nsr_hf.methods import headline_table, verdicts
from nsr_hf.metrics import regression_metrics

FAST = {"n_bootstrap": 100, "batch_size": 8}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def section_of(predictor, rows, **kw):
    causal = causal_test(predictor, rows, num_values=5, per_row=True)
    return faithfulness_section(predictor, {"test": rows}, rows, causal={"test": causal}, **FAST, **kw)["test"]


def test_a_report_that_is_the_set_value_gets_counterfactual_r2_one_and_slope_ratio_one(tiny):
    predictor, rows = known_answer(tiny)
    section = section_of(predictor, rows)
    assert section["methods"]["self"]["r2"] == pytest.approx(1.0, abs=1e-4)
    assert section["slope_ratio"]["ratio"] == pytest.approx(1.0, abs=0.05)
    assert section["meaningful"] is True and "follows the neuron when it is set" in section["verdict"]


def test_a_constant_report_gets_the_metrics_rule_against_the_set_values(tiny):
    model, tok = tiny
    predictor = linear_predictor(model, tok, torch.zeros(model.config.hidden_size), read_layer=2)
    rows = labelled_rows(predictor.base, tok)
    values = fit_values(predictor, rows, 0, TARGET)
    result = faithfulness_on_rows(predictor, rows, values, **FAST)
    reported = np.asarray(result["predictions"]["self"])
    assert np.ptp(reported) == 0
    with pytest.warns(RuntimeWarning):
        expected = regression_metrics(reported, result["predictions"]["set"])["r2"]
    assert result["methods"]["self"]["r2"] == expected


def test_a_neuron_whose_output_weights_are_zero_gets_a_slope_ratio_near_zero_and_the_verdict_says_so(tiny):
    model, tok = tiny
    with torch.no_grad():  # the neuron writes nothing: its value cannot reach the head
        module = get_neuron_module(model, TARGET.layer)
        (module.weight[TARGET.index] if model.config.model_type == "gpt2" else module.weight[:, TARGET.index]).zero_()
    head = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    predictor = linear_predictor(model, tok, head, read_layer=2)
    rows = labelled_rows(predictor.base, tok)
    reports = predictor_reports(predictor, rows)
    for row, value in zip(rows, reports):  # a perfect recomputer: the labels are what it reports from the context
        row["activations"] = [float(value)]
    section = section_of(predictor, rows)
    assert abs(section["slope_ratio"]["ratio"]) < 0.05 and section["slope_ratio"]["natural_slope"] == pytest.approx(1.0)
    assert "does not follow the neuron" in section["verdict"] and "recomputes the value from the context" in section["verdict"]


def test_reading_the_target_layer_is_flagged_and_the_verdict_claims_nothing(tiny):
    model, tok = tiny
    predictor = linear_predictor(model, tok, unit(COORD, model.config.hidden_size) / SCALE, read_layer=TARGET.layer)
    section = section_of(predictor, labelled_rows(predictor.base, tok))
    assert section["meaningful"] is False
    assert section["verdict"].startswith("Faithfulness cannot be shown here") and "target's own block" in section["verdict"]


def test_the_probe_of_intervened_rows_is_fitted_on_the_set_values(tiny, monkeypatch):
    predictor, rows = known_answer(tiny)
    fitted = []
    original = faithfulness.RidgeProbe.fit

    def spy(self, X, y, *args, **kw):
        fitted.append(np.asarray(y))
        return original(self, X, y, *args, **kw)

    monkeypatch.setattr(faithfulness.RidgeProbe, "fit", spy)
    values = fit_values(predictor, rows, 0, TARGET)
    _, info = faithfulness.fit_probes(predictor, rows, TARGET, 0, values, max_rows=64, seed=0, batch_size=4)
    natural = np.array([r["activations"][0] for r in rows])
    np.testing.assert_allclose(fitted[0], natural)  # the natural probe: natural labels
    np.testing.assert_allclose(fitted[1], info["train_set_values"])  # the intervened probe: the set values
    assert not np.allclose(fitted[1], natural)


def test_the_representation_is_read_with_each_rows_own_value_set(tiny):
    predictor, rows = known_answer(tiny)
    set_to = np.linspace(-3, 3, len(rows))
    features = faithfulness.representation(predictor, rows, 2, TARGET, set_to, batch_size=5)
    np.testing.assert_allclose(features[:, COORD] / SCALE, set_to, atol=1e-4)  # rows are reordered by length inside


def test_slope_ratio_interval_holds_the_ratio():
    rng = np.random.default_rng(0)
    true = rng.normal(size=40)
    given = np.repeat(np.linspace(-2, 2, 5)[:, None], 40, 1)
    ratio = slope_ratio_ci(given, 0.5 * given + rng.normal(scale=0.1, size=given.shape), true, true + rng.normal(scale=0.1, size=40),
                           n=200)
    assert ratio["low"] <= ratio["ratio"] <= ratio["high"] and ratio["ratio"] == pytest.approx(0.5, abs=0.1)
    assert slope_ratio_ci(given, given, true, np.zeros(40), n=50)["ratio"] is None  # no natural slope: no ratio


def test_the_section_is_strict_json_and_the_headline_shows_it(tiny):
    predictor, rows = known_answer(tiny)
    section = section_of(predictor, rows)
    section.pop("predictions")
    json.dumps(section, allow_nan=False)
    evaluation = {"metrics": {"test": {"self": {"r2": 0.9, "pearson": 0.95, "mse": 0.1}}}, "faithfulness": {"test": section}}
    table = headline_table(evaluation)
    assert "counterfactual R²" in table and "slope ratio" in table and "ridge probe (intervened rows)" in table
    assert section["verdict"] in verdicts(evaluation)
    honest = section["comparisons"]["ridge_probe_intervened"]
    row = next(line for line in table.splitlines() if line.startswith("| ridge probe (intervened rows)"))
    assert row.rstrip(" |").endswith(f"{honest['difference']:.3f} [{honest['low']:.3f}, {honest['high']:.3f}]")


# -- run_evaluate -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_evaluations(tiny_model_dirs, tmp_path_factory):
    """A tiny trained predictor evaluated with and without the faithfulness section."""
    from conftest import write_word_corpus

    from nsr_hf.evaluation.protocol import EvaluateConfig, run_evaluate
    from nsr_hf.modeling.predictor import load_predictor
    from nsr_hf.pipeline import run_train
    from nsr_hf.training.config import TrainConfig

    tmp = tmp_path_factory.mktemp("faithfulness")
    corpus = write_word_corpus(tmp / "docs.jsonl")
    config = TrainConfig(model=tiny_model_dirs["llama"], corpus=str(corpus), scan_documents=30, dataset_documents=60, max_length=32,
                         num_train_epochs=1, per_device_train_batch_size=8, learning_rate=1e-2, read_layer=2, unfreeze="head_only",
                         evaluate=False, output_dir=str(tmp / "train"))
    run_train(config)
    path = str(tmp / "train" / "predictor")
    fast = {"n_bootstrap": 50, "causal_max_rows": 16, "causal_num_values": 3, "methods": ["mean", "ridge_probe"], "base_unchanged": True}
    on = run_evaluate(EvaluateConfig(predictor=path, output_dir=str(tmp / "on"), counterfactual_rows=32, compare_predictor=path, **fast),
                      predictor=load_predictor(path))
    off = run_evaluate(EvaluateConfig(predictor=path, output_dir=str(tmp / "off"), counterfactual_rows=0, **fast),
                       predictor=load_predictor(path))
    return tmp, on, off


def test_run_evaluate_writes_the_section_in_strict_json_under_the_headline_neuron_and_per_neuron(two_evaluations):
    tmp, on, _ = two_evaluations
    saved = json.loads((tmp / "on" / "metrics.json").read_text())  # the reader refuses NaN: json.loads(parse_constant=...)
    json.dumps(saved, allow_nan=False)
    test = saved["faithfulness"]["test"]
    assert {"self", "compare", "ridge_probe", "ridge_probe_intervened"} == test["methods"].keys()
    assert test["slope_ratio"]["ratio"] is not None and test["verdict"]
    assert saved["by_neuron"][saved["neuron"]]["faithfulness"]["test"]["verdict"] == test["verdict"]
    assert "per_row" not in saved["causal"] and "predictions" not in test
    counterfactual = json.loads((tmp / "on" / "predictions.json").read_text())["counterfactual"][saved["neuron"]]["test"]
    assert len(counterfactual["set"]) == test["rows"] == min(32, saved["rows"]["test"])


def test_the_natural_figures_are_the_same_with_and_without_the_section(two_evaluations):
    _, on, off = two_evaluations
    assert "faithfulness" not in off
    for key in ("metrics", "comparisons", "selectivity", "spread", "probe_by_layer"):
        assert on[key] == off[key], key
    assert {k: v for k, v in on["causal"].items()} == off["causal"]


def test_the_report_has_a_faithfulness_section_and_plot(two_evaluations):
    tmp, _, off = two_evaluations
    report = (tmp / "on" / "report.md").read_text()
    assert "## Faithfulness" in report and "![faithfulness.png](faithfulness.png)" in report and "slope ratio" in report
    assert (tmp / "on" / "faithfulness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Faithfulness" not in (tmp / "off" / "report.md").read_text()


def test_the_sweep_summarises_slope_ratio_and_counterfactual_r2_next_to_r2():
    from nsr_hf.sweep import run_figures, summarise_runs, sweep_markdown

    def run(seed, ratio, r2):
        section = {"methods": {"self": {"r2": r2}, "ridge_probe": {"r2": 0.1}, "ridge_probe_intervened": {"r2": 0.5}},
                   "slope_ratio": {"ratio": ratio}}
        evaluation = {"metrics": {"test": {"self": {"r2": 0.9}}}, "faithfulness": {"test": section}}
        return {"neuron": "7.268", "seed": seed, "status": "finished", "figures": run_figures({"evaluation": evaluation})}

    runs = [run(0, 0.9, 0.8), run(1, 1.0, 0.9)]
    summary = summarise_runs(runs)
    assert summary["self"]["slope_ratio"]["median"] == pytest.approx(0.95)
    assert summary["self"]["counterfactual_r2"]["median"] == pytest.approx(0.85)
    assert summary["faithfulness:ridge_probe_intervened"]["counterfactual_r2"]["median"] == pytest.approx(0.5)
    text = sweep_markdown({"summary": summary, "runs": runs, "split": "test", "neurons": ["7.268"], "seeds": [0, 1]})
    assert "| faithfulness: reader | counterfactual R² | slope ratio |" in text and "| ridge_probe_intervened | 0.500" in text
    assert "| 7.268 | 0 | finished | 0.900 | n/a | n/a | n/a | 0.900 | 0.800 |" in text


def test_a_token_head_gets_the_same_section_through_its_expected_value(tiny):
    from nsr_hf.modeling.predictor import ActivationPredictor

    model, tok = tiny
    transform = {"mean": [0.0], "std": [1.0], "bin_edges": [[i / 10 for i in range(11)]]}
    predictor = ActivationPredictor.from_base(model, tok, neurons=[str(TARGET)], head_type="token", label_transform=transform, read_layer=2)
    section = section_of(predictor, labelled_rows(model, tok))
    assert {"self", "ridge_probe", "ridge_probe_intervened"} == section["methods"].keys() and section["meaningful"] is True
    assert section["verdict"].startswith("The report")


def test_the_report_is_compared_with_each_outside_reader_on_the_same_rows(tiny):
    predictor, rows = known_answer(tiny)
    section = section_of(predictor, rows)
    methods, comparisons = section["methods"], section["comparisons"]
    assert comparisons.keys() == {"ridge_probe", "ridge_probe_intervened"}
    for reader, c in comparisons.items():
        assert c["difference"] == pytest.approx(methods["self"]["r2"] - methods[reader]["r2"], abs=1e-9)
        assert c["low"] <= c["difference"] <= c["high"]
    honest = comparisons["ridge_probe_intervened"]
    expected = "beats" if honest["low"] > 0 else "is worse than" if honest["high"] < 0 else "within noise"
    assert "honest outside reader" in section["verdict"] and expected in section["verdict"]
    assert f"{honest['difference']:+.2f}" in section["verdict"]


def test_the_outside_readers_see_as_many_train_rows_as_the_reporter(tiny):
    predictor, rows = known_answer(tiny)
    assert len(rows) > 8
    causal = causal_test(predictor, rows, num_values=5, per_row=True)
    section = faithfulness_section(predictor, {"test": rows}, rows, causal={"test": causal}, max_rows=8, **FAST)["test"]
    assert section["rows"] == 8  # the held-out rows are capped by max_rows ...
    assert all(p["train_rows"] == len(rows) for p in section["probes"].values())  # ... the readers' training rows are not


def test_the_sweep_records_training_time_and_the_comparison_with_each_reader():
    from nsr_hf.sweep import run_figures

    section = {"methods": {"self": {"r2": 0.9}, "ridge_probe_intervened": {"r2": 0.5}}, "slope_ratio": {"ratio": 1.0},
               "comparisons": {"ridge_probe_intervened": {"difference": 0.4, "low": 0.2, "high": 0.6}}}
    figures = run_figures({"evaluation": {"metrics": {"test": {"self": {"r2": 0.9}}}, "faithfulness": {"test": section}},
                           "train": {"train_runtime": 123.4}})
    assert figures["self"]["train_seconds"] == 123.4
    assert figures["faithfulness:self_vs_ridge_probe_intervened"] == {"delta_counterfactual_r2": 0.4, "beats": 1.0}


def test_the_sweep_table_lists_readers_and_the_comparisons_apart():
    from nsr_hf.sweep import run_figures, summarise_runs, sweep_markdown

    section = {"methods": {"self": {"r2": 0.9}, "ridge_probe_intervened": {"r2": 0.5}}, "slope_ratio": {"ratio": 1.0},
               "comparisons": {"ridge_probe_intervened": {"difference": 0.4, "low": 0.2, "high": 0.6}}}
    runs = [{"neuron": "7.268", "seed": 0, "status": "finished",
             "figures": run_figures({"evaluation": {"metrics": {"test": {"self": {"r2": 0.9}}}, "faithfulness": {"test": section}}})}]
    text = sweep_markdown({"summary": summarise_runs(runs), "runs": runs, "split": "test", "neurons": ["7.268"], "seeds": [0]})
    assert "| self_vs_ridge_probe_intervened | 0.400" in text and "| 100% of 1 |" in text
    assert "| self_vs_ridge_probe_intervened | n/a" not in text  # not listed as a reader


# -- the honest reader of the original model -------------------------------------------------------------------


def _without_the_neuron(predictor):
    """A copy of the predictor's base whose target neuron writes nothing: the original model of a training that built the
    path from the neuron to the head (the known-answer predictor reads the neuron exactly)."""
    import copy

    original = copy.deepcopy(predictor.base)
    with torch.no_grad():
        module = get_neuron_module(original, TARGET.layer)
        (module.weight[TARGET.index] if original.config.model_type == "gpt2" else module.weight[:, TARGET.index]).zero_()
    return original


def test_the_original_models_reader_cannot_read_a_path_the_training_built_and_the_verdict_says_so(tiny):
    predictor, rows = known_answer(tiny)
    section = section_of(predictor, rows, original=_without_the_neuron(predictor))
    reader = section["methods"][faithfulness.ORIGINAL_READER]
    assert section["methods"]["self"]["r2"] == pytest.approx(1.0, abs=1e-4) and reader["r2"] < 0.2
    gain = section["comparisons"][faithfulness.ORIGINAL_READER]
    assert gain["low"] > 0.5 and gain["difference"] == pytest.approx(section["methods"]["self"]["r2"] - reader["r2"], abs=1e-9)
    assert "the training made the neuron readable where the head reads" in section["verdict"]
    assert "the ridge probe fitted on intervened rows of the original model does not follow it" in section["verdict"]
    assert section["probes"][faithfulness.ORIGINAL_READER]["model"].startswith("the original model")


def test_the_original_models_reader_is_the_honest_reader_when_nothing_was_trained(tiny):
    """The same weights give the same features, values and fit: the two readers' reports are equal; the predictor's own
    base (the same object) gets no second reader."""
    import copy

    predictor, rows = known_answer(tiny)
    section = section_of(predictor, rows, original=copy.deepcopy(predictor.base))
    np.testing.assert_allclose(section["predictions"][faithfulness.ORIGINAL_READER],
                               section["predictions"]["ridge_probe_intervened"], rtol=1e-6, atol=1e-8)
    assert faithfulness.ORIGINAL_READER not in section_of(predictor, rows, original=predictor.base)["methods"]


def test_the_original_models_reader_fits_features_of_the_original_with_each_rows_value_set(tiny):
    """Its probe is the ridge fit of the original model's read-layer features with the neuron set, row by row, to the
    honest reader's values: computed here one row at a time, apart from the section's batched passes."""
    from nsr_hf.capture import Intervention, intervene
    from nsr_hf.modeling.probes import RidgeProbe, layer_features

    predictor, rows = known_answer(tiny)
    original = _without_the_neuron(predictor)
    with torch.no_grad():  # and the blocks after the neuron differ too: the original is not the predictor's base
        for p in original.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    values = fit_values(predictor, rows, 0, TARGET)
    probes, info = faithfulness.fit_probes(predictor, rows, TARGET, 0, values, max_rows=64, seed=0, batch_size=4, original=original)
    features = []
    for row, value in zip(rows, info["train_set_values"]):
        iv = Intervention(TARGET.layer, [TARGET.index], "set", torch.tensor([[value]], dtype=torch.float32),
                          positions=torch.tensor([row["label_position"]]))
        with intervene(original, iv):
            columns = {"input_ids": [row["input_ids"]], "attention_mask": [row["attention_mask"]],
                       "label_position": [row["label_position"]]}
            features.append(layer_features(original, columns, [2], progress=False)[2][0])
    features = np.asarray(features)
    expected = RidgeProbe().fit(features, info["train_set_values"]).predict(features)
    np.testing.assert_allclose(probes[faithfulness.ORIGINAL_READER].predict(features), expected, rtol=1e-4, atol=1e-5)


def test_the_original_models_reader_starts_from_the_states_below_the_neuron_with_the_same_reports(tiny):
    from nsr_hf.capture import capture_activations
    from nsr_hf.training.collator import PredictorDataCollator
    from nsr_hf.training.prefix_cache import PrefixCache, recording_states

    predictor, rows = known_answer(tiny)
    original = _without_the_neuron(predictor)
    with recording_states(original, TARGET.layer) as states:  # the blocks below the neuron's are the predictor's too
        capture_activations(original, PredictorDataCollator(pad_token_id=0)(rows), [str(TARGET)], position="last")
    prefix = PrefixCache.from_states(states, rows)
    assert prefix is not None and prefix.layer == TARGET.layer
    fed = section_of(predictor, rows, original=original, train_prefix=prefix)
    whole = section_of(predictor, rows, original=original)
    np.testing.assert_allclose(fed["predictions"][faithfulness.ORIGINAL_READER], whole["predictions"][faithfulness.ORIGINAL_READER],
                               rtol=1e-4, atol=1e-5)


def test_the_verdict_says_what_the_original_models_reader_shows():
    def result(low, high):
        return {"meaningful": True, "slope_ratio": {"ratio": 1.0, "low": 0.9, "high": 1.1},
                "methods": {"self": {"r2": 0.9}, faithfulness.ORIGINAL_READER: {"r2": 0.9 - (low + high) / 2}},
                "comparisons": {faithfulness.ORIGINAL_READER: {"difference": (low + high) / 2, "low": low, "high": high}}}

    assert "the report gains ΔR² +0.50 [0.40, 0.60]: the training made the neuron readable" in faithfulness.verdict(result(0.4, 0.6))
    assert "is within noise of the report (ΔR² +0.00 [-0.05, 0.05]): the neuron was as readable there before the training" in \
        faithfulness.verdict(result(-0.05, 0.05))
    assert "The same reader of the original model does better than the report" in faithfulness.verdict(result(-0.3, -0.1))


def test_an_evaluation_of_a_trained_base_reads_the_original_model_and_says_so_in_the_report(two_evaluations, tiny_model_dirs):
    from nsr_hf.evaluation.protocol import EvaluateConfig, run_evaluate
    from nsr_hf.modeling.predictor import load_predictor
    from nsr_hf.models import load_model_and_tokenizer

    tmp, on, _ = two_evaluations
    assert faithfulness.ORIGINAL_READER not in on["faithfulness"]["test"]["methods"]  # base_unchanged: its base is the original
    path = str(tmp / "train" / "predictor")
    original, tok = load_model_and_tokenizer(tiny_model_dirs["llama"])
    result = run_evaluate(EvaluateConfig(predictor=path, output_dir=str(tmp / "original"), counterfactual_rows=16, n_bootstrap=20,
                                         causal_max_rows=8, causal_num_values=3, methods=["mean"]),
                          predictor=load_predictor(path), base_model=original, tokenizer=tok)
    assert faithfulness.ORIGINAL_READER in result["faithfulness"]["test"]["methods"]
    assert "| ridge probe (intervened rows, original model) |" in (tmp / "original" / "report.md").read_text()


def test_an_original_model_that_cannot_be_loaded_costs_only_its_reader(two_evaluations, caplog):
    from nsr_hf.evaluation.protocol import EvaluateConfig, run_evaluate
    from nsr_hf.modeling.predictor import load_predictor

    tmp, _, _ = two_evaluations
    path = str(tmp / "train" / "predictor")
    with caplog.at_level("WARNING"):
        result = run_evaluate(EvaluateConfig(predictor=path, output_dir=str(tmp / "no_original"), counterfactual_rows=16,
                                             n_bootstrap=20, causal_max_rows=8, causal_num_values=3, methods=[],
                                             base_model=str(tmp / "no such model")),
                              predictor=load_predictor(path))
    methods = result["faithfulness"]["test"]["methods"]
    assert {"self", "ridge_probe", "ridge_probe_intervened"} == methods.keys()
    assert "no reader of the original model" in caplog.text and "no such model" in caplog.text


def test_nsr_train_scores_the_plainly_trained_predictor_on_the_same_counterfactual_rows(two_evaluations):
    """``compare_predictor`` is a recipe key: the faithful run's evaluation scores the plain run's predictor next to its own
    report, on the rows and set values the plain predictor's own evaluation drew (same dataset, seed and source)."""
    from nsr_hf.pipeline import run_train
    from nsr_hf.training.config import TrainConfig

    tmp, on, _ = two_evaluations
    plain = tmp / "train" / "predictor"
    config = TrainConfig(model=str(json.loads((tmp / "train" / "run_config.json").read_text())["model"]),
                         dataset=str(tmp / "train" / "dataset"), neuron=on["neuron"], max_length=32, num_train_epochs=1,
                         per_device_train_batch_size=8, learning_rate=1e-2, read_layer=2, unfreeze="head_only",
                         intervention_rate=0.5, compare_predictor=str(plain), counterfactual_rows=32, n_bootstrap=50,
                         eval_methods=["mean", "ridge_probe"],
                         drift_every_n_steps=100000, output_dir=str(tmp / "faithful"))
    summary = run_train(config)
    section = summary["evaluation"]["faithfulness"]["test"]
    assert {"self", "compare", "ridge_probe", "ridge_probe_intervened"} == section["methods"].keys()
    assert section["comparisons"]["compare"]["difference"] == pytest.approx(
        section["methods"]["self"]["r2"] - section["methods"]["compare"]["r2"], abs=1e-9)
    assert section["methods"]["compare"]["r2"] == pytest.approx(on["faithfulness"]["test"]["methods"]["self"]["r2"], abs=1e-4)
    assert "plainly trained predictor" in section["verdict"]
    assert "plainly trained predictor" in (tmp / "faithful" / "evaluation" / "report.md").read_text()


def test_a_compare_predictor_of_another_neuron_is_refused_before_the_evaluation_works(two_evaluations):
    import shutil

    from nsr_hf.evaluation.protocol import EvaluateConfig, run_evaluate
    from nsr_hf.run_folder import work_folder

    tmp, on, _ = two_evaluations
    other = tmp / "other-neuron"
    shutil.copytree(tmp / "train" / "predictor", other)
    config = json.loads((other / "config.json").read_text())
    layer, index = on["neuron"].split(".")
    config["neurons"] = [f"{layer}.{int(index) + 1}"]
    (other / "config.json").write_text(json.dumps(config))
    out = tmp / "refused"
    with pytest.raises(ValueError, match=r"compare_predictor .* reports .*not " + on["neuron"].replace(".", r"\.")):
        run_evaluate(EvaluateConfig(predictor=str(tmp / "train" / "predictor"), output_dir=str(out), counterfactual_rows=32,
                                    compare_predictor=str(other), base_unchanged=True, n_bootstrap=10))
    assert not out.exists() and not work_folder(out, "stages").exists()  # refused before any stage was written
    # nsr train refuses it when the recipe is read, before training, when the recipe names the neuron
    from nsr_hf.training.config import TrainConfig

    with pytest.raises(ValueError, match=r"compare_predictor .* reports .*not " + on["neuron"].replace(".", r"\.")):
        TrainConfig(neuron=on["neuron"], compare_predictor=str(other), output_dir=str(tmp / "never"))


def test_a_compare_predictor_that_is_not_there_is_refused_when_the_recipe_is_read(tmp_path):
    from nsr_hf.errors import MissingPathError
    from nsr_hf.training.config import TrainConfig

    with pytest.raises(MissingPathError, match="compare_predictor .*no such path.*<its output_dir>/predictor"):
        TrainConfig(compare_predictor=str(tmp_path / "plain" / "predictor"), output_dir=str(tmp_path / "out"))


@pytest.mark.parametrize("suffix", [None, ""])
def test_a_token_heads_readers_read_the_state_its_report_is_read_from(tiny, suffix):
    """The outside readers read the head's own representation: for a token head with a prompt, the state at the prompt's
    last token (with the neuron set at the labelled token, as in the head's pass), not the labelled token's. The head's
    report is the LM head's report-token logits of that state, so those logits of the readers' features are the report."""
    from nsr_hf.capture import Intervention
    from nsr_hf.evaluation.causal import report_under_intervention
    from nsr_hf.evaluation.faithfulness import representation
    from nsr_hf.modeling.predictor import ActivationPredictor

    model, tok = tiny
    transform = {"mean": [0.0], "std": [1.0], "bin_edges": [[i / 10 for i in range(11)]]}
    prompt = {} if suffix is None else {"prompt_suffix": suffix}
    predictor = ActivationPredictor.from_base(model, tok, neurons=[str(TARGET)], head_type="token", label_transform=transform,
                                              read_layer=2, **prompt)
    assert bool(predictor.config.prompt_suffix_ids) == (suffix is None)  # the default asks a question after the text
    rows = labelled_rows(model, tok)
    rows = rows + [{**r, "label_position": len(r["input_ids"]) // 2} for r in rows]  # and tokens inside the text
    set_to = np.linspace(-1.0, 2.0, len(rows))
    features = representation(predictor, rows, 2, TARGET, set_to)
    lm_head = predictor.base.get_output_embeddings()
    ids = torch.as_tensor(predictor.config.report_token_ids)
    with torch.no_grad():
        logits = torch.as_tensor(features, dtype=torch.float32) @ lm_head.weight[ids].T.float()
        from_features = predictor.head.readouts(predictor, logits[:, None, :])[0][:, 0].double().numpy()
    report = report_under_intervention(predictor, rows, Intervention(TARGET.layer, [TARGET.index], "set", set_to))
    np.testing.assert_allclose(from_features, report, rtol=1e-4, atol=1e-5)


def test_the_evaluation_draws_the_set_values_as_the_training_did_unless_told(two_evaluations):
    """A predictor trained with ``intervention_source: shift`` (and its scale) is evaluated on shifted values by default;
    ``counterfactual_source`` chooses another source."""
    from nsr_hf.evaluation.protocol import EvaluateConfig, run_evaluate
    from nsr_hf.pipeline import run_train
    from nsr_hf.training.config import TrainConfig

    tmp, on, _ = two_evaluations
    run_train(TrainConfig(model=str(json.loads((tmp / "train" / "run_config.json").read_text())["model"]),
                          dataset=str(tmp / "train" / "dataset"), neuron=on["neuron"], max_length=32, num_train_epochs=1,
                          per_device_train_batch_size=8, read_layer=2, unfreeze="head_only", intervention_rate=0.5,
                          intervention_source="shift", intervention_shift_scale=2.0, evaluate=False, output_dir=str(tmp / "shift")))
    fast = {"counterfactual_rows": 16, "methods": ["mean"], "n_bootstrap": 10, "causal_max_rows": 8, "causal_num_values": 3,
            "base_unchanged": True}
    sources = {}
    for name, chosen in (("default", None), ("uniform", "uniform")):
        evaluation = run_evaluate(EvaluateConfig(predictor=str(tmp / "shift" / "predictor"), output_dir=str(tmp / f"shift-{name}"),
                                                 counterfactual_source=chosen, **fast))
        section = evaluation["faithfulness"]["test"]
        sources[name] = (section["source"], section["values"].get("shift_scale"))
    assert sources["default"] == ("shift", 2.0)
    assert sources["uniform"][0] == "uniform"


def test_the_compared_predictor_is_named_for_how_it_was_trained(tiny):
    """A plainly trained compare_predictor is 'the plainly trained predictor'; one trained with interventions is named so,
    in the verdict and the table, and neither claims what the intervention training did."""
    from nsr_hf.methods import faithfulness_table

    predictor, rows = known_answer(tiny)
    for rate, name in ((None, "the plainly trained predictor"), (0.5, "the compared predictor (trained with interventions, rate 0.5)")):
        predictor.config.intervention = None if rate is None else {"rate": rate, "source": "interchange"}
        section = section_of(predictor, rows, compare=predictor)
        assert section["compare"] == {"intervention_rate": rate or 0.0, "words": name}
        assert f"{name} follows it" in section["verdict"]
        assert f"{name[0].upper() + name[1:]} is within noise of the report on these rows" in section["verdict"]  # itself
        assert f"| {name[4:]} |" in faithfulness_table({"faithfulness": {"test": section}})
    predictor.config.intervention = None
