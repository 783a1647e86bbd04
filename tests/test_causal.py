"""The causal test: slope 1 for a head that reads what the neuron writes, 0 for a head orthogonal to it; reading the
target layer itself is flagged as not meaningful; interventions act at the labelled token only and leave no hooks;
bad input fails clearly.

The known-answer models (also used by test_analysis.py) give the target neuron a private residual coordinate: its
output vector becomes ``scale * e_coord`` and every other writer of that coordinate (embeddings, attention and MLP
outputs of every block, other neurons) is zeroed, so after its block that coordinate is exactly ``scale * neuron``.
With the final norm replaced by the identity and the head set to ``e_coord / scale`` (= w_out / |w_out|^2), the
report is the neuron's value.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from nsr_hf.architectures import arch_spec, get_layers, get_neuron_module, neuron_weights
from nsr_hf.capture import _INTERVENED, Intervention, Neuron, capture_activations, encode_texts
from nsr_hf.evaluation.causal import (
    causal_test,
    linear_fit,
    live_activations,
    path_to_report,
    predictor_reports,
    report_under_intervention,
)
from nsr_hf.evaluation.figures import plot_causal
from nsr_hf.modeling.predictor import ActivationPredictor

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Neurons in the MLP layer respond to particular tokens",
    "Python is a programming language",
    "0 1 2 3 4 5 6 7 8 9 on off",
    "def function(argument): return argument + 1",
    "A language model predicts the next token",
    "yes no level Neuron",
    "its documentation explains modules, classes and functions.",
    "The lazy dog",
    "return argument",
    "particular contexts and tokens",
    "modules and classes",
]
TARGET = Neuron(1, 3)
COORD, SCALE = 5, 2.0
OTHER_COORD = 7


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


# -- known-answer constructions (shared with test_analysis.py) ----------------------------------------------


def residual_writers(model, embeddings: bool = True):
    """``(tensor, axis)`` for every parameter that writes into the residual stream, ``axis`` = the residual axis."""
    kind = model.config.model_type
    if kind == "gpt2":
        t = model.transformer
        out = [(t.wte.weight, 1), (t.wpe.weight, 1)] if embeddings else []
        for block in t.h:
            out += [(block.attn.c_proj.weight, 1), (block.attn.c_proj.bias, 0), (block.mlp.c_proj.weight, 1), (block.mlp.c_proj.bias, 0)]
        return out
    out = [(model.model.embed_tokens.weight, 1)] if embeddings else []
    for block in model.model.layers:
        out += [(block.self_attn.o_proj.weight, 0), (block.mlp.down_proj.weight, 0)]
    return out


@torch.no_grad()
def silence(model, coord: int, embeddings: bool = True) -> None:
    """Zero residual coordinate ``coord`` in every writer (the embeddings too unless ``embeddings=False``)."""
    for tensor, axis in residual_writers(model, embeddings):
        tensor.select(axis, coord).zero_()


@torch.no_grad()
def isolate_neuron(model, neuron: Neuron = TARGET, coord: int = COORD, scale: float = SCALE):
    """Give ``neuron`` the private residual coordinate ``coord``: afterwards, after its block, coordinate ``coord``
    of the residual stream is exactly ``scale * neuron`` at every token. Returns the model."""
    silence(model, coord)
    module = get_neuron_module(model, neuron.layer)
    if model.config.model_type == "gpt2":  # Conv1D weight: (neurons, hidden)
        module.weight[neuron.index].zero_()
        module.weight[neuron.index, coord] = scale
    else:  # Linear weight: (hidden, neurons)
        module.weight[:, neuron.index].zero_()
        module.weight[coord, neuron.index] = scale
    return model


def identity_final_norm(predictor) -> None:
    """Replace the final norm by the identity, so the representation is the residual stream itself (linear)."""
    parent, _, name = arch_spec(predictor.base).final_norm.rpartition(".")
    setattr(predictor.base.get_submodule(parent), name, nn.Identity())


@torch.no_grad()
def linear_predictor(model, tok, head_vector, neuron: Neuron = TARGET, read_layer=None, linear_norm: bool = True):
    """A regression predictor (mean 0, std 1) whose head weight is ``head_vector`` and bias 0."""
    predictor = ActivationPredictor.from_base(model, tok, neurons=[str(neuron)], read_layer=read_layer)
    if linear_norm:
        identity_final_norm(predictor)
    predictor.neuron_head.weight.copy_(torch.as_tensor(head_vector, dtype=torch.float32).reshape(1, -1))
    predictor.neuron_head.bias.zero_()
    return predictor


def unit(coord: int, size: int) -> torch.Tensor:
    v = torch.zeros(size)
    v[coord] = 1.0
    return v


def labelled_rows(model, tok, neurons=(TARGET,), texts=TEXTS) -> list[dict]:
    """Activation-dataset rows (last token labelled) with the neurons' values in ``model``."""
    batch = encode_texts(tok, texts)
    cap = capture_activations(model, batch, [Neuron.parse(n) for n in neurons])
    rows = []
    for i, text in enumerate(texts):
        n = int(batch["attention_mask"][i].sum())
        values = [float(cap[Neuron.parse(x).layer][i,
                                                    list(cap.neuron_indices[Neuron.parse(x).layer].tolist()).index(Neuron.parse(x).index)])
                  for x in neurons]
        rows.append({"text": text, "input_ids": batch["input_ids"][i, :n].tolist(), "attention_mask": [1] * n,
                     "label_position": n - 1, "activations": values})
    return rows


def known_answer(tiny, read_layer=2):
    """The isolated model, a predictor whose report is exactly the target neuron, and rows labelled from it."""
    model, tok = tiny
    isolate_neuron(model)
    predictor = linear_predictor(model, tok, unit(COORD, model.config.hidden_size) / SCALE, read_layer=read_layer)
    return predictor, labelled_rows(predictor.base, tok)


# -- the causal test ----------------------------------------------------------------------------------------


def test_known_answer_construction_reports_the_neuron_exactly(tiny):
    predictor, rows = known_answer(tiny)
    true = np.array([r["activations"][0] for r in rows])
    assert np.ptp(true) > 0.01
    np.testing.assert_allclose(predictor_reports(predictor, rows), true, atol=1e-5)


def test_causal_slope_is_one_for_a_head_reading_the_neurons_output_direction_through_a_later_block(tiny):
    predictor, rows = known_answer(tiny, read_layer=2)
    result = causal_test(predictor, rows)
    assert result["meaningful"] is True and "block 2" in result["note"]
    assert abs(result["slope"] - 1) < 0.05
    assert abs(result["natural_slope"] - 1) < 0.05
    assert result["fit_r2"] > 0.99
    true = np.array([r["activations"][0] for r in rows])
    np.testing.assert_allclose(result["values"], np.linspace(*np.percentile(true, [1, 99]), 9))
    np.testing.assert_allclose(result["mean_report"], result["values"], atol=1e-4)  # clamped at the labelled token = reported
    json.dumps(result, allow_nan=False)


def test_causal_slope_is_zero_for_a_head_orthogonal_to_everything_the_neuron_writes(tiny):
    model, tok = tiny
    isolate_neuron(model)
    silence(model, OTHER_COORD, embeddings=False)  # only the embeddings write this coordinate: it varies, but not with the neuron
    predictor = linear_predictor(model, tok, unit(OTHER_COORD, model.config.hidden_size), read_layer=2)
    rows = labelled_rows(predictor.base, tok)
    result = causal_test(predictor, rows)
    assert np.ptp(predictor_reports(predictor, rows)) > 1e-3  # the report does vary across rows
    assert abs(result["slope"]) < 0.05
    assert result["meaningful"] is True


def test_scaling_the_neuron_gives_slope_one_on_the_scaled_value(tiny):
    predictor, rows = known_answer(tiny)
    result = causal_test(predictor, rows, mode="scale", num_values=5)
    assert result["values"] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    live = live_activations(predictor, rows, [TARGET])[:, 0]
    np.testing.assert_allclose(result["mean_activation"], np.array(result["values"]) * live.mean(), rtol=1e-5, atol=1e-6)
    assert abs(result["slope"] - 1) < 0.05


def test_reading_the_target_layer_gives_slope_one_for_w_out_and_is_flagged_not_meaningful(tiny):
    # No construction needed: the neuron's MLP output is the last thing added before the read.
    model, tok = tiny
    w_out = neuron_weights(model, TARGET.layer, TARGET.index)["out"]
    predictor = linear_predictor(model, tok, w_out / (w_out @ w_out), read_layer=TARGET.layer)
    result = causal_test(predictor, labelled_rows(predictor.base, tok))
    assert abs(result["slope"] - 1) < 1e-3
    assert result["meaningful"] is False
    assert "w_out" in result["note"] and "Read a later layer" in result["note"]


def test_reading_before_the_target_layer_is_flagged_with_slope_zero(tiny):
    model, tok = tiny
    predictor = linear_predictor(model, tok, torch.randn(model.config.hidden_size), read_layer=0, linear_norm=False)
    result = causal_test(predictor, labelled_rows(predictor.base, tok), num_values=3)
    assert result["meaningful"] is False and "cannot reach" in result["note"]
    assert abs(result["slope"]) < 1e-6


def test_token_head_is_meaningful_unless_the_target_is_in_the_last_block(tiny):
    model, tok = tiny
    transform = {"mean": [0.0], "std": [1.0], "bin_edges": [[i / 10 for i in range(11)]]}
    for neuron, expected in ((TARGET, True), (Neuron(2, 0), False)):
        predictor = ActivationPredictor.from_base(model, tok, neurons=[str(neuron)], head_type="token", label_transform=transform)
        assert path_to_report(predictor, neuron)[0] is expected
    result = causal_test(predictor, labelled_rows(model, tok, [Neuron(2, 0)]), num_values=3, max_rows=4)
    assert abs(result["slope"]) < 1e-5  # no attention after the last block carries the labelled token's MLP output


def test_interventions_act_at_the_labelled_token_and_accept_one_value_per_row(tiny):
    predictor, rows = known_answer(tiny)
    wanted = np.linspace(-1.0, 1.0, len(rows))
    got = report_under_intervention(predictor, rows, Intervention(TARGET.layer, [TARGET.index], "set", wanted), batch_size=5)
    np.testing.assert_allclose(got, wanted, atol=1e-5)
    # the labelled token is the one set: an earlier label position reports that token's own value instead
    shifted = [{**r, "label_position": r["label_position"] - 1} for r in rows if r["label_position"] > 0]
    got = report_under_intervention(predictor, shifted, Intervention(TARGET.layer, [TARGET.index], "set", 3.0))
    np.testing.assert_allclose(got, 3.0, atol=1e-5)


def test_no_hooks_remain_and_the_report_is_unchanged_after_the_test(tiny):
    from datasets import Dataset

    predictor, rows = known_answer(tiny)
    before = predictor_reports(predictor, rows)
    causal_test(predictor, Dataset.from_list(rows), num_values=3)
    causal_test(predictor, rows, num_values=3, mode="scale")
    for layer in range(len(get_layers(predictor.base))):
        assert len(get_neuron_module(predictor.base, layer)._forward_pre_hooks) == 0
    assert not _INTERVENED
    np.testing.assert_array_equal(predictor_reports(predictor, rows), before)


def test_max_rows_takes_the_same_seeded_subset_of_a_list_or_a_dataset(tiny):
    from datasets import Dataset

    predictor, rows = known_answer(tiny)
    a = causal_test(predictor, rows, num_values=2, max_rows=5, seed=1)
    b = causal_test(predictor, Dataset.from_list(rows), num_values=2, max_rows=5, seed=1)
    c = causal_test(predictor, rows, num_values=2, max_rows=5, seed=2)
    assert a["rows"] == 5 and a == b and a["values"] != c["values"]


def test_plot_shows_the_fit_and_the_natural_line(tiny, tmp_path):
    predictor, rows = known_answer(tiny)
    fig = plot_causal(causal_test(predictor, rows, num_values=3))
    assert len(fig.axes[0].lines) >= 2
    fig.savefig(tmp_path / "causal.png")
    assert (tmp_path / "causal.png").stat().st_size > 1000


def test_bad_input_fails_clearly(tiny):
    predictor, rows = known_answer(tiny)
    with pytest.raises(ValueError, match="not reported by this predictor"):
        causal_test(predictor, rows, neuron="0.1")
    with pytest.raises(ValueError, match="Cannot read a neuron"):
        causal_test(predictor, rows, neuron="twelve")
    with pytest.raises(ValueError, match="No rows"):
        causal_test(predictor, [])
    with pytest.raises(ValueError, match="lack column"):
        causal_test(predictor, [{"text": "x"}])
    with pytest.raises(ValueError, match="Unknown mode"):
        causal_test(predictor, rows, mode="add")
    with pytest.raises(ValueError, match="num_values"):
        causal_test(predictor, rows, num_values=1)
    constant = [{**r, "activations": [0.5]} for r in rows]
    with pytest.raises(ValueError, match="do not vary"):
        causal_test(predictor, constant)
    with pytest.raises(ValueError, match="fits neither"):
        report_under_intervention(predictor, rows, Intervention(TARGET.layer, [TARGET.index], "set", np.zeros(len(rows) + 1)))


def test_linear_fit_matches_numpy_and_follows_the_metrics_rule_for_a_flat_side():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = 2 * x + rng.normal(size=50)
    fit = linear_fit(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
    assert fit["r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    from scipy.stats import linregress

    assert fit["slope_se"] == pytest.approx(linregress(x, y).stderr)
    flat = linear_fit(x, np.ones(50))
    assert flat["slope"] == 0 and flat["r"] == 0.0 and flat["r2"] == 1.0  # a flat y is fitted exactly
    assert linear_fit(np.ones(5), y[:5])["slope"] is None


def test_a_token_head_reading_the_targets_own_block_is_not_meaningful(tiny):
    model, tok = tiny
    transform = {"mean": [0.0], "std": [1.0], "bin_edges": [[i / 10 for i in range(11)]]}
    for read, expected, words in ((TARGET.layer + 1, True, "through attention"), (TARGET.layer, False, "own block"),
                                  (0, TARGET.layer == 0, "")):
        predictor = ActivationPredictor.from_base(model, tok, neurons=[str(TARGET)], head_type="token", label_transform=transform,
                                                  read_layer=read)
        meaningful, note = path_to_report(predictor, TARGET)
        assert meaningful is expected and words in note
