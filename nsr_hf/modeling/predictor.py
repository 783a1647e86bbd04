"""``ActivationPredictor``: a causal LM plus a head that reports the model's own neurons.

Three heads (``nsr_hf.modeling.heads``, which owns each head's module, logits, loss and readouts):

* ``regression``: a linear layer (or a small MLP) on the representation, trained on z-scored targets,
  K neurons at once.
* ``classification``: logits over ``num_bins`` bins per neuron (quantile, equal-width or k-means edges
  fitted on the training split; each bin reports its train mean), cross-entropy with optional class weights.
* ``token``: the model's own LM head emits the report. The prompt is the text up to the labelled token
  followed by a suffix that names the neuron (``"\\nNeuron 12.345 level:"``); the next token is one of
  the report tokens (digits by default). Loss: cross-entropy restricted to the report tokens, optionally
  plus the squared error of the expected value. Readouts: the greedy token and the expected value.

The representation the regression and classification heads read is the residual stream after block
``read_layer`` passed through the model's final norm, at the labelled token (``label_positions`` from the
dataset, else the position rule). The default ``read_layer`` (the last block) is exactly what the LM head
sees; a lower ``read_layer`` runs only the blocks up to it.

Predictions come back in activation units: the label transform fitted on the training split (z-score
statistics, bin edges and bin centres) is part of the config and is saved with the model.

>>> predictor = ActivationPredictor.from_base("smollm2-135m", neurons=["12.345"], head_type="regression",
...                                           label_transform={"mean": [0.1], "std": [0.5]})
>>> predictor.predict(["Some text"])   # tensor of shape (1, 1), activation units
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from nsr_hf.architectures import num_layers
from nsr_hf.capture import Neuron, encode_texts, validate_neuron
from nsr_hf.data.labels import bins_of, centers_of, unzscore_of, zscore_of
from nsr_hf.errors import UserError, looks_local
from nsr_hf.methods import headline_table, verdicts
from nsr_hf.modeling.heads import HEAD_TYPES, Head, TokenHead, head_class, read_residual
from nsr_hf.models import fuse_kernels, load_model_and_tokenizer, model_loading
from nsr_hf.report_tokens import DEFAULT_PROMPT_SUFFIX
from nsr_hf.version import __version__

logger = logging.getLogger(__name__)

__all__ = ["HEAD_TYPES", "ActivationPredictor", "ActivationPredictorConfig", "ActivationPredictorOutput", "load_predictor",
           "save_predictor"]


def asked_labels(labels: torch.Tensor, asked: Optional[torch.Tensor]) -> torch.Tensor:
    """``labels`` (batch, K) as the loss sees them: each row's asked neuron's label (batch, 1) when ``asked`` is given."""
    if asked is None:
        return labels
    return labels.reshape(labels.shape[0], -1).gather(1, asked.long().reshape(-1, 1).to(labels.device))


class ActivationPredictorConfig(PretrainedConfig):
    """Configuration of an ``ActivationPredictor``.

    Args:
        base_model_name_or_path: the base causal LM (Hub id, folder or ``smollm2-135m``), for provenance
            and for loading a PEFT adapter onto it.
        base_config: the base model's config as a dict (the base weights are saved with the predictor).
        neurons: target neurons as ``"layer.index"`` strings (K of them; the token head takes one).
        read_layer: the block whose output (through the final norm) the head reads; ``None`` = last.
        position: the labelled token when the batch gives no ``label_positions``: ``"last"`` or an int.
        head_type: a registered head (``nsr_hf.modeling.heads.HEADS``): ``"regression"``, ``"classification"`` or ``"token"``.
        head_hidden_size: 0 for a linear head, else the hidden width of a two-layer MLP head.
        num_bins: bins per neuron for the classification and token heads (at least 2).
        class_weights: optional per-bin weights for the cross-entropy.
        report_tokens / report_token_ids: the token head's report tokens, one per bin, each a single token.
        prompt_suffix / prompt_suffix_ids: the token head's suffix (``{neuron}`` is filled in) and its ids.
        expected_value_loss_weight: weight of the squared error of the expected value (token head).
        label_transform: fitted on the training split: ``mean``, ``std`` (K each), ``bin_edges``
            (K lists of num_bins+1), optional ``bin_centers`` (K lists of num_bins; default midpoints).
        intervention: ``None`` (trained on natural rows only) or how intervention training set the neuron
            (``nsr_hf.training.interventions``): ``rate``, ``source``, ``shift_scale``, ``seed`` and ``values`` (the fitted
            ``CounterfactualValues.to_dict()``); the faithfulness evaluation draws its counterfactual rows from the same source.
        conditioning: the conditioned head's query (``nsr_hf.modeling.neuron_queries``): ``"weights"`` (the neuron's own
            weights), ``"weights+inputs"`` (also computing the neuron again from its input weights: the shortcut) or ``"name"``
            (a random vector seeded by its name: the control). Other heads ignore it.
        query_tokens: how many soft-prompt embeddings name the neuron in the conditioned token head's prompt
            (``nsr_hf.modeling.neuron_queries.QueryTokens``). Other heads ignore it.
    """

    model_type = "nsr_activation_predictor"

    def __init__(
        self,
        base_model_name_or_path: Optional[str] = None,
        base_config: Optional[dict] = None,
        neurons: Optional[list] = None,
        read_layer: Optional[int] = None,
        position="last",
        head_type: str = "regression",
        head_hidden_size: int = 0,
        num_bins: int = 10,
        class_weights: Optional[list] = None,
        report_tokens: Optional[list] = None,
        report_token_ids: Optional[list] = None,
        prompt_suffix: str = DEFAULT_PROMPT_SUFFIX,
        prompt_suffix_ids: Optional[list] = None,
        expected_value_loss_weight: float = 0.0,
        label_transform: Optional[dict] = None,
        dataset_name: Optional[str] = None,
        intervention: Optional[dict] = None,
        conditioning: str = "weights",
        query_tokens: int = 2,
        **kwargs,
    ):
        head_class(head_type)  # an unknown head is refused before anything else
        if int(num_bins) < 2:
            raise ValueError(f"num_bins must be at least 2, got {num_bins}.")
        self.base_model_name_or_path = base_model_name_or_path
        self.base_config = base_config
        self.neurons = [str(Neuron.parse(n)) for n in (neurons or [])]
        self.read_layer = read_layer
        self.position = position
        self.head_type = head_type
        self.head_hidden_size = int(head_hidden_size)
        self.num_bins = int(num_bins)
        self.class_weights = class_weights
        self.report_tokens = report_tokens
        self.report_token_ids = report_token_ids
        self.prompt_suffix = prompt_suffix
        self.prompt_suffix_ids = prompt_suffix_ids
        self.expected_value_loss_weight = float(expected_value_loss_weight)
        self.label_transform = label_transform
        self.dataset_name = dataset_name
        self.intervention = intervention
        self.conditioning = conditioning
        self.query_tokens = int(query_tokens)
        super().__init__(**kwargs)
        if base_config is not None:
            base = self.get_base_config()
            if read_layer is not None and not (isinstance(read_layer, int) and 0 <= read_layer < num_layers(base)):
                raise ValueError(f"read_layer {read_layer!r} is out of range: the base model has layers 0..{num_layers(base) - 1}.")
            for n in self.neurons:
                validate_neuron(base, n)
        self.head.check_config()

    def get_base_config(self) -> PretrainedConfig:
        config = dict(self.base_config)
        return AutoConfig.for_model(config.pop("model_type"), **config)

    @property
    def target_neurons(self) -> list[Neuron]:
        return [Neuron.parse(n) for n in self.neurons]

    @property
    def head(self) -> Head:
        """The head this config names (``nsr_hf.modeling.heads``)."""
        return head_class(self.head_type)(self)

    @property
    def effective_read_layer(self) -> int:
        return num_layers(self.get_base_config()) - 1 if self.read_layer is None else self.read_layer


@dataclass
class ActivationPredictorOutput(ModelOutput):
    """``predictions``: (batch, K) in activation units (the expected value for bins and tokens);
    ``greedy_predictions``: the centre of the most likely bin (bins and tokens); ``logits``: the head's
    raw output ((batch, K) z-scores, or (batch, K, bins) bin logits; for the token head K = 1 and the bins are the
    report tokens)."""

    loss: Optional[torch.Tensor] = None
    predictions: Optional[torch.Tensor] = None
    greedy_predictions: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


class ActivationPredictor(PreTrainedModel):
    """A causal LM and a head that reports the LM's own neurons (see the module docstring)."""

    config_class = ActivationPredictorConfig
    base_model_prefix = "predictor"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # Float labels with a **kwargs forward would make Trainer count tokens from them (PITFALLS HF-4).
    accepts_loss_kwargs = False

    def __init__(self, config: ActivationPredictorConfig):
        super().__init__(config)

        self.base = AutoModelForCausalLM.from_config(config.get_base_config())
        fuse_kernels(self.base)
        # the head's own module keeps the name `neuron_head`, so that saved predictors keep their parameter names
        self.neuron_head = config.head.build(self.base.config.hidden_size)
        self.tokenizer = None  # attached by from_base / load_predictor, used by predict()
        self.post_init()

    @property
    def head(self) -> Head:
        """The head (``nsr_hf.modeling.heads``): its logits, loss, readouts, trainable parameters and the rest."""
        return self.config.head

    def _init_weights(self, module):
        # Only the head is ours; the base model's weights come from the base checkpoint.
        if self.neuron_head is not None and any(module is m for m in self.neuron_head.modules()) and isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_base(
        cls,
        base,
        tokenizer=None,
        *,
        neurons,
        head_type: str = "regression",
        read_layer: Optional[int] = None,
        position="last",
        label_transform: Optional[dict] = None,
        num_bins: int = 10,
        head_hidden_size: int = 0,
        class_weights: Optional[list] = None,
        report_tokens: Optional[Sequence[str]] = None,
        prompt_suffix: str = DEFAULT_PROMPT_SUFFIX,
        expected_value_loss_weight: float = 0.0,
        dataset_name: Optional[str] = None,
        conditioning: str = "weights",
        query_tokens: int = 2,
    ) -> "ActivationPredictor":
        """A predictor around a base causal LM (a loaded model or a name for ``load_model_and_tokenizer``)."""

        name = base if isinstance(base, str) else getattr(base, "name_or_path", None)
        if isinstance(base, str):
            base, tokenizer = load_model_and_tokenizer(base)
        if isinstance(neurons, (str, Neuron)):
            neurons = [neurons]
        neurons = [str(validate_neuron(base, n)) for n in neurons]
        if label_transform and label_transform.get("bin_edges"):
            num_bins = len(label_transform["bin_edges"][0]) - 1
        derived = {"report_tokens": report_tokens, "report_token_ids": None, "prompt_suffix_ids": None}
        derived.update(head_class(head_type).prepare(tokenizer=tokenizer, neurons=neurons, label_transform=label_transform,
                                                     num_bins=num_bins, report_tokens=report_tokens, prompt_suffix=prompt_suffix))
        config = ActivationPredictorConfig(
            base_model_name_or_path=name,
            base_config=base.config.to_dict(),
            neurons=neurons,
            read_layer=read_layer,
            position=position,
            head_type=head_type,
            head_hidden_size=head_hidden_size,
            num_bins=num_bins,
            class_weights=class_weights,
            prompt_suffix=prompt_suffix,
            **derived,
            expected_value_loss_weight=expected_value_loss_weight,
            label_transform=label_transform or {"mean": [0.0] * len(neurons), "std": [1.0] * len(neurons)},
            dataset_name=dataset_name,
            conditioning=conditioning,
            query_tokens=query_tokens,
        )
        predictor = cls(config)
        predictor.base.load_state_dict(base.state_dict())
        predictor.tokenizer = tokenizer
        if predictor.head.any_neuron:  # from the weights as they are now (ConditionedHead.queries)
            predictor.head.queries(predictor)
            predictor.head.inputs(predictor)
        return predictor.eval()

    def retarget(self, neurons, label_transform: Optional[dict] = None) -> "ActivationPredictor":
        """This predictor reporting ``neurons`` instead (a head that reports any neuron: ``conditioned``): a view that shares
        every parameter, with its own config. ``label_transform`` (those neurons' train statistics) serves only the loss;
        the reports never read it, so a neuron the head never trained on is reported from its query alone."""
        if not self.head.any_neuron:
            raise ValueError(f"The {self.config.head_type} head reports the neurons it was built for ({', '.join(self.config.neurons)}): "
                             "only the conditioned head (head_type 'conditioned') can be pointed at other neurons.")
        if isinstance(neurons, (str, Neuron)):
            neurons = [neurons]
        base_config = self.config.get_base_config()
        neurons = [str(validate_neuron(base_config, n)) for n in neurons]
        view = copy.copy(self)  # the same modules (nn.Module keeps them in a dict that the copy shares)
        config = copy.deepcopy(self.config)
        config.neurons = neurons
        config.label_transform = self.head.retargeted_transform(neurons, label_transform)
        view.config = config
        view.head.queries(view)
        view.head.inputs(view)
        return view

    @torch.no_grad()
    def init_head_from_probe(self, train_rows, validation_rows=None, batch_size: int = 32, features=None) -> dict:
        """Set the regression head to the closed-form ridge probe of its own representation (``nsr_hf.evaluation.baselines.RidgeProbe``,
        alpha chosen on ``validation_rows`` or by GCV), fitted on ``train_rows`` (an activation dataset split): linear
        probing before fine-tuning (LP-FT, Kumar et al. 2022), so that fine-tuning starts from the best linear readout
        of the frozen model instead of a random head, and does not distort the features to fit a random head.
        Returns the probe's alphas and validation R^2 per neuron. Regression heads with a linear head only.

        ``features``: ``(train, validation)`` arrays of that representation already computed (the pipeline computes them once
        for the head and the evaluation's probes of the original model, whose weights these still are); else computed here."""

        return self.head.init_from_probe(self, train_rows, validation_rows, batch_size, features)

    # -- label transform -------------------------------------------------------------------------

    def zscore(self, values: torch.Tensor) -> torch.Tensor:
        """z-scores (float32) of ``values`` (batch, K) with the train mean and std: ``nsr_hf.data.labels.zscore_of``."""
        transform = self.config.label_transform
        return zscore_of(values, transform["mean"], transform["std"])

    def unzscore(self, z: torch.Tensor) -> torch.Tensor:
        """Activation values from z-scores: the inverse of ``zscore`` (the regression head's readout)."""
        transform = self.config.label_transform
        return unzscore_of(z, transform["mean"], transform["std"])

    def bin_of(self, values: torch.Tensor) -> torch.Tensor:
        """Bin index of each value, (batch, K), by the train-fitted edges: ``nsr_hf.data.labels.bins_of``
        (``edges[i] <= v < edges[i+1]``; the last bin includes its upper edge, values beyond the edges fall in the end bins)."""
        return bins_of(values, self.config.label_transform["bin_edges"])

    def bin_centers(self, ref: torch.Tensor) -> torch.Tensor:
        """(K, bins) activation value that each bin reports (``nsr_hf.data.labels.centers_of``), float32 on ``ref``'s device."""
        transform = self.config.label_transform
        return torch.as_tensor(centers_of(transform["bin_edges"], transform.get("bin_centers")), dtype=torch.float32, device=ref.device)

    # -- forward ---------------------------------------------------------------------------------

    def representation(self, input_ids, attention_mask=None, label_positions=None) -> torch.Tensor:
        """(batch, hidden): the final-normed residual stream after ``read_layer`` at the labelled token."""
        return read_residual(self, input_ids, attention_mask, label_positions)

    def report_prompts(self, input_ids, attention_mask, label_positions=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The token head's prompts: each text up to its labelled token, then the suffix (right-padded)."""
        return TokenHead(self.config).prompts(self, input_ids, attention_mask, label_positions)

    def report_logits(self, input_ids, attention_mask=None, label_positions=None) -> torch.Tensor:
        """(batch, bins): the LM head's logits of the report tokens after the prompt (``TokenHead.report_logits``). Only
        those rows of the output embedding are multiplied, never the full vocabulary. With the default ``read_layer``
        (the last block) these are the model's own next-token logits; a lower ``read_layer`` is an early exit: blocks
        ``0..read_layer``, the final norm and the LM head (the logit lens), which free generation does not use."""
        return TokenHead(self.config).report_logits(self, input_ids, attention_mask, label_positions)

    def forward(self, input_ids, attention_mask=None, label_positions=None, labels=None, asked=None, **kwargs) -> ActivationPredictorOutput:
        """``labels``: (batch, K) neuron values in activation units; the head's loss is computed from them
        through the saved label transform (``head_loss``). ``asked``: (batch,) for a head that asks one neuron per prompt
        (``conditioned_token``), the index among the current neurons of the one each row asks about: the output is that
        neuron's report only (batch, 1), and the loss is against that neuron's label (``asked_labels``)."""
        output = self.head_forward(input_ids, attention_mask, label_positions, asked=asked)
        if labels is not None:
            output.loss = self.head_loss(output, asked_labels(labels, asked))
        return output

    def head_forward(self, input_ids, attention_mask=None, label_positions=None, asked=None) -> ActivationPredictorOutput:
        """The head's output without a loss: ``predictions`` (expected value) and, for bins, ``greedy_predictions``."""
        head = self.head
        if asked is not None and not head.asks_one_neuron:
            raise ValueError(f"The batch says which neuron each row asks about ('asked'), but the {self.config.head_type} head reports "
                             "every neuron of each row: only the conditioned token head asks one per prompt. Drop the 'asked' column.")
        logits = head.logits(self, input_ids, attention_mask, label_positions, **({"asked": asked} if asked is not None else {}))
        predictions, greedy = head.readouts(self, logits)
        return ActivationPredictorOutput(predictions=predictions, greedy_predictions=greedy, logits=logits)

    def head_loss(self, output: ActivationPredictorOutput, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of ``output`` (from ``head_forward``) against ``labels`` (batch, K) in activation
        units: MSE on z-scores (regression), cross-entropy over the train-fitted bins (classification and token,
        plus the optional expected-value term)."""
        return self.head.loss(self, output, labels.float().reshape(output.logits.shape[0], -1))

    # -- convenience -----------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, texts: Sequence[str], tokenizer=None, batch_size: int = 16, max_length: Optional[int] = None,
                greedy: bool = False) -> torch.Tensor:
        """Predicted neuron values (activation units) for ``texts``, shape (len(texts), K), read at the
        position rule's token (``"last"`` by default). ``greedy`` returns the most likely bin's value."""
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise ValueError("predict() needs a tokenizer: pass tokenizer= or load the predictor with load_predictor().")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            batch = encode_texts(tokenizer, texts[start : start + batch_size], max_length=max_length)
            result = self(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            out.append((result.greedy_predictions if greedy and result.greedy_predictions is not None else result.predictions).cpu())
        self.train(was_training)
        return torch.cat(out)

    def model_card(self, metrics: Optional[dict] = None) -> str:
        """A model card (README.md) naming the base model, the neurons, the head, the dataset and metrics.

        ``metrics``: simple figures (``{split: {name: value}}``; default ``self.evaluation_results``), shown as a
        table; or the full evaluation of ``nsr_hf.evaluation.protocol.run_evaluate`` (default ``self.evaluation`` when it is
        set), shown as its headline table (every method's R², r with intervals, MSE) with the comparisons' verdicts.
        """
        c = self.config
        base = c.base_model_name_or_path or c.base_config.get("_name_or_path", "unknown")
        source = (c.base_config or {}).get("nsr_hf_source")
        quant = f"\n- Base weights: {source['quantization']} ({source['package']}/{source['file']})" if source else ""
        evaluation = getattr(self, "evaluation", None)
        if isinstance(metrics, dict) and metrics.get("kind") == "nsr_hf.evaluation.protocol":
            evaluation, metrics = metrics, None
        metrics = metrics if metrics is not None else getattr(self, "evaluation_results", None)
        lines = [
            "---",
            "library_name: transformers",
            "tags: [nsr_hf, neuron-self-report, interpretability]",
            f"base_model: {base}" if "/" in str(base) and not str(base).startswith("/") else "",
            "---",
            f"# Neuron self-report: {', '.join(c.neurons)} of {base}",
            "",
            f"This model reads out MLP neuron(s) **{', '.join(c.neurons)}** (layer.index: a coordinate of the MLP hidden activation) "
            f"of its own base model, **{base}**, with a **{c.head_type}** head.",
            "",
            f"- Base model: `{base}`{quant}",
            f"- Target neuron(s): {', '.join(c.neurons)}",
            f"- Head: {self.head.card_words(self)}",
            f"- Reads: {self.head.reads_in_words(self)}",
            *([f"- Training: intervention training (rate {c.intervention['rate']}, source {c.intervention['source']}): that share of "
               "training rows had the neuron set to a value its context does not predict and were labelled with it"]
              if c.intervention else []),
            f"- Dataset: {c.dataset_name or 'not recorded'}",
            f"- Made with nsr_hf {__version__}",
        ]
        if evaluation:
            lines += ["", "## Evaluation", "", f"Neuron {evaluation.get('neuron')}, against baselines and controls on the same rows "
                      "(activation units; intervals: percentile bootstrap over rows). R² below 0 is worse than predicting the mean."]
            for split in evaluation.get("splits") or list(evaluation.get("metrics") or {}):
                rows = (evaluation.get("rows") or {}).get(split)
                lines += ["", f"### {split}" + (f" ({rows} rows)" if rows else ""), "", headline_table(evaluation, split), ""]
                lines += [f"- {v}" for v in verdicts(evaluation, split)]
        if metrics:
            lines += ["", "## Metrics at the end of training" if evaluation else "## Evaluation", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in _flat(metrics).items()]
        lines += ["", "```python", "import nsr_hf", "from nsr_hf.modeling.predictor import load_predictor",
                  "predictor = load_predictor(PATH_OR_REPO)",
                  "predictor.predict(['Some text'])", "```", ""]
        return "\n".join(line for line in lines if line is not None)

    def push_to_hub(self, repo_id: str, *, private: Optional[bool] = None, token: Optional[str] = None,
                    commit_message: str = "Upload nsr_hf activation predictor", revision: Optional[str] = None,
                    create_pr: bool = False, **kwargs):
        """Push the saved predictor with its model card. ``PreTrainedModel.push_to_hub`` would replace our
        README.md with a generic card, so the folder ``save_pretrained`` writes is uploaded as it is."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                     revision=revision, create_pr=create_pr)

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            Path(save_directory, "README.md").write_text(self.model_card())
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(save_directory)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, str)):
            out[f"{prefix}{k}"] = v
    return out


AutoConfig.register(ActivationPredictorConfig.model_type, ActivationPredictorConfig)
AutoModel.register(ActivationPredictorConfig, ActivationPredictor)


# -- saving and loading, with or without a PEFT adapter ------------------------------------------


def save_predictor(model, save_directory: str, merge: bool = False) -> str:
    """Save a predictor, or a PEFT-wrapped one as adapter + head (``merge=False``) or merged weights.

    An adapter folder also holds the predictor's config; ``load_predictor`` rebuilds the base model from
    ``base_model_name_or_path`` and applies the adapter.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        inner = model.get_base_model()
        if merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(save_directory)
            return save_directory
        model.save_pretrained(save_directory)
        inner.config.save_pretrained(save_directory)
        Path(save_directory, "README.md").write_text(inner.model_card())
        if inner.tokenizer is not None:
            inner.tokenizer.save_pretrained(save_directory)
        return save_directory
    model.save_pretrained(save_directory)
    return save_directory


def check_compare_neurons(path: str, reported, wanted) -> None:
    """Refuse a ``compare_predictor`` (at ``path``) that does not report every neuron in ``wanted``: it is scored on the same
    counterfactual rows of each of them. ``reported``: its neurons (``None``: not known here, nothing is refused)."""
    if reported is None:
        return
    have = {str(n) for n in reported}
    missing = [str(n) for n in wanted if str(n) not in have]
    if missing:
        raise ValueError(f"compare_predictor {str(path)!r} reports {', '.join(sorted(have)) or 'no neuron'}, not {', '.join(missing)}: "
                         "it is scored on the same counterfactual rows, so give a predictor of the same neuron(s) (the plainly "
                         "trained run of this neuron: <its output_dir>/predictor).")


def saved_neurons(path: str) -> list[str] | None:
    """The neurons a local predictor folder reports (its ``config.json``), read without loading it; None for a Hub id or a
    folder without one."""
    import json

    config = Path(str(path)).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        neurons = json.loads(config.read_text()).get("neurons")
    except (OSError, ValueError, AttributeError):
        return None  # not ours to judge here: loading it says what is wrong
    return [str(n) for n in neurons] if isinstance(neurons, list) else None


def check_predictor_config(folder: Path) -> None:
    """Refuse a local folder whose ``config.json`` is another model's (the base model given as the predictor)."""
    import json

    config_file = folder / "config.json"
    if not config_file.is_file() or (folder / "adapter_config.json").exists():
        return
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError) as err:
        raise UserError(f"predictor {str(folder)!r}: its config.json is not valid JSON ({err}); save the predictor again.") from err
    if model_type != ActivationPredictorConfig.model_type:
        raise UserError(f"{str(folder)!r} holds a {model_type!r} model, not an nsr_hf predictor "
                        f"({ActivationPredictorConfig.model_type!r}): give the predictor folder nsr train wrote "
                        "(<output_dir>/predictor), not the base model's.")


def load_predictor(path: str, device=None, trust_remote_code: bool = False):
    """Load a predictor saved by ``save_pretrained`` / ``save_predictor`` (a folder or a Hub id), with its
    tokenizer when one was saved. Safetensors only; no code from the checkpoint is ever run."""
    from transformers import AutoTokenizer

    if trust_remote_code:
        raise ValueError("nsr_hf never runs code from a checkpoint; predictors load without trust_remote_code.")
    folder = Path(path)
    # a path that is not there (``out/nothere`` when out/ exists, ``./x``) is never tried as a Hub id
    local = looks_local(path) or str(path).count("/") != 1
    if local and not (folder / "config.json").exists() and not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"No predictor in {path!r}: expected a folder written by nsr train (<output_dir>/predictor) or "
                                "save_predictor, holding config.json or adapter_config.json; or a Hub id 'owner/name'.")
    check_predictor_config(folder)
    is_adapter = (folder / "adapter_config.json").exists()
    with model_loading(str(path), "predictor"):
        if is_adapter:
            from peft import PeftModel

            config = ActivationPredictorConfig.from_pretrained(path)
            base, tokenizer = load_model_and_tokenizer(config.base_model_name_or_path)
            predictor = ActivationPredictor(config)
            predictor.base.load_state_dict(base.state_dict())
            model = PeftModel.from_pretrained(predictor, path)
            inner = predictor
        else:
            model = inner = ActivationPredictor.from_pretrained(path, use_safetensors=True)
            tokenizer = None
    try:
        inner.tokenizer = AutoTokenizer.from_pretrained(path)
        if inner.tokenizer.pad_token is None:
            inner.tokenizer.pad_token = inner.tokenizer.eos_token
    except (OSError, ValueError, TypeError):
        inner.tokenizer = tokenizer
    if device is not None:
        model.to(device)
    return model.eval()


