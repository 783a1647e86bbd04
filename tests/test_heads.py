"""The heads as objects: each head's readouts, loss, trainable parameters, label offset, checks and words, and the
registry that is all a new head needs."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nsr_hf.architectures import arch_spec
from nsr_hf.capture import encode_texts
from nsr_hf.modeling.heads import (
    HEAD_TYPES,
    HEADS,
    ClassificationHead,
    ConditionedHead,
    ConditionedTokenHead,
    RegressionHead,
    TokenHead,
    head_class,
    register_head,
)
from nsr_hf.modeling.predictor import ActivationPredictor, ActivationPredictorConfig, load_predictor
from nsr_hf.models import load_model_and_tokenizer
from nsr_hf.report_tokens import DEFAULT_PROMPT_SUFFIX
from nsr_hf.training.trainer import PredictorMetrics
from nsr_hf.training.unfreezing import apply_unfreezing

TEXTS = ["Hello world", "A much longer text about neurons and the MLP layers of a language model", "def f(x): return x"]
EDGES = [[i / 10 for i in range(11)]]  # ten equal bins over [0, 1]
TRANSFORM = {"mean": [0.5], "std": [0.25], "bin_edges": EDGES}


def _predictor(tiny, head, **kw):
    model, tok = tiny
    return ActivationPredictor.from_base(model, tok, neurons=["1.3"], head_type=head, label_transform=dict(TRANSFORM), **kw)


def _recipe(head_type, **kw):
    """The fields of a training recipe that the heads check."""
    fields = {"head_type": head_type, "expected_value_loss_weight": 0.0, "prompt_suffix": DEFAULT_PROMPT_SUFFIX, "bin_strategy": None,
              "head_init": "random"}
    return SimpleNamespace(**{**fields, **kw})


# -- the registry ----------------------------------------------------------------------------------


def test_the_registry_names_the_regression_classification_token_and_conditioned_heads():
    assert HEAD_TYPES == ("regression", "classification", "token", "conditioned", "conditioned_token")
    assert [head_class(name) for name in HEAD_TYPES] == [RegressionHead, ClassificationHead, TokenHead, ConditionedHead,
                                                         ConditionedTokenHead]


def test_an_unknown_head_type_is_refused_with_the_registered_names():
    with pytest.raises(ValueError, match="regression, classification, token"):
        head_class("ordinal")


@pytest.fixture
def halved_head():
    """A head registered for one test: the regression head reporting half its value."""

    @register_head
    class HalvedHead(RegressionHead):
        name = "halved"

        def readouts(self, predictor, logits):
            expected, greedy = super().readouts(predictor, logits)
            return expected / 2, greedy

    yield HalvedHead
    del HEADS["halved"]


def test_registering_a_head_is_all_the_predictor_needs_to_build_run_train_and_reload_it(tiny, halved_head, tmp_path):
    predictor = _predictor(tiny, "halved")
    assert isinstance(predictor.head, halved_head)
    batch = encode_texts(tiny[1], TEXTS)
    with torch.no_grad():
        out = predictor(**batch, labels=torch.zeros(len(TEXTS), 1))
        regression = RegressionHead(predictor.config).readouts(predictor, out.logits)[0]
    torch.testing.assert_close(out.predictions, regression / 2)
    assert out.loss is not None
    assert sorted(apply_unfreezing(predictor, "head_only")) == ["neuron_head.bias", "neuron_head.weight"]
    predictor.save_pretrained(tmp_path)
    assert type(load_predictor(str(tmp_path)).head) is halved_head


# -- readouts, in activation units -------------------------------------------------------------------


def test_regression_readout_undoes_the_zscore_and_has_no_greedy_value(tiny):
    predictor = _predictor(tiny, "regression")
    expected, greedy = predictor.head.readouts(predictor, torch.tensor([[0.0], [2.0], [-1.0]]))
    torch.testing.assert_close(expected, torch.tensor([[0.5], [1.0], [0.25]]))
    assert greedy is None


def test_bin_readouts_are_the_expected_bin_centre_and_the_centre_of_the_most_likely_bin(tiny):
    predictor = _predictor(tiny, "classification")
    logits = torch.full((1, 1, 10), -1e4)
    logits[0, 0, 2] = logits[0, 0, 7] = 0.0  # half the mass on bin 2 (centre 0.25), half on bin 7 (centre 0.75)
    logits[0, 0, 7] += 1e-3  # and bin 7 the most likely
    expected, greedy = predictor.head.readouts(predictor, logits)
    torch.testing.assert_close(expected, torch.tensor([[0.5]]), atol=1e-3, rtol=0)
    torch.testing.assert_close(greedy, torch.tensor([[0.75]]))


def test_token_head_reads_out_over_its_report_tokens_like_the_classification_head(tiny):
    token, classification = _predictor(tiny, "token"), _predictor(tiny, "classification")
    logits = torch.randn(4, 1, 10, generator=torch.Generator().manual_seed(0))
    for got, want in zip(token.head.readouts(token, logits), classification.head.readouts(classification, logits)):
        torch.testing.assert_close(got, want)


# -- losses -----------------------------------------------------------------------------------------


def test_regression_loss_is_the_squared_error_of_the_zscores(tiny):
    predictor = _predictor(tiny, "regression")
    output = SimpleNamespace(logits=torch.tensor([[1.0], [0.0]]))
    loss = predictor.head.loss(predictor, output, torch.tensor([[0.5], [1.0]]))  # z-scores 0 and 2
    torch.testing.assert_close(loss, torch.tensor((1.0 + 4.0) / 2))


def test_classification_loss_is_the_cross_entropy_of_the_labels_bins(tiny):
    predictor = _predictor(tiny, "classification")
    logits = torch.randn(2, 1, 10, generator=torch.Generator().manual_seed(0))
    loss = predictor.head.loss(predictor, SimpleNamespace(logits=logits), torch.tensor([[0.05], [0.93]]))
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits[:, 0], torch.tensor([0, 9])))


def test_token_loss_adds_the_weighted_squared_error_of_the_expected_value_in_zscores(tiny):
    plain, weighted = _predictor(tiny, "token"), _predictor(tiny, "token", expected_value_loss_weight=2.0)
    logits = torch.randn(2, 1, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[0.05], [0.93]])
    output = SimpleNamespace(logits=logits, predictions=plain.head.readouts(plain, logits)[0])
    extra = nn.functional.mse_loss((output.predictions - 0.5) / 0.25, (labels - 0.5) / 0.25)
    torch.testing.assert_close(weighted.head.loss(weighted, output, labels), plain.head.loss(plain, output, labels) + 2.0 * extra)


# -- trainable parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["regression", "classification"])
def test_a_reading_head_trains_its_own_module(tiny, head):
    predictor = _predictor(tiny, head)
    assert predictor.head.trainable_prefixes(predictor) == ["neuron_head."]


def test_the_token_head_trains_the_final_norm_and_never_a_tied_lm_head(tiny):
    predictor = _predictor(tiny, "token")
    assert predictor.head.trainable_prefixes(predictor) == [f"base.{arch_spec(predictor.base).final_norm}."]


def test_the_token_head_trains_an_untied_lm_head(tiny_model_dirs):
    model, tok = load_model_and_tokenizer(tiny_model_dirs["gpt_neox"])
    predictor = ActivationPredictor.from_base(model, tok, neurons=["1.3"], head_type="token", label_transform=dict(TRANSFORM))
    norm, lm_head = predictor.head.trainable_prefixes(predictor)
    assert norm == f"base.{arch_spec(predictor.base).final_norm}."
    assert [p for n, p in predictor.named_parameters() if n.startswith(lm_head)] == [predictor.base.get_output_embeddings().weight]


# -- the label offset -----------------------------------------------------------------------------------


def test_the_token_heads_label_offset_is_where_its_prompt_puts_the_labelled_token(tiny):
    predictor = _predictor(tiny, "token")
    batch = encode_texts(tiny[1], TEXTS, padding_side="left")
    positions = batch["attention_mask"].shape[1] - 1 - torch.tensor([1, 3, 0])  # some real token of each row
    prompts, _ = predictor.head.prompts(predictor, batch["input_ids"], batch["attention_mask"], positions)
    at = positions - predictor.head.label_offset(batch["attention_mask"])
    rows = torch.arange(len(TEXTS))
    assert torch.equal(prompts[rows, at], batch["input_ids"][rows, positions])
    assert not torch.equal(at, positions)  # left padding: the prompt starts later than the batch row


@pytest.mark.parametrize("head", ["regression", "classification"])
def test_a_reading_head_reads_the_text_itself_so_its_label_offset_is_zero(tiny, head):
    predictor = _predictor(tiny, head)
    mask = encode_texts(tiny[1], TEXTS, padding_side="left")["attention_mask"]
    assert torch.equal(predictor.head.label_offset(mask), torch.zeros(len(TEXTS), dtype=torch.long))


# -- checks of a predictor and of a recipe --------------------------------------------------------------


@pytest.mark.parametrize("head", ["classification", "token"])
def test_a_head_with_bins_needs_bin_edges(tiny, head):
    model, tok = tiny
    with pytest.raises(ValueError, match=f"The {head} head needs bin edges"):
        ActivationPredictor.from_base(model, tok, neurons=["1.3"], head_type=head, label_transform={"mean": [0.0], "std": [1.0]})


def test_the_token_head_refuses_several_neurons(tiny):
    with pytest.raises(ValueError, match="one neuron per prompt"):
        ActivationPredictorConfig(neurons=["1.3", "1.4"], head_type="token")


@pytest.mark.parametrize("setting", [{"expected_value_loss_weight": 1.0}, {"prompt_suffix": " level:"}])
def test_a_reading_head_refuses_the_token_heads_recipe_settings(setting):
    with pytest.raises(ValueError, match="token head only"):
        RegressionHead.check_training(_recipe("regression", **setting))
    TokenHead.check_training(_recipe("token", **setting))


def test_only_heads_with_bins_take_a_bin_strategy_and_only_regression_a_probe_init():
    with pytest.raises(ValueError, match="regression head has none"):
        RegressionHead.check_training(_recipe("regression", bin_strategy="kmeans"))
    ClassificationHead.check_training(_recipe("classification", bin_strategy="kmeans"))
    with pytest.raises(ValueError, match="head_init 'probe'"):
        ClassificationHead.check_training(_recipe("classification", head_init="probe"))
    RegressionHead.check_training(_recipe("regression", head_init="probe"))


# -- what the rest of the package asks ---------------------------------------------------------------------


def test_bin_metrics_apply_to_the_heads_with_bins():
    assert [head_class(name).has_bins for name in HEAD_TYPES] == [False, True, True, False, True]
    assert "accuracy" not in PredictorMetrics(["1.3"], "regression", EDGES).neuron_metrics(
        torch.rand(20).numpy(), torch.full((20,), float("nan")).numpy(), torch.rand(20).numpy(), 0)


@pytest.mark.parametrize(("head", "layer", "read", "meaningful"), [
    ("regression", 0, 1, True), ("regression", 1, 1, False), ("token", 0, 1, True), ("token", 1, 1, False), ("token", 2, 1, False),
    ("conditioned", 0, 1, True), ("conditioned", 1, 1, False)])
def test_a_clamped_neuron_reaches_the_report_only_from_a_block_before_the_one_read(head, layer, read, meaningful):
    config = SimpleNamespace(head_type=head)
    assert head_class(head)(config).report_path(layer, read)[0] is meaningful


@pytest.mark.parametrize(("layer", "read", "meaningful", "words"), [
    (0, 1, True, "through the residual stream"), (1, 1, False, "target's own block"), (2, 1, False, "before the target")])
def test_a_token_head_without_a_prompt_reports_at_the_labelled_token_and_its_note_says_so(layer, read, meaningful, words):
    # with prompt_suffix "" the report is read where the neuron is set: its write reaches the report up the same residual
    # stream as a regression head's, not through attention, and reading the target's own block reads the write trivially
    config = SimpleNamespace(head_type="token", prompt_suffix="")
    ok, note = head_class("token")(config).report_path(layer, read)
    assert ok is meaningful
    assert note.startswith("Token head without a prompt: the report is read at the labelled token itself.")
    assert words in note and "attention" not in note
    prompted = head_class("token")(SimpleNamespace(head_type="token", prompt_suffix="\nNeuron {neuron} level:"))
    assert "attention" in prompted.report_path(0, 1)[1]


def test_the_conditioned_heads_direction_depends_on_the_query_and_it_says_where_to_get_it(tiny):
    predictor = _predictor(tiny, "conditioned")
    with pytest.raises(ValueError, match="neuron_head.directions"):
        predictor.head.direction(predictor.neuron_head, 0)
    queries = predictor.head.queries(predictor)
    assert predictor.neuron_head.directions(queries).shape == (1, predictor.base.config.hidden_size)


def test_the_token_head_has_no_weight_direction_to_align(tiny):
    predictor = _predictor(tiny, "token")
    with pytest.raises(ValueError, match="no head weight vector"):
        predictor.head.direction(None, 0)


def test_the_regression_heads_direction_is_its_row_and_an_mlp_head_has_none(tiny):
    predictor = _predictor(tiny, "regression")
    direction, how = predictor.head.direction(predictor.neuron_head, 0)
    assert torch.equal(torch.as_tensor(direction), predictor.neuron_head.weight[0].detach().double())
    assert how["source"] == "regression head row"
    mlp = _predictor(tiny, "regression", head_hidden_size=8)
    with pytest.raises(ValueError, match="not a linear map"):
        mlp.head.direction(mlp.neuron_head, 0)


def test_each_head_names_itself_and_its_bins_and_report_tokens_in_the_model_card(tiny):
    regression, classification, token, conditioned = (_predictor(tiny, head) for head in HEAD_TYPES[:4])
    assert regression.head.card_words(regression) == "regression"
    assert conditioned.head.card_words(conditioned) == "conditioned (any neuron; weights query, nsr_hf.modeling.neuron_queries)"
    assert classification.head.card_words(classification).startswith("classification over 10 ")
    assert f"report tokens {token.config.report_tokens}" in token.head.card_words(token)
    assert "through the final norm" in regression.head.reads_in_words(regression)
    assert "the model's own next token" in token.head.reads_in_words(token)


def test_the_heads_module_keeps_the_parameter_names_of_saved_predictors(tiny):
    predictor = _predictor(tiny, "classification")
    assert {"neuron_head.weight", "neuron_head.bias"} <= set(predictor.state_dict())
    assert _predictor(tiny, "token").neuron_head is None
