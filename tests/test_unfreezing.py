"""Unfreezing strategies: after a few Trainer steps every parameter meant to train has changed and every frozen
one is bit-identical (PITFALL 5); after_target leaves the target neuron bit-identical (PITFALL 4); LoRA wraps the
right modules; gradual unfreezing extends the running optimizer (PITFALLS HF-8)."""
from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from nsr_hf.capture import capture_activations
from nsr_hf.modeling.predictor import ActivationPredictor
from nsr_hf.training.trainer import PredictorTrainer
from nsr_hf.training.unfreezing import GradualUnfreezing, apply_unfreezing

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def function(argument): return argument + 1", "0 1 2 3 on off"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def activation_dataset(tok, n=32, seed=0) -> Dataset:
    """Rows shaped like an `nsr dataset` split, with a learnable target (last token id % 10 / 10)."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "label_position": [], "activations": []}
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        ids = torch.randint(1, len(tok), (length,), generator=g).tolist()
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["label_position"].append(length - 1)
        rows["activations"].append([(ids[-1] % 10) / 10])
    return Dataset.from_dict(rows)


def predictor_for(tiny, head="regression"):
    model, tok = tiny
    transform = {"mean": [0.45], "std": [0.29], "bin_edges": [[i / 10 for i in range(11)]]}
    return ActivationPredictor.from_base(model, tok, neurons=["1.3"], head_type=head, label_transform=transform)


def args(tmp_path, steps=4, **kw):
    return TrainingArguments(str(tmp_path), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-2, report_to="none",
                             save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, **kw)


def train_and_compare(trainer):
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return {n: not torch.equal(before[n], p.detach()) for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("strategy,k", [("head_only", None), ("last_k", 1), ("after_target", None), ("full", None)])
def test_every_trained_parameter_changes_and_every_frozen_one_is_bit_identical(tiny, tmp_path, strategy, k):
    predictor = predictor_for(tiny)
    trainable = set(apply_unfreezing(predictor, strategy, k=k))
    trainer = PredictorTrainer(model=predictor, args=args(tmp_path), train_dataset=activation_dataset(tiny[1]))
    changed = train_and_compare(trainer)
    assert trainable == {n for n, p in predictor.named_parameters() if p.requires_grad}
    assert {n for n, c in changed.items() if c} == trainable


def test_head_only_trains_the_head_alone(tiny):
    assert apply_unfreezing(predictor_for(tiny), "head_only") == ["neuron_head.weight", "neuron_head.bias"]


def test_last_k_trains_the_last_k_blocks_the_final_norm_and_the_head(tiny):
    predictor = predictor_for(tiny)
    names = apply_unfreezing(predictor, "last_k", k=2)
    blocks = {n.split(".")[3] for n in names if ".h." in n or ".layers." in n}
    assert blocks == {"1", "2"} and "neuron_head.weight" in names
    with pytest.raises(ValueError, match="k must be"):
        apply_unfreezing(predictor, "last_k", k=4)
    with pytest.raises(ValueError, match="needs k"):
        apply_unfreezing(predictor, "last_k")


def test_after_target_leaves_the_target_neuron_bit_identical(tiny, tmp_path):
    predictor = predictor_for(tiny)
    names = apply_unfreezing(predictor, "after_target")
    assert all(".0." not in n and ".1." not in n for n in names)  # target layer 1: blocks 0 and 1 frozen
    tok = tiny[1]
    before = capture_activations(predictor.base, TEXTS, ["1.3"], tokenizer=tok)[1].clone()
    trainer = PredictorTrainer(model=predictor, args=args(tmp_path), train_dataset=activation_dataset(tok))
    changed = train_and_compare(trainer)
    assert any(changed[n] for n in names if ".2." in n)  # the block after the target did train
    after = capture_activations(predictor.base, TEXTS, ["1.3"], tokenizer=tok)[1]
    assert torch.equal(before, after)


def test_token_head_never_unfreezes_tied_embeddings_outside_full(tiny):
    predictor = predictor_for(tiny, head="token")
    emb = predictor.base.get_input_embeddings().weight
    for strategy, k in [("head_only", None), ("last_k", 1), ("after_target", None)]:
        apply_unfreezing(predictor, strategy, k=k)
        assert not emb.requires_grad, strategy
        assert any(p.requires_grad for p in predictor.parameters())


def test_lora_trains_adapters_and_head_and_leaves_base_weights_bit_identical(tiny, tmp_path):
    predictor = predictor_for(tiny)
    config = apply_unfreezing(predictor, "lora", lora_r=2)
    assert config.modules_to_save == ["neuron_head"]
    assert config.fan_in_fan_out == (predictor.base.config.model_type == "gpt2")
    trainer = PredictorTrainer(model=predictor, args=args(tmp_path), train_dataset=activation_dataset(tiny[1]), peft_config=config)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "neuron_head.modules_to_save" in n for n in trainable), trainable
    assert not any("lm_head" in n for n in trainable)
    changed = train_and_compare(trainer)
    assert {n for n, c in changed.items() if c} == trainable


def test_lora_without_the_head_in_modules_to_save_is_refused(tiny, tmp_path):
    predictor = predictor_for(tiny)
    config = apply_unfreezing(predictor, "lora")
    config.modules_to_save = None
    with pytest.raises(ValueError, match="modules_to_save"):
        PredictorTrainer(model=predictor, args=args(tmp_path), train_dataset=activation_dataset(tiny[1]), peft_config=config)


def test_gradual_unfreezing_adds_each_new_block_to_the_running_optimizer(tiny, tmp_path):
    predictor = predictor_for(tiny)
    callback = apply_unfreezing(predictor, "gradual", every_n_steps=2)
    assert isinstance(callback, GradualUnfreezing)
    trainer = PredictorTrainer(model=predictor, args=args(tmp_path, steps=5), train_dataset=activation_dataset(tiny[1]),
                               callbacks=[callback])
    changed = train_and_compare(trainer)
    assert [block for _, block in callback.history] == [2, 1]  # joined at steps 2 and 4, from the top
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    named = dict(predictor.named_parameters())
    assert all(id(named[n]) in in_optimizer for n in callback.trainable)
    assert {n for n, c in changed.items() if c} == set(callback.trainable)
    assert any(".1." in n for n in callback.trainable) and not any(".0." in n for n in callback.trainable)
    assert not any(changed[n] for n in named if ".0." in n)


def test_unknown_strategy_is_refused_with_the_valid_ones(tiny):
    with pytest.raises(ValueError, match="head_only"):
        apply_unfreezing(predictor_for(tiny), "everything")


def test_a_lora_predictor_saves_its_trained_head_and_adapters_and_reloads_identically(tiny, tmp_path):
    from nsr_hf.modeling.predictor import load_predictor, save_predictor
    from nsr_hf.training.trainer import apply_peft

    predictor = predictor_for(tiny)
    wrapped = apply_peft(predictor, apply_unfreezing(predictor, "lora", lora_r=2))
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # stands in for training
    save_predictor(wrapped, str(tmp_path))
    loaded = load_predictor(str(tmp_path))
    torch.testing.assert_close(loaded.get_base_model().predict(TEXTS), predictor.predict(TEXTS))


def test_a_token_head_with_a_read_layer_trains_no_block_after_it(tiny):
    model, tok = tiny
    transform = {"mean": [0.45], "std": [0.29], "bin_edges": [[i / 10 for i in range(11)]]}
    predictor = ActivationPredictor.from_base(model, tok, neurons=["0.3"], head_type="token", label_transform=transform, read_layer=1)
    names = apply_unfreezing(predictor, "after_target")
    assert any(".1." in n for n in names) and not any(".2." in n or ".0." in n for n in names if ".layers." in n or ".h." in n)
    names = apply_unfreezing(predictor, "full")
    assert not any(".2." in n for n in names if ".layers." in n or ".h." in n)


def test_lora_after_target_adapts_only_the_blocks_after_the_target_and_keeps_the_neuron(tiny, tmp_path):
    model, tok = tiny
    transform = {"mean": [0.45], "std": [0.29], "bin_edges": [[i / 10 for i in range(11)]]}
    predictor = ActivationPredictor.from_base(model, tok, neurons=["0.3"], head_type="token", label_transform=transform)
    config = apply_unfreezing(predictor, "lora_after_target", lora_r=2)
    trainer = PredictorTrainer(model=predictor, args=args(tmp_path), train_dataset=activation_dataset(tok), peft_config=config)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    blocks = {int(part) for n in trainable for part in n.split(".") if part.isdigit()}
    assert blocks == {1, 2} and all("lora_" in n for n in trainable), trainable  # tiny models have blocks 0..2; the target is in 0
    before = capture_activations(predictor.base, TEXTS, ["0.3"], tokenizer=tok)[0].clone()
    changed = train_and_compare(trainer)
    assert any(changed.values())
    assert torch.equal(capture_activations(trainer.model.base_model.model.base, TEXTS, ["0.3"], tokenizer=tok)[0], before)
    with pytest.raises(ValueError, match="leave k"):
        apply_unfreezing(predictor_for(tiny), "lora_after_target", k=1)
    last = ActivationPredictor.from_base(model, tok, neurons=["2.3"], head_type="token", label_transform=transform)
    with pytest.raises(ValueError, match="no block lies after target layer 2"):
        apply_unfreezing(last, "lora_after_target")
