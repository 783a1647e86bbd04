"""DriftMonitor: with head_only the live neuron is its reference and the LM loss does not move; with full
unfreezing the drift it reports is the drift an independent computation finds; it measures at step 0, every N
steps and at the end, logs through the Trainer, writes drift.json and drift.png, sees LoRA adapters, leaves
training untouched, and rejects bad input clearly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import TrainerCallback, TrainingArguments

from nsr_hf.capture import Neuron, capture_activations, model_inputs
from nsr_hf.modeling.predictor import ActivationPredictor
from nsr_hf.models import load_model_and_tokenizer
from nsr_hf.training.collator import PredictorDataCollator
from nsr_hf.training.monitoring import DriftMonitor, neuron_drift_stats
from nsr_hf.training.trainer import PredictorTrainer
from nsr_hf.utils import unwrap as _unwrap

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def load(tiny_model_dirs, arch="gpt2"):
    return load_model_and_tokenizer(tiny_model_dirs[arch])


def probe_dataset(model, tok, neurons, n=40, seed=0) -> Dataset:
    """Rows of an activation dataset whose `activations` are the neurons of `model` (the frozen original) at
    `label_position`, which is not always the last token."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 10, (1,), generator=g))
        rows.append({"input_ids": torch.randint(1, len(tok), (length,), generator=g).tolist(), "attention_mask": [1] * length,
                     "label_position": int(torch.randint(0, length, (1,), generator=g))})
    values = reference_values(model, rows, neurons)
    for row, v in zip(rows, values):
        row["activations"] = v.tolist()
    return Dataset.from_list(rows)


def reference_values(base, rows, neurons, stop_early=True) -> np.ndarray:
    """The neurons of `base` at each row's label_position, (rows, K), by capture_activations (one batch)."""
    batch = PredictorDataCollator(pad_token_id=0)([{**r, "activations": [0.0]} for r in rows])
    cap = capture_activations(base, {k: batch[k] for k in ("input_ids", "attention_mask")}, neurons, position="all", stop_early=stop_early)
    cols = []
    for name in neurons:
        n = Neuron.parse(name)
        col = cap.neuron_indices[n.layer].tolist().index(n.index)
        cols.append(cap[n.layer][torch.arange(len(rows)), batch["label_positions"], col])
    return torch.stack(cols, 1).double().numpy()


def lm_loss(base, rows) -> float:
    """Mean next-token cross-entropy over real tokens, by the model's own `labels` loss on one padded batch."""
    batch = PredictorDataCollator(pad_token_id=0)([{**r, "activations": [0.0]} for r in rows])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(base(**model_inputs(batch), labels=labels, use_cache=False).loss)


def args(tmp_path, **kw):
    base = dict(max_steps=7, per_device_train_batch_size=8, learning_rate=5e-2, report_to="none", logging_steps=2, save_strategy="no",
                use_cpu=True, disable_tqdm=True, seed=0)
    return TrainingArguments(str(tmp_path), **{**base, **kw})


class LogRecorder(TrainerCallback):
    """Sees what every report_to integration sees: the logs passed to on_log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def train(model, tok, data, neurons, unfreeze, tmp_path, bind=True, monitor=True, head="regression", callbacks=(), **kw):
    """(trainer, monitor) after training a fresh predictor on `data` with a DriftMonitor every 3 steps."""
    torch.manual_seed(0)
    predictor = ActivationPredictor.from_base(model, tok, neurons=neurons, head_type=head,
                                              label_transform={"mean": [0.0] * len(neurons), "std": [1.0] * len(neurons)})
    drift = DriftMonitor(data, every_n_steps=3, output_dir=str(tmp_path / "drift"), max_probe_rows=64, max_lm_rows=64) if monitor else None
    trainer = PredictorTrainer(model=predictor, args=args(tmp_path / "run", **kw), train_dataset=data, unfreeze=unfreeze,
                               callbacks=[*callbacks, *([drift] if drift is not None and not bind else [])])
    if drift is not None and bind:
        drift.bind(trainer)
    trainer.train()
    return trainer, drift


@pytest.fixture(scope="module")
def head_only_run(tiny_model_dirs, tmp_path_factory):
    model, tok = load(tiny_model_dirs)
    data = probe_dataset(model, tok, ["1.3"])
    recorder = LogRecorder()
    trainer, monitor = train(model, tok, data, ["1.3"], "head_only", tmp_path_factory.mktemp("head_only"), callbacks=[recorder])
    trainer.log_recorder = recorder
    return trainer, monitor, model, data


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def full_run(request, tiny_model_dirs, tmp_path_factory):
    """Full unfreezing at a high learning rate, two target neurons in two layers, 6 steps (a multiple of N=3)."""
    model, tok = load(tiny_model_dirs, request.param)
    neurons = ["0.5", "1.3"]
    data = probe_dataset(model, tok, neurons)
    out = tmp_path_factory.mktemp(f"full_{request.param}")
    trainer, monitor = train(model, tok, data, neurons, "full", out, max_steps=6)
    return trainer, monitor, model, data, out


# -- what it measures ---------------------------------------------------------------------------------------------


def test_head_only_training_leaves_the_neuron_on_its_reference_and_the_lm_loss_unchanged(head_only_run):
    _, monitor, _, _ = head_only_run
    assert len(monitor.history) == 4
    for h in monitor.history:
        assert h["1.3/mean_shift"] == pytest.approx(0.0, abs=1e-6)
        assert h["1.3/std_ratio"] == pytest.approx(1.0, abs=1e-6)
        assert h["1.3/correlation"] == pytest.approx(1.0, abs=1e-6)
        assert h["1.3/max_abs_change"] <= 1e-6
        assert h["lm_loss_delta"] == pytest.approx(0.0, abs=1e-6) and h["lm_loss"] == pytest.approx(monitor.history[0]["lm_loss"], abs=1e-6)
        # the live neuron is the reference, so the head agrees with both equally
        assert h["head_r_live"] == pytest.approx(h["head_r_reference"], abs=1e-6)
    # the head did train: its agreement changed while the neuron stayed put
    assert monitor.history[-1]["head_r_live"] != pytest.approx(monitor.history[0]["head_r_live"], abs=1e-3)


def test_full_unfreezing_drift_is_seen_and_matches_an_independent_computation(full_run):
    trainer, monitor, original, data, _ = full_run
    neurons = ["0.5", "1.3"]
    inner = _unwrap(trainer.model).eval()
    rows = data.to_list()
    live = reference_values(inner.base, rows, neurons)
    reference = np.asarray(data["activations"], dtype=np.float64)
    np.testing.assert_allclose(reference, reference_values(original, rows, neurons), atol=1e-6)  # the original is untouched
    final = monitor.history[-1]
    assert final["step"] == 6
    for j, name in enumerate(neurons):
        expected = neuron_drift_stats(live[:, j], reference[:, j])
        ref_std = reference[:, j].std()
        assert expected["mean_shift"] == pytest.approx((live[:, j].mean() - reference[:, j].mean()) / ref_std)
        for key, value in expected.items():
            assert final[f"{name}/{key}"] == pytest.approx(value, abs=1e-5), (name, key)
    # the neurons drifted, and the monitor says so
    assert any(abs(final[f"{n}/std_ratio"] - 1) > 0.05 or abs(final[f"{n}/correlation"] - 1) > 0.05 for n in neurons)
    assert max(final[f"{n}/max_abs_change"] for n in neurons) > 1e-2
    # head agreement against the live neuron and the reference, per neuron and as the mean
    collate = PredictorDataCollator(pad_token_id=0)
    with torch.no_grad():
        report = inner(**{k: v for k, v in collate(rows).items() if k != "labels"}).predictions.double().numpy()
    for j, name in enumerate(neurons):
        assert final[f"{name}/head_r_live"] == pytest.approx(np.corrcoef(report[:, j], live[:, j])[0, 1], abs=1e-5)
        assert final[f"{name}/head_r_reference"] == pytest.approx(np.corrcoef(report[:, j], reference[:, j])[0, 1], abs=1e-5)
        r2 = 1 - np.sum((live[:, j] - report[:, j]) ** 2) / np.sum((live[:, j] - live[:, j].mean()) ** 2)
        assert final[f"{name}/head_r2_live"] == pytest.approx(r2, abs=1e-5)
    assert final["head_r_live"] == pytest.approx(np.mean([final[f"{n}/head_r_live"] for n in neurons]))
    # LM damage: the trained base's loss on the probe texts, and its change from the original's
    assert final["lm_loss"] == pytest.approx(lm_loss(inner.base, rows), abs=1e-5)
    assert monitor.history[0]["lm_loss"] == pytest.approx(lm_loss(original, rows), abs=1e-5)
    assert final["lm_loss_delta"] == pytest.approx(final["lm_loss"] - monitor.history[0]["lm_loss"])
    assert final["lm_loss_delta"] != 0.0


def test_the_token_head_and_a_read_layer_below_the_target_read_the_neuron_in_their_own_pass(tiny_model_dirs):
    model, tok = load(tiny_model_dirs)
    data = probe_dataset(model, tok, ["1.3"], n=12)
    monitor = DriftMonitor(data)
    for kwargs in ({"head_type": "token", "label_transform": {"mean": [0.0], "std": [1.0], "bin_edges": [list(np.linspace(-1, 1, 11))]}},
                   {"head_type": "regression", "read_layer": 0, "label_transform": {"mean": [0.0], "std": [1.0]}}):
        predictor = ActivationPredictor.from_base(model, tok, neurons=["1.3"], **kwargs)
        m = monitor.measure(predictor)
        assert m["1.3/max_abs_change"] <= 1e-6 and m["1.3/correlation"] == pytest.approx(1.0, abs=1e-6), kwargs


# -- when it measures and where it goes ------------------------------------------------------------------------


def test_it_measures_at_step_zero_every_n_steps_and_at_the_end(head_only_run, full_run):
    assert [h["step"] for h in head_only_run[1].history] == [0, 3, 6, 7]  # 7 steps: the end is measured too
    assert [h["step"] for h in full_run[1].history] == [0, 3, 6]  # 6 steps: the last step was just measured


def test_measurements_are_logged_through_the_trainer_once_each_under_drift_keys(head_only_run):
    trainer, monitor, _, _ = head_only_run
    logged = [e for e in trainer.state.log_history if any(k.startswith("drift/") for k in e)]
    # one log entry per measurement: logging (on_log) never triggers another measurement (on_step_end)
    assert [e["step"] for e in logged] == [h["step"] for h in monitor.history]
    for entry, h in zip(logged, monitor.history):
        for key in ("1.3/mean_shift", "1.3/std_ratio", "1.3/correlation", "1.3/max_abs_change", "head_r_live", "head_r2_live",
                    "head_r_reference", "head_r2_reference", "lm_loss", "lm_loss_delta"):
            assert entry[f"drift/{key}"] == h[key], key
    assert any("loss" in e and "drift/lm_loss" not in e for e in trainer.state.log_history)  # the Trainer's own logs are still there
    # what the integrations (wandb, tensorboard ...) receive through on_log
    seen = [e for e in trainer.log_recorder.logs if "drift/lm_loss" in e]
    assert [e["drift/lm_loss"] for e in seen] == [h["lm_loss"] for h in monitor.history]


def test_an_unbound_monitor_keeps_its_history_but_logs_nothing(tiny_model_dirs, tmp_path):
    model, tok = load(tiny_model_dirs)
    data = probe_dataset(model, tok, ["1.3"], n=16)
    trainer, monitor = train(model, tok, data, ["1.3"], "head_only", tmp_path, bind=False, max_steps=3)
    assert [h["step"] for h in monitor.history] == [0, 3]
    assert not any(k.startswith("drift/") for e in trainer.state.log_history for k in e)
    assert (tmp_path / "drift" / "drift.json").exists()


def test_drift_json_and_png_are_written_at_the_end(full_run):
    _, monitor, _, data, out = full_run
    summary = json.loads((out / "drift" / "drift.json").read_text())
    assert {"neurons", "every_n_steps", "probe_rows", "lm_rows", "lm_tokens", "reference", "history", "final"} <= summary.keys()
    assert summary["neurons"] == ["0.5", "1.3"] and summary["every_n_steps"] == 3 and summary["probe_rows"] == len(data)
    reference = np.asarray(data["activations"])
    for j, name in enumerate(summary["neurons"]):
        assert summary["reference"][name]["mean"] == pytest.approx(reference[:, j].mean())
        assert summary["reference"][name]["std"] == pytest.approx(reference[:, j].std())
    assert [h["step"] for h in summary["history"]] == [0, 3, 6]
    assert summary["final"] == summary["history"][-1] == pytest.approx(monitor.history[-1])
    png = (out / "drift" / "drift.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# -- wrappers and side effects ---------------------------------------------------------------------------------


def test_a_lora_wrapped_predictor_is_measured_with_its_adapters_active(tiny_model_dirs, tmp_path):
    model, tok = load(tiny_model_dirs)
    data = probe_dataset(model, tok, ["1.3"], n=24)
    trainer, monitor = train(model, tok, data, ["1.3"], {"strategy": "lora", "lora_r": 2}, tmp_path, max_steps=6)
    peft_model, inner = trainer.model, _unwrap(trainer.model)
    assert type(peft_model).__name__.startswith("Peft") and type(inner).__name__ == "ActivationPredictor"
    peft_model.eval()
    rows = data.to_list()
    batch = {k: v for k, v in PredictorDataCollator(pad_token_id=0)(rows).items() if k != "labels"}
    with torch.no_grad():
        through_peft = peft_model(**batch).predictions
        unwrapped = inner(**batch).predictions
        with peft_model.disable_adapter():
            without_adapters = inner(**batch).predictions
            base_neuron = reference_values(inner.base, rows, ["1.3"], stop_early=False)
    # the unwrapped predictor still runs its injected LoRA layers: it reports what the PeftModel reports
    torch.testing.assert_close(unwrapped, through_peft)
    assert not torch.allclose(unwrapped, without_adapters, atol=1e-4)
    # the monitor's live neuron is the adapted one (full forward: LoRA also sits on the target layer's MLP input)
    live = reference_values(inner.base, rows, ["1.3"], stop_early=False)[:, 0]
    np.testing.assert_allclose(base_neuron[:, 0], np.asarray(data["activations"])[:, 0], atol=1e-6)
    final = monitor.history[-1]
    assert final["1.3/max_abs_change"] == pytest.approx(np.max(np.abs(live - base_neuron[:, 0])), abs=1e-5)
    assert final["1.3/max_abs_change"] > 1e-2
    assert final["head_r_live"] == pytest.approx(np.corrcoef(through_peft[:, 0].double().numpy(), live)[0, 1], abs=1e-5)


def test_monitoring_does_not_change_training(tiny_model_dirs, tmp_path):
    model, tok = load(tiny_model_dirs)
    data = probe_dataset(model, tok, ["1.3"], n=16)
    weights = []
    for monitor in (True, False):
        trainer, _ = train(model, tok, data, ["1.3"], "full", tmp_path / str(monitor), monitor=monitor, max_steps=4)
        weights.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_measuring_restores_the_mode_of_every_module(tiny_model_dirs):
    model, tok = load(tiny_model_dirs)
    data = probe_dataset(model, tok, ["1.3"], n=8)
    predictor = ActivationPredictor.from_base(model, tok, neurons=["1.3"], label_transform={"mean": [0.0], "std": [1.0]})
    predictor.train()
    predictor.base.transformer.h[0].eval()  # a mixed state must come back as it was, not as all-train
    before = {name: m.training for name, m in predictor.named_modules()}
    DriftMonitor(data).measure(predictor)
    assert {name: m.training for name, m in predictor.named_modules()} == before
    assert torch.is_grad_enabled()


def test_large_probe_sets_are_subsampled_deterministically(tiny_model_dirs):
    model, tok = load(tiny_model_dirs)
    data = probe_dataset(model, tok, ["1.3"], n=40)
    a, b = DriftMonitor(data, max_probe_rows=10, max_lm_rows=5), DriftMonitor(data.to_list(), max_probe_rows=10, max_lm_rows=5)
    assert len(a.probe) == 10 and len(a.lm_rows) == 5
    assert a.probe == b.probe and a.lm_rows == b.lm_rows
    np.testing.assert_array_equal(a.reference, b.reference)
    assert len({tuple(r["input_ids"]) for r in a.probe}) == 10  # distinct rows, drawn without replacement


# -- bad input ---------------------------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors(tiny_model_dirs):
    model, tok = load(tiny_model_dirs)
    data = probe_dataset(model, tok, ["1.3"], n=8)
    with pytest.raises(ValueError, match="no column.*activations.*reference"):
        DriftMonitor(data.remove_columns("activations"))
    with pytest.raises(ValueError, match="every_n_steps must be an integer of at least 1"):
        DriftMonitor(data, every_n_steps=0)
    with pytest.raises(ValueError, match="probe_rows is empty"):
        DriftMonitor(data.select([]))
    with pytest.raises(ValueError, match="probe_rows is empty"):
        DriftMonitor([])
    with pytest.raises(ValueError, match="one split"):
        DriftMonitor(DatasetDict({"validation": data}))
    with pytest.raises(ValueError, match="constant"):
        DriftMonitor(data.map(lambda r: {"activations": [1.0]}))
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        DriftMonitor(data, lm_rows=[{"input_ids": [5]}])
    two = ActivationPredictor.from_base(model, tok, neurons=["0.1", "1.3"], label_transform={"mean": [0.0, 0.0], "std": [1.0, 1.0]})
    with pytest.raises(ValueError, match="1 activation.*2 neuron"):
        DriftMonitor(data).measure(two)


def test_the_recipe_sizes_the_drift_monitors_probe_set(tiny_model_dirs, tmp_path):
    """``drift_probe_rows`` / ``drift_lm_rows``: the monitor measures on that many rows (a smaller set is a cheaper watch)."""
    from conftest import write_word_corpus

    from nsr_hf.pipeline import run_train
    from nsr_hf.training.config import TrainConfig

    with pytest.raises(ValueError, match="drift_probe_rows must be at least 1"):
        TrainConfig(drift_probe_rows=0, output_dir=str(tmp_path / "never"))
    corpus = write_word_corpus(tmp_path / "docs.jsonl")
    config = TrainConfig(model=tiny_model_dirs["llama"], corpus=str(corpus), scan_documents=30, dataset_documents=60, max_length=32,
                         max_steps=2, per_device_train_batch_size=8, read_layer=2, unfreeze="head_only", drift_every_n_steps=1,
                         drift_probe_rows=5, drift_lm_rows=3, evaluate=False, output_dir=str(tmp_path / "run"))
    run_train(config)
    history = json.loads((tmp_path / "run" / "drift.json").read_text())
    assert history["probe_rows"] == 5 and history["lm_rows"] == 3
