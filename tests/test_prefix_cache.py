"""The frozen-prefix cache (nsr_hf.training.prefix_cache): training with it gives the losses and the weights of training
without it, to float round-off, for every strategy where it applies, every head and with intervention training or live
labels; it is refused, with the reason, where it does not apply; its size is reported and capped."""
from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from nsr_hf.capture import capture_activations
from nsr_hf.data.counterfactuals import CounterfactualValues
from nsr_hf.errors import UserError
from nsr_hf.modeling.predictor import ActivationPredictor
from nsr_hf.training.collator import PredictorDataCollator
from nsr_hf.training.config import TrainConfig
from nsr_hf.training.interventions import InterventionSampler
from nsr_hf.training.prefix_cache import PrefixCache, row_keys
from nsr_hf.training.trainer import PredictorTrainer
from nsr_hf.utils import unwrap

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread

STRATEGIES = {"head_only": {}, "last_k": {"k": 1}, "after_target": {}, "lora_after_target": {}}


def reference_dataset(model, tok, n: int = 24, seed: int = 0) -> tuple[Dataset, np.ndarray]:
    """Rows of different lengths (so batches are padded), labelled with neuron 1.3 of ``model`` at the last token."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, len(tok), (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    batch = PredictorDataCollator(pad_token_id=0)([{"input_ids": i, "label_position": len(i) - 1, "activations": [0.0]} for i in ids])
    values = capture_activations(model, {k: batch[k] for k in ("input_ids", "attention_mask")}, ["1.3"], position="last")[1].numpy()
    rows = {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids], "label_position": [len(i) - 1 for i in ids],
            "activations": values.astype(np.float64).tolist()}
    return Dataset.from_dict(rows), values.astype(np.float64)


def predictor_on(model, tok, values, head="regression", **kw):
    transform = {"mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
                 "bin_edges": [np.quantile(values[:, 0], np.linspace(0, 1, 11)).tolist()]}
    return ActivationPredictor.from_base(model, tok, neurons=["1.3"], head_type=head, label_transform=transform, **kw)


def args(tmp_path, **kw):
    base = dict(max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=1e-2, report_to="none",
                save_strategy="no", logging_strategy="steps", logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0)
    return TrainingArguments(str(tmp_path), **{**base, **kw})


def train(predictor, ds, tmp_path, strategy, prefix_cache, k=None, **kw) -> PredictorTrainer:
    torch.manual_seed(0)  # LoRA adapters are initialised when the trainer wraps the model
    unfreeze = {"strategy": strategy, **STRATEGIES.get(strategy, {}), **({"k": k} if k else {})}
    # plain SGD: Adam divides each gradient by its own size, so a gradient that is 0 in exact arithmetic (a key bias: softmax
    # does not see a shift of every key) takes a full step in the direction of its float noise, which differs between two
    # orders of the same sums; SGD keeps round-off at round-off
    trainer = PredictorTrainer(model=copy.deepcopy(predictor), args=args(tmp_path, optim="sgd", learning_rate=0.1), train_dataset=ds,
                               unfreeze=unfreeze, prefix_cache=prefix_cache, **kw)
    trainer.initial = {n: q.detach().clone() for n, q in trainer.model.named_parameters() if q.requires_grad}
    trainer.train()
    return trainer


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def trained(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def assert_same_training(with_cache, without_cache):
    assert with_cache.prefix_cache_info["used"] and not without_cache.prefix_cache_info["used"]
    # rtol 1e-4: the cached and the full forward differ by float round-off, which the steps compound (an AMD EPYC without
    # AVX-512 gave 6e-5 relative at the last step of live labels with last_k 2, where the trained block moves the labels too)
    np.testing.assert_allclose(losses(with_cache), losses(without_cache), rtol=1e-4, atol=1e-6)
    a, b = trained(with_cache), trained(without_cache)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # the steps moved the weights far beyond that tolerance: the equality is not that of weights that stayed put
    assert max(float((a[n] - with_cache.initial[n]).abs().max()) for n in a) > 1e-3


# -- the same training ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["regression", "token"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_training_with_the_cache_gives_the_losses_and_weights_of_training_without_it(tiny, tmp_path, strategy, head):
    model, tok = tiny
    ds, values = reference_dataset(model, tok)
    predictor = predictor_on(model, tok, values, head=head)
    cached = train(predictor, ds, tmp_path / "on", strategy, "on")
    assert_same_training(cached, train(predictor, ds, tmp_path / "off", strategy, "off"))
    # below the first trainable block (after_target, last_k 1, lora_after_target: block 2; head_only: the final norm's input)
    assert cached.prefix_cache_info["layer"] == (3 if strategy == "head_only" else 2)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_with_intervention_training_the_cache_sits_at_the_target_block_and_changes_nothing(tiny, tmp_path, strategy):
    model, tok = tiny
    ds, values = reference_dataset(model, tok)
    predictor = predictor_on(model, tok, values)

    def sampler():
        return InterventionSampler(CounterfactualValues.fit(values, ["1.3"], source="interchange"), 0.5, seed=0)

    cached = train(predictor, ds, tmp_path / "on", strategy, "on", interventions=sampler())
    assert cached.prefix_cache_info["layer"] == 1  # the input of block 1, where neuron 1.3 is set
    assert_same_training(cached, train(predictor, ds, tmp_path / "off", strategy, "off", interventions=sampler()))


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
@pytest.mark.parametrize("strategy,k", [("after_target", None), ("last_k", 2)])  # last_k 2 trains the target's block: the neuron moves
def test_with_live_labels_the_cache_sits_at_the_target_block_where_the_label_is_read(tiny, tmp_path, strategy, k):
    # live labels read the neuron from the current weights in the head's own pass: with the cache at the input of the
    # target's block, that block (trained or not) runs at every step, and everything below it is frozen
    model, tok = tiny
    ds, values = reference_dataset(model, tok)
    predictor = predictor_on(model, tok, values)
    cached = train(predictor, ds, tmp_path / "on", strategy, "on", k=k, label_mode="live")
    assert cached.prefix_cache_info["layer"] == 1
    assert_same_training(cached, train(predictor, ds, tmp_path / "off", strategy, "off", k=k, label_mode="live"))


def test_the_token_head_reporting_as_the_next_token_trains_the_same_with_the_cache(tiny, tmp_path):
    model, tok = tiny
    ds, values = reference_dataset(model, tok)
    predictor = predictor_on(model, tok, values, head="token", prompt_suffix="")  # the prompt is the row itself
    cached = train(predictor, ds, tmp_path / "on", "after_target", "on")
    assert_same_training(cached, train(predictor, ds, tmp_path / "off", "after_target", "off"))


@pytest.mark.parametrize("tiny", ["gpt2"], indirect=True)
def test_the_classification_head_and_a_lower_read_layer_train_the_same_with_the_cache(tiny, tmp_path):
    model, tok = tiny
    ds, values = reference_dataset(model, tok)
    predictor = predictor_on(model, tok, values, head="classification", read_layer=1)
    cached = train(predictor, ds, tmp_path / "on", "head_only", "auto")
    assert cached.prefix_cache_info["layer"] == 2  # after block 1, the block the head reads
    assert_same_training(cached, train(predictor, ds, tmp_path / "off", "head_only", "off"))


def test_evaluation_runs_the_whole_model_after_cached_training(tiny, tmp_path):
    model, tok = tiny
    ds, values = reference_dataset(model, tok)
    trainer = PredictorTrainer(model=predictor_on(model, tok, values), args=args(tmp_path), train_dataset=ds, eval_dataset=ds,
                               unfreeze="after_target")
    trainer.train()
    assert trainer.prefix_cache is None  # released once training ended
    inner = unwrap(trainer.model).eval()
    batch = PredictorDataCollator(pad_token_id=0)([ds[i] for i in range(8)])
    with torch.no_grad():
        direct = inner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], label_positions=batch["label_positions"])
    assert trainer.evaluate()["eval_loss"] > 0
    np.testing.assert_allclose(trainer.predict(ds.select(range(8))).predictions[:, 0], direct.predictions.numpy(), rtol=1e-5, atol=1e-6)


# -- where it does not apply ------------------------------------------------------------------------------------


REFUSALS = {"full": "unfreeze 'full'|embed|wte|block 0", "lora": "block 0 trains \\(LoRA adapters\\)",
            "gradual": "'gradual' adds blocks to the optimizer during the run"}


@pytest.mark.parametrize("tiny", ["gpt2"], indirect=True)
@pytest.mark.parametrize("strategy", list(REFUSALS))
def test_an_explicit_request_where_the_cache_does_not_apply_is_a_user_error_that_says_why(tiny, tmp_path, strategy):
    model, tok = tiny
    ds, values = reference_dataset(model, tok, n=8)
    trainer = PredictorTrainer(model=predictor_on(model, tok, values), args=args(tmp_path, max_steps=1), train_dataset=ds,
                               unfreeze=strategy, prefix_cache="on")
    with pytest.raises(UserError, match=REFUSALS[strategy]) as err:
        trainer.train()
    assert "prefix_cache auto or off" in str(err.value)


@pytest.mark.parametrize("tiny", ["gpt2"], indirect=True)
@pytest.mark.parametrize("strategy", list(REFUSALS))
def test_auto_trains_without_the_cache_where_it_does_not_apply_and_logs_why_once(tiny, tmp_path, strategy, caplog):
    model, tok = tiny
    ds, values = reference_dataset(model, tok, n=8)
    trainer = PredictorTrainer(model=predictor_on(model, tok, values), args=args(tmp_path, max_steps=1), train_dataset=ds,
                               unfreeze=strategy)
    with caplog.at_level(logging.INFO, logger="nsr_hf.training.trainer"):
        trainer.train()
    assert not trainer.prefix_cache_info["used"] and trainer.state.global_step == 1
    lines = [r.getMessage() for r in caplog.records if "prefix cache not used" in r.getMessage()]
    assert len(lines) == 1 and trainer.prefix_cache_info["reason"] in lines[0]


@pytest.mark.parametrize("tiny", ["gpt2"], indirect=True)
def test_dropout_before_the_cache_point_keeps_training_uncached(tiny, tmp_path):
    model, tok = tiny
    ds, values = reference_dataset(model, tok, n=8)
    predictor = predictor_on(model, tok, values)
    predictor.base.transformer.h[0].attn.resid_dropout.p = 0.1  # a frozen block in train mode: a different output every time
    trainer = PredictorTrainer(model=predictor, args=args(tmp_path, max_steps=1), train_dataset=ds, unfreeze="after_target")
    trainer.train()
    assert not trainer.prefix_cache_info["used"] and "dropout transformer.h.0.attn.resid_dropout" in trainer.prefix_cache_info["reason"]
    with pytest.raises(UserError, match="dropout"):
        PredictorTrainer(model=predictor, args=args(tmp_path, max_steps=1), train_dataset=ds, unfreeze="after_target",
                         prefix_cache="on").train()


@pytest.mark.parametrize("tiny", ["gpt2"], indirect=True)
def test_lora_on_the_last_block_only_caches_below_it_and_a_lora_on_block_0_is_refused(tiny, tmp_path):
    model, tok = tiny
    ds, values = reference_dataset(model, tok, n=8)
    trainer = PredictorTrainer(model=predictor_on(model, tok, values), args=args(tmp_path, max_steps=1), train_dataset=ds,
                               unfreeze={"strategy": "lora", "k": 1}, prefix_cache="on")
    trainer.train()
    assert trainer.prefix_cache_info["layer"] == 2
    trainer = PredictorTrainer(model=predictor_on(model, tok, values), args=args(tmp_path, max_steps=1), train_dataset=ds,
                               unfreeze={"strategy": "lora", "k": 3}, prefix_cache="on")
    with pytest.raises(UserError, match="LoRA adapters"):
        trainer.train()


def test_a_train_run_records_the_cache_in_metrics_json(tiny_model_dirs, tmp_path):
    from conftest import write_word_corpus

    from nsr_hf.pipeline import run_train

    config = TrainConfig(model=tiny_model_dirs["llama"], corpus=str(write_word_corpus(tmp_path / "docs.jsonl")), scan_documents=30,
                         dataset_documents=60, max_length=32, neuron="1.3", num_train_epochs=1, per_device_train_batch_size=8,
                         unfreeze="after_target", evaluate=False, output_dir=str(tmp_path / "out"))
    summary = run_train(config)
    cache = json.loads((tmp_path / "out" / "metrics.json").read_text())["prefix_cache"]
    assert cache == summary["prefix_cache"] and cache["used"] and cache["layer"] == 2
    assert cache["rows"] == summary["rows"]["train"] and cache["bytes"] > 0


def test_a_recipe_that_asks_for_the_cache_where_it_cannot_apply_is_refused_before_the_model_loads():
    with pytest.raises(UserError, match="unfreeze 'full'"):
        TrainConfig(unfreeze="full", prefix_cache="on")
    with pytest.raises(ValueError, match="prefix_cache must be one of auto, on, off"):
        TrainConfig(prefix_cache="yes")
    with pytest.raises(ValueError, match="prefix_cache_max_gb must be a number of GB >= 0, got -1"):
        TrainConfig(prefix_cache_max_gb=-1)
    assert TrainConfig().prefix_cache == "auto"  # on where it applies, unless a recipe says off


# -- its size ---------------------------------------------------------------------------------------------------


def test_the_cache_reports_its_size_and_a_cap_below_it_falls_back_to_recomputation(tiny, tmp_path):
    model, tok = tiny
    ds, values = reference_dataset(model, tok)
    predictor = predictor_on(model, tok, values)
    cached = train(predictor, ds, tmp_path / "on", "after_target", "auto")
    positions = sum(len(i) for i in ds["input_ids"])
    assert cached.prefix_cache_info == {"used": True, "layer": 2, "rows": len(ds), "bytes": positions * model.config.hidden_size * 4}
    capped = train(predictor, ds, tmp_path / "capped", "after_target", "on", prefix_cache_max_gb=1e-9)
    assert not capped.prefix_cache_info["used"] and "over prefix_cache_max_gb" in capped.prefix_cache_info["reason"]
    np.testing.assert_allclose(losses(capped), losses(cached), rtol=1e-5, atol=1e-6)


def test_a_row_is_found_by_its_tokens_and_labelled_token_whatever_batch_it_is_in(tiny):
    model, tok = tiny
    ds, values = reference_dataset(model, tok, n=8)
    predictor = predictor_on(model, tok, values)
    collate = PredictorDataCollator(pad_token_id=0)
    in_a_batch = PrefixCache(2).build(predictor, [collate([ds[i] for i in range(8)])])
    alone = collate([ds[5]])
    by_itself = PrefixCache(2).build(predictor, [alone])
    hidden = torch.zeros(1, alone["input_ids"].shape[1], model.config.hidden_size)
    assert in_a_batch.rows == 8 and row_keys(alone)[0] in in_a_batch.spans
    torch.testing.assert_close(in_a_batch.batch_states(row_keys(alone), hidden), by_itself.batch_states(row_keys(alone), hidden))
    with pytest.raises(RuntimeError, match="not in the prefix cache"):
        in_a_batch.batch_states([b"another row"], hidden)
