"""ActivationPredictor: heads learn, save/load round-trips, truncated forward, positions, errors."""
import pytest
import torch

from nsr_hf.architectures import get_final_norm
from nsr_hf.capture import capture_activations, encode_texts
from nsr_hf.modeling.predictor import ActivationPredictor, ActivationPredictorConfig, load_predictor, save_predictor

TEXTS = ["Hello world", "A much longer text about neurons and the MLP layers of a language model", "def f(x): return x"]
EDGES = [[i / 10 for i in range(11)]]  # ten equal bins over [0, 1]


def _synthetic(tok, n=96, length=6, seed=0):
    """Random token sequences whose target is a known function of the input: (last token id % 10) / 10 + 0.05,
    i.e. the centre of bin (last token id % 10)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, len(tok), (n, length), generator=g)
    target = ((ids[:, -1] % 10).float() / 10 + 0.05)[:, None]
    return ids, torch.ones_like(ids), target


def _train(predictor, ids, mask, target, steps=150, lr=3e-3):
    predictor.train()
    opt = torch.optim.Adam([p for p in predictor.parameters() if p.requires_grad], lr=lr)
    first = None
    for _ in range(steps):
        loss = predictor(input_ids=ids, attention_mask=mask, labels=target).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    predictor.eval()
    return first, loss.item()


def _predictor(tiny, head, **kw):
    model, tok = tiny
    transform = {"mean": [0.5], "std": [0.29], "bin_edges": EDGES}
    return ActivationPredictor.from_base(model, tok, neurons=["1.3"], head_type=head, label_transform=transform, **kw)


@pytest.mark.parametrize("head", ["regression", "classification", "token"])
def test_each_head_learns_a_known_function_of_its_input(tiny, head):
    torch.manual_seed(0)
    predictor = _predictor(tiny, head)
    ids, mask, target = _synthetic(tiny[1])
    first, last = _train(predictor, ids, mask, target)
    assert last < 0.1 * first
    with torch.no_grad():
        pred = predictor(input_ids=ids, attention_mask=mask).predictions
    r = torch.corrcoef(torch.stack([pred[:, 0], target[:, 0]]))[0, 1]
    assert r > 0.95


def test_token_head_puts_mass_on_every_digit_including_the_lowest_bin(tiny):
    torch.manual_seed(0)
    predictor = _predictor(tiny, "token")
    ids, mask, target = _synthetic(tiny[1])
    _train(predictor, ids, mask, target)
    with torch.no_grad():
        probs = predictor(input_ids=ids, attention_mask=mask).logits[:, 0].softmax(-1)
    bins = predictor.bin_of(target)[:, 0]
    for b in range(10):
        assert probs[bins == b, b].mean() > 0.5, f"report token {predictor.config.report_tokens[b]!r} never learned"


def test_token_head_default_report_tokens_are_single_tokens_of_this_tokenizer(tiny):
    predictor = _predictor(tiny, "token")
    tok = tiny[1]
    assert len(predictor.config.report_tokens) == 10
    assert [tok.encode(t, add_special_tokens=False) for t in predictor.config.report_tokens] == [
        [i] for i in predictor.config.report_token_ids]


@pytest.mark.parametrize("head", ["regression", "classification", "token"])
def test_predictions_are_identical_after_save_and_load(tiny, head, tmp_path):
    predictor = _predictor(tiny, head, read_layer=1 if head != "token" else None)
    with torch.no_grad():
        for p in predictor.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the initial state
    predictor.save_pretrained(tmp_path)
    loaded = load_predictor(str(tmp_path))
    assert type(loaded) is ActivationPredictor and loaded.config.head_type == head
    saved, reloaded = predictor.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)  # bit-identical weights
    # same predictions; not asserted bit-for-bit: BLAS may take another kernel for differently aligned memory
    torch.testing.assert_close(loaded.predict(TEXTS), predictor.predict(TEXTS), atol=1e-6, rtol=1e-6)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))


def test_tied_embeddings_stay_tied_after_a_round_trip(tiny_model_dirs, tmp_path):
    from nsr_hf.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dirs["llama"])  # tie_word_embeddings=True
    predictor = ActivationPredictor.from_base(model, tok, neurons=["0.1"])
    predictor.save_pretrained(tmp_path)
    loaded = load_predictor(str(tmp_path))
    assert loaded.base.get_output_embeddings().weight is loaded.base.get_input_embeddings().weight


@pytest.mark.parametrize("merge", [False, True])
def test_lora_predictor_round_trips_as_adapter_or_merged(tiny, tiny_model_dirs, tmp_path, merge):
    from peft import LoraConfig, PeftModel, get_peft_model

    from nsr_hf.architectures import lora_target_modules
    from nsr_hf.models import load_model_and_tokenizer

    arch = tiny[0].config.model_type
    model, tok = load_model_and_tokenizer(tiny_model_dirs[arch])
    predictor = ActivationPredictor.from_base(model, tok, neurons=["1.3"], label_transform={"mean": [0.5], "std": [0.29]})
    predictor.config.base_model_name_or_path = tiny_model_dirs[arch]
    lora = LoraConfig(
        r=4, target_modules=lora_target_modules(model), modules_to_save=["neuron_head"], fan_in_fan_out=arch == "gpt2",
        init_lora_weights=False
    )
    peft_model = get_peft_model(predictor, lora)
    before = peft_model.get_base_model().predict(TEXTS)
    save_predictor(peft_model, str(tmp_path), merge=merge)
    loaded = load_predictor(str(tmp_path))
    assert isinstance(loaded, PeftModel) != merge
    inner = loaded.get_base_model() if isinstance(loaded, PeftModel) else loaded
    torch.testing.assert_close(inner.predict(TEXTS), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("read_layer", [0, 1, 2])
def test_truncated_forward_equals_the_full_forward(tiny, read_layer):
    model, tok = tiny
    predictor = ActivationPredictor.from_base(model, tok, neurons=["0.1"], read_layer=read_layer)
    batch = encode_texts(tok, TEXTS)
    with torch.no_grad():
        rep = predictor.representation(batch["input_ids"], batch["attention_mask"])
        full = predictor.base(**batch, output_hidden_states=True)
    last = batch["attention_mask"].sum(-1) - 1
    hidden = full.hidden_states[read_layer + 1]
    if read_layer < 2:  # HF's last hidden state is already through the final norm
        hidden = get_final_norm(predictor.base)(hidden)
    torch.testing.assert_close(rep, hidden[torch.arange(len(TEXTS)), last], atol=1e-5, rtol=1e-5)


def test_truncated_forward_runs_only_the_blocks_it_needs(tiny):
    from nsr_hf.architectures import get_layers

    model, tok = tiny
    predictor = ActivationPredictor.from_base(model, tok, neurons=["0.1"], read_layer=0)
    ran = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(get_layers(predictor.base))]
    predictor.predict(TEXTS)
    for h in handles:
        h.remove()
    assert set(ran) == {0}
    assert len(get_layers(predictor.base)) == 3  # restored


def test_label_position_matches_the_datasets_labelled_token_with_either_padding(tiny):
    model, tok = tiny
    predictor = ActivationPredictor.from_base(model, tok, neurons=["1.3"])
    alone = [predictor.representation(**encode_texts(tok, [t])) for t in TEXTS]
    for side in ("left", "right"):
        batch = encode_texts(tok, TEXTS, padding_side=side)
        positions = capture_activations(model, batch, "1.3").positions[1][:, 0]  # the dataset's labelled token
        with torch.no_grad():
            given = predictor.representation(batch["input_ids"], batch["attention_mask"], label_positions=positions)
            by_rule = predictor.representation(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(given, by_rule)
        for i in range(len(TEXTS)):
            torch.testing.assert_close(given[i], alone[i][0], atol=1e-5, rtol=1e-5)


def test_token_prompt_is_the_text_up_to_the_labelled_token_then_the_suffix(tiny):
    model, tok = tiny
    predictor = _predictor(tiny, "token")
    batch = encode_texts(tok, TEXTS, padding_side="left")
    ids, mask = predictor.report_prompts(batch["input_ids"], batch["attention_mask"])
    for i, text in enumerate(TEXTS):
        expected = tok.encode(text) + tok.encode("\nNeuron 1.3 level:", add_special_tokens=False)
        assert ids[i, : int(mask[i].sum())].tolist() == expected


def test_an_empty_prompt_suffix_reports_at_the_labelled_token_from_the_regression_heads_representation(tiny):
    """prompt_suffix "": the report is the labelled token's own next token, read from exactly the representation the
    regression head and the ridge probe read (final norm of the read layer at that token), times the report rows."""
    model, tok = tiny
    bare = _predictor(tiny, "token", prompt_suffix="", read_layer=0)
    batch = encode_texts(tok, TEXTS, padding_side="left")
    with torch.no_grad():
        ids, mask = bare.report_prompts(batch["input_ids"], batch["attention_mask"])
        logits = bare.report_logits(batch["input_ids"], batch["attention_mask"])
        representation = bare.representation(batch["input_ids"], batch["attention_mask"])
    assert bare.config.prompt_suffix_ids == []
    for i, text in enumerate(TEXTS):
        assert ids[i, : int(mask[i].sum())].tolist() == tok.encode(text)
    rows = model.get_output_embeddings().weight[bare.config.report_token_ids]
    torch.testing.assert_close(logits, representation @ rows.T, atol=1e-5, rtol=1e-5)


def test_predictions_come_back_in_activation_units(tiny):
    predictor = _predictor(tiny, "regression")
    with torch.no_grad():
        out = predictor(**encode_texts(tiny[1], TEXTS))
    torch.testing.assert_close(out.predictions, out.logits * 0.29 + 0.5)


def test_bins_cover_every_value_with_no_off_by_one_at_the_edges(tiny):
    predictor = _predictor(tiny, "classification")
    # float64: 0.9 in float32 is 0.89999998, below the edge 0.9, and is binned 8, as numpy (the dataset's bin column) bins it
    values = torch.tensor([[-5.0], [0.0], [0.1], [0.0999], [0.5], [0.9], [0.99], [1.0], [7.0]], dtype=torch.float64)
    assert predictor.bin_of(values)[:, 0].tolist() == [0, 0, 1, 0, 5, 9, 9, 9, 9]


def test_model_card_names_base_neuron_head_dataset_and_metrics(tiny, tmp_path):
    predictor = _predictor(tiny, "classification")
    predictor.config.dataset_name = "my/dataset"
    predictor.evaluation_results = {"test": {"r2": 0.93, "pearson_r": 0.97}}
    predictor.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    for needle in ("1.3", "classification", "my/dataset", "test/r2", "0.9300"):
        assert needle in card


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"head_type": "ranking"}, "Unknown head_type 'ranking'"),
        ({"read_layer": 9}, "read_layer 9 is out of range"),
        ({"head_type": "classification", "label_transform": {"mean": [0], "std": [1], "bin_edges": [[0.0, 1.0]]}},
         "num_bins must be at least 2"),
        ({"head_type": "token", "report_tokens": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "Neuron level"]},
         "is 3 tokens|is 2 tokens|tokens in this"),
        ({"neurons": ["1.999"]}, "Neuron index 999 is out of range"),
        ({"head_type": "classification", "label_transform": {"mean": [0], "std": [1]}}, "needs bin edges"),
    ],
)
def test_invalid_settings_get_clear_errors(tiny, kwargs, message):
    model, tok = tiny
    args = {"neurons": ["1.3"], "label_transform": {"mean": [0.5], "std": [0.29], "bin_edges": EDGES}} | kwargs
    with pytest.raises(ValueError, match=message):
        ActivationPredictor.from_base(model, tok, **args)


def test_loading_refuses_remote_code(tmp_path):
    with pytest.raises(ValueError, match="never runs code"):
        load_predictor(str(tmp_path), trust_remote_code=True)


def test_config_is_registered_with_the_auto_classes(tiny, tmp_path):
    from transformers import AutoConfig, AutoModel

    predictor = _predictor(tiny, "regression")
    predictor.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ActivationPredictorConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), ActivationPredictor)


def test_push_to_hub_uploads_our_model_card_not_a_generic_one(tiny, monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub import HfApi

    uploaded = {}

    def upload_folder(self, repo_id, folder_path, **kwargs):
        from pathlib import Path

        uploaded["repo"] = repo_id
        uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        uploaded["card"] = (Path(folder_path) / "README.md").read_text()

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    predictor = _predictor(tiny, "regression")
    predictor.evaluation_results = {"test": {"r2": 0.91}}
    predictor.push_to_hub("me/self-report")
    assert uploaded["repo"] == "me/self-report"
    assert {"config.json", "model.safetensors", "README.md"} <= set(uploaded["files"])
    assert "Neuron self-report: 1.3" in uploaded["card"] and "test/r2" in uploaded["card"]


def test_loading_a_missing_predictor_folder_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="No predictor in"):
        load_predictor(str(tmp_path / "nothing_here"))


def test_token_head_with_a_read_layer_is_the_logit_lens_of_that_block(tiny):
    """A token head with read_layer below the last block exits early: blocks 0..read_layer, the final norm, and the
    LM head's report-token rows at the prompt's last token (never the model's later blocks)."""
    model, tok = tiny
    torch.manual_seed(0)
    early = _predictor(tiny, "token", read_layer=1)
    full = _predictor(tiny, "token")
    batch = encode_texts(tok, TEXTS, padding_side="right")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prompt, prompt_mask = early.report_prompts(ids, mask)
    with torch.no_grad():
        states = model(input_ids=prompt, attention_mask=prompt_mask, output_hidden_states=True).hidden_states
        last = prompt_mask.sum(-1) - 1
        rows = torch.arange(len(TEXTS))
        report_rows = model.get_output_embeddings().weight[early.config.report_token_ids]
        expected = get_final_norm(model)(states[2])[rows, last] @ report_rows.T  # states[2]: the output of block 1
        assert torch.allclose(early.report_logits(ids, mask), expected, atol=1e-4)
        assert early.config.effective_read_layer == 1
        # the default reads the last block: the model's own next-token logits of the report tokens
        logits = model(input_ids=prompt, attention_mask=prompt_mask).logits[rows, last][:, early.config.report_token_ids]
        assert torch.allclose(full.report_logits(ids, mask), logits, atol=1e-4)
        assert not torch.allclose(early.report_logits(ids, mask), logits, atol=1e-3)


def test_the_card_says_where_a_token_head_reads(tiny):
    model, _ = tiny
    last = model.config.num_hidden_layers - 1
    asked = _predictor(tiny, "token").model_card()
    assert ("- Reads: the model's own next token, after the prompt: the text up to the labelled token (rule: last), "
            "then '\\nNeuron 1.3 level:'") in asked
    bare = _predictor(tiny, "token", prompt_suffix="", read_layer=0).model_card()
    assert ("- Reads: an early exit: block 0, the final norm and the LM head (the logit lens), "
            "as the labelled token's own next token") in bare
    assert f"- Reads: block {last} through the final norm, at the labelled token" in _predictor(tiny, "regression").model_card()
