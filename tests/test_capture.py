"""Neuron capture: the right unit, independent of padding, early stop, hook hygiene, interventions."""
import math

import pytest
import torch

from nsr_hf.architectures import get_layers, get_pre_mlp_norm, num_neurons
from nsr_hf.capture import (
    Intervention,
    Neuron,
    NeuronRecorder,
    capture_activations,
    encode_texts,
    intervene,
    label_positions,
    model_inputs,
    pad_right,
    read_live_neurons,
)

TEXTS = ["Hello world", "A much longer text about neurons and the MLP layers of a language model", "def f(x): return x"]


def _recompute_from_weights(model, layer, residual):
    """The neuron vector written out from the block's weights, in float64, from the residual stream
    that enters the pre-MLP norm. Independent of the library's own MLP code."""
    block = get_layers(model)[layer]
    x = residual.double()
    if model.config.model_type == "gpt2":
        ln = block.ln_2
        h = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
        h = h * ln.weight.double() + ln.bias.double()
        pre = h @ block.mlp.c_fc.weight.double() + block.mlp.c_fc.bias.double()
        return 0.5 * pre * (1 + torch.tanh(math.sqrt(2 / math.pi) * (pre + 0.044715 * pre**3)))  # gelu_new
    norm = block.post_attention_layernorm
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()
    gate = h @ block.mlp.gate_proj.weight.double().T
    up = h @ block.mlp.up_proj.weight.double().T
    return gate * torch.sigmoid(gate) * up  # SiLU(gate) * up


def _residual_before_mlp(model, layer, batch):
    seen = {}

    def hook(module, args):
        seen["x"] = args[0].detach()

    handle = get_pre_mlp_norm(model, layer).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(**model_inputs(batch))
    finally:
        handle.remove()
    return seen["x"]


def _all_hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_captured_value_equals_recomputation_from_layer_weights(tiny, layer):
    model, tok = tiny
    batch = encode_texts(tok, TEXTS)
    cap = capture_activations(model, batch, layer, position="all")
    expected = _recompute_from_weights(model, layer, _residual_before_mlp(model, layer, batch))
    mask = batch["attention_mask"].bool()
    assert cap[layer].shape[-1] == num_neurons(model)
    torch.testing.assert_close(cap[layer][mask].double(), expected[mask], atol=1e-5, rtol=1e-5)


def test_capture_reads_mlp_hidden_units_not_residual_coordinates(tiny):
    model, tok = tiny
    cap = capture_activations(model, TEXTS, 1, tokenizer=tok)
    assert cap[1].shape == (len(TEXTS), num_neurons(model))
    assert num_neurons(model) != model.config.hidden_size


@pytest.mark.parametrize("position", ["last", 0, 2, -2, "max"])
def test_value_is_the_same_alone_in_a_batch_and_with_either_padding_side(tiny, position):
    model, tok = tiny
    neurons = {1: [0, 5, 7]}
    alone = capture_activations(model, encode_texts(tok, TEXTS[:1]), neurons, position=position)[1][0]
    for side in ("left", "right"):
        batch = encode_texts(tok, TEXTS, padding_side=side)
        assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # really padded
        in_batch = capture_activations(model, batch, neurons, position=position)[1][0]
        torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=1e-5)


def test_every_token_rule_agrees_across_padding_sides(tiny):
    model, tok = tiny
    right = capture_activations(model, encode_texts(tok, TEXTS, padding_side="right"), 2, position="all")
    left = capture_activations(model, encode_texts(tok, TEXTS, padding_side="left"), 2, position="all")
    for row in range(len(TEXTS)):
        r = right[2][row][~torch.isnan(right[2][row, :, 0])]
        lft = left[2][row][~torch.isnan(left[2][row, :, 0])]
        torch.testing.assert_close(r, lft, atol=1e-5, rtol=1e-5)


def test_every_token_rule_marks_padding_as_nan(tiny):
    model, tok = tiny
    batch = encode_texts(tok, TEXTS)
    acts = capture_activations(model, batch, 0, position="all")[0]
    mask = batch["attention_mask"].bool()
    assert torch.isnan(acts[~mask]).all() and not torch.isnan(acts[mask]).any()


def test_last_rule_reads_the_last_real_token(tiny):
    model, tok = tiny
    batch = encode_texts(tok, TEXTS, padding_side="left")
    every = capture_activations(model, batch, 1, position="all")[1]
    last = capture_activations(model, batch, 1, position="last")
    assert (last.positions[1][:, 0] == batch["attention_mask"].shape[1] - 1).all()  # left padding: always the end
    torch.testing.assert_close(last[1], every[:, -1, :])


def test_max_rule_returns_the_maximum_over_real_tokens(tiny):
    model, tok = tiny
    batch = encode_texts(tok, TEXTS)
    every = capture_activations(model, batch, 1, position="all")[1]
    cap = capture_activations(model, batch, 1, position="max")
    torch.testing.assert_close(cap[1], every.nan_to_num(float("-inf")).amax(1))
    gathered = every.gather(1, cap.positions[1][:, None, :]).squeeze(1)
    torch.testing.assert_close(gathered, cap[1])


def test_fixed_index_beyond_the_text_is_a_clear_error(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="outside text 0"):
        capture_activations(model, ["Hi", TEXTS[1]], 1, tokenizer=tok, position=40)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_early_stopped_capture_equals_full_forward_capture(tiny, layer):
    model, tok = tiny
    batch = encode_texts(tok, TEXTS)
    for neurons in ({layer: None}, {layer: [3, 1, 9]}):
        early = capture_activations(model, batch, neurons, position="all", stop_early=True)[layer]
        full = capture_activations(model, batch, neurons, position="all", stop_early=False)[layer]
        torch.testing.assert_close(early, full, atol=1e-6, rtol=1e-6, equal_nan=True)


def test_early_stopped_capture_sees_a_lora_adapter_on_the_mlp_input(tiny):
    # the early-stop shortcut recomputes the deepest layer's neurons from plain weights; a LoRA adapter on
    # the MLP input (GPT-2 c_fc, Llama gate/up) must not be skipped
    import copy

    from peft import LoraConfig, get_peft_model

    from nsr_hf.architectures import lora_target_modules

    model, tok = tiny
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=lora_target_modules(model, mlp_only=True),
                                                                  fan_in_fan_out=model.config.model_type == "gpt2",
                                                                  init_lora_weights=False))
    batch = encode_texts(tok, TEXTS)
    early = capture_activations(peft_model, batch, ["1.3"], position="last", stop_early=True)[1]
    full = capture_activations(peft_model, batch, ["1.3"], position="last", stop_early=False)[1]
    plain = capture_activations(model, batch, ["1.3"], position="last")[1]
    torch.testing.assert_close(early, full, atol=1e-6, rtol=1e-6)
    assert (early - plain).abs().max() > 1e-3, "the adapter should change the neuron"


def test_early_stop_runs_no_layer_after_the_deepest_needed(tiny):
    model, tok = tiny
    ran = []
    handles = [blk.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, blk in enumerate(get_layers(model))]
    try:
        capture_activations(model, TEXTS, {0: [1]}, tokenizer=tok)
    finally:
        for h in handles:
            h.remove()
    assert ran == [0]


def test_multiple_layers_and_neurons_in_the_order_requested(tiny):
    model, tok = tiny
    cap = capture_activations(model, TEXTS, ["2.5", "0.7", Neuron(0, 3)], tokenizer=tok)
    full0 = capture_activations(model, TEXTS, 0, tokenizer=tok)[0]
    full2 = capture_activations(model, TEXTS, 2, tokenizer=tok)[2]
    torch.testing.assert_close(cap[0], full0[:, [7, 3]])
    torch.testing.assert_close(cap[2], full2[:, [5]])


def test_hooks_are_removed_after_a_normal_capture(tiny):
    model, tok = tiny
    before = _all_hooks(model)
    capture_activations(model, TEXTS, [0, 2], tokenizer=tok)
    assert _all_hooks(model) == before


def test_hooks_are_removed_when_the_forward_raises(tiny):
    model, tok = tiny
    before = _all_hooks(model)
    bad = {"input_ids": torch.tensor([[len(tok) + 10_000]]), "attention_mask": torch.tensor([[1]])}  # out of vocabulary
    with pytest.raises((IndexError, RuntimeError)):
        capture_activations(model, bad, 1)
    assert _all_hooks(model) == before

    def boom(layer, value):
        raise KeyError("callback failed")

    with pytest.raises(KeyError):
        NeuronRecorder(model, 1, callback=boom, stop_early=True).run(encode_texts(tok, TEXTS))
    with pytest.raises(ZeroDivisionError):
        with intervene(model, Intervention(1, [0], "set", 1.0)):
            1 / 0
    assert _all_hooks(model) == before


def test_intervention_changes_later_layers_and_nothing_before(tiny):
    model, tok = tiny
    batch = encode_texts(tok, TEXTS)
    layers = [0, 1, 2]
    clean = capture_activations(model, batch, layers, position="all", stop_early=False)
    with torch.no_grad():
        clean_logits = model(**model_inputs(batch)).logits
    with intervene(model, Intervention(layer=1, indices=[3], mode="set", value=7.0)):
        patched = capture_activations(model, batch, layers, position="all", stop_early=False)
        with torch.no_grad():
            patched_logits = model(**model_inputs(batch)).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(patched[0][mask], clean[0][mask])  # before: untouched
    assert (patched[1][mask][:, 3] == 7.0).all()  # the neuron itself: clamped
    others = [i for i in range(num_neurons(model)) if i != 3]
    torch.testing.assert_close(patched[1][mask][:, others], clean[1][mask][:, others])  # its neighbours: untouched
    assert not torch.allclose(patched[2][mask], clean[2][mask])  # after: changed
    assert not torch.allclose(patched_logits, clean_logits)


def test_intervention_at_the_deepest_layer_is_seen_by_an_early_stopped_capture(tiny):
    model, tok = tiny
    with intervene(model, Intervention(layer=2, indices=[1], mode="scale", value=0.0)):
        cap = capture_activations(model, TEXTS, {2: [1, 2]}, tokenizer=tok)
    assert (cap[2][:, 0] == 0).all() and (cap[2][:, 1] != 0).all()


def test_per_text_values_at_chosen_positions(tiny):
    model, tok = tiny
    batch = encode_texts(tok, TEXTS)
    cap = capture_activations(model, batch, {1: [4]})
    values = torch.tensor([1.0, -2.0, 3.0])
    with intervene(model, Intervention(1, [4], "set", values, positions=cap.positions[1][:, 0])):
        patched = capture_activations(model, batch, {1: [4]}, position="all")
    assert torch.equal(patched[1][torch.arange(3), cap.positions[1][:, 0], 0], values)
    unchanged = capture_activations(model, batch, {1: [4]}, position="all")[1]
    torch.testing.assert_close(patched[1][0, 0], unchanged[0, 0])  # other tokens untouched


def test_intervention_rows_set_the_chosen_rows_and_leave_the_others_exactly_natural(tiny):
    model, tok = tiny
    batch = encode_texts(tok, TEXTS)
    natural = capture_activations(model, batch, {1: [4, 5]}, stop_early=False)
    positions = natural.positions[1][:, 0]
    rows = torch.tensor([True, False, True])
    with intervene(model, Intervention(1, [4, 5], "set", torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), positions, rows=rows)):
        patched = capture_activations(model, batch, {1: [4, 5]}, stop_early=False)
    assert patched[1][0].tolist() == [1.0, 2.0] and patched[1][2].tolist() == [5.0, 6.0]
    assert torch.equal(patched[1][1], natural[1][1])  # the row left out: bit for bit natural


def test_intervention_rows_per_neuron_choose_which_neurons_of_which_rows(tiny):
    model, tok = tiny
    batch = encode_texts(tok, TEXTS)
    natural = capture_activations(model, batch, {1: [4, 5]}, position="all", stop_early=False)[1]
    rows = torch.tensor([[True, False], [False, True], [False, False]])
    with intervene(model, Intervention(1, [4, 5], "set", 9.0, rows=rows)):
        patched = capture_activations(model, batch, {1: [4, 5]}, position="all", stop_early=False)[1]
    mask = batch["attention_mask"].bool()
    assert (patched[0][mask[0]][:, 0] == 9).all() and (patched[1][mask[1]][:, 1] == 9).all()
    assert torch.equal(patched[0][mask[0]][:, 1], natural[0][mask[0]][:, 1])
    assert torch.equal(patched[1][mask[1]][:, 0], natural[1][mask[1]][:, 0])
    assert torch.equal(patched[2][mask[2]], natural[2][mask[2]])


def test_intervention_rows_of_the_wrong_shape_or_type_are_a_clear_error(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="must be a bool tensor"):
        Intervention(1, [4], "set", 1.0, rows=torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match=r"shape \(3,\) or \(3, 1\)"):
        with intervene(model, Intervention(1, [4], "set", 1.0, rows=torch.tensor([True, False]))):
            capture_activations(model, TEXTS, {1: [4]}, tokenizer=tok, stop_early=False)


def test_scale_and_add_modes(tiny):
    model, tok = tiny
    base = capture_activations(model, TEXTS, {1: [2]}, tokenizer=tok)[1]
    with intervene(model, Intervention(1, [2], "scale", 3.0)):
        scaled = capture_activations(model, TEXTS, {1: [2]}, tokenizer=tok, stop_early=False)[1]
    with intervene(model, Intervention(1, [2], "add", 0.5)):
        added = capture_activations(model, TEXTS, {1: [2]}, tokenizer=tok, stop_early=False)[1]
    torch.testing.assert_close(scaled, base * 3)
    torch.testing.assert_close(added, base + 0.5)


@pytest.mark.parametrize(
    "neurons, message",
    [({7: None}, "Layer 7 is out of range: this model has layers 0..2"), ("1.5000", "Neuron index 5000 is out of range"),
     ("abc", "Cannot read a neuron")],
)
def test_out_of_range_layer_or_index_is_a_clear_error(tiny, neurons, message):
    model, tok = tiny
    with pytest.raises(ValueError, match=message):
        capture_activations(model, TEXTS, neurons, tokenizer=tok)


def test_unknown_position_rule_is_a_clear_error(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="Unknown position rule 'first'"):
        capture_activations(model, TEXTS, 1, tokenizer=tok, position="first")


def test_unknown_intervention_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown intervention mode"):
        Intervention(0, [1], mode="double")


def test_neuron_names_parse_both_ways():
    assert Neuron.parse("12.345") == Neuron(12, 345) == Neuron.parse("L12.N345") == Neuron.parse("L12N345") == Neuron.parse((12, 345))
    assert str(Neuron(3, 7)) == "3.7"


# -- the one padding rule -------------------------------------------------------------------------------


def test_pad_right_pads_each_row_after_its_tokens_and_masks_the_padding():
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pad_right_keeps_a_rows_own_attention_mask():
    _, mask = pad_right([[5, 6, 7], [8, 4]], masks=[[1, 1, 0], None])
    assert mask.tolist() == [[1, 1, 0], [1, 1, 0]]


def test_pad_right_of_tensors_keeps_their_dtype_and_device_when_asked():
    rows = [torch.tensor([1, 2], dtype=torch.int32), torch.tensor([3], dtype=torch.int32)]
    ids, mask = pad_right(rows, dtype=torch.int32, device=torch.device("cpu"))
    assert ids.dtype == mask.dtype == torch.int32 and ids.tolist() == [[1, 2], [3, 0]]


def test_pad_right_of_no_rows_is_a_clear_error():
    with pytest.raises(ValueError, match="no rows"):
        pad_right([])


# -- the one live-neuron reader --------------------------------------------------------------------------


def test_live_neurons_are_the_captured_values_at_each_rows_labelled_token(tiny):
    model, tok = tiny
    batch = encode_texts(tok, TEXTS)
    positions = label_positions(batch["attention_mask"], "last")
    _, live = read_live_neurons(model, ["1.3", "0.5"], batch, positions)
    cap = capture_activations(model, batch, ["1.3", "0.5"])
    torch.testing.assert_close(live, torch.stack([cap[1][:, 0], cap[0][:, 0]], 1).float(), atol=1e-5, rtol=1e-5)


def test_live_neurons_are_read_in_a_given_pass_at_the_shifted_labelled_token(tiny):
    """A pass over the texts moved right by one token (a BOS in front) reads each labelled token at position + 1."""
    model, tok = tiny
    batch = encode_texts(tok, TEXTS)
    positions = label_positions(batch["attention_mask"], "last")
    bos = torch.zeros_like(batch["input_ids"][:, :1])
    shifted = {"input_ids": torch.cat([bos, batch["input_ids"]], 1),
               "attention_mask": torch.cat([torch.ones_like(bos), batch["attention_mask"]], 1)}
    output, live = read_live_neurons(model, ["1.3"], batch, positions, run=lambda: model(**model_inputs(shifted)),
                                     offset=-torch.ones_like(positions))
    expected = capture_activations(model, shifted, ["1.3"], position="last")[1][:, 0]
    assert output is not None
    torch.testing.assert_close(live[:, 0], expected.float(), atol=1e-5, rtol=1e-5)


def test_live_neurons_a_given_pass_does_not_reach_are_read_in_one_more_pass_of_the_text(tiny):
    model, tok = tiny
    batch = encode_texts(tok, TEXTS)
    positions = label_positions(batch["attention_mask"], "last")
    with torch.no_grad():
        _, alone = read_live_neurons(model, ["2.3"], batch, positions)
        _, after = read_live_neurons(model, ["2.3"], batch, positions, run=lambda: None)
    torch.testing.assert_close(after, alone)


def test_live_neurons_keep_their_gradient_only_when_asked(tiny):
    model, tok = tiny
    batch = encode_texts(tok, TEXTS)
    positions = label_positions(batch["attention_mask"], "last")
    assert read_live_neurons(model, ["1.3"], batch, positions, keep_grad=True)[1].requires_grad
    assert not read_live_neurons(model, ["1.3"], batch, positions)[1].requires_grad


def test_live_neuron_hooks_are_removed_after_reading(tiny):
    model, tok = tiny
    batch = encode_texts(tok, TEXTS)
    read_live_neurons(model, ["1.3"], batch, label_positions(batch["attention_mask"], "last"))
    assert all(not m._forward_pre_hooks for m in model.modules())
