"""Intervention training: set rows are labelled with the set value exactly and natural rows keep theirs; rate 0 is
plain training; evaluation never intervenes; draws are per row and reproducible; live labels read the set value; the
token head sets the labelled token inside its prompt; LoRA and several neurons work; and on a tiny model it makes the
report follow the neuron (the causal slope ratio) where the neuron can reach the head, and cannot where it cannot."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from nsr_hf.architectures import get_neuron_module
from nsr_hf.capture import capture_activations, intervene
from nsr_hf.data.counterfactuals import CounterfactualValues
from nsr_hf.evaluation.causal import causal_test
from nsr_hf.evaluation.faithfulness import faithfulness_section
from nsr_hf.modeling.predictor import ActivationPredictor
from nsr_hf.training.collator import PredictorDataCollator
from nsr_hf.training.config import TrainConfig
from nsr_hf.training.interventions import InterventionSampler
from nsr_hf.training.trainer import PredictorTrainer
from nsr_hf.utils import unwrap

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def token_rows(tok, n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "label_position": []}
    for _ in range(n):
        length = int(torch.randint(4, 12, (1,), generator=g))
        rows["input_ids"].append(torch.randint(1, len(tok), (length,), generator=g).tolist())
        rows["attention_mask"].append([1] * length)
        rows["label_position"].append(length - 1)
    return rows


def natural_values(model, rows: dict, neurons: list[str]) -> np.ndarray:
    """(rows, K) the neurons' values at each row's labelled (last) token: what `nsr dataset` stores."""
    batch = PredictorDataCollator(pad_token_id=0)([{"input_ids": i, "label_position": p, "activations": [0.0]}
                                                   for i, p in zip(rows["input_ids"], rows["label_position"])])
    cap = capture_activations(model, {k: batch[k] for k in ("input_ids", "attention_mask")}, neurons, position="last")
    layers = [int(n.split(".")[0]) for n in neurons]
    columns = {layer: 0 for layer in layers}
    out = []
    for layer in layers:
        out.append(cap[layer][:, columns[layer]])
        columns[layer] += 1
    return torch.stack(out, 1).numpy().astype(np.float64)


def reference_dataset(model, tok, n: int = 48, neurons=("1.3",), seed: int = 0) -> tuple[Dataset, np.ndarray]:
    rows = token_rows(tok, n, seed)
    values = natural_values(model, rows, list(neurons))
    return Dataset.from_dict({**rows, "activations": values.tolist()}), values


def predictor_on(model, tok, values, neurons=("1.3",), head="regression", read_layer=2):
    transform = {"mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
                 "bin_edges": [np.quantile(values[:, j], np.linspace(0, 1, 11)).tolist() for j in range(values.shape[1])]}
    return ActivationPredictor.from_base(model, tok, neurons=list(neurons), head_type=head, read_layer=read_layer,
                                         label_transform=transform)


def sampler_for(values, neurons=("1.3",), rate=0.5, seed=0, source="interchange") -> InterventionSampler:
    return InterventionSampler(CounterfactualValues.fit(values, list(neurons), source=source), rate, seed=seed)


def args(tmp_path, **kw):
    base = dict(max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=1e-2, report_to="none",
                save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    return TrainingArguments(str(tmp_path), **{**base, **kw})


def collate(ds: Dataset, rows=None) -> dict:
    rows = range(len(ds)) if rows is None else rows
    return PredictorDataCollator(pad_token_id=0)([ds[int(i)] for i in rows])


# -- the labels ---------------------------------------------------------------------------------------------------


def test_intervened_rows_are_labelled_with_the_set_value_exactly_and_natural_rows_keep_theirs(tiny):
    model, tok = tiny
    ds, values = reference_dataset(model, tok)
    batch = collate(ds)
    plan = sampler_for(values).plan(batch)
    assert 0 < plan.mask.sum() < len(ds)
    assert torch.equal(plan.labels[~plan.mask], batch["labels"][~plan.mask])  # natural rows: their own label, bit for bit
    assert not torch.equal(plan.labels[plan.mask], batch["labels"][plan.mask])
    with intervene(model, plan.interventions(["1.3"], batch["label_positions"])):
        held = capture_activations(model, {k: batch[k] for k in ("input_ids", "attention_mask")}, ["1.3"], stop_early=False)[1]
    assert torch.equal(held[plan.mask[:, 0], 0], plan.labels[plan.mask])  # the label is exactly what the neuron held


def test_intervention_rate_zero_trains_exactly_as_plain_training(tiny, tmp_path):
    model, tok = tiny
    ds, values = reference_dataset(model, tok)
    runs = []
    for sampler in (None, sampler_for(values, rate=0.0)):
        torch.manual_seed(0)
        trainer = PredictorTrainer(model=predictor_on(model, tok, values), args=args(tmp_path, logging_strategy="steps", logging_steps=1),
                                   train_dataset=ds, unfreeze="head_only", interventions=sampler)
        trainer.train()
        runs.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], trainer.model.neuron_head.weight.detach().clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert TrainConfig().intervention_rate == 0  # off unless a recipe asks


def test_evaluation_and_prediction_never_intervene(tiny, tmp_path):
    model, tok = tiny
    ds, values = reference_dataset(model, tok, n=16)
    sampler = sampler_for(values, rate=1.0)
    calls = []
    plan = sampler.plan
    sampler.plan = lambda *a, **k: calls.append(1) or plan(*a, **k)
    trainer = PredictorTrainer(model=predictor_on(model, tok, values), args=args(tmp_path), train_dataset=ds, eval_dataset=ds,
                               unfreeze="head_only", interventions=sampler)
    trainer.evaluate()
    out = trainer.predict(ds)
    assert calls == []
    np.testing.assert_array_equal(out.label_ids, values.astype(np.float32))  # the natural labels
    trainer.model.eval()
    with torch.no_grad():
        natural = trainer.model(**{k: v for k, v in collate(ds).items() if k != "labels"}).predictions
    np.testing.assert_allclose(out.predictions[:, 0], natural.numpy(), rtol=1e-6)
    trainer.train()
    assert len(calls) == trainer.state.global_step  # training steps do


# -- reproducibility ----------------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_draws_and_a_row_the_same_draw_in_any_batch(tiny):
    model, tok = tiny
    ds, values = reference_dataset(model, tok, n=24)
    whole = sampler_for(values).plan(collate(ds))
    again = sampler_for(values).plan(collate(ds))
    assert torch.equal(whole.mask, again.mask) and torch.equal(whole.values, again.values)
    order = list(range(23, -1, -1))  # the other rows, another order, other padding: the same draw per row
    for part in (order[:8], order[8:]):
        plan = sampler_for(values).plan(collate(ds, part))
        assert torch.equal(plan.mask, whole.mask[part]) and torch.equal(plan.values, whole.values[part])
    other_seed = sampler_for(values, seed=1).plan(collate(ds))
    next_epoch = sampler_for(values)
    next_epoch.epoch = 1
    assert not torch.equal(other_seed.values, whole.values) and not torch.equal(next_epoch.plan(collate(ds)).values, whole.values)


# -- live labels, the token head, LoRA and several neurons ----------------------------------------------------------


@pytest.mark.parametrize("tiny", ["gpt2"], indirect=True)
def test_with_live_labels_the_label_of_a_set_neuron_is_the_set_value(tiny, tmp_path):
    model, tok = tiny
    ds, values = reference_dataset(model, tok, n=16)
    sampler = sampler_for(values)
    trainer = PredictorTrainer(model=predictor_on(model, tok, values), args=args(tmp_path), train_dataset=ds, unfreeze="full",
                               label_mode="live", interventions=sampler)
    batch = collate(ds)
    plan = sampler.plan(batch)
    trainer.model.train()
    _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    live = outputs["live_labels"]
    assert torch.equal(live[plan.mask], plan.labels[plan.mask])
    torch.testing.assert_close(live[~plan.mask], batch["labels"][~plan.mask], atol=1e-5, rtol=0)


def test_the_token_head_sets_the_labelled_token_inside_its_prompt(tiny, tmp_path):
    """Left padding puts the labelled token `label_offset` to the right of its place in the prompt; live labels read
    there show the set value in set rows and the natural value elsewhere."""
    model, tok = tiny
    ds, values = reference_dataset(model, tok, n=12)
    sampler = sampler_for(values)
    trainer = PredictorTrainer(model=predictor_on(model, tok, values, head="token", read_layer=None), args=args(tmp_path),
                               train_dataset=ds, unfreeze="head_only", label_mode="live", interventions=sampler)
    batch = collate(ds)
    pad = batch["input_ids"].shape[1] - batch["attention_mask"].sum(-1)
    left = {"input_ids": torch.stack([row.roll(int(p)) for row, p in zip(batch["input_ids"], pad)]),
            "attention_mask": torch.stack([row.roll(int(p)) for row, p in zip(batch["attention_mask"], pad)]),
            "label_positions": batch["label_positions"] + pad, "labels": batch["labels"]}
    assert (trainer.model.head.label_offset(left["attention_mask"]) == pad).all() and pad.any()
    plan = sampler.plan(left)
    trainer.model.train()
    with torch.no_grad():
        _, outputs = trainer.compute_loss(trainer.model, left, return_outputs=True)
    assert torch.equal(outputs["live_labels"][plan.mask], plan.labels[plan.mask])
    torch.testing.assert_close(outputs["live_labels"][~plan.mask], batch["labels"][~plan.mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_lora_and_several_neurons_train_on_the_set_values_and_log_the_intervened_fraction(tiny, tmp_path):
    model, tok = tiny
    neurons = ("1.3", "1.5", "0.2")
    ds, values = reference_dataset(model, tok, n=32, neurons=neurons)
    sampler = sampler_for(values, neurons)
    trainer = PredictorTrainer(model=predictor_on(model, tok, values, neurons),
                               args=args(tmp_path, logging_strategy="steps", logging_steps=1), train_dataset=ds, unfreeze="lora",
                               interventions=sampler)
    batch = collate(ds, range(8))
    plan = sampler.plan(batch)
    assert [(iv.layer, list(iv.indices)) for iv in plan.interventions(neurons, batch["label_positions"])] == [(0, [2]), (1, [3, 5])]
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    inner = unwrap(trainer.model)
    with intervene(inner.base, plan.interventions(neurons, batch["label_positions"])):
        by_hand = trainer.model(**{**batch, "labels": plan.labels}).loss
    assert torch.equal(loss, by_hand)
    trainer.train()
    logged = [h["intervened_fraction"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and all(0 < f < 1 for f in logged)


@pytest.mark.parametrize("tiny", ["gpt2"], indirect=True)
@pytest.mark.parametrize("strategy", ["head_only", "last_k", "after_target", "full", "lora", "lora_after_target", "gradual"])
def test_every_unfreezing_strategy_trains_on_the_set_values(tiny, tmp_path, strategy):
    model, tok = tiny
    ds, values = reference_dataset(model, tok, n=16)
    sampler = sampler_for(values)
    unfreeze = {"strategy": strategy, "k": 1 if strategy == "last_k" else None, "every_n_steps": 1}
    trainer = PredictorTrainer(model=predictor_on(model, tok, values), args=args(tmp_path, max_steps=2), train_dataset=ds,
                               unfreeze=unfreeze, interventions=sampler)
    batch = collate(ds, range(8))
    plan = sampler.plan(batch)
    trainer.model.train()
    with intervene(unwrap(trainer.model).base, plan.interventions(["1.3"], batch["label_positions"])):
        by_hand = trainer.model(**{**batch, "labels": plan.labels}).loss
    assert torch.equal(trainer.compute_loss(trainer.model, batch), by_hand)
    trainer.train()
    assert trainer.state.global_step == 2


def test_gradient_checkpointing_with_interventions_is_refused(tiny, tmp_path):
    model, tok = tiny
    ds, values = reference_dataset(model, tok, n=8)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        PredictorTrainer(model=predictor_on(model, tok, values), args=args(tmp_path, gradient_checkpointing=True), train_dataset=ds,
                         unfreeze="head_only", interventions=sampler_for(values))


# -- the recipe keys ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys, message", [
    ({"intervention_rate": 1.5}, "intervention_rate must be a number from 0"),
    ({"intervention_rate": 0.5, "intervention_source": "swap"}, "intervention_source must be one of interchange, uniform, shift"),
    ({"intervention_rate": 0.5, "intervention_shift_scale": 0}, "intervention_shift_scale must be a positive"),
    ({"intervention_rate": 0.5, "gradient_checkpointing": True}, "gradient_checkpointing"),
    ({"intervention_rate": 0.5, "neuron": "3.7", "read_layer": "1"}, "cannot reach the head"),
])
def test_intervention_keys_are_validated_with_clear_messages(keys, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**keys)


def test_the_pipeline_refuses_intervention_training_of_a_head_that_reads_before_the_target(tiny):
    from nsr_hf.pipeline import intervention_sampler

    model, tok = tiny
    ds, values = reference_dataset(model, tok, n=8)
    with pytest.raises(ValueError, match="before the layer of neuron"):
        intervention_sampler(TrainConfig(intervention_rate=0.5), predictor_on(model, tok, values, read_layer=0), ds, ["1.3"])
    sampler = intervention_sampler(TrainConfig(intervention_rate=0.5, intervention_source="shift"), predictor_on(model, tok, values), ds,
                                   ["1.3"])
    assert sampler.values.source == "shift" and sampler.rate == 0.5


# -- faithfulness on a tiny model -----------------------------------------------------------------------------------


def trained_head(model, tok, rate: float, steps: int = 200) -> tuple:
    """A head on block 2 of `model` trained to report neuron 1.3 (plain: rate 0), with its train and test rows."""
    ds, values = reference_dataset(model, tok, n=160)
    train, test = ds.select(range(128)), ds.select(range(128, 160))
    torch.manual_seed(0)
    training = args("unused", max_steps=steps, per_device_train_batch_size=16, learning_rate=3e-2)
    trainer = PredictorTrainer(model=predictor_on(model, tok, values[:128]), args=training, train_dataset=train, unfreeze="head_only",
                               interventions=sampler_for(values[:128], rate=rate))
    trainer.train()
    return trainer.model, [train[i] for i in range(len(train))], [test[i] for i in range(len(test))]


def slope_ratio(model, tok, rate: float, steps: int = 200) -> float:
    """The causal slope ratio of ``trained_head``."""
    predictor, _, test = trained_head(model, tok, rate, steps)
    result = causal_test(predictor, test)
    return result["slope"] / result["natural_slope"]


@pytest.mark.parametrize("tiny", ["gpt2"], indirect=True)
def test_intervention_training_raises_the_causal_slope_ratio_well_above_plain_training(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tok = tiny
    plain, faithful = slope_ratio(model, tok, 0.0), slope_ratio(model, tok, 0.5)
    assert abs(plain) < 0.15, f"plain training recomputes the neuron from its context (ratio {plain:.3f})"
    assert faithful > plain + 0.25, f"intervention training should make the report follow the neuron ({plain:.3f} -> {faithful:.3f})"


@pytest.mark.parametrize("tiny", ["gpt2"], indirect=True)
def test_a_neuron_whose_output_weights_are_zero_cannot_become_faithful(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tok = tiny
    with torch.no_grad():  # GPT-2's Conv1D c_proj is (neurons, hidden): row 3 is neuron 1.3's write to the residual stream
        get_neuron_module(model, 1).weight[3].zero_()
    predictor, train, test = trained_head(model, tok, 0.5)
    causal = causal_test(predictor, test, per_row=True)
    assert abs(causal["slope"] / causal["natural_slope"]) < 0.02
    # the evaluation's section on the intervention-trained predictor says so: no reader of block 2 can follow the neuron
    section = faithfulness_section(predictor, {"test": test}, train, causal={"test": causal}, n_bootstrap=100)["test"]
    assert abs(section["slope_ratio"]["ratio"]) < 0.02
    assert section["methods"]["self"]["r2"] < 0.2 and section["methods"]["ridge_probe_intervened"]["r2"] < 0.2
    assert section["verdict"].startswith("The report does not follow the neuron")
    assert "the ridge probe fitted on intervened rows does not follow it" in section["verdict"]


@pytest.mark.parametrize("tiny", ["gpt2", "llama"], indirect=True)
def test_under_bf16_mixed_precision_the_label_is_the_value_the_neuron_held(tiny, tmp_path):
    """Under autocast the neuron's value is computed (and set) in bfloat16 while the weights stay float32: the set values
    are rounded to bfloat16 too, so the label is still exactly what the neuron held in that training step."""
    model, tok = tiny
    ds, values = reference_dataset(model, tok, n=16)
    sampler = sampler_for(values, rate=1.0)
    predictor = predictor_on(model, tok, values)
    planned, held = [], []
    plan = sampler.plan
    sampler.plan = lambda inputs, **kw: planned.append((inputs["label_positions"], plan(inputs, **kw))) or planned[-1][1]
    handle = get_neuron_module(predictor.base, 1).register_forward_pre_hook(lambda module, a: held.append(a[0].detach().clone()))
    try:
        trainer = PredictorTrainer(model=predictor, args=args(tmp_path, max_steps=2, bf16=True), train_dataset=ds,
                                   unfreeze="head_only", interventions=sampler)
        trainer.train()
    finally:
        handle.remove()
    assert len(planned) == len(held) == 2
    for (positions, step), states in zip(planned, held):
        assert states.dtype == torch.bfloat16  # the step ran under autocast
        neuron = states[torch.arange(len(positions)), positions.long(), 3].float()
        assert torch.equal(neuron, step.labels[:, 0])  # bit for bit: the label is the value the neuron held
        assert torch.equal(step.labels[:, 0].to(torch.bfloat16).float(), step.labels[:, 0])


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_the_classification_head_is_trained_on_the_bin_of_the_set_value(tiny, tmp_path):
    model, tok = tiny
    ds, values = reference_dataset(model, tok, n=16)
    sampler = sampler_for(values, rate=1.0)
    predictor = predictor_on(model, tok, values, head="classification")
    trainer = PredictorTrainer(model=predictor, args=args(tmp_path, max_steps=2), train_dataset=ds, unfreeze="head_only",
                               interventions=sampler)
    batch = collate(ds, range(8))
    plan = sampler.plan(batch)
    edges = np.asarray(predictor.config.label_transform["bin_edges"][0])

    def bins(v):  # edges[i] <= v < edges[i+1]; the last bin holds its upper edge, values beyond the edges the end bins
        return torch.as_tensor(np.clip(np.searchsorted(edges, v.numpy(), side="right") - 1, 0, len(edges) - 2))

    set_bins, natural_bins = bins(plan.labels[:, 0]), bins(batch["labels"].reshape(-1))
    assert (set_bins != natural_bins).any()  # the set values moved rows into other bins
    trainer.model.train()
    with intervene(predictor.base, plan.interventions(["1.3"], batch["label_positions"])):
        logits = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, len(edges) - 1).float(), set_bins)
    assert torch.allclose(trainer.compute_loss(trainer.model, batch), expected, atol=1e-6)
    trainer.train()
    assert trainer.state.global_step == 2
