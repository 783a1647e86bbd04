"""One pass where the pipeline used to make several (issue 18): the shared passes give the same numbers as separate ones."""
import json

import numpy as np
import pytest

from nsr_hf.capture import Neuron, capture_activations, encode_texts, label_positions
from nsr_hf.modeling.probes import layer_features
from nsr_hf.pipeline import candidate_readings

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
                         max_length=32, num_train_epochs=1, per_device_train_batch_size=8, learning_rate=1e-2, unfreeze="after_target",
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
