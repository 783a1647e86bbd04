"""Baselines and controls: layer features are the predictor's representation; the ridge probe is the closed-form
solution, reaches R² ≈ 1 on a neuron's pre-activation (the plumbing check), regularises more on noisy data and
learns nothing from shuffled labels; the lookup table is exact on token-only targets; cross-prediction reads
mask-aware features of the text up to the labelled token; run_baselines returns one prediction per evaluated row
for every method; bad input fails clearly. Tiny models, offline (MiniLM in a slow test)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from datasets import Dataset

from nsr_hf.architectures import get_mlp, get_pre_mlp_norm
from nsr_hf.data.generator import ActivationDatasetGenerator, DatasetConfig
from nsr_hf.evaluation.baselines import (
    CrossModel,
    TokenLookup,
    _random_init_copy,
    baseline_torch_dtype,
    cross_texts,
    load_cross_model,
    probe_by_layer,
    run_baselines,
    shuffled_label_probe,
)
from nsr_hf.methods import BASELINE_METHODS
from nsr_hf.metrics import r2_score
from nsr_hf.modeling.predictor import ActivationPredictor
from nsr_hf.modeling.probes import RidgeProbe, labels_of, layer_features
from nsr_hf.models import load_model_and_tokenizer

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "neurons", "in", "MLP", "layer", "respond", "to", "particular",
         "tokens", "and", "contexts", "Python", "is", "a", "programming", "language", "its", "documentation", "explains", "modules",
         "classes", "functions", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
ALL_METHODS = ("mean", "token_lookup", "ridge_probe", "random_init", "shuffled_labels")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture(scope="module")
def gpt2(tiny_model_dirs):
    return load_model_and_tokenizer(tiny_model_dirs["gpt2"])


def token_rows(vocab_size: int, n: int, seed: int = 0, values=None) -> Dataset:
    """Unpadded rows of random tokens, labelled at a random position (not always the last)."""
    rng = np.random.default_rng(seed)
    rows = {"input_ids": [], "attention_mask": [], "label_position": [], "label_token_id": [], "activations": []}
    for i in range(n):
        length = int(rng.integers(2, 12))
        ids = rng.integers(1, vocab_size, length).tolist()
        position = int(rng.integers(0, length))
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["label_position"].append(position)
        rows["label_token_id"].append(ids[position])
        rows["activations"].append([float(values[i]) if values is not None else float(rng.normal()), 0.0])
    return Dataset.from_dict(rows)


@pytest.fixture(scope="module")
def activation_splits(gpt2, tmp_path_factory):
    """A tiny activation dataset of neuron 1.3 of the tiny GPT-2, made by the dataset generator."""
    model, tokenizer = gpt2
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("baselines")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"doc{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))}) + "\n"
                              for i in range(60)))
    config = DatasetConfig(neurons=["1.3", "0.5"], corpus=str(corpus), id_field="id", max_length=16, batch_size=8, shard_size=16,
                           split_fractions=[0.6, 0.2, 0.2], output_dir=str(root / "ds"))
    dd = ActivationDatasetGenerator(config, model=model, tokenizer=tokenizer).generate()
    assert all(len(dd[s]) >= 5 for s in ("train", "validation", "test"))
    return dict(dd)


# ------------------------------------------------------------------------------------------------ features


def test_layer_features_are_the_predictor_representation_at_every_read_layer(tiny):
    model, tokenizer = tiny
    rows = token_rows(len(tokenizer), 10, seed=1)
    features = layer_features(model, rows, batch_size=4)
    assert sorted(features) == [0, 1, 2]
    batch = tokenizer.pad({"input_ids": rows["input_ids"]}, return_tensors="pt", padding_side="right")
    positions = torch.tensor(list(rows["label_position"]))
    for layer in range(3):
        predictor = ActivationPredictor.from_base(model, tokenizer, neurons=["1.3"], read_layer=layer)
        with torch.no_grad():
            expected = predictor.representation(batch["input_ids"], batch["attention_mask"], positions)
        assert features[layer].dtype == np.float64 and features[layer].shape == (10, model.config.hidden_size)
        np.testing.assert_allclose(features[layer], expected.double().numpy(), atol=1e-5, rtol=1e-5)


def test_layer_features_of_a_row_do_not_depend_on_its_batch(gpt2):
    model, tokenizer = gpt2
    rows = token_rows(len(tokenizer), 9, seed=2)
    together = layer_features(model, rows, layers=[1], batch_size=9)[1]
    alone = np.concatenate([layer_features(model, rows.select([i]), layers=[1])[1] for i in range(9)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


# ------------------------------------------------------------------------------------------------ ridge probe


def preactivation_data(model, tokenizer, layer: int, neuron: int, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(normalised MLP input, pre-activation of one neuron) at every token: GPT-2 ``c_fc``, Llama ``gate_proj``."""
    captured = {}
    mlp = get_mlp(model, layer)
    pre = mlp.c_fc if hasattr(mlp, "c_fc") else mlp.gate_proj
    hooks = [get_pre_mlp_norm(model, layer).register_forward_hook(lambda m, a, out: captured.__setitem__("x", out)),
             pre.register_forward_hook(lambda m, a, out: captured.__setitem__("z", out[..., neuron]))]
    X, z = [], []
    try:
        with torch.no_grad():
            for text in texts:
                model(**tokenizer(text, return_tensors="pt"))
                X.append(captured["x"][0].double().numpy())
                z.append(captured["z"][0].double().numpy())
    finally:
        for h in hooks:
            h.remove()
    return np.concatenate(X), np.concatenate(z)


def test_ridge_probe_reads_a_neuron_preactivation_from_the_normalised_mlp_input_with_r2_near_1(tiny):
    model, tokenizer = tiny
    rng = random.Random(3)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) for _ in range(60)]
    X, z = preactivation_data(model, tokenizer, layer=1, neuron=7, texts=texts)
    n = len(z)
    assert n > 300
    train, val, test = slice(0, n // 2), slice(n // 2, 3 * n // 4), slice(3 * n // 4, n)
    probe = RidgeProbe().fit(X[train], z[train], X[val], z[val])
    assert probe.val_r2 > 0.99
    assert r2_score(z[test], probe.predict(X[test])) > 0.99


def test_ridge_probe_is_the_closed_form_solution_with_an_unpenalised_intercept():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 6)) * [1, 2, 3, 4, 5, 6] + 10
    y = X @ rng.normal(size=6) + 3 + rng.normal(size=40)
    probe = RidgeProbe().fit(X, y, alphas=[2.5])
    Xc, yc = X - X.mean(0), y - y.mean()
    coef = np.linalg.solve(Xc.T @ Xc + 2.5 * np.eye(6), Xc.T @ yc)
    np.testing.assert_allclose(probe.coef_, coef, rtol=1e-10)
    assert probe.intercept_ == pytest.approx(y.mean() - X.mean(0) @ coef)
    np.testing.assert_allclose(probe.predict(X), X @ coef + probe.intercept_)
    assert np.linalg.norm(probe.direction) == pytest.approx(1.0)
    np.testing.assert_allclose(probe.direction, coef / np.linalg.norm(coef))


def test_without_validation_rows_alpha_minimises_the_generalized_cross_validation_error():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 8))
    y = X @ rng.normal(size=8) + rng.normal(size=30)
    alphas = np.logspace(-2, 3, 6)
    probe = RidgeProbe().fit(X, y, alphas=alphas)
    Xc = X - X.mean(0)
    expected = []
    for alpha in alphas:  # hat matrix of ridge on centred X plus the intercept's averaging
        H = Xc @ np.linalg.solve(Xc.T @ Xc + alpha * np.eye(8), Xc.T) + np.full((30, 30), 1 / 30)
        residual = y - H @ y
        expected.append(30 * residual @ residual / (30 - np.trace(H)) ** 2)
    np.testing.assert_allclose(probe.scores_, expected, rtol=1e-8)
    assert probe.selection == "gcv" and probe.alpha == alphas[int(np.argmin(expected))] and np.isnan(probe.val_r2)


@pytest.mark.parametrize("with_validation", [True, False])
def test_ridge_probe_picks_a_larger_alpha_on_noisy_targets_than_on_clean_ones(with_validation):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 30))
    w = rng.normal(size=30)
    clean = X @ w
    noisy = clean + 10 * rng.normal(size=300)

    def fit(y):
        return RidgeProbe().fit(X[:200], y[:200], X[200:], y[200:]) if with_validation else RidgeProbe().fit(X, y)

    assert fit(noisy).alpha > fit(clean).alpha


def test_a_probe_fit_on_shuffled_labels_explains_nothing_while_the_real_probe_explains_most():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(4000, 20))
    y = X @ rng.normal(size=20) + 0.5 * rng.normal(size=4000)
    train, val, test = slice(0, 2500), slice(2500, 3000), slice(3000, 4000)
    shuffled = shuffled_label_probe(X[train], y[train], X[val], y[val], seed=0)
    real = RidgeProbe().fit(X[train], y[train], X[val], y[val])
    assert abs(r2_score(y[test], shuffled.predict(X[test]))) < 0.1
    assert r2_score(y[test], real.predict(X[test])) > 0.9


# ------------------------------------------------------------------------------------------------ lookup table


def test_the_token_lookup_is_exact_on_a_target_that_depends_only_on_the_token_and_falls_back_to_the_mean():
    rng = np.random.default_rng(4)
    value_of = {t: float(rng.normal()) for t in range(20)}
    train_tokens = np.concatenate([np.arange(20), rng.integers(0, 20, 200)])
    y = np.array([value_of[t] for t in train_tokens])
    table = TokenLookup().fit(train_tokens, y)
    test_tokens = rng.integers(0, 20, 50)
    np.testing.assert_allclose(table.predict(test_tokens), [value_of[t] for t in test_tokens])
    assert table.predict([99])[0] == pytest.approx(y.mean())
    assert table.coverage(test_tokens) == 1.0
    assert table.coverage([1, 2, 99, 100]) == 0.5


# ------------------------------------------------------------------------------------------------ cross-prediction


def test_the_cross_text_ends_at_the_labelled_token(gpt2):
    _, tokenizer = gpt2
    ids = tokenizer("the quick brown fox jumps")["input_ids"]
    rows = Dataset.from_dict({"input_ids": [ids], "attention_mask": [[1] * len(ids)], "label_position": [2]})
    assert cross_texts(rows, tokenizer) == [tokenizer.decode(ids[:3])]
    assert cross_texts(rows, tokenizer)[0].endswith(tokenizer.decode(ids[2]))


def test_cross_features_are_mask_aware_mean_and_last_token_for_a_causal_model(tiny_model_dirs):
    cross = load_cross_model(tiny_model_dirs["llama"])
    assert isinstance(cross, CrossModel) and cross.causal and cross.feature_names == "mean+last"
    texts = ["the fox", "Python is a programming language its documentation explains modules"]
    together = cross.features(texts, batch_size=2)
    alone = np.concatenate([cross.features([t]) for t in texts])
    assert together.shape == (2, 2 * cross.model.config.hidden_size)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    ids = cross.tokenizer(texts[0], return_tensors="pt")
    with torch.no_grad():
        hidden = cross.model(**{k: v for k, v in ids.items() if k != "token_type_ids"}).last_hidden_state[0].double()
    np.testing.assert_allclose(together[0], torch.cat([hidden.mean(0), hidden[-1]]).numpy(), atol=1e-5)


def test_a_tiny_llama_from_a_folder_cross_predicts_the_tiny_gpt2_labels(gpt2, activation_splits, tiny_model_dirs):
    model, tokenizer = gpt2
    name = tiny_model_dirs["llama"]
    out = run_baselines(model, tokenizer, activation_splits, read_layer=1, methods=("cross",), cross_models=(name,))
    assert list(out["predictions"]) == [f"cross:{name}"]
    predicted = out["predictions"][f"cross:{name}"]["test"]
    assert predicted.shape == (len(activation_splits["test"]),) and np.isfinite(predicted).all()
    info = out["info"][f"cross:{name}"]
    assert info["causal"] and info["features"] == "mean+last" and info["num_features"] == 64 and info["alpha"] > 0


@pytest.mark.slow
def test_minilm_loads_offline_from_its_package_and_gives_features_for_two_texts():
    cross = load_cross_model("minilm")
    assert not cross.causal and cross.feature_names == "mean"
    features = cross.features(["The quick brown fox.", "def function(argument): return argument + 1"])
    assert features.shape == (2, 384) and np.isfinite(features).all()
    assert not np.allclose(features[0], features[1])


# ------------------------------------------------------------------------------------------------ run_baselines


def test_run_baselines_returns_one_prediction_per_evaluated_row_for_every_method(gpt2, activation_splits, tiny_model_dirs):
    model, tokenizer = gpt2
    llama = tiny_model_dirs["llama"]
    out = run_baselines(model, tokenizer, activation_splits, read_layer=1, eval_splits=("test", "validation"),
                        cross_models=(llama,), batch_size=8)
    assert set(out["predictions"]) == {*ALL_METHODS, f"cross:{llama}"}
    assert set(out["info"]) == {*out["predictions"], "probe_by_layer"}
    assert out["info"]["probe_by_layer"]["best_validation_layer"] in (0, 1, 2)
    assert out["info"]["shuffled_labels"]["alpha_at_grid_edge"] in (True, False)
    for method, by_split in out["predictions"].items():
        for split in ("test", "validation"):
            assert by_split[split].shape == (len(activation_splits[split]),), (method, split)
            assert np.isfinite(by_split[split]).all(), (method, split)
    y_train = labels_of(activation_splits["train"])
    assert np.all(out["predictions"]["mean"]["test"] == pytest.approx(y_train.mean()))
    assert sorted(out["probe_by_layer"]) == [0, 1, 2]
    assert set(out["probe_by_layer"][1]) == {"alpha", "validation_r2", "test_r2"}
    assert out["probe_by_layer"][1]["alpha"] == out["info"]["ridge_probe"]["alpha"]
    assert out["ridge_direction"].shape == (32,) and np.linalg.norm(out["ridge_direction"]) == pytest.approx(1.0)
    assert 0.0 <= out["info"]["token_lookup"]["coverage"]["test"] <= 1.0


def test_the_ridge_probe_baseline_is_the_probe_on_the_read_layer_features(gpt2, activation_splits):
    model, tokenizer = gpt2
    out = run_baselines(model, tokenizer, activation_splits, read_layer=0, methods=("ridge_probe",), neuron_column=1)
    X = {s: layer_features(model, activation_splits[s], [0])[0] for s in ("train", "validation", "test")}
    y = {s: labels_of(activation_splits[s], 1) for s in X}
    probe = RidgeProbe().fit(X["train"], y["train"], X["validation"], y["validation"])
    np.testing.assert_allclose(out["predictions"]["ridge_probe"]["test"], probe.predict(X["test"]), atol=1e-8)
    np.testing.assert_allclose(out["ridge_direction"], probe.direction, atol=1e-8)
    by_layer = probe_by_layer({s: {0: X[s]} for s in X}, y)
    assert by_layer[0]["test_r2"] == pytest.approx(r2_score(y["test"], probe.predict(X["test"])))


def test_the_random_init_control_is_seeded_and_leaves_the_global_rng_alone(gpt2, activation_splits):
    model, tokenizer = gpt2
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = run_baselines(model, tokenizer, activation_splits, read_layer=1, methods=("random_init", "ridge_probe"), seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    again = run_baselines(model, tokenizer, activation_splits, read_layer=1, methods=("random_init",), seed=5)
    other = run_baselines(model, tokenizer, activation_splits, read_layer=1, methods=("random_init",), seed=6)
    np.testing.assert_array_equal(first["predictions"]["random_init"]["test"], again["predictions"]["random_init"]["test"])
    assert not np.allclose(first["predictions"]["random_init"]["test"], other["predictions"]["random_init"]["test"])
    assert not np.allclose(first["predictions"]["random_init"]["test"], first["predictions"]["ridge_probe"]["test"])


def test_a_shared_feature_cache_computes_features_once_across_neuron_columns(gpt2, activation_splits, tiny_model_dirs, monkeypatch):
    from nsr_hf.evaluation import baselines

    model, tokenizer = gpt2
    llama = tiny_model_dirs["llama"]
    methods = ("ridge_probe", "probe_by_layer", "random_init", "cross")
    fresh = [run_baselines(model, tokenizer, activation_splits, read_layer=1, methods=methods, cross_models=(llama,), neuron_column=j)
             for j in (0, 1)]
    calls = {"layer_features": 0, "load_cross_model": 0}
    for name in calls:
        original = getattr(baselines, name)
        monkeypatch.setattr(baselines, name, lambda *a, _f=original, _n=name, **k: (calls.__setitem__(_n, calls[_n] + 1), _f(*a, **k))[1])
    cache = {}
    shared = [run_baselines(model, tokenizer, activation_splits, read_layer=1, methods=methods, cross_models=(llama,), neuron_column=j,
                            feature_cache=cache) for j in (0, 1)]
    assert calls == {"layer_features": 6, "load_cross_model": 1}  # self and random-init per split, once; the cross model once
    for a, b in zip(fresh, shared):
        for method in a["predictions"]:
            np.testing.assert_allclose(a["predictions"][method]["test"], b["predictions"][method]["test"], atol=1e-10)
        assert a["info"][f"cross:{llama}"] == b["info"][f"cross:{llama}"]
    assert not np.allclose(shared[0]["predictions"]["ridge_probe"]["test"], shared[1]["predictions"]["ridge_probe"]["test"])


# ------------------------------------------------------------------------------------------------ baseline_dtype


def test_baseline_dtype_is_bfloat16_only_where_the_machine_multiplies_it_natively(monkeypatch):
    from nsr_hf.evaluation import baselines

    assert baseline_torch_dtype("float32", "cpu") is torch.float32
    assert baseline_torch_dtype("bfloat16", "cpu") is torch.bfloat16
    monkeypatch.setattr(baselines, "bfloat16_is_native", lambda device: True)
    assert baseline_torch_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(baselines, "bfloat16_is_native", lambda device: False)
    assert baseline_torch_dtype("auto", "cpu") is torch.float32
    with pytest.raises(ValueError, match="baseline_dtype must be one of auto, float32, bfloat16, got 'fp8'"):
        baseline_torch_dtype("fp8", "cpu")


def test_the_random_init_copy_draws_the_same_weights_at_every_precision(gpt2):
    model, _ = gpt2
    full = _random_init_copy(model, 3)
    half = _random_init_copy(model, 3, torch.bfloat16)
    assert next(full.parameters()).dtype is torch.float32 and next(half.parameters()).dtype is torch.bfloat16
    for (name, a), (_, b) in zip(full.state_dict().items(), half.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_bfloat16_baselines_match_float32_ones_and_say_so(gpt2, activation_splits, tiny_model_dirs):
    """The other models in bf16: the same probes to bf16's round-off, the dtype in ``info``, the features not shared
    with a float32 call through the same cache, and the self probes (the model under study) untouched."""
    model, tokenizer = gpt2
    llama = tiny_model_dirs["llama"]
    methods, cache = ("ridge_probe", "random_init", "cross"), {}
    runs = {dtype: run_baselines(model, tokenizer, activation_splits, read_layer=1, methods=methods, cross_models=(llama,),
                                 feature_cache=cache, dtype=dtype) for dtype in ("float32", "bfloat16")}
    full, half = runs["float32"], runs["bfloat16"]
    assert next(model.parameters()).dtype is torch.float32  # the model under study stays as it was
    np.testing.assert_array_equal(full["predictions"]["ridge_probe"]["test"], half["predictions"]["ridge_probe"]["test"])
    y = labels_of(activation_splits["test"])
    for method in ("random_init", f"cross:{llama}"):
        assert (full["info"][method]["dtype"], half["info"][method]["dtype"]) == ("float32", "bfloat16")
        a, b = full["predictions"][method]["test"], half["predictions"][method]["test"]
        assert not np.array_equal(a, b), method  # computed again in bf16, not read from the float32 entries
        assert abs(r2_score(y, a) - r2_score(y, b)) < 0.05, method
        assert np.corrcoef(a, b)[0, 1] > 0.95, method


def test_a_bad_baseline_dtype_is_refused_before_any_work_by_every_config(tmp_path):
    from nsr_hf.evaluation.protocol import EvaluateConfig
    from nsr_hf.training.config import TrainConfig

    with pytest.raises(ValueError, match="baseline_dtype must be one of auto, float32, bfloat16, got 'half'"):
        EvaluateConfig(predictor="p", dataset="d", output_dir=str(tmp_path / "e"), baseline_dtype="half")
    with pytest.raises(ValueError, match="baseline_dtype must be one of"):
        TrainConfig(output_dir=str(tmp_path / "t"), baseline_dtype="half")


def test_the_report_says_which_baselines_ran_in_bfloat16():
    from nsr_hf.evaluation.report import _precision

    evaluation = {"baselines_info": {"random_init": {"dtype": "bfloat16"}, "cross:minilm": {"dtype": "float32"}, "mean": {}}}
    assert _precision(evaluation, "random_init") == " (run in bfloat16: baseline_dtype)"
    assert _precision(evaluation, "cross:minilm") == _precision(evaluation, "mean") == _precision({}, "random_init") == ""


def test_an_empty_eval_split_gets_empty_predictions_and_a_note(gpt2, activation_splits):
    model, tokenizer = gpt2
    splits = {**activation_splits, "test": activation_splits["test"].select([])}
    out = run_baselines(model, tokenizer, splits, read_layer=1, methods=("mean", "token_lookup", "ridge_probe", "shuffled_labels"))
    for method in ("mean", "token_lookup", "ridge_probe", "shuffled_labels"):
        assert out["predictions"][method]["test"].shape == (0,)
        assert out["info"][method]["empty_splits"] == ["test"]
    assert any("no rows" in note for note in out["notes"])


def test_an_empty_validation_split_falls_back_to_generalized_cross_validation(gpt2, activation_splits):
    model, tokenizer = gpt2
    splits = {**activation_splits, "validation": activation_splits["validation"].select([])}
    out = run_baselines(model, tokenizer, splits, read_layer=1, methods=("ridge_probe",))
    assert out["info"]["ridge_probe"]["alpha_selection"] == "gcv"
    assert out["predictions"]["ridge_probe"]["test"].shape == (len(splits["test"]),)


# ------------------------------------------------------------------------------------------------ errors


def test_an_unknown_method_is_refused_naming_the_valid_ones(gpt2, activation_splits):
    model, tokenizer = gpt2
    with pytest.raises(ValueError, match="unknown baseline method.*'linear'.*" + ", ".join(BASELINE_METHODS)):
        run_baselines(model, tokenizer, activation_splits, read_layer=1, methods=("mean", "linear"))


def test_missing_columns_splits_and_bad_read_layers_are_refused_clearly(gpt2, activation_splits):
    model, tokenizer = gpt2
    without = {**activation_splits, "test": activation_splits["test"].remove_columns("label_token_id")}
    with pytest.raises(ValueError, match=r"split 'test' lacks the column\(s\) \['label_token_id'\]"):
        run_baselines(model, tokenizer, without, read_layer=1, methods=("token_lookup",))
    run_baselines(model, tokenizer, without, read_layer=1, methods=("mean",))  # only token_lookup reads it
    with pytest.raises(ValueError, match=r"splits lacks \['test_ood'\]"):
        run_baselines(model, tokenizer, activation_splits, read_layer=1, eval_splits=("test_ood",), methods=("mean",))
    with pytest.raises(ValueError, match="read_layer 3 is out of range.*0..2"):
        run_baselines(model, tokenizer, activation_splits, read_layer=3, methods=("mean",))
    with pytest.raises(ValueError, match="neuron_column 2 is out of range"):
        run_baselines(model, tokenizer, activation_splits, read_layer=1, methods=("mean",), neuron_column=2)


def test_wrong_lengths_are_refused_clearly(gpt2):
    model, _ = gpt2
    with pytest.raises(ValueError, match="y has 9 values for 10 rows"):
        RidgeProbe().fit(np.zeros((10, 3)), np.zeros(9))
    with pytest.raises(ValueError, match="X_val has 2 features, X has 3"):
        RidgeProbe().fit(np.random.rand(10, 3), np.random.rand(10), np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="shape \\(rows, 3\\)"):
        RidgeProbe().fit(np.random.rand(10, 3), np.random.rand(10)).predict(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="y has 3 values for 2 rows"):
        TokenLookup().fit([1, 2], [0.1, 0.2, 0.3])
    bad = Dataset.from_dict({"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1]], "label_position": [1]})
    with pytest.raises(ValueError, match="attention_mask has 2 entries for 3 input_ids"):
        layer_features(model, bad)
    bad = Dataset.from_dict({"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1, 1]], "label_position": [3]})
    with pytest.raises(ValueError, match="label_position 3 is not a real token"):
        layer_features(model, bad)
