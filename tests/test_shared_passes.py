"""One pass where the pipeline used to make several (issue 18): the shared passes give the same numbers as separate ones."""
import contextlib
import json

import numpy as np
import pytest
import torch

from nsr_hf.capture import Neuron, capture_activations, encode_texts, label_positions
from nsr_hf.modeling.probes import layer_features
from nsr_hf.pipeline import candidate_readings
from nsr_hf.training.collator import PredictorDataCollator
from nsr_hf.training.prefix_cache import row_keys

TEXTS = ["the cat sat on the mat", "a dog", "one two three four five six seven eight nine ten eleven", "hello there world",
         "x", "alpha beta gamma delta", "we read the neuron from the residual stream of the model itself"]


@pytest.mark.parametrize("position", ["last", 0])
def test_the_readability_selection_reads_values_and_features_in_one_pass_as_two_passes_give_them(tiny, position):
    model, tok = tiny
    candidates = [Neuron(0, 3), Neuron(1, 7), Neuron(0, 11), Neuron(2, 1)]
    layers = [1, 2]
    values, features = candidate_readings(model, tok, TEXTS, candidates, layers, position, max_length=16, batch_size=3)
    assert values.shape == (len(TEXTS), len(candidates))
    for start in range(0, len(TEXTS), 3):  # the two passes it replaces, batch by batch, in the texts' own order
        batch = encode_texts(tok, TEXTS[start : start + 3], max_length=16)
        capture = capture_activations(model, batch, [str(n) for n in candidates], position=position)
        for j, n in enumerate(candidates):
            col = capture.neuron_indices[n.layer].tolist().index(n.index)
            np.testing.assert_allclose(values[start : start + 3, j], capture[n.layer][:, col].double().numpy(), atol=1e-5)
        lengths = batch["attention_mask"].sum(-1).tolist()
        at = label_positions(batch["attention_mask"], position)
        rows = {"input_ids": [batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)],
                "attention_mask": [[1] * n for n in lengths], "label_position": [int(p) for p in at]}
        expected = layer_features(model, rows, layers, progress=False)
        for layer in layers:
            np.testing.assert_allclose(features[layer][start : start + 3], expected[layer], atol=1e-5)


def test_train_computes_the_original_models_probe_features_once_for_the_head_and_the_evaluation(tiny_model_dirs, tmp_path, monkeypatch):
    """The head's probe initialisation and the evaluation's probes of the original model read the same train and validation
    features: one pass over each split, and the same figures as an evaluation that computes them itself."""
    from conftest import write_word_corpus

    import nsr_hf.evaluation.baselines as baselines
    from nsr_hf.evaluation.protocol import run_evaluate
    from nsr_hf.pipeline import evaluate_config, run_train
    from nsr_hf.training.config import TrainConfig

    passes = []
    real = baselines.layer_features

    def counted(model, rows, layers=None, **kwargs):
        passes.append((id(model), len(rows), tuple(layers)))
        return real(model, rows, layers, **kwargs)

    monkeypatch.setattr(baselines, "layer_features", counted)
    corpus = write_word_corpus(tmp_path / "docs.jsonl")
    config = TrainConfig(model=tiny_model_dirs["llama"], corpus=str(corpus), neuron="0.3", read_layer="target+1", dataset_documents=60,
                         max_length=32, num_train_epochs=1, per_device_train_batch_size=8, learning_rate=1e-2,
                         unfreeze="after_target", head_init="probe",
                         eval_methods=["mean", "ridge_probe", "probe_by_layer"], probe_layers="up_to_read", counterfactual_rows=0,
                         n_bootstrap=20, drift_every_n_steps=100, output_dir=str(tmp_path / "out"))
    summary = run_train(config)
    rows = summary["rows"]
    original_passes = [p for p in passes if p[1] in (rows["train"], rows["validation"])]
    # one pass over train and one over validation, at every layer the probes read (blocks 0..read)
    assert sorted(p[1] for p in original_passes) == sorted([rows["train"], rows["validation"]])
    assert all(p[2] == (0, 1) for p in original_passes) and len({p[0] for p in original_passes}) == 1

    # the same figures as an evaluation that computes every feature itself
    alone = run_evaluate(replace_output(evaluate_config(config, tmp_path / "out"), tmp_path / "alone"))
    shared = summary["evaluation"]
    for method in ("self", "ridge_probe", "mean"):
        assert alone["metrics"]["test"][method]["r2"] == pytest.approx(shared["metrics"]["test"][method]["r2"], abs=1e-6)
    assert json_close(json.loads(json.dumps(alone["probe_by_layer"])), json.loads(json.dumps(shared["probe_by_layer"])))


def replace_output(config, folder):
    from dataclasses import replace

    return replace(config, output_dir=str(folder))


def json_close(a, b, tol=1e-6):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(json_close(a[k], b[k], tol) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= tol or (a != a and b != b)
    return a == b


def _rows(tok, n=20, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(1, len(tok), (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "label_position": int(torch.randint(0, length, (1,), generator=g)),
                     "activations": [float(torch.rand(1, generator=g))]})
    return rows


@pytest.mark.parametrize("head", ["regression", "token"])
def test_reports_under_several_value_sets_run_the_blocks_below_the_neuron_once_and_equal_one_pass_per_set(tiny, head):
    """The causal test's reports: the natural report and one per set value, from one run of the blocks below the neuron's
    block per batch, equal the reports of one full forward per set (float round-off)."""
    from nsr_hf.capture import Intervention
    from nsr_hf.evaluation.causal import report_under_intervention, reports_under_value_sets
    from nsr_hf.modeling.predictor import ActivationPredictor

    model, tok = tiny
    predictor = ActivationPredictor.from_base(model, tok, neurons=["1.3"], head_type=head, read_layer=2,
                                              label_transform={"mean": [0.5], "std": [0.3], "bin_edges": [[0, .2, .4, .6, .8, 1]]})
    rows = _rows(tok)
    per_row = np.linspace(-2, 3, len(rows))
    sets = [None, 0.5, -1.0, per_row]
    shared = reports_under_value_sets(predictor, rows, "1.3", sets, batch_size=6)
    for k, value in enumerate(sets):
        ivs = [] if value is None else Intervention(1, [3], "set", value)
        np.testing.assert_allclose(shared[k], report_under_intervention(predictor, rows, ivs, batch_size=6), atol=1e-5)
    scaled = reports_under_value_sets(predictor, rows, "1.3", [2.0], mode="scale", batch_size=6)
    np.testing.assert_allclose(scaled[0], report_under_intervention(predictor, rows, Intervention(1, [3], "scale", 2.0), batch_size=6),
                               atol=1e-5)
    assert not np.allclose(shared[1], shared[2])  # the set value reaches the report: the sets really differ


def test_the_honest_readers_natural_and_intervened_features_share_the_blocks_below_the_neuron(tiny):
    from nsr_hf.capture import Neuron
    from nsr_hf.evaluation.faithfulness import representation, representations
    from nsr_hf.modeling.predictor import ActivationPredictor

    model, tok = tiny
    predictor = ActivationPredictor.from_base(model, tok, neurons=["1.3"], read_layer=2, label_transform={"mean": [0.5], "std": [0.3]})
    rows = _rows(tok, seed=1)
    values = np.linspace(-3, 3, len(rows))
    plain, intervened = representations(predictor, rows, 2, Neuron(1, 3), [None, values], batch_size=7)
    np.testing.assert_allclose(plain, representation(predictor, rows, 2, batch_size=7), atol=1e-5)
    # against features computed with no prefix at all: layer_features with the neuron set, one row at a time
    import torch

    from nsr_hf.capture import Intervention, intervene
    from nsr_hf.modeling.probes import layer_features

    for i in (0, 5, 19):
        with intervene(predictor.base, Intervention(1, [3], "set", float(values[i]), positions=torch.tensor([rows[i]["label_position"]]))):
            one = {c: [rows[i][c]] for c in ("input_ids", "attention_mask", "label_position")}
            alone = layer_features(predictor.base, one, [2], progress=False)[2][0]
        np.testing.assert_allclose(intervened[i], alone, atol=1e-5)
    assert not np.allclose(plain, intervened)


@pytest.mark.parametrize("layer", [1, 2])
def test_states_recorded_on_a_pass_that_runs_anyway_make_the_same_prefix_cache_as_its_own_pass(tiny, layer):
    """The head's probe pass keeps the train rows' states entering a block (``recording_states``); the cache made from
    them, and a cache at a higher block built from it, equal the caches built by their own passes."""
    import torch

    from nsr_hf.evaluation.causal import batches
    from nsr_hf.modeling.predictor import ActivationPredictor
    from nsr_hf.training.prefix_cache import PrefixCache, recording_states

    model, tok = tiny
    predictor = ActivationPredictor.from_base(model, tok, neurons=["1.3"], read_layer=2, label_transform={"mean": [0.5], "std": [0.3]})
    rows = _rows(tok, seed=2)
    columns = {c: [r[c] for r in rows] for c in ("input_ids", "attention_mask", "label_position")}
    with recording_states(model, layer) as recorded:
        layer_features(model, columns, [0, 2], batch_size=5, progress=False)
    given = PrefixCache.from_states(recorded, rows)
    own = PrefixCache(layer).build(predictor, (b for _, _, b in batches(predictor, rows, 4)))
    assert given.rows == own.rows == len(rows) and given.blocks_return_tuples == own.blocks_return_tuples
    for _, _, batch in batches(predictor, rows, 4):
        keys = row_keys(batch)
        assert given.holds(keys)
        hidden = torch.zeros(len(keys), batch["input_ids"].shape[1], model.config.hidden_size)
        torch.testing.assert_close(given.batch_states(keys, hidden), own.batch_states(keys, hidden), atol=1e-5, rtol=1e-5)
    # a cache at the read layer's input, built from the lower one, equals the one built from the embeddings up
    chained = PrefixCache(2).build(predictor, (b for _, _, b in batches(predictor, rows, 4)), start=given)
    direct = PrefixCache(2).build(predictor, (b for _, _, b in batches(predictor, rows, 4)))
    torch.testing.assert_close(chained.states, direct.states, atol=1e-5, rtol=1e-5)
    assert chained.spans == direct.spans and chained.started_at == layer and direct.started_at is None
    with pytest.raises(ValueError, match="above it"):
        PrefixCache(0).build(predictor, [], start=given)
    # a row whose states were not recorded: no cache
    assert PrefixCache.from_states(recorded, [{"input_ids": [5, 6, 7, 8, 9, 10, 11], "label_position": 2}]) is None


@pytest.mark.slow
def test_train_starts_its_prefix_cache_and_the_honest_reader_from_the_probe_pass_with_the_same_results(tiny_model_dirs, tmp_path):
    """nsr train keeps the train rows' states entering the target's block from the head's probe pass: training builds its
    frozen-prefix cache from them and the evaluation's honest reader reads from them. The losses equal those of a run
    without any cache, and the faithfulness figures those of an evaluation that computes everything itself."""
    from conftest import write_word_corpus

    from nsr_hf.evaluation.protocol import run_evaluate
    from nsr_hf.pipeline import evaluate_config, run_train
    from nsr_hf.training.config import TrainConfig

    corpus = write_word_corpus(tmp_path / "docs.jsonl")
    common = dict(model=tiny_model_dirs["llama"], corpus=str(corpus), neuron="1.3", read_layer="target+1", dataset_documents=60,
                  max_length=32, num_train_epochs=2, per_device_train_batch_size=8, learning_rate=1e-2,
                         unfreeze="after_target", head_init="probe",
                  eval_methods=["mean", "ridge_probe"], counterfactual_rows=32, n_bootstrap=20, drift_every_n_steps=100, logging_steps=1)
    shared = run_train(TrainConfig(**common, output_dir=str(tmp_path / "shared")))
    plain = run_train(TrainConfig(**common, prefix_cache="off", output_dir=str(tmp_path / "plain")))
    assert shared["prefix_cache"]["used"] and shared["prefix_cache"]["layer"] == 2 and not plain["prefix_cache"]["used"]
    assert shared["prefix_cache"]["started_at_block"] == 1  # built from the probe pass's states at the target's block
    losses = [[h["loss"] for h in json.loads((tmp_path / run / "log_history.json").read_text()) if "loss" in h]
              for run in ("shared", "plain")]
    assert len(losses[0]) > 3 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    alone = run_evaluate(replace_output(evaluate_config(TrainConfig(**common, output_dir=str(tmp_path / "shared")), tmp_path / "shared"),
                                        tmp_path / "alone"))
    mine, theirs = shared["evaluation"]["faithfulness"]["test"], alone["faithfulness"]["test"]
    for reader in ("self", "ridge_probe", "ridge_probe_intervened"):
        assert mine["methods"][reader]["r2"] == pytest.approx(theirs["methods"][reader]["r2"], abs=1e-6)


@pytest.mark.slow
def test_the_seeds_of_a_sweep_share_the_original_models_passes_with_the_same_figures(tiny_model_dirs, tmp_path, monkeypatch):
    """Runs given one SharedPasses (as nsr sweep gives them) load the model once, and a second seed on the same dataset makes
    no pass of the original model over the train split: its probes, its cross-model features and the lower blocks of its
    frozen-prefix cache come from the first seed's passes. Its figures equal those of the same run made alone."""
    from conftest import write_word_corpus

    import nsr_hf.evaluation.baselines as baselines
    import nsr_hf.pipeline as pipeline
    from nsr_hf.pipeline import SharedPasses, run_train
    from nsr_hf.training.config import TrainConfig

    corpus = write_word_corpus(tmp_path / "docs.jsonl")
    common = dict(model=tiny_model_dirs["llama"], corpus=str(corpus), neuron="1.3", read_layer="target+1", dataset_documents=60,
                  max_length=32, num_train_epochs=1, per_device_train_batch_size=8, learning_rate=1e-2, unfreeze="after_target",
                  head_init="probe", eval_methods=["mean", "ridge_probe", "cross"], cross_models=[tiny_model_dirs["gpt2"]],
                  counterfactual_rows=16, n_bootstrap=20, drift_every_n_steps=100)
    shared = SharedPasses()
    first = run_train(TrainConfig(**common, seed=0, output_dir=str(tmp_path / "seed-0")), shared=shared)
    model = shared.model
    loads, passes = [], []
    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", lambda *a, **k: loads.append(a) or (_ for _ in ()).throw(AssertionError))
    real_features, real_cross = baselines.layer_features, baselines.CrossModel.features

    def features(m, rows, *args, **kwargs):
        passes.append(("self", len(rows)))
        return real_features(m, rows, *args, **kwargs)

    def cross(self, texts, **kwargs):
        passes.append(("cross", len(texts)))
        return real_cross(self, texts, **kwargs)

    monkeypatch.setattr(baselines, "layer_features", features)
    monkeypatch.setattr(baselines.CrossModel, "features", cross)
    dataset = str(tmp_path / "seed-0" / "dataset")
    second = run_train(TrainConfig(**common, seed=1, dataset=dataset, output_dir=str(tmp_path / "seed-1")), shared=shared)
    assert not loads and shared.model is model  # loaded once
    assert passes == []  # the train and validation features of the original model and every cross feature: from seed 0
    assert second["prefix_cache"]["started_at_block"] == 1 and first["prefix_cache"]["started_at_block"] == 1
    monkeypatch.undo()
    alone = run_train(TrainConfig(**common, seed=1, dataset=dataset, output_dir=str(tmp_path / "alone")))
    for method in ("self", "ridge_probe", f"cross:{tiny_model_dirs['gpt2']}", "mean"):
        ours, own = second["evaluation"]["metrics"]["test"][method]["r2"], alone["evaluation"]["metrics"]["test"][method]["r2"]
        assert ours == pytest.approx(own, abs=1e-6), method
    mine, theirs = second["evaluation"]["faithfulness"]["test"]["methods"], alone["evaluation"]["faithfulness"]["test"]["methods"]
    assert all(mine[m]["r2"] == pytest.approx(theirs[m]["r2"], abs=1e-6) for m in mine)
    # another neuron's dataset of the same rows keeps the features (keyed by the rows' content), not the states
    from datasets import Dataset, load_from_disk

    from nsr_hf.evaluation.baselines import RowsKey

    same_rows = load_from_disk(dataset)
    same_rows["train"] = same_rows["train"].map(lambda row: {"activations": [2 * v for v in row["activations"]]})
    kept = [k for k in shared.features if isinstance(k[-1], RowsKey)]
    assert kept
    shared.on(same_rows)
    assert all(k in shared.features for k in kept) and shared.states == {}
    # a run on other documents drops what the first ones' passes gave
    shared.on({"train": Dataset.from_dict({"input_ids": [[5, 6]], "attention_mask": [[1, 1]], "label_position": [1]})})
    assert not any(isinstance(k[-1], RowsKey) for k in shared.features) and shared.states == {}


@pytest.mark.slow
def test_the_neurons_of_a_sweep_on_the_same_documents_share_the_baselines_features(tiny_model_dirs, tmp_path, monkeypatch):
    """Two neurons whose datasets hold the same documents (a sweep's: the same tokens and labelled tokens, other labels):
    the second neuron's run makes no pass of the cross model or of the random-init copy, and no pass of the original model
    at the layers the first one read; its figures equal those of the same run made alone."""
    from conftest import write_word_corpus

    import nsr_hf.evaluation.baselines as baselines
    from nsr_hf.pipeline import SharedPasses, run_train
    from nsr_hf.training.config import TrainConfig

    corpus = write_word_corpus(tmp_path / "docs.jsonl")
    common = dict(model=tiny_model_dirs["llama"], corpus=str(corpus), read_layer="target+1", dataset_documents=60, max_length=32,
                  num_train_epochs=1, per_device_train_batch_size=8, learning_rate=1e-2, unfreeze="after_target", head_init="probe",
                  eval_methods=["mean", "ridge_probe", "random_init", "cross"], cross_models=[tiny_model_dirs["gpt2"]],
                  counterfactual_rows=16, n_bootstrap=20, drift_every_n_steps=100, seed=0)
    shared = SharedPasses()
    run_train(TrainConfig(**common, neuron="1.3", output_dir=str(tmp_path / "first")), shared=shared)
    passes = []
    real_features, real_cross, real_copy = baselines.layer_features, baselines.CrossModel.features, baselines._random_init_copy

    def features(m, rows, layers, *args, **kwargs):
        passes.append(("self", tuple(layers), len(rows)))
        return real_features(m, rows, layers, *args, **kwargs)

    def cross(self, texts, **kwargs):
        passes.append(("cross", len(texts)))
        return real_cross(self, texts, **kwargs)

    def random_copy(*args, **kwargs):
        passes.append(("random_init",))
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(baselines, "layer_features", features)
    monkeypatch.setattr(baselines.CrossModel, "features", cross)
    monkeypatch.setattr(baselines, "_random_init_copy", random_copy)
    second = run_train(TrainConfig(**common, neuron="1.5", output_dir=str(tmp_path / "second")), shared=shared)
    assert passes == []
    monkeypatch.undo()
    alone = run_train(TrainConfig(**common, neuron="1.5", dataset=str(tmp_path / "second" / "dataset"), output_dir=str(tmp_path / "alone")))
    for method in ("self", "ridge_probe", "random_init", f"cross:{tiny_model_dirs['gpt2']}", "mean"):
        ours, own = second["evaluation"]["metrics"]["test"][method]["r2"], alone["evaluation"]["metrics"]["test"][method]["r2"]
        assert ours == pytest.approx(own, abs=1e-6), method


@pytest.mark.slow
def test_the_dataset_pass_gives_the_probes_their_features_and_the_prefix_cache_its_states(tiny_tokenizer, tmp_path, monkeypatch):
    """The dataset's own forward pass keeps each row's states entering the neuron's block and the probe layers below it: the
    head's probe, the evaluation's probes of the original model (every split) and the frozen-prefix cache start from them,
    so the original model never runs its lower blocks over a split again. The figures equal those of an evaluation that
    computes every feature itself."""
    from conftest import build_model, write_word_corpus

    import nsr_hf.evaluation.baselines as baselines
    import nsr_hf.pipeline as pipeline
    from nsr_hf.evaluation.protocol import run_evaluate
    from nsr_hf.pipeline import evaluate_config, run_train
    from nsr_hf.training.config import TrainConfig

    model_dir = tmp_path / "llama4"
    build_model("llama", len(tiny_tokenizer), n_layers=4).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    whole, partial = [], []
    real_baselines, real_pipeline = baselines.layer_features, pipeline.layer_features
    monkeypatch.setattr(baselines, "layer_features",
                        lambda m, rows, layers=None, **k: whole.append(len(rows)) or real_baselines(m, rows, layers, **k))
    monkeypatch.setattr(pipeline, "layer_features",
                        lambda m, rows, layers=None, **k: partial.append((len(rows), tuple(layers), k["prefix"].layer)) or
                        real_pipeline(m, rows, layers, **k))
    from nsr_hf.training.trainer import PredictorTrainer

    fed = []
    real_start = PredictorTrainer.held_out_start
    def spied(self, m, inputs):
        context = real_start(self, m, inputs)
        fed.append((len(inputs["input_ids"]), not isinstance(context, contextlib.nullcontext)))
        return context

    monkeypatch.setattr(PredictorTrainer, "held_out_start", spied)
    import nsr_hf.evaluation.faithfulness as faithfulness

    natural = []
    real_natural = faithfulness.natural_features
    monkeypatch.setattr(faithfulness, "natural_features", lambda *a: natural.append(real_natural(*a)) or natural[-1])
    corpus = write_word_corpus(tmp_path / "docs.jsonl")
    config = TrainConfig(model=str(model_dir), corpus=str(corpus), neuron="2.3", read_layer="target+1", dataset_documents=60,
                         max_length=32, num_train_epochs=1, per_device_train_batch_size=8, learning_rate=1e-2, unfreeze="after_target",
                         head_init="probe", eval_methods=["mean", "ridge_probe", "probe_by_layer"], probe_layers="up_to_read",
                         counterfactual_rows=16, n_bootstrap=20, drift_every_n_steps=100, output_dir=str(tmp_path / "out"))
    summary = run_train(config)
    rows = summary["rows"]
    # no whole pass of the original model over a split: only the blocks from the neuron's (2) up, on the recorded states
    assert not [n for n in whole if n in (rows["train"], rows["validation"], rows["test"])]
    assert sorted(n for n, _, _ in partial) == sorted([rows["train"], rows["validation"], rows["test"]])
    assert all(layers == (2, 3) and at == 2 for _, layers, at in partial)  # blocks 0 and 1 came from the record itself
    assert summary["prefix_cache"]["used"] and summary["prefix_cache"]["started_at_block"] == 2
    # the validation and test loss pass started from the dataset pass's states of those rows
    assert all(held for _, held in fed) and sum(n for n, _ in fed) >= rows["validation"] + rows["test"]
    # the honest reader's natural train features started from training's own cache (block 3, above the neuron's)
    assert len(natural) == 1 and natural[0] is not None
    assert summary["passes_reused"] == {"probe_features_from_dataset_pass_block": 2, "held_out_from_block": 2,
                                        "evaluation_predictions_from_loss_pass": ["test", "validation"]}

    monkeypatch.setattr(baselines, "layer_features", real_baselines)
    alone = run_evaluate(replace_output(evaluate_config(config, tmp_path / "out"), tmp_path / "alone"))
    shared = summary["evaluation"]
    # states that would not fit prefix_cache_max_gb are not recorded: every pass runs as before, with the same figures
    from dataclasses import replace

    capped = run_train(replace(config, prefix_cache_max_gb=1e-6, output_dir=str(tmp_path / "capped")))
    assert "probe_features_from_dataset_pass_block" not in capped["passes_reused"]
    assert capped["evaluation"]["metrics"]["test"]["ridge_probe"]["r2"] == pytest.approx(shared["metrics"]["test"]["ridge_probe"]["r2"],
                                                                                         abs=1e-6)
    for method in ("self", "ridge_probe", "mean"):
        assert alone["metrics"]["test"][method]["r2"] == pytest.approx(shared["metrics"]["test"][method]["r2"], abs=1e-6)
    assert sorted(map(int, shared["probe_by_layer"])) == [0, 1, 2, 3]
    assert json_close(json.loads(json.dumps(alone["probe_by_layer"])), json.loads(json.dumps(shared["probe_by_layer"])))


@pytest.mark.parametrize("position", ["last", 0])
def test_features_recorded_on_a_pass_and_from_its_states_equal_layer_features(tiny, position):
    """What ``recording_layer_features`` keeps during another pass (a neuron capture that stops at block 2) and the blocks
    above run from ``recording_states``' states are ``layer_features`` itself; a row whose labelled token differs from the
    recorded one, or a layer not recorded, gives ``None`` (the caller runs the pass)."""
    from datasets import Dataset

    from nsr_hf.modeling.probes import recording_layer_features
    from nsr_hf.training.prefix_cache import PrefixCache, recording_states

    model, tok = tiny
    batch = encode_texts(tok, TEXTS, max_length=16)
    with recording_states(model, 2) as states, recording_layer_features(model, [0, 1], position) as recorded:
        capture_activations(model, batch, ["2.5"], position=position)
    lengths = batch["attention_mask"].sum(-1).tolist()
    at = label_positions(batch["attention_mask"], position)
    rows = Dataset.from_dict({"input_ids": [batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)],
                              "attention_mask": [[1] * n for n in lengths], "label_position": [int(p) for p in at]})
    expected = layer_features(model, rows, [0, 1, 2], batch_size=3, progress=False)
    below = recorded.features(rows, [0, 1])
    above = layer_features(model, rows, [2], batch_size=3, progress=False, prefix=PrefixCache.from_states(states, rows))
    for layer, X in {**below, **above}.items():
        np.testing.assert_allclose(X, expected[layer], atol=1e-5)
    assert recorded.features(rows, [0, 2]) is None
    moved = rows.map(lambda row: {"label_position": 0 if position == "last" else len(row["input_ids"]) - 1})
    assert recorded.features(moved, [0]) is None
    with pytest.raises(ValueError, match="gives that block and later ones"):
        layer_features(model, rows, [1, 2], prefix=PrefixCache.from_states(states, rows))


@pytest.mark.parametrize("position", ["last", 0])
def test_the_selection_reads_from_the_scans_pass_what_its_own_pass_gives(tiny, position):
    """The readability selection's values and features from what a scan-like pass kept (neurons and features below its
    deepest block, the states entering it; the pass ends inside that block's MLP as the scan's does) equal its own pass."""
    from nsr_hf.modeling.probes import recording_layer_features
    from nsr_hf.pipeline import RecordedPass
    from nsr_hf.training.prefix_cache import recording_states

    model, tok = tiny
    candidates = [Neuron(0, 3), Neuron(1, 7), Neuron(0, 11), Neuron(2, 1)]
    layers = [0, 1, 2]
    plain = candidate_readings(model, tok, TEXTS, candidates, layers, position, max_length=16, batch_size=3)
    record = RecordedPass()
    with recording_states(model, 1) as states, recording_layer_features(model, [0], position, neuron_layers=[0]) as features:
        for start in range(0, len(TEXTS), 4):  # the scan's pass: other batches, ended at block 1's neurons
            capture_activations(model, encode_texts(tok, TEXTS[start:start + 4], max_length=16), {0: None, 1: None}, position="all")
    record.states, record.features = states, features
    assert len(features.rows) == len(TEXTS) and all(("neurons", 0) in e[1] and 1 not in e[1] for e in features.rows.values())
    shared = candidate_readings(model, tok, TEXTS, candidates, layers, position, max_length=16, batch_size=3, record=record)
    np.testing.assert_allclose(shared[0], plain[0], atol=1e-5)
    for layer in layers:
        np.testing.assert_allclose(shared[1][layer], plain[1][layer], atol=1e-5)


@pytest.mark.slow
def test_the_quickstarts_selection_is_the_same_from_the_scans_pass(tiny_model_dirs, tmp_path, monkeypatch):
    """nsr train's readability selection from the scan's recorded pass chooses the same neuron with the same R^2 of every
    candidate as the selection that runs its own pass (prefix_cache_max_gb 0 turns the recording off)."""
    import nsr_hf.pipeline as pipeline
    from nsr_hf.models import load_model_and_tokenizer
    from nsr_hf.pipeline import choose_neuron
    from nsr_hf.training.config import TrainConfig

    model, tok = load_model_and_tokenizer(tiny_model_dirs["llama"])
    used = []
    real = pipeline.recorded_readings
    monkeypatch.setattr(pipeline, "recorded_readings", lambda *a: used.append(1) or real(*a))
    tables = []
    for cap in (2.0, 0.0):
        config = TrainConfig(model=tiny_model_dirs["llama"], corpus="synthetic", neuron="auto", select="readable", layers=[0, 1],
                             scan_documents=40, dataset_documents=120, max_length=32, read_layer="target+1", prefix_cache_max_gb=cap,
                             output_dir=str(tmp_path / str(cap)))
        out = tmp_path / str(cap)
        out.mkdir()
        choose_neuron(config, model, tok, out)
        tables.append(json.loads((out / "scan" / "selection.json").read_text()))
        if cap:
            assert used, "the selection did not read the scan's pass"
            used.clear()
    assert not used
    assert tables[0]["chosen"]["neuron"] == tables[1]["chosen"]["neuron"]
    for a, b in zip(tables[0]["candidates"], tables[1]["candidates"]):
        assert a["neuron"] == b["neuron"] and a["cv_r2"] == pytest.approx(b["cv_r2"], abs=1e-6)


@pytest.mark.slow
def test_the_evaluation_reuses_the_validation_and_test_predictions_of_the_trainers_loss_pass(tiny_model_dirs, tmp_path, monkeypatch):
    """nsr train's validation and test loss pass gives the evaluation its predictions of those splits (no second pass), and
    they are the predictions a pass of its own gives; the figures are logged as evaluate logs them."""
    from conftest import write_word_corpus

    import nsr_hf.evaluation.protocol as protocol
    from nsr_hf.data.storage import load_activation_dataset
    from nsr_hf.evaluation.predictions import predict_split
    from nsr_hf.metrics import r2_score
    from nsr_hf.modeling.predictor import load_predictor
    from nsr_hf.pipeline import run_train
    from nsr_hf.training.config import TrainConfig

    calls = []
    monkeypatch.setattr(protocol, "predict_split", lambda p, rows, *a, **k: calls.append(len(rows)) or predict_split(p, rows, *a, **k))
    corpus = write_word_corpus(tmp_path / "docs.jsonl")
    config = TrainConfig(model=tiny_model_dirs["llama"], corpus=str(corpus), neuron="1.3", read_layer="target+1", dataset_documents=60,
                         max_length=32, num_train_epochs=1, per_device_train_batch_size=8, learning_rate=1e-2, head_type="classification",
                         unfreeze="after_target", eval_methods=["mean", "ridge_probe"], counterfactual_rows=0, n_bootstrap=20,
                         drift_every_n_steps=100, output_dir=str(tmp_path / "out"))
    summary = run_train(config)
    rows = summary["rows"]
    assert rows["validation"] not in calls and rows["test"] not in calls  # no pass of their own (the shuffled control has its own model)
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert any("validation_loss" in h for h in history) and any("test_r2" in h for h in history)
    # the evaluation's R^2 of the report is that of the saved predictor's own pass over the test rows
    predictor = load_predictor(str(tmp_path / "out" / "predictor"))
    dataset, _ = load_activation_dataset(tmp_path / "out" / "dataset")
    expected, greedy = predict_split(predictor, dataset["test"])
    assert greedy is not None  # bins: the greedy readout came through too
    truth = np.asarray(dataset["test"]["activations"], dtype=np.float64)[:, 0]
    assert summary["evaluation"]["metrics"]["test"]["self"]["r2"] == pytest.approx(r2_score(truth, expected[:, 0]), abs=1e-5)


def test_the_drift_monitor_and_the_neuron_drift_from_recorded_states_measure_what_the_whole_pass_measures(tiny):
    """Started from the rows' states entering the neuron's block (the dataset pass's), the drift monitor's measurement and the
    neuron drift equal those of the whole pass, while the trainer's frozen-prefix cache sits at that block or above; below
    it the monitor runs the whole pass."""
    from types import SimpleNamespace

    from nsr_hf.pipeline import neuron_drift
    from nsr_hf.training.monitoring import DriftMonitor
    from nsr_hf.training.prefix_cache import PrefixCache, recording_states
    from tests.test_prefix_cache import predictor_on, reference_dataset

    model, tok = tiny
    ds, values = reference_dataset(model, tok, n=20)
    with recording_states(model, 1) as states:  # a pass that runs anyway: the rows through the model
        capture_activations(model, PredictorDataCollator(pad_token_id=0)(ds.to_list()), ["1.3"], position="last")
    predictor = predictor_on(model, tok, values).eval()
    whole = DriftMonitor(ds, max_probe_rows=16, max_lm_rows=8, batch_size=4).measure(predictor)
    started = DriftMonitor(ds, max_probe_rows=16, max_lm_rows=8, batch_size=4).start_from(states)
    assert set(started.prefixes) == {"probe", "lm"}
    used = []
    real_feeding = PrefixCache.feeding

    def counted(self, *a, **k):
        used.append(self.layer)
        return real_feeding(self, *a, **k)

    for cache_layer, expect_used in ((2, True), (0, False)):
        used.clear()
        started.trainer = SimpleNamespace(prefix_cache=SimpleNamespace(layer=cache_layer))
        PrefixCache.feeding = counted
        try:
            measured = started.measure(predictor)
        finally:
            PrefixCache.feeding = real_feeding
        assert bool(used) == expect_used
        for key, value in whole.items():
            if key != "seconds":
                assert measured[key] == pytest.approx(value, abs=1e-5), key

    # a trained block at the neuron's layer (the states below it unchanged): the same drift, and not zero
    import copy

    from nsr_hf.architectures import get_layers

    trained = copy.deepcopy(model)
    with torch.no_grad():
        for q in get_layers(trained)[1].parameters():
            q.add_(0.05 * torch.randn_like(q))
    rows = ds.select(range(12))
    plain = neuron_drift(trained, rows, ["1.3"], "last")
    fed = neuron_drift(trained, rows, ["1.3"], "last", prefix=PrefixCache.from_states(states, rows))
    assert plain["max_abs"] > 1e-3
    for key in ("max_abs", "mean_abs", "mean_abs_over_std"):
        assert fed[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("head", ["regression", "token"])
def test_the_causal_test_and_the_counterfactual_rows_start_from_given_states_with_the_same_reports(tiny, head):
    """Given the rows' states entering the neuron's block (the dataset pass's), the causal test's reports and the
    counterfactual rows' reports and readers equal those of passes that run every block; a head that reads the
    representation reports from the readers' own pass (the report of one forward with the neuron set)."""
    from nsr_hf.capture import Intervention
    from nsr_hf.data.counterfactuals import CounterfactualValues
    from nsr_hf.evaluation.causal import report_under_intervention, reports_under_value_sets
    from nsr_hf.evaluation.faithfulness import draw_values, faithfulness_on_rows
    from nsr_hf.modeling.predictor import ActivationPredictor
    from nsr_hf.training.prefix_cache import PrefixCache, recording_states

    model, tok = tiny
    predictor = ActivationPredictor.from_base(model, tok, neurons=["1.3"], head_type=head, read_layer=2,
                                              label_transform={"mean": [0.5], "std": [0.3], "bin_edges": [[0, .2, .4, .6, .8, 1]]})
    rows = _rows(tok)
    with recording_states(model, 1) as states:
        capture_activations(model, PredictorDataCollator(pad_token_id=0)(rows), ["1.3"], position="last")
    prefix = PrefixCache.from_states(states, rows)
    assert prefix is not None
    sets = [None, 0.5, np.linspace(-2, 3, len(rows))]
    np.testing.assert_allclose(reports_under_value_sets(predictor, rows, "1.3", sets, batch_size=6, prefix=prefix),
                               reports_under_value_sets(predictor, rows, "1.3", sets, batch_size=6), atol=1e-5)
    values = CounterfactualValues.fit(np.asarray([r["activations"] for r in rows]), ["1.3"], source="interchange")
    fed = faithfulness_on_rows(predictor, rows, values, neuron="1.3", n_bootstrap=0, batch_size=6, prefix=prefix)
    whole = faithfulness_on_rows(predictor, rows, values, neuron="1.3", n_bootstrap=0, batch_size=6)
    np.testing.assert_allclose(fed["predictions"]["self"], whole["predictions"]["self"], atol=1e-5)
    natural = np.asarray([r["activations"][0] for r in rows])
    set_to = draw_values(values, natural, 1)  # faithfulness_on_rows' draw (seed 0 + 1) on all rows (max_rows is above them)
    assert np.allclose(fed["predictions"]["set"], set_to)
    direct = report_under_intervention(predictor, rows, Intervention(1, [3], "set", set_to), batch_size=6)
    np.testing.assert_allclose(fed["predictions"]["self"], direct, atol=1e-5)


def test_the_honest_readers_natural_features_from_trainings_cache_equal_its_own_pass(tiny):
    """Training's frozen-prefix cache (the train rows' natural states above the neuron's block) gives the honest reader its
    natural features: the same probes as the pass from the neuron's block. A cache at or below the neuron's block is not
    used for them."""
    from nsr_hf.data.counterfactuals import CounterfactualValues
    from nsr_hf.evaluation.faithfulness import fit_probes, natural_features, subsample
    from nsr_hf.modeling.predictor import ActivationPredictor
    from nsr_hf.training.prefix_cache import PrefixCache

    model, tok = tiny
    predictor = ActivationPredictor.from_base(model, tok, neurons=["1.3"], head_type="regression", read_layer=2,
                                              label_transform={"mean": [0.5], "std": [0.3]})
    rows = _rows(tok)
    collate = PredictorDataCollator(pad_token_id=0)
    above = PrefixCache(2).build(predictor, [collate(rows[i:i + 5]) for i in range(0, len(rows), 5)])
    values = CounterfactualValues.fit(np.asarray([r["activations"] for r in rows]), ["1.3"], source="interchange")
    neuron = Neuron(1, 3)
    fed, info_fed = fit_probes(predictor, rows, neuron, 0, values, max_rows=100, seed=0, batch_size=6, natural_prefix=above)
    whole, info = fit_probes(predictor, rows, neuron, 0, values, max_rows=100, seed=0, batch_size=6)
    X = np.random.default_rng(0).normal(size=(4, model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd))
    for name in whole:
        np.testing.assert_allclose(fed[name].predict(X), whole[name].predict(X), rtol=1e-4, atol=1e-5)
    assert natural_features(predictor, subsample(rows, 100, 0), 2, neuron, above, 6) is not None
    at_neuron = PrefixCache(1).build(predictor, [collate(rows)])
    assert natural_features(predictor, subsample(rows, 100, 0), 2, neuron, at_neuron, 6) is None
