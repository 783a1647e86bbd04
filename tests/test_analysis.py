"""Mechanistic analyses on models built to have a known answer (see test_causal.py for the constructions): a head set
to the neuron's output vector is found aligned; the output-direction projection carries the neuron exactly where it is
written; ablating that direction destroys a head that reads it while a random direction does not; patching moves the
report 1:1 with the target and not with a control; drift reports exactly the change that was made. Bad input fails
clearly; every analysis runs once on the real SmolLM2."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from test_causal import TARGET, known_answer, labelled_rows, linear_predictor

from nsr_hf.analysis import (
    AnalysisResult,
    activation_patching,
    direction_ablation,
    drift_anatomy,
    fold_through_norm,
    layer_vectors,
    projection_analysis,
    residual_stream,
    weight_alignment,
)
from nsr_hf.architectures import get_final_norm, get_layers, get_mlp, neuron_weights
from nsr_hf.capture import Neuron
from nsr_hf.evaluation.causal import causal_test, predictor_reports
from nsr_hf.modeling.predictor import ActivationPredictor

EDGES = [[i / 10 for i in range(11)]]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def output_reading_predictor(model, tok, **kw):
    """A regression predictor, real final norm, whose head reads the neuron's output vector: weight w_out / g, so
    that the head's residual-basis direction g * w is w_out."""
    w_out = neuron_weights(model, TARGET.layer, TARGET.index)["out"]
    g = get_final_norm(model).weight.detach()
    return linear_predictor(model, tok, w_out / g, linear_norm=False, **kw)


# -- weight alignment ----------------------------------------------------------------------------------------


def test_a_head_on_the_output_vector_is_aligned_with_it_far_beyond_chance(tiny):
    model, tok = tiny
    result = weight_alignment(output_reading_predictor(model, tok), num_random=500)
    n = result.numbers
    assert n["cosine"]["out"] == pytest.approx(1.0, abs=1e-6)
    assert n["z_score"]["out"] > 5
    assert n["p_value"]["out"] == pytest.approx(1 / 501)
    assert n["layer_rank"]["out"] == 1 and n["layer_percentile"]["out"] == 100.0
    assert set(n["cosine"]) >= {"out", "in:" + ("c_fc" if model.config.model_type == "gpt2" else "gate_proj")}
    assert n["random"]["mean_abs_cosine"] < 0.3


def test_alignment_with_input_vectors_is_the_cosine_computed_by_hand(tiny):
    model, tok = tiny
    torch.manual_seed(1)
    predictor = linear_predictor(model, tok, torch.randn(model.config.hidden_size), linear_norm=False)
    n = weight_alignment(predictor, num_random=50).numbers
    final = get_final_norm(model)
    head = fold_through_norm(final, predictor.neuron_head.weight[0])
    for name, vector in neuron_weights(model, TARGET.layer, TARGET.index).items():
        v = vector.double().numpy()
        if model.config.model_type == "gpt2":  # LayerNorm: only centred directions pass
            v = v - v.mean()
        assert n["cosine"][name] == pytest.approx(v @ head / np.linalg.norm(v) / np.linalg.norm(head), abs=1e-9)


def test_input_vectors_are_folded_through_the_pre_mlp_norm_weight(tiny):
    from nsr_hf.architectures import get_pre_mlp_norm

    model, tok = tiny
    torch.manual_seed(3)
    with torch.no_grad():
        get_pre_mlp_norm(model, TARGET.layer).weight.uniform_(0.2, 3.0)
    g = get_pre_mlp_norm(model, TARGET.layer).weight.detach().double().numpy()
    predictor = linear_predictor(model, tok, torch.randn(model.config.hidden_size))  # identity final norm
    head = predictor.neuron_head.weight[0].detach().double().numpy()
    n = weight_alignment(predictor, num_random=20).numbers
    name, w = next((k, v) for k, v in neuron_weights(model, TARGET.layer, TARGET.index).items() if k.startswith("in:"))
    folded = g * w.double().numpy()
    if model.config.model_type == "gpt2":
        folded = folded - folded.mean()
    assert n["cosine"][f"{name}@residual"] == pytest.approx(folded @ head / np.linalg.norm(folded) / np.linalg.norm(head))
    assert n["cosine"][f"{name}@residual"] != pytest.approx(n["cosine"][name])


def test_probe_direction_is_compared_with_the_head_and_the_neuron(tiny):
    model, tok = tiny
    predictor = output_reading_predictor(model, tok)
    w = predictor.neuron_head.weight[0].detach()

    class Probe:
        direction = (w / w.norm()).numpy()

    n = weight_alignment(predictor, probe_direction=Probe(), num_random=20).numbers
    assert n["probe"]["cosine_with_head"] == pytest.approx(1.0)
    assert n["probe"]["cosine"]["out"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="probe_direction has"):
        weight_alignment(predictor, probe_direction=np.ones(3))


def test_classification_head_uses_the_principal_direction_of_its_bin_rows(tiny):
    model, tok = tiny
    w_out = neuron_weights(model, TARGET.layer, TARGET.index)["out"]
    u = w_out / get_final_norm(model).weight.detach()
    predictor = ActivationPredictor.from_base(model, tok, neurons=[str(TARGET)], head_type="classification",
                                              label_transform={"mean": [0.0], "std": [1.0], "bin_edges": EDGES})
    with torch.no_grad():  # higher bins further along w_out, plus a shared offset
        predictor.neuron_head.weight.copy_(torch.arange(10.0)[:, None] * u[None, :] + torch.randn(model.config.hidden_size))
    n = weight_alignment(predictor, num_random=50).numbers
    assert n["cosine"]["out"] == pytest.approx(1.0, abs=1e-5)  # signed: pointing to the high bins
    assert n["head"]["explained"] == pytest.approx(1.0)


def test_weight_alignment_rejects_heads_without_a_weight_vector(tiny):
    model, tok = tiny
    token = ActivationPredictor.from_base(model, tok, neurons=[str(TARGET)], head_type="token",
                                          label_transform={"mean": [0.0], "std": [1.0], "bin_edges": EDGES})
    with pytest.raises(ValueError, match="token head"):
        weight_alignment(token)
    mlp_head = ActivationPredictor.from_base(model, tok, neurons=[str(TARGET)], head_hidden_size=4)
    with pytest.raises(ValueError, match="not a linear map"):
        weight_alignment(mlp_head)
    with pytest.raises(ValueError, match="not reported"):
        weight_alignment(output_reading_predictor(model, tok), neuron="0.0")
    with pytest.raises(ValueError, match="num_random"):
        weight_alignment(output_reading_predictor(model, tok), num_random=1)


# -- projections ---------------------------------------------------------------------------------------------


def test_residual_stream_matches_the_models_hidden_states(tiny):
    model, tok = tiny
    predictor = linear_predictor(model, tok, torch.randn(model.config.hidden_size), linear_norm=False)
    rows = labelled_rows(model, tok)
    stream = residual_stream(predictor, rows, batch_size=5)
    assert stream.shape == (len(rows), model.config.num_hidden_layers + 1, model.config.hidden_size)
    for i, row in enumerate(rows[:3]):
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in range(model.config.num_hidden_layers):  # the last entry is after the final norm
            np.testing.assert_allclose(stream[i, layer], hidden[layer][0, -1].numpy(), atol=1e-4)


def test_the_output_direction_carries_the_neuron_exactly_from_its_block_on(tiny):
    predictor, rows = known_answer(tiny, read_layer=2)
    n = projection_analysis(predictor, rows).numbers
    assert n["layers"] == ["embeddings", 0, 1, 2]
    out = n["correlation"]["out"]
    assert out[0] is None and out[1] is None  # nothing writes that coordinate before block 1
    assert out[2] == pytest.approx(1.0) and out[3] == pytest.approx(1.0)
    assert n["correlation"]["head"][3] == pytest.approx(1.0)
    assert n["head_output_r"] == pytest.approx(1.0) and n["head_output_r2"] == pytest.approx(1.0, abs=1e-6)


def test_head_output_correlation_is_the_reports_correlation_with_the_activation(tiny):
    model, tok = tiny
    torch.manual_seed(2)
    predictor = linear_predictor(model, tok, torch.randn(model.config.hidden_size), linear_norm=False)
    rows = labelled_rows(model, tok)
    n = projection_analysis(predictor, rows).numbers
    report = predictor_reports(predictor, rows)
    true = np.array([r["activations"][0] for r in rows])
    assert n["head_output_r"] == pytest.approx(np.corrcoef(report, true)[0, 1])
    assert n["head_output_r2"] == pytest.approx(1 - np.sum((report - true) ** 2) / np.sum((true - true.mean()) ** 2))
    assert all(len(v) == model.config.num_hidden_layers + 1 for v in n["correlation"].values())
    with pytest.raises(ValueError, match="at least 3 rows"):
        projection_analysis(predictor, rows[:2])


# -- activation patching -------------------------------------------------------------------------------------


def test_patching_moves_the_report_one_to_one_with_the_target_and_not_with_a_control(tiny):
    predictor, rows = known_answer(tiny)
    n = activation_patching(predictor, rows, control_neurons=2).numbers
    for mode in ("set", "zero", "scale", "all"):
        assert abs(n["target"][mode]["slope"] - 1) < 0.05, mode
        for control in n["controls"]:
            assert abs(control[mode]["slope"]) < 0.05, (mode, control["neuron"])
    assert len({c["neuron"] for c in n["controls"]} | {n["neuron"]}) == 3
    assert all(Neuron.parse(c["neuron"]).layer == TARGET.layer for c in n["controls"])
    assert n["meaningful"] is True


def test_patching_rejects_bad_modes_and_control_counts(tiny):
    predictor, rows = known_answer(tiny)
    with pytest.raises(ValueError, match="Unknown patching mode"):
        activation_patching(predictor, rows, modes=("set", "add"))
    with pytest.raises(ValueError, match="control_neurons"):
        activation_patching(predictor, rows, control_neurons=10_000)
    with pytest.raises(ValueError, match="No rows"):
        activation_patching(predictor, [])


# -- direction ablation --------------------------------------------------------------------------------------


def test_ablating_the_output_direction_collapses_a_head_that_reads_it_and_a_random_one_does_not(tiny):
    predictor, rows = known_answer(tiny, read_layer=2)
    n = direction_ablation(predictor, rows, control_directions=3).numbers
    assert n["before"]["r2"] == pytest.approx(1.0, abs=1e-6)
    assert n["after"]["r2"] < 0.05 and n["after"]["r"] == 0.0  # the report is 0 on every row
    assert n["r2_retained"] < 0.05
    assert n["control_r2_retained_mean"] > 0.8
    block = get_layers(predictor.base)[2]
    assert not block._forward_hooks
    np.testing.assert_allclose(predictor_reports(predictor, rows), [r["activations"][0] for r in rows], atol=1e-5)


def test_direction_ablation_rejects_bad_input(tiny):
    predictor, rows = known_answer(tiny)
    with pytest.raises(ValueError, match="control_directions"):
        direction_ablation(predictor, rows, control_directions=-1)
    with pytest.raises(ValueError, match="at least 2 rows"):
        direction_ablation(predictor, rows[:1])


# -- drift ---------------------------------------------------------------------------------------------------


def test_identical_models_show_no_drift(tiny):
    model, _ = tiny
    n = drift_anatomy(model, copy.deepcopy(model), TARGET).numbers
    assert n["changed"] is False
    for v in n["vectors"].values():
        assert v["change_norm"] == 0 and v["cosine"] == pytest.approx(1.0) and v["relative_norm_change"] == 0
        assert v["change_z"] is None and v["change_percentile"] == 0


def test_drift_reports_exactly_the_change_made_to_the_input_vector(tiny):
    model, _ = tiny
    trained = copy.deepcopy(model)
    name = "in:" + ("c_fc" if model.config.model_type == "gpt2" else "gate_proj")
    old = neuron_weights(model, TARGET.layer, TARGET.index)[name].double()
    delta = torch.linspace(-0.3, 0.5, old.numel(), dtype=torch.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        weight = getattr(get_mlp(trained, TARGET.layer), name[3:]).weight
        noise = 1e-3 * torch.randn_like(weight)
        weight.add_(noise)  # every neuron of the layer moves a little: the reference distribution
        column = model.config.model_type == "gpt2"
        target_noise = noise[:, TARGET.index] if column else noise[TARGET.index]
        (weight[:, TARGET.index] if column else weight[TARGET.index]).add_(delta.float() - target_noise)
    n = drift_anatomy(model, trained, TARGET).numbers
    new = old + delta.float().double()
    v = n["vectors"][name]
    assert v["change_norm"] == pytest.approx(float(delta.norm()), rel=1e-5)
    assert v["cosine"] == pytest.approx(float(old @ new / old.norm() / new.norm()), abs=1e-6)
    assert v["relative_norm_change"] == pytest.approx(float((new.norm() - old.norm()) / old.norm()), rel=1e-4)
    others = np.delete(layer_vectors(trained, TARGET.layer)[name].numpy() - layer_vectors(model, TARGET.layer)[name].numpy(),
                       TARGET.index, 0)
    norms = np.linalg.norm(others, axis=1)
    assert v["change_z"] == pytest.approx((float(delta.norm()) - norms.mean()) / norms.std(ddof=1), rel=1e-4)
    assert v["change_percentile"] == 100.0
    assert n["vectors"]["out"]["change_norm"] == 0 and n["changed"] is True


def test_drift_includes_an_unmerged_lora_adapter(tiny_model_dirs):
    from peft import LoraConfig, get_peft_model

    from nsr_hf.architectures import lora_target_modules
    from nsr_hf.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(tiny_model_dirs["gpt2"])
    peft_model = get_peft_model(copy.deepcopy(model),
                                LoraConfig(r=2, target_modules=lora_target_modules(model, mlp_only=True), fan_in_fan_out=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    via_adapter = drift_anatomy(model, peft_model, TARGET).numbers["vectors"]
    via_merge = drift_anatomy(model, merged, TARGET).numbers["vectors"]
    assert via_adapter["in:c_fc"]["change_norm"] > 0
    for name in via_merge:
        assert via_adapter[name]["change_norm"] == pytest.approx(via_merge[name]["change_norm"], rel=1e-4)


def test_drift_rejects_mismatched_models_and_bad_neurons(tiny_model_dirs):
    from nsr_hf.models import load_model_and_tokenizer

    gpt2, _ = load_model_and_tokenizer(tiny_model_dirs["gpt2"])
    llama, _ = load_model_and_tokenizer(tiny_model_dirs["llama"])
    with pytest.raises(ValueError, match="different architectures"):
        drift_anatomy(gpt2, llama, TARGET)
    with pytest.raises(ValueError, match="out of range"):
        drift_anatomy(gpt2, gpt2, "1.100000")


# -- results ---------------------------------------------------------------------------------------------------


def test_results_save_as_json_and_png(tiny, tmp_path):
    predictor, rows = known_answer(tiny)
    result = direction_ablation(predictor, rows, control_directions=1)
    assert isinstance(result, AnalysisResult)
    paths = result.save(tmp_path / "out", "ablation")
    assert json.loads(paths["json"].read_text()) == result.numbers
    assert paths["png"].stat().st_size > 1000


# -- the real model --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_analysis_runs_on_smollm2_with_a_head_only_predictor(smollm2, tmp_path):
    from nsr_hf.training.unfreezing import apply_unfreezing

    model, tok = smollm2
    neuron = Neuron(20, 100)
    predictor = ActivationPredictor.from_base(model, tok, neurons=[str(neuron)])
    apply_unfreezing(predictor, "head_only")
    rows = labelled_rows(model, tok, [neuron], texts=["The cat sat on the mat.", "def add(a, b): return a + b",
                                                       "Paris is the capital of France.", "import numpy as np"])
    results = {
        "weight_alignment": weight_alignment(predictor, num_random=200),
        "projection": projection_analysis(predictor, rows),
        "patching": activation_patching(predictor, rows, modes=("set", "zero"), num_values=2),
        "ablation": direction_ablation(predictor, rows, control_directions=1),
        "drift": drift_anatomy(model, predictor, neuron),
    }
    causal = causal_test(predictor, rows, num_values=3)
    assert causal["meaningful"] is True and np.isfinite(causal["slope"])
    assert results["drift"].numbers["changed"] is False  # head_only never touches the base
    assert len(results["projection"].numbers["layers"]) == 31
    assert results["weight_alignment"].numbers["layer_neurons"] == 1536
    for name, result in results.items():
        result.save(tmp_path, name)
        assert (tmp_path / f"{name}.png").exists()
