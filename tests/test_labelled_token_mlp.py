"""The read block's MLP and attention projections at the labelled tokens only (nsr_hf.architectures.labelled_token_block):
a head reads the block's output at one token per row, so its MLP and its attention's query and output projections run
there alone. The representation, its gradients, a training run's losses and weights are those of the whole block, to
float round-off; where it would not be exact (a hook on the MLP, a projection or the block, dropout in training, gradient
checkpointing) the whole block runs."""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

from nsr_hf.architectures import (
    AtLabelledTokens,
    arch_spec,
    get_layers,
    labelled_token_block,
    labelled_token_block_applies,
    token_wise_modules,
    truncated,
)
from nsr_hf.capture import NeuronRecorder, position_ids_from_mask
from nsr_hf.modeling import heads
from nsr_hf.modeling.predictor import ActivationPredictor
from nsr_hf.training.collator import PredictorDataCollator
from nsr_hf.training.trainer import PredictorTrainer
from tests.test_prefix_cache import STRATEGIES, args, reference_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@contextlib.contextmanager
def whole_blocks():
    """The reference: every block runs at every token (the trick switched off where the heads use it)."""
    real = heads.labelled_token_block

    @contextlib.contextmanager
    def off(model, layer, positions):
        yield False

    heads.labelled_token_block = off
    try:
        yield
    finally:
        heads.labelled_token_block = real


def batch_of(tok, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, len(tok), (length,), generator=g).tolist() for length in (3, 5, 9, 4, 8, 6)[:n]]
    return PredictorDataCollator(pad_token_id=0)([{"input_ids": i, "label_position": len(i) - 1, "activations": [0.0]} for i in ids])


def predictor_of(model, tok, read_layer=1, head="regression"):
    transform = {"mean": [0.0], "std": [1.0], "bin_edges": [np.linspace(-1, 1, 11).tolist()]}
    return ActivationPredictor.from_base(model, tok, neurons=["0.3"], head_type=head, read_layer=read_layer, label_transform=transform)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
@pytest.mark.parametrize("read_layer", [0, 1, 2])
def test_the_representation_and_its_gradients_equal_the_whole_blocks(tiny_model_dirs, arch, read_layer):
    from nsr_hf.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dirs[arch])
    predictor = predictor_of(model, tok, read_layer)
    batch = batch_of(tok)
    # the MLP is replaced, and the rows are padded (a labelled token before the end of the batch's longest row)
    assert len(set(batch["attention_mask"].sum(-1).tolist())) > 1
    assert labelled_token_block_applies(predictor.base, read_layer)
    results = []
    for context in (contextlib.nullcontext, whole_blocks):
        predictor.zero_grad()
        with context():
            h = predictor.representation(batch["input_ids"], batch["attention_mask"], batch["label_positions"])
        h.pow(2).sum().backward()
        grads = {n: q.grad.clone() for n, q in predictor.named_parameters() if q.grad is not None}
        results.append((h.detach(), grads))
    (h, grads), (h_ref, grads_ref) = results
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and any("mlp" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # and the plain model's own forward, read at the labelled tokens, is that same representation
    with torch.no_grad(), truncated(model, read_layer):
        out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=position_ids_from_mask(batch["attention_mask"])).last_hidden_state
    torch.testing.assert_close(h, out[torch.arange(len(out)), batch["label_positions"]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch, projections", [("gpt2", ["attn.c_proj"]), ("llama", ["self_attn.q_proj", "self_attn.o_proj"]),
                                                 ("gpt_neox", ["attention.dense"])])
def test_inside_the_with_the_mlp_and_projections_see_one_token_per_row_and_after_it_the_block_is_whole_again(tiny_model_dirs, arch,
                                                                                                          projections):
    """The MLP and the attention's query and output projections run at the labelled token of each row; the keys and
    values (and GPT-2's and GPT-NeoX's fused query) at every token."""
    from nsr_hf.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dirs[arch])
    block = get_layers(model)[1]
    paths = ["mlp", *projections]
    modules = {path: block.get_submodule(path) for path in paths}
    assert token_wise_modules(block, arch_spec(model)) == paths
    seen, handles = {}, []
    batch = batch_of(tok)
    rows, length = batch["input_ids"].shape
    with labelled_token_block(model, 1, batch["label_positions"]) as applies:
        assert applies and all(block.get_submodule(path) is not modules[path] for path in paths)
        for path, module in modules.items():
            handles.append(module.register_forward_hook(lambda m, a, o, path=path: seen.update({path: tuple(a[0].shape[:2])})))
        fused = {"gpt2": "attn.c_attn", "llama": "self_attn.k_proj", "gpt_neox": "attention.query_key_value"}[arch]
        handles.append(block.get_submodule(fused).register_forward_hook(lambda m, a, o: seen.update(keys=tuple(a[0].shape[:2]))))
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for handle in handles:
        handle.remove()
    assert all(block.get_submodule(path) is modules[path] for path in paths)
    assert seen == {**{path: (rows, 1) for path in paths}, "keys": (rows, length)}


@pytest.mark.parametrize("strategy", ["after_target", "last_k", "head_only", "lora_after_target"])
def test_training_gives_the_losses_and_weights_of_the_whole_blocks(tiny, tmp_path, strategy, monkeypatch):
    model, tok = tiny
    calls = []
    real_forward = AtLabelledTokens.forward
    monkeypatch.setattr(AtLabelledTokens, "forward", lambda self, *a, **k: calls.append(id(self.module)) or
                        real_forward(self, *a, **k))
    ds, values = reference_dataset(model, tok)
    transform = {"mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
                 "bin_edges": [np.quantile(values[:, 0], np.linspace(0, 1, 11)).tolist()]}
    predictor = ActivationPredictor.from_base(model, tok, neurons=["1.3"], head_type="regression", label_transform=transform)
    runs = []
    for context in (contextlib.nullcontext, whole_blocks):
        torch.manual_seed(0)  # LoRA adapters are initialised when the trainer wraps the model
        # plain SGD: Adam would blow up the float noise of gradients that are 0 in exact arithmetic (a key bias: softmax
        # does not see a shift of every key) into different steps; the gradients themselves are compared above
        trainer = PredictorTrainer(model=copy.deepcopy(predictor), args=args(tmp_path / context.__name__, optim="sgd", learning_rate=0.1),
                                   train_dataset=ds, unfreeze={"strategy": strategy, **STRATEGIES[strategy]}, prefix_cache="off")
        with context():
            trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs.append((losses, {n: q.detach().clone() for n, q in trainer.model.named_parameters() if q.requires_grad}))
    (losses, weights), (losses_ref, weights_ref) = runs
    # at each of the 4 training steps (in the first run only): the read block's MLP and its attention's projections
    projections = len(token_wise_modules(get_layers(model)[1], arch_spec(model)))
    assert projections > 1 and len(set(calls)) == projections and all(calls.count(c) == 4 for c in calls)
    np.testing.assert_allclose(losses, losses_ref, rtol=1e-5, atol=1e-7)
    assert len(losses) == 4 and weights.keys() == weights_ref.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], weights_ref[name], rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_a_neuron_read_or_set_in_the_read_block_keeps_the_whole_block(tiny):
    """Live labels, interventions and the drift monitor hook the neuron's module: the MLP must see every token."""
    model, tok = tiny
    batch = batch_of(tok)
    n_layers = len(get_layers(model))
    read = n_layers - 1
    assert labelled_token_block_applies(model, read)
    with NeuronRecorder(model, [f"{read}.3"]) as recorder:
        assert not labelled_token_block_applies(model, read)
        with labelled_token_block(model, read, batch["label_positions"]) as applies, torch.no_grad():
            assert not applies
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    seq = batch["input_ids"].shape[1]
    assert recorder.activations[read].shape[:2] == (len(batch["input_ids"]), seq)
    assert labelled_token_block_applies(model, read)  # the recorder's hooks are gone


@pytest.mark.parametrize("path", ["self_attn.q_proj", "self_attn.o_proj"])
def test_a_hook_on_an_attention_projection_keeps_the_whole_block(tiny_model_dirs, path):
    """A hook on the query or output projection of the read block could read its other tokens: the block runs whole."""
    from nsr_hf.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dirs["llama"])
    block = get_layers(model)[1]
    seen = []
    handle = block.get_submodule(path).register_forward_hook(lambda m, a, o: seen.append(tuple(o.shape[:2])))
    batch = batch_of(tok)
    try:
        with labelled_token_block(model, 1, batch["label_positions"]) as applies, torch.no_grad():
            assert not applies
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    assert seen[0] == tuple(batch["input_ids"].shape) and labelled_token_block_applies(model, 1)


def test_dropout_in_training_and_gradient_checkpointing_keep_the_whole_block(tiny_model_dirs):
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.1))
    model.train()
    assert not labelled_token_block_applies(model, 1)  # GPT-2's MLP ends in a dropout: fewer tokens would draw other random numbers
    model.eval()
    assert labelled_token_block_applies(model, 1)  # in eval mode dropout is off
    from nsr_hf.models import load_model_and_tokenizer

    llama, _ = load_model_and_tokenizer(tiny_model_dirs["llama"])
    llama = copy.deepcopy(llama)
    (getattr(llama, "activation_checkpointing_enable", None) or llama.gradient_checkpointing_enable)()
    assert not labelled_token_block_applies(llama, 1)
