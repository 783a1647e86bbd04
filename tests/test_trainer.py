"""PredictorTrainer: the collator pads dynamically and keeps label positions; training lowers the eval loss;
metrics match hand-computed cases and never return NaN; evaluation keeps two values per neuron, never logits;
gradient accumulation does not re-scale the loss of float labels (PITFALLS HF-4); the whole pipeline runs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import EvalPrediction, TrainingArguments

from nsr_hf.data.labels import bins_of
from nsr_hf.metrics import bin_metrics, quadratic_weighted_kappa, regression_metrics
from nsr_hf.modeling.predictor import ActivationPredictor
from nsr_hf.training.collator import PredictorDataCollator
from nsr_hf.training.trainer import LiveLabels, PredictorMetrics, PredictorTrainer

EDGES = [[i / 10 for i in range(11)]]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def activation_dataset(tok, n=48, seed=0, extra_columns=True) -> Dataset:
    """Rows shaped like an `nsr dataset` split. The last token is one of ten ids and sets the target
    ((id % 10) / 10 + 0.05), so a small train set covers every case and the function generalises."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "label_position": [], "activations": []}
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        ids = torch.randint(1, len(tok), (length,), generator=g).tolist()
        ids[-1] = 40 + int(torch.randint(0, 10, (1,), generator=g))
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["label_position"].append(length - 1)
        rows["activations"].append([(ids[-1] % 10) / 10 + 0.05])
    if extra_columns:
        rows["text"] = [tok.decode(i) for i in rows["input_ids"]]
        rows["doc_id"] = [f"doc{i}" for i in range(n)]
    return Dataset.from_dict(rows)


def predictor_for(tiny, head="regression"):
    model, tok = tiny
    transform = {"mean": [0.5], "std": [0.29], "bin_edges": EDGES}
    return ActivationPredictor.from_base(model, tok, neurons=["1.3"], head_type=head, label_transform=transform)


def args(tmp_path, **kw):
    base = dict(max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=1e-2, report_to="none",
                save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    return TrainingArguments(str(tmp_path), **{**base, **kw})


# -- collator -------------------------------------------------------------------------------------------------


def test_collator_pads_to_the_longest_row_of_the_batch_and_keeps_label_positions():
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "label_position": 1, "activations": [0.5, -1.0], "text": "x"},
            {"input_ids": [8], "attention_mask": [1], "label_position": 0, "activations": [2.0, 3.0], "doc_id": "d"}]
    batch = PredictorDataCollator(pad_token_id=99)(rows)
    assert batch.keys() == {"input_ids", "attention_mask", "label_positions", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["label_positions"].tolist() == [1, 0]
    assert batch["input_ids"][torch.arange(2), batch["label_positions"]].tolist() == [6, 8]  # the labelled tokens, not padding
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [[0.5, -1.0], [2.0, 3.0]]
    assert PredictorDataCollator(pad_token_id=0)(rows[1:])["input_ids"].shape == (1, 1)  # dynamic: no fixed length


def test_collator_uses_the_tokenizer_pad_id_and_rejects_positions_on_padding(tiny):
    tok = tiny[1]
    assert PredictorDataCollator(tok).pad_token_id == tok.pad_token_id
    with pytest.raises(ValueError, match="outside"):
        PredictorDataCollator(tok)([{"input_ids": [1, 2], "label_position": 2, "activations": [0.0]}])


# -- trainer ----------------------------------------------------------------------------------------------------


def test_trainer_sets_the_arguments_the_activation_columns_need(tiny, tmp_path):
    trainer = PredictorTrainer(model=predictor_for(tiny), args=args(tmp_path), train_dataset=activation_dataset(tiny[1]),
                               unfreeze="head_only")
    assert trainer.args.remove_unused_columns is False and trainer.args.label_names == ["labels"]
    assert trainer.model_accepts_loss_kwargs is False


def test_training_lowers_the_eval_loss_and_prints_the_trainable_parameter_count(tiny, tmp_path, capsys):
    torch.manual_seed(0)
    train, evaluation = activation_dataset(tiny[1], 96), activation_dataset(tiny[1], 32, seed=1)
    trainer = PredictorTrainer(model=predictor_for(tiny), args=args(tmp_path, max_steps=120, learning_rate=5e-3), train_dataset=train,
                               eval_dataset=evaluation, unfreeze={"strategy": "last_k", "k": 1})
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < 0.8 * before["eval_loss"]
    assert {"eval_pearson", "eval_spearman", "eval_r2", "eval_mse", "eval_mae", "eval_calibration_slope",
            "eval_calibration_intercept"} <= after.keys()
    assert "trainable parameters:" in capsys.readouterr().out


@pytest.mark.parametrize("head", ["classification", "token"])
def test_bin_heads_report_both_readouts_and_keep_two_values_per_row_not_logits(tiny, tmp_path, head):
    evaluation = activation_dataset(tiny[1], 20)
    trainer = PredictorTrainer(model=predictor_for(tiny, head), args=args(tmp_path), eval_dataset=evaluation, unfreeze="head_only")
    output = trainer.predict(evaluation)
    assert output.predictions.shape == (20, 2, 1)  # [expected value, greedy value] per neuron: never (rows, vocab)
    assert output.label_ids.shape == (20, 1)
    for key in ("pearson", "r2", "accuracy", "balanced_accuracy", "qwk", "greedy_pearson", "greedy_accuracy", "greedy_qwk"):
        assert np.isfinite(output.metrics[f"test_{key}"]), key
    # the greedy readout is a bin centre, the expected value a mixture of them
    centres = np.arange(10) / 10 + 0.05
    assert np.all(np.isclose(output.predictions[:, 1, :1], centres[None, :], atol=1e-6).any(-1))


def test_gradient_accumulation_does_not_rescale_the_loss_of_float_labels(tiny, tmp_path):
    data = activation_dataset(tiny[1], 8, extra_columns=False)
    heads = []
    for batch, accumulation in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        predictor = predictor_for(tiny)
        trainer = PredictorTrainer(model=predictor, args=args(tmp_path / str(accumulation), max_steps=1, per_device_train_batch_size=batch,
                                   gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
                                   max_grad_norm=0.0),  # no clipping: it would hide a 2x gradient
                                   train_dataset=data, unfreeze="head_only")
        trainer.train()
        heads.append(predictor.neuron_head.weight.detach().clone())
    torch.manual_seed(0)
    start = predictor_for(tiny).neuron_head.weight.detach()
    assert not torch.equal(heads[0], start)
    # mean of two half-batch losses, each divided by the accumulation steps == the full-batch loss: same update
    torch.testing.assert_close(heads[1] - start, heads[0] - start, rtol=1e-4, atol=1e-7)


def test_a_peft_wrapped_predictor_still_reports_eval_loss(tiny, tmp_path):
    evaluation = activation_dataset(tiny[1], 16)
    trainer = PredictorTrainer(model=predictor_for(tiny), args=args(tmp_path), eval_dataset=evaluation,
                               unfreeze={"strategy": "lora", "lora_r": 2})
    assert "eval_loss" in trainer.evaluate()


# -- metrics ----------------------------------------------------------------------------------------------------


def test_regression_metrics_match_a_hand_computed_case():
    m = regression_metrics([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
    assert m["pearson"] == pytest.approx(1.0) and m["spearman"] == pytest.approx(1.0)
    assert m["mse"] == pytest.approx(14 / 3) and m["mae"] == pytest.approx(2.0)
    assert m["r2"] == pytest.approx(1 - 14 / 8)  # high r with negative R^2: a failure the metrics must show
    assert m["calibration_slope"] == pytest.approx(2.0) and m["calibration_intercept"] == pytest.approx(0.0, abs=1e-12)
    perfect = regression_metrics([0.1, 0.5, 0.2], [0.1, 0.5, 0.2])
    assert perfect["r2"] == 1.0 and perfect["mse"] == 0.0 and perfect["calibration_slope"] == pytest.approx(1.0)


def test_constant_predictions_give_defined_values_and_a_warning_never_nan():
    with pytest.warns(RuntimeWarning, match="constant"):
        m = regression_metrics([0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 2.0, 3.0])
    assert all(np.isfinite(v) for v in m.values())
    assert m["pearson"] == 0.0 and m["spearman"] == 0.0 and m["calibration_slope"] == 0.0 and m["calibration_intercept"] == 1.5
    assert m["r2"] == pytest.approx(1 - (0.25 + 0.25 + 2.25 + 6.25) / 5)


def test_constant_targets_give_defined_values_and_a_warning_never_nan():
    with pytest.warns(RuntimeWarning, match="targets are constant"):
        m = regression_metrics([0.0, 1.0, 2.0], [1.0, 1.0, 1.0])
    assert all(np.isfinite(v) for v in m.values()) and m["r2"] == 0.0 and m["pearson"] == 0.0


def test_bins_follow_the_edges_of_the_label_transform():
    edges = [0.0, 1.0, 2.0, 3.0]
    assert bins_of([-5.0, 0.0, 0.999, 1.0, 2.5, 3.0, 9.0], edges).tolist() == [0, 0, 0, 1, 2, 2, 2]


def test_bin_metrics_match_hand_computed_cases():
    m = bin_metrics([0, 1, 1, 2], [0, 1, 2, 2], 3)
    assert m["accuracy"] == 0.75 and m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    # observed weighted disagreement: one pair (2, 1) with weight 1/4, over 4 rows; expected from the marginals
    true_marg, pred_marg = np.array([1, 1, 2]) / 4, np.array([1, 2, 1]) / 4
    w = (np.subtract.outer(np.arange(3), np.arange(3)) ** 2) / 4
    assert m["qwk"] == pytest.approx(1 - (0.25 / 4) / (w * np.outer(true_marg, pred_marg)).sum())
    assert quadratic_weighted_kappa([0, 1, 2], [0, 1, 2], 3) == 1.0
    assert quadratic_weighted_kappa([0, 1, 2], [2, 1, 0], 3) == pytest.approx(-1.0)
    with pytest.warns(RuntimeWarning):
        assert quadratic_weighted_kappa([1, 1], [1, 1], 3) == 1.0


def test_metrics_of_several_neurons_are_averaged_and_given_per_neuron():
    preds = np.stack([np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 3.0]]), np.full((3, 2), np.nan)], 1)
    labels = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 2.0]])
    m = PredictorMetrics(["1.3", "2.4"])(EvalPrediction(predictions=preds, label_ids=labels))
    assert m["1.3/mse"] == 0.0 and m["2.4/mse"] == pytest.approx(1 / 3) and m["mse"] == pytest.approx(1 / 6)
    assert "greedy_pearson" not in m  # regression: no greedy readout


# -- the pipeline -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head_only_run(tiny_model_dirs, tmp_path_factory):
    """run_train on a tiny Llama and a 60-document jsonl corpus: scan, dataset, head_only training (about 3 s)."""
    from conftest import write_word_corpus

    from nsr_hf.pipeline import run_train
    from nsr_hf.training.config import TrainConfig

    tmp_path = tmp_path_factory.mktemp("train")
    corpus = write_word_corpus(tmp_path / "docs.jsonl")
    config = TrainConfig(model=tiny_model_dirs["llama"], corpus=str(corpus), scan_documents=30, dataset_documents=60, max_length=32,
                         num_train_epochs=1, per_device_train_batch_size=8, learning_rate=1e-2, unfreeze="head_only", drift_every_n_steps=2,
                         cross_models=[tiny_model_dirs["gpt2"]], n_bootstrap=50, output_dir=str(tmp_path / "out"))
    return config, run_train(config)


def test_run_train_scans_builds_trains_evaluates_and_saves(head_only_run):
    from nsr_hf.modeling.predictor import load_predictor

    config, summary = head_only_run
    out = Path(config.output_dir)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["neurons"] == summary["neurons"] and saved["scan_rank"] == 1
    assert (out / "scan").is_dir() and (out / "dataset" / "README.md").exists()
    assert {"test_pearson", "test_r2", "test_mse"} <= saved["metrics"]["test"].keys()
    assert saved["neuron_drift"]["max_abs"] < 1e-4  # head_only: the base is frozen, the neuron cannot move
    predictor = load_predictor(str(out / "predictor"))
    assert predictor.config.neurons == summary["neurons"]
    assert predictor.predict(["the quick brown fox"]).shape == (1, 1)
    # the drift monitor, the training log and the evaluation protocol
    drift = json.loads((out / "drift.json").read_text())
    assert [h["step"] for h in drift["history"]][0] == 0 and (out / "drift.png").exists()
    assert any(k.startswith("drift/") for h in json.loads((out / "log_history.json").read_text()) for k in h)
    evaluation = saved["evaluation"]
    assert {"self", "mean", "ridge_probe", "shuffled_labels", "random_init"} <= evaluation["metrics"]["test"].keys()
    assert any(k.startswith("cross:") for k in evaluation["metrics"]["test"])
    assert (out / "evaluation" / "report.md").exists() and (out / "evaluation" / "methods.png").exists()
    card = (out / "predictor" / "README.md").read_text()
    assert "## Evaluation" in card and "| **self** |" in card  # the headline table is in the model card


def test_split_fractions_reach_the_scan_and_the_dataset(head_only_run, tmp_path):
    from dataclasses import replace

    from nsr_hf.data.corpus import load_corpus, split_of
    from nsr_hf.data.storage import load_activation_dataset
    from nsr_hf.pipeline import run_train
    from nsr_hf.scanner import load_scan

    config, _ = head_only_run
    out = tmp_path / "fractions"
    run_train(replace(config, split_fractions=[0.6, 0.1, 0.3], max_steps=1, evaluate=False, output_dir=str(out)))
    dataset, metadata = load_activation_dataset(out / "dataset")
    assert metadata["split_fractions"] == [0.6, 0.1, 0.3] and len(dataset["test"]) > len(dataset["validation"])
    docs = list(load_corpus(config.corpus).iter_documents(limit=config.dataset_documents))
    expected = {split: sum(split_of(d.doc_id, 0, [0.6, 0.1, 0.3]) == split for d in docs) for split in ("train", "validation", "test")}
    assert {split: len(dataset[split]) for split in expected} == expected
    assert load_scan(out / "scan").metadata["documents"] == min(config.scan_documents, expected["train"])  # train documents only


def test_run_train_with_lora_on_a_saved_dataset_saves_an_adapter_that_reloads(head_only_run, tmp_path):
    from dataclasses import replace

    from nsr_hf.modeling.predictor import load_predictor
    from nsr_hf.pipeline import run_train

    config, first = head_only_run
    lora = replace(config, dataset=str(Path(config.output_dir) / "dataset"), unfreeze="lora", lora_r=2, evaluate=False,
                   output_dir=str(tmp_path / "lora"))
    summary = run_train(lora)
    assert summary["neurons"] == first["neurons"] and summary["scan_rank"] is None
    assert (tmp_path / "lora" / "predictor" / "adapter_config.json").exists()
    model = load_predictor(str(tmp_path / "lora" / "predictor"))
    assert model.predict(["the quick brown fox"]).shape == (1, 1)


def test_run_train_builds_a_token_head_with_its_read_layer_expected_value_loss_and_lora_after_target(head_only_run, tmp_path):
    from dataclasses import replace

    from nsr_hf.pipeline import run_train

    config, first = head_only_run
    token = replace(config, dataset=str(Path(config.output_dir) / "dataset"), head_type="token", head_init="random", read_layer="target+1",
                    expected_value_loss_weight=0.5, unfreeze="lora_after_target", lora_r=2, evaluate=False, prompt_suffix=" Say {neuron}:",
                    output_dir=str(tmp_path / "token"))
    summary = run_train(token)
    saved = json.loads((tmp_path / "token" / "predictor" / "config.json").read_text())
    target = int(first["neurons"][0].split(".")[0])
    assert saved["expected_value_loss_weight"] == 0.5 and saved["read_layer"] == target + 1 and summary["read_layer"] == target + 1
    assert saved["prompt_suffix"] == " Say {neuron}:" and saved["prompt_suffix_ids"]
    adapter = json.loads((tmp_path / "token" / "predictor" / "adapter_config.json").read_text())
    assert f"layers\\.(?:{target + 1})\\." in adapter["target_modules"]  # exactly the one block after the target's, up to the read layer


# -- live labels ----------------------------------------------------------------------------------------------


def _live_values(model, ds):
    from nsr_hf.capture import capture_activations

    batch = PredictorDataCollator(pad_token_id=0)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        cap = capture_activations(model, {k: batch[k] for k in ("input_ids", "attention_mask")}, ["1.3"], position="last")
    return cap[1][:, 0].numpy().astype(np.float64)


def _reference_dataset(model, tok, n=64):
    """Rows whose `activations` are neuron 1.3's values in `model` (what `nsr dataset` would store)."""
    ds = activation_dataset(tok, n=n, extra_columns=False)
    values = _live_values(model, ds)
    return ds.remove_columns("activations").add_column("activations", [[float(v)] for v in values]), values


def _live_run(tiny, tmp_path, guard_weight, steps=100, weight_decay=0.3):
    model, tok = tiny
    ds, ref = _reference_dataset(model, tok)
    torch.manual_seed(0)
    predictor = ActivationPredictor.from_base(model, tok, neurons=["1.3"], read_layer=2,
                                              label_transform={"mean": [float(ref.mean())], "std": [float(ref.std())]})
    trainer = PredictorTrainer(model=predictor, args=args(tmp_path, max_steps=steps, learning_rate=1e-2, weight_decay=weight_decay,
                                                          logging_strategy="steps", logging_steps=20),
                               train_dataset=ds, unfreeze="full", label_mode="live", live_guard_weight=guard_weight)
    trainer.train()
    return trainer, ds, ref


@pytest.mark.parametrize("tiny", ["gpt2"], indirect=True)
def test_live_labels_follow_the_moving_neuron(tiny, tmp_path):
    trainer, ds, ref = _live_run(tiny, tmp_path, guard_weight=10.0, steps=40)
    live_now = _live_values(trainer.model.base, ds)
    assert np.abs(live_now - ref).max() > 0.05, "the neuron should have moved under full fine-tuning"
    out = trainer.predict(ds)  # evaluation compares the report with the live neuron
    np.testing.assert_allclose(out.label_ids.reshape(-1), live_now, atol=1e-5)
    logged = [h for h in trainer.state.log_history if "live_std_ratio" in h]
    assert logged and all({"live_std_ratio", "live_mean_shift", "live_guard", "loss"} <= h.keys() for h in logged)


@pytest.mark.parametrize("tiny", ["gpt2"], indirect=True)
def test_live_label_guard_prevents_the_neuron_from_collapsing(tiny, tmp_path):
    # Weight decay on every weight pushes the neuron towards zero, and with live labels nothing resists:
    # a flat neuron is trivially predictable. The guard keeps its spread and its mean.
    unguarded, ds, ref = _live_run(tiny, tmp_path / "off", guard_weight=0.0)
    guarded, _, _ = _live_run(tiny, tmp_path / "on", guard_weight=10.0)
    ratio_off = _live_values(unguarded.model.base, ds).std() / ref.std()
    ratio_on = _live_values(guarded.model.base, ds).std() / ref.std()
    assert ratio_off < 0.1, f"without the guard the neuron should collapse (std ratio {ratio_off:.3f})"
    assert 0.6 < ratio_on < 1.5, f"the guard should keep the neuron's spread (std ratio {ratio_on:.3f})"


def test_live_labels_equal_reference_labels_when_the_base_is_frozen(tiny, tmp_path):
    model, tok = tiny
    ds, ref = _reference_dataset(model, tok, n=24)
    predictor = ActivationPredictor.from_base(model, tok, neurons=["1.3"], read_layer=0,  # reads BEFORE the target layer
                                              label_transform={"mean": [float(ref.mean())], "std": [float(ref.std())]})
    trainer = PredictorTrainer(model=predictor, args=args(tmp_path, max_steps=2), train_dataset=ds, unfreeze="head_only", label_mode="live")
    trainer.train()
    out = trainer.predict(ds)
    np.testing.assert_allclose(out.label_ids.reshape(-1), ref, atol=1e-5)
    assert trainer.live_labels.last["live_guard"] == pytest.approx(0.0, abs=1e-8)


def test_token_head_live_labels_are_read_in_its_prompt_where_its_label_offset_puts_the_labelled_token(tiny):
    """Left padding moves every row right; the token head's prompt starts at the first real token, so the labelled
    token sits `label_offset` to the left there, and the live labels read in that one pass are the reference values."""
    model, tok = tiny
    ds, ref = _reference_dataset(model, tok, n=8)
    predictor = predictor_for(tiny, "token")
    batch = PredictorDataCollator(pad_token_id=0)([ds[i] for i in range(len(ds))])
    real = batch["attention_mask"].sum(-1)
    pad = batch["input_ids"].shape[1] - real
    left = {"input_ids": torch.stack([row.roll(int(p)) for row, p in zip(batch["input_ids"], pad)]),
            "attention_mask": torch.stack([row.roll(int(p)) for row, p in zip(batch["attention_mask"], pad)]),
            "label_positions": batch["label_positions"] + pad}
    assert torch.equal(predictor.head.label_offset(left["attention_mask"]), pad)
    with torch.no_grad():
        _, live = LiveLabels().forward(predictor, left)
    np.testing.assert_allclose(live[:, 0].numpy(), ref, atol=1e-4)


def test_neuron_drift_of_an_unchanged_base_is_zero_and_of_a_moved_neuron_its_change(tiny):
    from nsr_hf.capture import Intervention, intervene
    from nsr_hf.pipeline import neuron_drift

    model, tok = tiny
    ds, ref = _reference_dataset(model, tok, n=12)
    assert neuron_drift(model, ds, ["1.3"], "last", batch_size=5)["max_abs"] < 1e-5
    with intervene(model, Intervention(1, [3], "add", 0.5)):
        moved = neuron_drift(model, ds, ["1.3"], "last", batch_size=5)
    assert moved["max_abs"] == pytest.approx(0.5, abs=1e-5) and moved["mean_abs"] == pytest.approx(0.5, abs=1e-5)


def test_unknown_label_mode_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(ValueError, match="label_mode must be one of reference, live"):
        PredictorTrainer(model=predictor_for(tiny), args=args(tmp_path), train_dataset=activation_dataset(tiny[1]), label_mode="current")


# -- checkpoints, mixed precision, logging, several processes ------------------------------------------------------


def test_resume_from_the_latest_checkpoint_continues_the_step_count(head_only_run, tmp_path):
    from dataclasses import replace

    from nsr_hf.pipeline import run_train

    config, _ = head_only_run
    base = replace(config, dataset=str(Path(config.output_dir) / "dataset"), evaluate=False, max_steps=4, save_strategy="steps",
                   save_steps=2, logging_steps=1, output_dir=str(tmp_path / "run"), keep_checkpoints=True)
    first = run_train(base)
    assert first["global_step"] == 4 and (tmp_path / "run" / "checkpoints" / "checkpoint-4").is_dir()
    # the run finished: continuing it replaces it, which --overwrite allows
    resumed = run_train(replace(base, max_steps=7, resume_from_checkpoint="latest", overwrite=True))
    assert resumed["resumed_from"].endswith("checkpoint-4") and resumed["global_step"] == 7
    steps = [h["step"] for h in json.loads((tmp_path / "run" / "log_history.json").read_text()) if "loss" in h]
    assert steps[-3:] == [5, 6, 7]  # the resumed run logged steps 5..7, continuing from 4


def test_resume_without_a_checkpoint_is_a_clear_error(head_only_run, tmp_path):
    from dataclasses import replace

    from nsr_hf.pipeline import run_train

    config, _ = head_only_run
    with pytest.raises(ValueError, match="no checkpoint"):
        run_train(replace(config, resume_from_checkpoint="latest", evaluate=False, output_dir=str(tmp_path / "empty")))


def test_bf16_mixed_precision_runs_on_the_cpu(head_only_run, tmp_path):
    from dataclasses import replace

    from nsr_hf.pipeline import run_train

    config, _ = head_only_run
    summary = run_train(replace(config, dataset=str(Path(config.output_dir) / "dataset"), evaluate=False, bf16=True, max_steps=3,
                                unfreeze="last_k", unfreeze_k=1, output_dir=str(tmp_path / "bf16")))
    assert summary["config"]["bf16"] is True and summary["global_step"] == 3
    assert np.isfinite(summary["train"]["train_loss"]) and np.isfinite(summary["metrics"]["test"]["test_mse"])


def test_report_to_wandb_offline_writes_a_run_with_the_logged_metrics(head_only_run, tmp_path, monkeypatch):
    from dataclasses import replace

    from nsr_hf.pipeline import run_train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config, _ = head_only_run
    run_train(replace(config, dataset=str(Path(config.output_dir) / "dataset"), evaluate=False, report_to="wandb", max_steps=4,
                      logging_steps=1, drift_every_n_steps=2, output_dir=str(tmp_path / "out")))
    import wandb

    # run_train finished the run, but the wandb service process writes the offline record file asynchronously and
    # completes it when it shuts down (at exit, or here): read it only after that, or a loaded machine reads a bare header.
    wandb.teardown()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (log,) = runs[0].glob("run-*.wandb")  # the run's record log (protobuf; wandb >= 0.19 has no Python reader for it)
    records = log.read_bytes()
    assert records.count(b"train/loss") >= 4  # one history row per logged step
    assert b"train/drift/lm_loss" in records and b"train/drift/head_r_live" in records  # the drift monitor's figures
    assert b"final/test_r2" in records  # the run's summary, written before the run is closed


def one_and_two_processes(head_only_run, tmp_path, **keys) -> tuple[dict, dict]:
    """The metrics.json of run_train in one process of 16 rows and of `accelerate launch --multi_gpu --num_processes 2`
    of 8 rows each, on this CPU-only machine (gloo, PITFALLS 14), both for 6 steps on the head_only run's dataset."""
    import os
    import subprocess
    import sys
    from dataclasses import replace

    import yaml

    from nsr_hf.pipeline import run_train
    from nsr_hf.training.config import TrainConfig

    config, _ = head_only_run
    common = dict(dataset=str(Path(config.output_dir) / "dataset"), evaluate=False, max_steps=6, learning_rate=1e-2, logging_steps=1,
                  **keys)
    single = run_train(replace(config, per_device_train_batch_size=16, output_dir=str(tmp_path / "one"), **common))
    recipe = tmp_path / "tiny.yaml"
    defaults = TrainConfig().to_dict()  # the recipe of this config: the keys it sets away from their defaults
    values = {**{k: v for k, v in config.to_dict().items() if v != defaults[k]}, **common, "per_device_train_batch_size": 8,
              "output_dir": str(tmp_path / "two")}
    recipe.write_text(yaml.safe_dump(values))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch",
                           "--config_file", str(root / "recipes/accelerate/cpu_2proc.yaml"),
                           str(root / "nsr_hf/train.py"), str(recipe)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and single["world_size"] == 1  # two processes really ran
    assert two["global_step"] == single["global_step"] == 6
    return single, two


def test_two_processes_run_a_tiny_recipe_and_match_one_process(head_only_run, tmp_path):
    """Two processes of 8 rows each make the same optimizer steps as one process of 16 rows."""
    single, two = one_and_two_processes(head_only_run, tmp_path)
    # same rows per step, gradients averaged over the processes: the same model within float tolerance
    for key in ("test_mse", "test_r2", "test_pearson"):
        assert two["metrics"]["test"][key] == pytest.approx(single["metrics"]["test"][key], rel=1e-3, abs=1e-4), key


@pytest.mark.slow
def test_two_processes_of_intervention_training_match_one_process_of_twice_the_batch(head_only_run, tmp_path):
    """Each row's draw is a function of the row alone: the two processes set the same rows to the same values as the one
    process (the same fraction at every step) and train the same head."""
    single, two = one_and_two_processes(head_only_run, tmp_path, intervention_rate=0.5)
    assert two["intervention"] == single["intervention"]
    fractions = [[h["intervened_fraction"] for h in json.loads((tmp_path / run / "log_history.json").read_text()) if "loss" in h]
                 for run in ("one", "two")]
    assert len(fractions[0]) == 6 and fractions[0] == pytest.approx(fractions[1], abs=1e-6) and 0 < np.mean(fractions[0]) < 1
    for key in ("test_mse", "test_r2", "test_pearson"):
        assert two["metrics"]["test"][key] == pytest.approx(single["metrics"]["test"][key], rel=1e-3, abs=1e-4), key


def test_run_train_with_intervention_training_records_it_in_the_predictor_metrics_and_card(head_only_run, tmp_path):
    from dataclasses import replace

    from nsr_hf.modeling.predictor import load_predictor
    from nsr_hf.pipeline import run_train

    config, plain = head_only_run
    summary = run_train(replace(config, dataset=str(Path(config.output_dir) / "dataset"), evaluate=False, max_steps=4, logging_steps=1,
                                intervention_rate=0.5, intervention_source="uniform", output_dir=str(tmp_path / "out")))
    recorded = summary["intervention"]
    assert {k: recorded[k] for k in ("rate", "source", "shift_scale")} == {"rate": 0.5, "source": "uniform", "shift_scale": 1.0}
    assert recorded["values"]["neurons"] == summary["neurons"] and recorded["values"]["train_rows"] == summary["rows"]["train"]
    predictor = load_predictor(str(tmp_path / "out" / "predictor"))
    assert predictor.config.intervention == recorded  # the faithfulness evaluation draws from the same source
    assert "intervention training (rate 0.5, source uniform)" in (tmp_path / "out" / "predictor" / "README.md").read_text()
    logged = [h for h in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "loss" in h]
    assert logged and all(0 <= h["intervened_fraction"] <= 1 for h in logged)
    # off (the default): nothing of it in metrics.json, the predictor's config or its card
    assert "intervention" not in plain and load_predictor(str(Path(config.output_dir) / "predictor")).config.intervention is None
    assert "intervention training" not in (Path(config.output_dir) / "predictor" / "README.md").read_text()


def test_head_init_from_the_ridge_probe_predicts_what_the_probe_predicts(tiny):
    from nsr_hf.modeling.probes import RidgeProbe, layer_features

    model, tok = tiny
    ds, ref = _reference_dataset(model, tok, n=48)
    predictor = ActivationPredictor.from_base(model, tok, neurons=["1.3"], read_layer=2,
                                              label_transform={"mean": [float(ref.mean())], "std": [float(ref.std())]})
    info = predictor.init_head_from_probe(ds.select(range(40)), ds.select(range(40, 48)))
    X = layer_features(model, ds, [2], progress=False)[2]
    probe = RidgeProbe().fit(X[:40], ref[:40], X[40:], ref[40:])
    batch = PredictorDataCollator(tok)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        pred = predictor(**{k: batch[k] for k in ("input_ids", "attention_mask", "label_positions")}).predictions[:, 0].numpy()
    np.testing.assert_allclose(pred, probe.predict(X), rtol=1e-3, atol=1e-4)
    assert info["1.3"]["alpha"] == pytest.approx(probe.alpha)
    with pytest.raises(ValueError, match="regression head"):
        predictor_for(tiny, "classification").init_head_from_probe(ds)
    # the same head from features computed once elsewhere (the pipeline shares them with the evaluation's probes)
    given = ActivationPredictor.from_base(model, tok, neurons=["1.3"], read_layer=2,
                                          label_transform={"mean": [float(ref.mean())], "std": [float(ref.std())]})
    again = given.init_head_from_probe(ds.select(range(40)), ds.select(range(40, 48)), features=(X[:40], X[40:]))
    assert again.keys() == info.keys() and again["1.3"]["alpha"] == info["1.3"]["alpha"]
    # the features come from another pass (other batches): equal to float round-off, not bit for bit on every CPU
    assert again["1.3"]["validation_r2"] == pytest.approx(info["1.3"]["validation_r2"], rel=1e-5)
    torch.testing.assert_close(given.neuron_head.weight, predictor.neuron_head.weight, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="in its row order"):
        given.init_head_from_probe(ds.select(range(40)), ds.select(range(40, 48)), features=(X[:39], X[40:]))


def test_push_to_hub_uploads_the_saved_predictor_folder_with_its_card(head_only_run, tmp_path, monkeypatch):
    from dataclasses import replace

    import huggingface_hub

    from nsr_hf.pipeline import run_train

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok=False, **kw):
            calls.append(("create_repo", repo_id))

        def upload_folder(self, folder_path, repo_id, **kw):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    config, _ = head_only_run
    run_train(replace(config, dataset=str(Path(config.output_dir) / "dataset"), evaluate=False, max_steps=2,
                      push_to_hub="me/neuron-reporter", output_dir=str(tmp_path / "push")))
    assert calls[0] == ("create_repo", "me/neuron-reporter")
    assert calls[1][:2] == ("upload_folder", "me/neuron-reporter") and {"README.md", "config.json", "model.safetensors"} <= set(calls[1][2])


def test_a_dataset_without_bin_centres_gets_the_train_means_before_a_token_head_trains(head_only_run, tmp_path, monkeypatch):
    """Datasets made before bin centres were fitted (their transform has edges only): run_train fits the centres on
    the train split, so the token head reports bin means, never midpoints."""
    from dataclasses import replace

    import nsr_hf.pipeline as train_module
    from nsr_hf.data.labels import LabelTransform
    from nsr_hf.data.storage import load_activation_dataset

    config, _ = head_only_run
    dataset_dir = Path(config.output_dir) / "dataset"
    dataset, metadata = load_activation_dataset(dataset_dir)
    assert metadata["transform"]["bin_centers"]  # new datasets carry them

    def without_centres(*args, **kwargs):
        ds, meta, rank = choose(*args, **kwargs)
        meta = {**meta, "transform": {k: v for k, v in meta["transform"].items() if k != "bin_centers"}}
        return ds, meta, rank

    choose = train_module.choose_neuron_and_build_dataset
    monkeypatch.setattr(train_module, "choose_neuron_and_build_dataset", without_centres)
    token = replace(config, dataset=str(dataset_dir), head_type="token", head_init="random", max_steps=1, evaluate=False,
                    unfreeze="head_only", output_dir=str(tmp_path / "old"))
    train_module.run_train(token)
    saved = json.loads((tmp_path / "old" / "predictor" / "config.json").read_text())
    values = np.asarray(dataset["train"]["activations"], dtype=np.float64).reshape(len(dataset["train"]), -1)
    expected = LabelTransform.from_dict(metadata["transform"]).with_bin_centers(values).centers()
    np.testing.assert_allclose(saved["label_transform"]["bin_centers"], expected, rtol=1e-6)
    np.testing.assert_allclose(saved["label_transform"]["bin_centers"], metadata["transform"]["bin_centers"], rtol=1e-6)


def test_bin_strategy_rebins_a_dataset_on_its_train_split_and_leaves_the_dataset_alone(head_only_run, tmp_path, capsys):
    """bin_strategy on a dataset binned otherwise: the head trains on bins refitted on the train split (the predictor
    carries them); the dataset on disk keeps its own. Another num_bins with it gets report tokens of its own."""
    from dataclasses import replace

    from nsr_hf.data.labels import LabelTransform
    from nsr_hf.data.storage import load_activation_dataset
    from nsr_hf.pipeline import run_train

    config, _ = head_only_run
    dataset_dir = Path(config.output_dir) / "dataset"
    dataset, metadata = load_activation_dataset(dataset_dir)
    assert metadata["transform"]["bin_strategy"] == "quantile"
    on_disk = sorted((p.name, p.read_bytes()) for p in dataset_dir.rglob("*") if p.is_file())
    values = np.asarray(dataset["train"]["activations"], dtype=np.float64).reshape(len(dataset["train"]), -1)
    base = replace(config, dataset=str(dataset_dir), head_type="token", head_init="random", max_steps=1, evaluate=False,
                   unfreeze="head_only")

    run_train(replace(base, bin_strategy="kmeans", output_dir=str(tmp_path / "kmeans")))
    assert "this run refits 10 kmeans bins on its train split" in capsys.readouterr().out
    saved = json.loads((tmp_path / "kmeans" / "predictor" / "config.json").read_text())["label_transform"]
    expected = LabelTransform.fit(values, metadata["neurons"], 10, "kmeans")
    assert saved["bin_strategy"] == "kmeans"
    np.testing.assert_allclose(saved["bin_edges"], expected.bin_edges, rtol=1e-6)
    np.testing.assert_allclose(saved["bin_centers"], expected.bin_centers, rtol=1e-6)
    assert saved["report_tokens"] == metadata["transform"]["report_tokens"] and saved["mean"] == metadata["transform"]["mean"]
    assert "Head: token over 10 kmeans bins (fitted on train; each reports its train mean)" in (
        tmp_path / "kmeans" / "predictor" / "README.md").read_text()

    run_train(replace(base, bin_strategy="quantile", num_bins=4, output_dir=str(tmp_path / "four")))
    saved = json.loads((tmp_path / "four" / "predictor" / "config.json").read_text())
    assert len(saved["label_transform"]["bin_edges"][0]) == 5 and len(saved["report_tokens"]) == 4
    np.testing.assert_allclose(saved["label_transform"]["bin_edges"], LabelTransform.fit(values, metadata["neurons"], 4).bin_edges,
                               rtol=1e-6)

    run_train(replace(base, num_bins=4, output_dir=str(tmp_path / "unset")))  # no bin_strategy: the dataset's bins, said so
    assert "the dataset has 10 quantile bins per neuron and they are used" in capsys.readouterr().out
    saved = json.loads((tmp_path / "unset" / "predictor" / "config.json").read_text())["label_transform"]
    assert saved["bin_edges"] == metadata["transform"]["bin_edges"]
    assert sorted((p.name, p.read_bytes()) for p in dataset_dir.rglob("*") if p.is_file()) == on_disk


def test_train_label_transform_refits_only_when_asked_and_refuses_a_balanced_dataset(head_only_run, capsys):
    from dataclasses import replace

    from nsr_hf.data.labels import LabelTransform
    from nsr_hf.data.storage import load_activation_dataset
    from nsr_hf.pipeline import train_label_transform

    config, _ = head_only_run
    dataset, metadata = load_activation_dataset(Path(config.output_dir) / "dataset")
    transform, neurons = metadata["transform"], metadata["neurons"]
    values = np.asarray(dataset["train"]["activations"], dtype=np.float64).reshape(len(dataset["train"]), -1)
    classification = replace(config, head_type="classification", head_init="random")
    # the dataset's own strategy and number of bins: nothing to refit, nothing said
    assert train_label_transform(replace(classification, bin_strategy="quantile"), transform, dataset["train"], neurons) == transform
    assert train_label_transform(classification, transform, dataset["train"], neurons) == transform
    assert capsys.readouterr().out == ""
    # the classification head refits like the token head
    refit = train_label_transform(replace(classification, bin_strategy="equal_width", num_bins=5), transform, dataset["train"], neurons)
    np.testing.assert_allclose(refit["bin_edges"], LabelTransform.fit(values, neurons, 5, "equal_width").bin_edges)
    assert refit["bin_strategy"] == "equal_width" and "report_tokens" not in refit and refit["std"] == transform["std"]
    # a dataset balanced on its own bins has a reshaped train split: refitting on it is refused, with the way out
    with pytest.raises(ValueError, match="balanced on its own 10 quantile bins.*--bin_strategy kmeans.*leave bin_strategy unset"):
        train_label_transform(replace(classification, bin_strategy="kmeans"), transform, dataset["train"], neurons,
                              balance={"counts_before": [5, 1], "counts_after": [1, 1]})
    # the regression head keeps the transform as it is
    assert train_label_transform(config, transform, dataset["train"], neurons) is transform


def test_the_training_clock_carries_the_seconds_of_earlier_attempts_through_a_checkpoint():
    from transformers import TrainerControl, TrainerState

    from nsr_hf.training.trainer import TrainingClock

    fresh = TrainerState(stateful_callbacks=[TrainingClock()])
    clock = TrainingClock()
    clock.on_train_begin(None, fresh, TrainerControl())
    assert clock.saved_seconds == 0.0 and 0.0 <= clock.seconds < 60
    saved = {"args": {}, "attributes": {"saved_seconds": 123.5}}
    resumed = TrainerState(global_step=8, stateful_callbacks={"TrainingClock": saved})
    clock = TrainingClock()
    clock.on_train_begin(None, resumed, TrainerControl())
    assert clock.saved_seconds == 123.5 and clock.seconds >= 123.5
    assert clock.state()["attributes"]["saved_seconds"] >= 123.5  # what the next checkpoint keeps
    # a checkpoint written before the clock existed: no entry, and the Trainer's save must find one to update
    old = TrainerState(global_step=8, stateful_callbacks={"TrainerControl": {"args": {}, "attributes": {}}})
    clock = TrainingClock()
    clock.on_train_begin(None, old, TrainerControl())
    assert clock.saved_seconds == 0.0 and "TrainingClock" in old.stateful_callbacks
