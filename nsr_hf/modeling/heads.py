"""The heads of an ``ActivationPredictor``: one class per head, and the registry that names them.

* ``regression`` (``RegressionHead``): a linear layer (or a small MLP) on the representation, trained on z-scored
  targets, K neurons at once.
* ``classification`` (``ClassificationHead``): logits over ``num_bins`` bins per neuron (edges fitted on the training
  split; each bin reports its train mean), cross-entropy with optional class weights.
* ``token`` (``TokenHead``): the model's own LM head emits the report after a prompt (the text up to the labelled
  token, then a suffix that names the neuron); cross-entropy over the report tokens, optionally plus the squared
  error of the expected value.
* ``conditioned`` (``ConditionedHead``): one reporter for any neuron. The neuron is an input, its *query*
  (``nsr_hf.modeling.neuron_queries``: its own weights, or its name as the control); the report is in activation
  units, trained with the squared error of z-scores. ``ActivationPredictor.retarget`` points it at other neurons,
  including ones it never trained on.
* ``conditioned_token`` (``ConditionedTokenHead``): the token head for any neuron. The report prompt names the neuron
  with a few soft-prompt embeddings made from its query (``QueryTokens``), and the model's LM head answers with a bin's
  report token; the bins are shared by every neuron (activation units, fitted on the train neurons' pooled values:
  ``nsr_hf.data.labels.shared_bins``), so a neuron never seen is reported on the same scale. One prompt per (row,
  neuron): a training row asks about one neuron (the batch's ``asked``), an evaluation asks about every current one.

A head owns everything that differs between heads: the module it adds (kept as the predictor's ``neuron_head``, so
saved predictors keep their parameter names), its logits from what it reads, its loss, its readouts in activation
units, the parameters it trains, the offset between a row's labelled token and that token in the sequence the head
runs, whether a clamped neuron can reach its report, its weight direction, whether bin metrics apply, its words in the
model card, and its checks of a predictor's and a training recipe's settings. The rest of the package asks the head
(``predictor.head``, or ``head_class(name)`` before a predictor exists).

Adding a head: subclass ``Head`` here, decorate it with ``@register_head``, and test it in ``tests/test_heads.py``.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import numpy as np
import torch
from torch import nn

from nsr_hf.architectures import arch_spec, labelled_token_block, num_layers, truncated
from nsr_hf.capture import label_positions as rule_positions
from nsr_hf.capture import pad_right, position_ids_from_mask
from nsr_hf.data.labels import bins_of, with_shared_bins
from nsr_hf.modeling.neuron_queries import (
    ConditionedReadout,
    NeuronInputs,
    QueryTokens,
    check_conditioning,
    neuron_queries,
    query_parts,
)
from nsr_hf.modeling.probes import RidgeProbe, labels_of, layer_features
from nsr_hf.report_tokens import DEFAULT_PROMPT_SUFFIX, check_report_tokens, default_report_tokens

HEADS: dict[str, type["Head"]] = {}


def register_head(cls: type["Head"]) -> type["Head"]:
    """Class decorator: make ``cls`` the head named ``cls.name`` (``head_type``) for the predictor and the recipes."""
    HEADS[cls.name] = cls
    return cls


def head_class(name: str) -> type["Head"]:
    """The head class registered as ``name``; a ValueError naming the registered heads otherwise."""
    if name not in HEADS:
        raise ValueError(f"Unknown head_type {name!r}: use one of {', '.join(HEADS)}.")
    return HEADS[name]


def lm_head_tied(base) -> bool:
    """Whether the causal LM's output embedding is its input embedding (training one trains the other)."""
    out, inp = base.get_output_embeddings(), base.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def labelled_positions(config, attention_mask: torch.Tensor, label_positions: Optional[torch.Tensor]) -> torch.Tensor:
    """(batch,) each row's labelled token: ``label_positions`` when given, else the config's position rule."""
    if label_positions is not None:
        return label_positions.long().reshape(-1)
    return rule_positions(attention_mask, config.position)


def read_residual(predictor, input_ids, attention_mask=None, label_positions=None) -> torch.Tensor:
    """(batch, hidden): the final-normed residual stream after ``read_layer`` at the labelled token."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    read = predictor.config.effective_read_layer
    at = labelled_positions(predictor.config, attention_mask, label_positions).to(input_ids.device)
    # the read block's MLP and query/output projections run at the labelled tokens only: its output elsewhere is never read
    with truncated(predictor.base, read), labelled_token_block(predictor.base, read, at):
        hidden = predictor.base.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask), use_cache=False
        ).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, at]


def bins_in_words(config) -> str:
    """The model card's words for the bins: how many, which strategy, where fitted, and what each reports."""
    t = config.label_transform or {}
    strategy = t.get("bin_strategy") or "unrecorded-strategy"
    reports = "each reports its train mean" if t.get("bin_centers") else "each reports the midpoint of its edges"
    return f"{config.num_bins} {strategy} bins (fitted on {t.get('fitted_on', 'an unrecorded split')}; {reports})"


class Head:
    """What every head answers (see the module docstring). ``config`` is the predictor's ``ActivationPredictorConfig``.

    Class attributes: ``name`` (the ``head_type``), ``has_bins`` (bins, a greedy readout and bin metrics),
    ``uses_lm_head`` (the report goes through the base model's LM head), ``takes_prompt`` (``prompt_suffix`` and
    ``expected_value_loss_weight`` apply), ``probe_init`` (``head_init: probe`` can set it), ``any_neuron`` (it reports
    any neuron it is given: ``ActivationPredictor.retarget``), ``asks_one_neuron`` (one prompt per (row, neuron): a batch
    may say which neuron each row asks about, ``asked``).
    """

    name: ClassVar[str] = ""
    any_neuron: ClassVar[bool] = False
    asks_one_neuron: ClassVar[bool] = False  # a batch's ``asked`` says which neuron each prompt asks about
    trains_prompt_input: ClassVar[bool] = False  # its module makes embeddings of the prompt (no frozen prefix to cache)
    reads_representation: ClassVar[bool] = False  # its logits are a function of the representation alone (``logits_from``)
    has_bins: ClassVar[bool] = False
    uses_lm_head: ClassVar[bool] = False
    takes_prompt: ClassVar[bool] = False
    probe_init: ClassVar[bool] = False

    def __init__(self, config):
        self.config = config

    # -- settings --------------------------------------------------------------------------------

    def check_config(self) -> None:
        """Refuse a predictor config this head cannot run (called by ``ActivationPredictorConfig``)."""

    @classmethod
    def prepare(cls, *, tokenizer, neurons: list[str], label_transform: Optional[dict], num_bins: int, report_tokens=None,
                prompt_suffix: str = DEFAULT_PROMPT_SUFFIX) -> dict:
        """The config fields this head derives when a predictor is built around a base model (``from_base``);
        a ValueError for settings it cannot use."""
        return {}

    @classmethod
    def check_training(cls, config) -> None:
        """Refuse a training recipe (``TrainConfig``) that sets what this head does not use (``head_type`` is ``cls.name``)."""
        if config.expected_value_loss_weight and not cls.takes_prompt:
            raise ValueError(f"expected_value_loss_weight applies to the token head only (head_type is {cls.name!r}): leave it at 0.")
        if config.prompt_suffix != DEFAULT_PROMPT_SUFFIX and not cls.takes_prompt:
            raise ValueError(f"prompt_suffix applies to the token head only (head_type is {cls.name!r}): leave it out.")
        if config.bin_strategy is not None and not cls.has_bins:
            raise ValueError("bin_strategy sets the bins of the classification and token heads; the regression head has none: "
                             "leave it out (over a recipe that sets it: --bin_strategy none).")
        if config.head_init == "probe" and not cls.probe_init:
            raise ValueError("head_init 'probe' initialises a regression head: use head_init 'random' for classification and token heads.")

    # -- parameters ------------------------------------------------------------------------------

    def build(self, hidden: int) -> Optional[nn.Module]:
        """The module the head adds on a representation of width ``hidden`` (``None``: it adds none)."""
        return None

    def trainable_prefixes(self, predictor) -> list[str]:
        """Parameter-name prefixes of the head in ``predictor`` (what ``head_only`` trains)."""
        return ["neuron_head."]

    def init_from_probe(self, predictor, train_rows, validation_rows=None, batch_size: int = 32, features=None) -> dict:
        """Set the head to the ridge probe of its representation (``ActivationPredictor.init_head_from_probe``)."""
        raise ValueError("init_head_from_probe needs a regression head that is one linear layer (head_hidden_size 0).")

    def retargeted_transform(self, neurons: list[str], label_transform: Optional[dict]) -> dict:
        """The label transform of a view of this any-neuron head that reports ``neurons`` (``ActivationPredictor.retarget``):
        ``label_transform`` (their train statistics, for the loss), else neutral ones."""
        return label_transform or {"mean": [0.0] * len(neurons), "std": [1.0] * len(neurons)}

    # -- forward ---------------------------------------------------------------------------------

    def logits(self, predictor, input_ids, attention_mask=None, label_positions=None) -> torch.Tensor:
        """The head's raw output for a batch (see ``ActivationPredictorOutput.logits``)."""
        raise NotImplementedError

    def logits_from(self, predictor, h: torch.Tensor) -> torch.Tensor:
        """The logits of a head that ``reads_representation`` from the representation ``h`` (batch, hidden) that ``read_residual``
        gives: several heads on one base can then share a forward pass (``nsr_hf.evaluation.causal.causal_tests``)."""
        raise ValueError(f"The {self.name} head does not read the representation alone: it has no logits_from.")

    def readouts(self, predictor, logits: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(expected value, greedy value or None)``, each (batch, K) in activation units."""
        raise NotImplementedError

    def loss(self, predictor, output, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of ``output`` against ``labels`` (batch, K) in activation units."""
        raise NotImplementedError

    def label_offset(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch,) how far left of its place in the batch each row's labelled token sits in the sequence this head
        runs through the blocks (0: the head runs the text itself)."""
        return torch.zeros(attention_mask.shape[0], dtype=torch.long, device=attention_mask.device)

    def read_rows(self, columns: dict) -> dict:
        """Text rows (``input_ids``, ``attention_mask``, ``label_position`` lists, unpadded) as this head runs them through
        the blocks, each ``label_position`` moved to the token whose state it reads (``reads_at``), for an outside reader of
        the same representation (``nsr_hf.evaluation.faithfulness``); the labelled token keeps its index, so a neuron set
        there is set as in the head's own pass. Default: the text itself, read at the labelled token (also the conditioned
        token head's: its prompt holds soft query embeddings, which rows of token ids cannot carry)."""
        return columns

    def reads_at(self) -> str:
        """Which token's state ``read_rows`` reads, in words."""
        return "the labelled token"

    # -- questions -------------------------------------------------------------------------------

    def report_path(self, layer: int, read: int) -> tuple[bool, str]:
        """``(meaningful, note)``: whether a clamped neuron of ``layer`` reaches the report, read at block ``read``,
        only through computation."""
        if read > layer:
            return True, (f"The head reads block {read}'s output, after the target layer {layer}: the clamped value reaches it through "
                          f"the residual stream and blocks {layer + 1}..{read}.")
        if read == layer:
            return False, (f"The head reads the output of block {layer}, the target's own block. That output is the residual stream plus "
                           "the MLP output, in which the neuron enters as activation x its output weight vector (w_out) with nothing "
                           "computed after it: clamping the neuron moves the representation by exactly (v - a) * w_out before the "
                           "final norm. The slope is then fixed by the head's weights alone (with a linear final norm it equals "
                           "head . (g * w_out) * std), i.e. by how well the readout aligns with w_out, which any linear probe of this "
                           "layer shares; it is not evidence that the model computes with or reports its neuron. Read a later layer.")
        return False, (f"The head reads block {read}, before the target layer {layer}: the intervention cannot reach the "
                       "representation and the slope is 0 by construction.")

    def direction(self, module: nn.Module, column: int) -> tuple[np.ndarray, dict]:
        """The head's weight vector for report column ``column`` in the representation basis, and how it was taken."""
        raise NotImplementedError

    def card_words(self, predictor) -> str:
        """The model card's "Head:" line."""
        return self.name

    def reads_in_words(self, predictor) -> str:
        """The model card's "Reads:" line: where the head reads, in words."""
        c = self.config
        return f"block {c.effective_read_layer} through the final norm, at the labelled token (rule: {c.position})"


def linear_weight(module: nn.Module, config) -> np.ndarray:
    """The weight matrix of a linear head; a ValueError for an MLP head, which has no single weight vector."""
    if not isinstance(module, nn.Linear):
        raise ValueError(  # noqa: TRY004 (a configuration the analysis cannot use, not a wrong argument type)
            f"The head is a {type(module).__name__} (head_hidden_size={config.head_hidden_size}), not a linear map: "
            "it has no single weight vector to align.")
    return module.weight.detach().double().cpu().numpy()


class ReadingHead(Head):
    """A head with its own module on the representation (``read_residual``): K x ``outputs_per_neuron`` outputs."""

    outputs_per_neuron: ClassVar[int] = 1

    def build(self, hidden: int) -> nn.Module:
        out = len(self.config.neurons) * self.outputs_per_neuron
        if self.config.head_hidden_size:
            return nn.Sequential(nn.Linear(hidden, self.config.head_hidden_size), nn.GELU(), nn.Linear(self.config.head_hidden_size, out))
        return nn.Linear(hidden, out)

    reads_representation = True

    def logits(self, predictor, input_ids, attention_mask=None, label_positions=None) -> torch.Tensor:
        return self.logits_from(predictor, read_residual(predictor, input_ids, attention_mask, label_positions))

    def logits_from(self, predictor, h: torch.Tensor) -> torch.Tensor:
        return predictor.neuron_head(h)


@register_head
class RegressionHead(ReadingHead):
    """Regression: (batch, K) z-scores, MSE against the z-scored labels; the readout undoes the z-score."""

    name = "regression"
    probe_init = True

    def readouts(self, predictor, logits):
        return predictor.unzscore(logits), None

    def loss(self, predictor, output, labels):
        return nn.functional.mse_loss(output.logits, predictor.zscore(labels))

    def direction(self, module, column):
        return linear_weight(module, self.config)[column], {"source": "regression head row"}

    @torch.no_grad()
    def init_from_probe(self, predictor, train_rows, validation_rows=None, batch_size: int = 32, features=None) -> dict:
        if not isinstance(predictor.neuron_head, nn.Linear):
            return super().init_from_probe(predictor, train_rows, validation_rows, batch_size, features)
        X, X_val = probe_features(predictor, train_rows, validation_rows, batch_size, features)
        mean, std = (np.asarray(self.config.label_transform[k], dtype=np.float64) for k in ("mean", "std"))
        info = {}
        head = predictor.neuron_head
        for j, name in enumerate(self.config.neurons):
            y = (labels_of(train_rows, j) - mean[j]) / std[j]
            y_val = None if X_val is None else (labels_of(validation_rows, j) - mean[j]) / std[j]
            probe = RidgeProbe().fit(X, y, X_val, y_val)
            head.weight[j] = torch.as_tensor(probe.coef_, dtype=head.weight.dtype, device=head.weight.device)
            head.bias[j] = float(probe.intercept_)
            info[name] = {"alpha": float(probe.alpha), "validation_r2": None if X_val is None else float(probe.val_r2)}
        return info


def probe_features(predictor, train_rows, validation_rows, batch_size: int, features) -> tuple[np.ndarray, np.ndarray | None]:
    """``(X, X_val or None)``: the head's representation of the train and validation rows, ``features`` when given (checked
    against the rows' number), else computed (``layer_features`` at the read layer)."""
    read = predictor.config.effective_read_layer
    has_validation = validation_rows is not None and len(validation_rows) > 0
    if features is not None:
        X, X_val = (np.asarray(f, dtype=np.float64) for f in features)
        if X.shape[0] != len(train_rows) or (has_validation and X_val.shape[0] != len(validation_rows)):
            raise ValueError(f"init_head_from_probe got features of {X.shape[0]} train and {X_val.shape[0]} validation rows for "
                             f"{len(train_rows)} and {len(validation_rows or [])}: give each split's features in its row order.")
        return X, (X_val if has_validation else None)
    X = layer_features(predictor.base, train_rows, [read], batch_size=batch_size, progress=False)[read]
    X_val = layer_features(predictor.base, validation_rows, [read], batch_size=batch_size, progress=False)[read] if has_validation else None
    return X, X_val


class BinHead(Head):
    """A head over the train-fitted bins: logits (batch, K, bins), cross-entropy; readouts are the expected bin value
    and the value of the most likely bin."""

    has_bins = True

    @classmethod
    def prepare(cls, *, tokenizer, neurons, label_transform, num_bins, report_tokens=None, prompt_suffix=DEFAULT_PROMPT_SUFFIX) -> dict:
        if not (label_transform and label_transform.get("bin_edges")):
            raise ValueError(f"The {cls.name} head needs bin edges: pass label_transform with 'bin_edges' fitted on the training split.")
        return {}

    def readouts(self, predictor, logits):
        centers = predictor.bin_centers(logits)  # (K, bins)
        probs = logits.float().softmax(-1)
        return (probs * centers).sum(-1), centers.gather(1, logits.argmax(-1).T).T

    def loss(self, predictor, output, labels):
        config, logits = self.config, output.logits
        weight = None if config.class_weights is None else torch.as_tensor(config.class_weights, dtype=torch.float32, device=logits.device)
        return nn.functional.cross_entropy(logits.reshape(-1, config.num_bins).float(), predictor.bin_of(labels).reshape(-1), weight=weight)

    def card_words(self, predictor) -> str:
        return f"{self.name} over {bins_in_words(self.config)}"


@register_head
class ClassificationHead(BinHead, ReadingHead):
    """Classification: ``num_bins`` logits per neuron from the representation."""

    name = "classification"

    @property
    def outputs_per_neuron(self) -> int:
        return self.config.num_bins

    def logits_from(self, predictor, h):
        logits = super().logits_from(predictor, h)
        return logits.reshape(logits.shape[0], len(self.config.neurons), self.config.num_bins)

    def direction(self, module, column):
        """The first principal direction of the neuron's per-bin rows (centred over bins), signed so that higher bins
        project higher; ``explained`` is its share of the rows' variance."""
        config = self.config
        rows = linear_weight(module, config).reshape(len(config.neurons), config.num_bins, -1)[column]
        centred = rows - rows.mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        direction = vt[0]
        if np.corrcoef(centred @ direction, np.arange(config.num_bins))[0, 1] < 0:
            direction = -direction
        explained = float(s[0] ** 2 / np.sum(s**2)) if np.sum(s**2) > 0 else None
        return direction, {"source": "first principal direction of the classification head's bin rows", "explained": explained}


@register_head
class TokenHead(BinHead):
    """Token: the model's own LM head, restricted to the report tokens (one per bin), after the report prompt.

    With the default ``read_layer`` (the last block) the logits are the model's own next-token logits; a lower
    ``read_layer`` is an early exit (blocks ``0..read_layer``, the final norm and the LM head: the logit lens)."""

    name = "token"
    uses_lm_head = True
    takes_prompt = True

    def check_config(self) -> None:
        if len(self.config.neurons) > 1:
            raise ValueError("The token head reports one neuron per prompt: give one neuron, or use the regression head for several.")

    @classmethod
    def prepare(cls, *, tokenizer, neurons, label_transform, num_bins, report_tokens=None, prompt_suffix=DEFAULT_PROMPT_SUFFIX) -> dict:
        super().prepare(tokenizer=tokenizer, neurons=neurons, label_transform=label_transform, num_bins=num_bins)
        if tokenizer is None:
            raise ValueError("The token head needs the tokenizer (report tokens and prompt).")
        # explicit tokens > the dataset's (stored with its label transform) > the tokenizer's default
        report_tokens = list(report_tokens or (label_transform or {}).get("report_tokens") or default_report_tokens(tokenizer, num_bins))
        if len(report_tokens) != num_bins:
            raise ValueError(f"{len(report_tokens)} report tokens for {num_bins} bins: give one per bin.")
        return {"report_tokens": report_tokens, "report_token_ids": check_report_tokens(tokenizer, report_tokens),
                "prompt_suffix_ids": tokenizer.encode(prompt_suffix.format(neuron=neurons[0]), add_special_tokens=False)}

    def trainable_prefixes(self, predictor) -> list[str]:
        # the LM head trains only when untied: a tied one is the input embedding, which moves every neuron
        base = predictor.base
        prefixes = [f"base.{arch_spec(base).final_norm}."]
        if not lm_head_tied(base):
            prefixes.append(f"base.{next(n for n, m in base.named_modules() if m is base.get_output_embeddings())}.")
        return prefixes

    def label_offset(self, attention_mask):
        # the report prompt starts at each row's first real token (prompts)
        return attention_mask.long().argmax(-1)

    def read_rows(self, columns: dict) -> dict:
        """The report prompts (``prompts``) as lists: each text up to its labelled token, then the suffix, read at its last token."""
        suffix = list(self.config.prompt_suffix_ids)
        if not suffix:
            return columns
        ids, masks = [], []
        for row, mask, position in zip(columns["input_ids"], columns["attention_mask"], columns["label_position"]):
            ids.append(list(row[: position + 1]) + suffix)
            masks.append(list(mask[: position + 1]) + [1] * len(suffix))
        return {"input_ids": ids, "attention_mask": masks, "label_position": [len(r) - 1 for r in ids]}

    def reads_at(self) -> str:
        if not self.config.prompt_suffix_ids:
            return "the labelled token (the head's prompt is the text up to it)"
        return "the last token of the head's prompt (text up to the labelled token, then the prompt suffix)"

    def prompts(self, predictor, input_ids, attention_mask, label_positions=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The report prompts: each text up to its labelled token, then the suffix (right-padded)."""
        positions = labelled_positions(self.config, attention_mask, label_positions)
        first = self.label_offset(attention_mask)
        suffix = torch.as_tensor(self.config.prompt_suffix_ids, dtype=input_ids.dtype, device=input_ids.device)
        rows = [torch.cat([input_ids[i, int(first[i]) : int(positions[i]) + 1], suffix]) for i in range(input_ids.shape[0])]
        pad = getattr(predictor.base.config, "pad_token_id", None)
        return pad_right(rows, 0 if pad is None else pad, dtype=input_ids.dtype, device=input_ids.device)

    def report_logits(self, predictor, input_ids, attention_mask=None, label_positions=None) -> torch.Tensor:
        """(batch, bins): the LM head's logits of the report tokens after the prompt. Only those rows of the output
        embedding are multiplied, never the full vocabulary."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids, mask = self.prompts(predictor, input_ids, attention_mask, label_positions)
        return answer_logits(predictor, mask, input_ids=ids)

    def logits(self, predictor, input_ids, attention_mask=None, label_positions=None):
        return self.report_logits(predictor, input_ids, attention_mask, label_positions)[:, None, :]

    def loss(self, predictor, output, labels):
        loss = super().loss(predictor, output, labels)
        weight = self.config.expected_value_loss_weight
        if weight:
            loss = loss + weight * nn.functional.mse_loss(predictor.zscore(output.predictions), predictor.zscore(labels))
        return loss

    def report_path(self, layer, read):
        if getattr(self.config, "prompt_suffix", None) == "":
            # no prompt: the report is the labelled token's own next token, read at the position where the neuron is set,
            # so the clamped value reaches it up that position's residual stream, as it reaches a regression head's
            meaningful, note = super().report_path(layer, read)
            return meaningful, f"Token head without a prompt: the report is read at the labelled token itself. {note}"
        return self.prompted_report_path(layer, read)

    @staticmethod
    def prompted_report_path(layer, read):
        """``report_path`` of a head that reads its report at the last token of a prompt after the labelled token."""
        if layer < read:
            return True, (f"Token head: the report is read at the prompt's last token after block {read}, which sees the labelled "
                          f"token's clamped neuron only through attention in blocks {layer + 1}..{read}.")
        if layer == read:
            return False, (f"Token head reading block {read}, the target's own block: the report is read at the prompt's last token, "
                           "and no later attention can carry the labelled token's MLP output there, so the slope is 0 by construction.")
        return False, (f"Token head reading block {read}, before the target layer {layer}: the intervention cannot reach the report, "
                       "so the slope is 0 by construction.")

    def direction(self, module, column):
        raise ValueError("The token head reports through the LM head: there is no head weight vector to align. "
                         "Use projection_analysis, activation_patching or direction_ablation instead.")

    def card_words(self, predictor) -> str:
        return f"{super().card_words(predictor)}, report tokens {self.config.report_tokens}"

    def reads_in_words(self, predictor) -> str:
        c = self.config
        last = c.effective_read_layer == num_layers(predictor.base) - 1
        how = ("the model's own next token" if last
               else f"an early exit: block {c.effective_read_layer}, the final norm and the LM head (the logit lens)")
        where = (f"after the prompt: the text up to the labelled token (rule: {c.position}), "
                 f"then {c.prompt_suffix.format(neuron=c.neurons[0])!r}"
                 if c.prompt_suffix else f"as the labelled token's own next token (rule: {c.position}), no question after it")
        return f"{how}, {where}"


def answer_logits(predictor, mask: torch.Tensor, input_ids=None, inputs_embeds=None) -> torch.Tensor:
    """(prompts, bins): the LM head's logits of the report tokens at each prompt's last real token, after blocks
    ``0..read_layer`` and the final norm (the prompts are right-padded: ``input_ids`` or ``inputs_embeds``)."""
    config = predictor.config
    with truncated(predictor.base, config.effective_read_layer):
        hidden = predictor.base.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask,
                                           position_ids=position_ids_from_mask(mask), use_cache=False).last_hidden_state
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(-1) - 1]
    lm_head = predictor.base.get_output_embeddings()
    report_ids = torch.as_tensor(config.report_token_ids, device=h.device)
    bias = None if getattr(lm_head, "bias", None) is None else lm_head.bias[report_ids]
    return nn.functional.linear(h, lm_head.weight[report_ids], bias)


def cached_queries(predictor) -> torch.Tensor:
    """(K, width) the current neurons' queries (``nsr_hf.modeling.neuron_queries``), computed once per neuron list from the
    base model's weights as they are then (``from_base`` and ``retarget`` compute them at once: a training step with the
    frozen-prefix cache has no blocks to read weights from) and kept on the predictor, outside its state dict."""
    config = predictor.config
    cache = predictor.__dict__.setdefault("_neuron_queries", {})
    key = (tuple(config.neurons), config.conditioning, str(next(predictor.base.parameters()).device))
    if key not in cache:
        cache[key] = neuron_queries(predictor.base, config.neurons, config.conditioning)
    return cache[key]


@register_head
class ConditionedHead(Head):
    """Conditioned: one reporter for any neuron (``nsr_hf.modeling.neuron_queries``). ``config.neurons`` are the neurons it
    reports now; their queries come from the base model's weights (or names) at every forward, so that ``retarget`` only
    changes the list. Logits are the reports in activation units; the loss is the squared error of z-scores (the current
    neurons' train statistics weigh them alike); the readout needs no statistics, so a neuron never seen reads the same."""

    name = "conditioned"
    any_neuron = True
    probe_init = True

    def check_config(self) -> None:
        check_conditioning(self.config.conditioning)
        if self.config.head_hidden_size:
            raise ValueError("The conditioned head is linear in the representation: leave head_hidden_size at 0.")

    @classmethod
    def check_training(cls, config) -> None:
        super().check_training(config)
        if config.head_init != "probe":
            raise ValueError("The conditioned head's mean and recompute weight are fitted in closed form and kept (only its read "
                             "direction trains): use head_init 'probe'.")

    def trainable_prefixes(self, predictor) -> list[str]:
        # the read direction only: its gains and mixing. The mean (query_bias, bias) and the recompute weight stay at their closed
        # form (init_from_probe). Trained, they chase the few neurons whose mean the query predicts worst (a squared error in
        # z-units is dominated by them) and lose every other neuron: on SmolLM2 the held-out median R² fell from 0.19 to -5.
        return ["neuron_head.gains", "neuron_head.mix"]

    def build(self, hidden: int) -> nn.Module:
        recompute = self.config.conditioning == "weights+inputs"
        return ConditionedReadout(hidden, query_parts(self.config.get_base_config()), recompute=recompute)

    def queries(self, predictor) -> torch.Tensor:
        """(K, width) the current neurons' queries (``cached_queries``)."""
        return cached_queries(predictor)

    def inputs(self, predictor) -> NeuronInputs | None:
        """The current neurons' input weights for the ``weights+inputs`` readout (None for the other conditionings), computed
        once per neuron list like ``queries``."""
        if self.config.conditioning != "weights+inputs":
            return None
        cache = predictor.__dict__.setdefault("_neuron_inputs", {})
        key = (tuple(self.config.neurons), str(next(predictor.base.parameters()).device))
        if key not in cache:
            cache[key] = NeuronInputs(predictor.base, self.config.neurons)
        return cache[key]

    reads_representation = True

    def logits(self, predictor, input_ids, attention_mask=None, label_positions=None) -> torch.Tensor:
        return self.logits_from(predictor, read_residual(predictor, input_ids, attention_mask, label_positions))

    def logits_from(self, predictor, h: torch.Tensor) -> torch.Tensor:
        return predictor.neuron_head(h, self.queries(predictor), self.inputs(predictor))

    def readouts(self, predictor, logits):
        return logits, None

    def loss(self, predictor, output, labels):
        return nn.functional.mse_loss(predictor.zscore(output.logits), predictor.zscore(labels))

    def direction(self, module, column):
        raise ValueError("The conditioned head's read direction depends on the neuron's query, which comes from the predictor's base "
                         "model: use predictor.neuron_head.directions(predictor.head.queries(predictor))[column].")

    @torch.no_grad()
    def init_from_probe(self, predictor, train_rows, validation_rows=None, batch_size: int = 32, features=None) -> dict:
        """The closed-form start of a conditioned reporter, as the ridge probe is a regression head's: each neuron read along
        its own query with one scale pooled over the current neurons (with ``weights+inputs``, plus the recompute term's weight),
        and its mean from its query (``ConditionedReadout.fit``)."""
        X, _ = probe_features(predictor, train_rows, validation_rows, batch_size, features)
        y = np.stack([labels_of(train_rows, j) for j in range(len(self.config.neurons))], 1)
        return predictor.neuron_head.fit(self.queries(predictor).double().cpu().numpy(), X, y, self.inputs(predictor))

    def card_words(self, predictor) -> str:
        return f"{self.name} (any neuron; {self.config.conditioning} query, nsr_hf.modeling.neuron_queries)"


@register_head
class ConditionedTokenHead(BinHead):
    """Conditioned token: the token head for any neuron (module docstring). The prompt is the text up to the labelled token,
    then ``prompt_suffix`` with its ``{neuron}`` replaced by ``query_tokens`` soft-prompt embeddings of the neuron's query
    (``QueryTokens``, the head's module); the LM head's logits of the report tokens answer. The bins are shared by every
    neuron (``shared_bin_edges`` / ``shared_bin_centers`` in the label transform). Without ``asked``, each row asks about every
    current neuron (one forward per neuron, so that an intervention on the batch's rows applies as it does for one neuron);
    with ``asked`` (batch,), each row asks about its own one."""

    name = "conditioned_token"
    uses_lm_head = True
    takes_prompt = True
    any_neuron = True
    asks_one_neuron = True
    trains_prompt_input = True

    def check_config(self) -> None:
        c = self.config
        check_conditioning(c.conditioning)
        if c.conditioning == "weights+inputs":
            raise ValueError("The conditioned token head names the neuron in its prompt: conditioning 'weights' or 'name' "
                             "('weights+inputs' adds a readout term, which only the conditioned regression head has).")
        if "{neuron}" not in c.prompt_suffix:
            raise ValueError(f"The conditioned token head's prompt_suffix must hold {{neuron}}, where the neuron's query tokens go; got "
                             f"{c.prompt_suffix!r}.")

    @classmethod
    def check_training(cls, config) -> None:
        super().check_training(config)
        if config.expected_value_loss_weight:
            raise ValueError("expected_value_loss_weight: the conditioned token head trains on its shared bins' cross-entropy only; "
                             "leave it at 0.")

    @classmethod
    def prepare(cls, *, tokenizer, neurons, label_transform, num_bins, report_tokens=None, prompt_suffix=DEFAULT_PROMPT_SUFFIX) -> dict:
        if not (label_transform or {}).get("shared_bin_edges"):
            raise ValueError("The conditioned token head reports every neuron on one scale: pass a label_transform with shared bins "
                             "(nsr_hf.data.labels.shared_bins on the train neurons' pooled values, then with_shared_bins).")
        if tokenizer is None:
            raise ValueError("The conditioned token head needs the tokenizer (report tokens and prompt).")
        if "{neuron}" not in prompt_suffix:
            raise ValueError(f"prompt_suffix must hold {{neuron}}, where the neuron's query tokens go; got {prompt_suffix!r}.")
        report_tokens = list(report_tokens or label_transform.get("report_tokens") or default_report_tokens(tokenizer, num_bins))
        if len(report_tokens) != num_bins:
            raise ValueError(f"{len(report_tokens)} report tokens for {num_bins} bins: give one per bin.")
        before, after = prompt_suffix.split("{neuron}", 1)
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False) if text else []  # noqa: E731
        return {"report_tokens": report_tokens, "report_token_ids": check_report_tokens(tokenizer, report_tokens),
                "prompt_suffix_ids": [encode(before), encode(after)]}

    def build(self, hidden: int) -> nn.Module:
        return QueryTokens(query_parts(self.config.get_base_config()) * hidden, hidden, self.config.query_tokens)

    def trainable_prefixes(self, predictor) -> list[str]:
        return ["neuron_head.", *TokenHead(self.config).trainable_prefixes(predictor)]

    def queries(self, predictor) -> torch.Tensor:
        return cached_queries(predictor)

    def inputs(self, predictor) -> None:
        return None

    def retargeted_transform(self, neurons, label_transform):
        shared = {k: self.config.label_transform[k] for k in ("shared_bin_edges", "shared_bin_centers")}
        statistics = {k: v for k, v in (label_transform or {}).items() if k in ("mean", "std", "fitted_on")}
        return with_shared_bins(statistics or {"mean": [0.0] * len(neurons), "std": [1.0] * len(neurons)}, len(neurons), shared)

    def label_offset(self, attention_mask):
        return attention_mask.long().argmax(-1)

    def prompt_embeddings(self, predictor, input_ids, attention_mask, label_positions, neuron_of_row) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs_embeds, mask)`` of the prompts: row ``i``'s text up to its labelled token, the suffix's text before
        ``{neuron}``, the query tokens of neuron ``neuron_of_row[i]`` (an index into the current neurons), the rest of the suffix."""
        positions = labelled_positions(self.config, attention_mask, label_positions)
        first = self.label_offset(attention_mask)
        before, after = (torch.as_tensor(part, dtype=input_ids.dtype, device=input_ids.device) for part in self.config.prompt_suffix_ids)
        tokens = self.config.query_tokens
        holes = torch.zeros(tokens, dtype=input_ids.dtype, device=input_ids.device)
        rows = [torch.cat([input_ids[i, int(first[i]) : int(positions[i]) + 1], before, holes, after]) for i in range(input_ids.shape[0])]
        pad = getattr(predictor.base.config, "pad_token_id", None)
        ids, mask = pad_right(rows, 0 if pad is None else pad, dtype=input_ids.dtype, device=input_ids.device)
        embeds = predictor.base.get_input_embeddings()(ids)
        soft = predictor.neuron_head(self.queries(predictor).to(embeds.device)[neuron_of_row.to(embeds.device)]).to(embeds.dtype)
        start = (positions - first + 1 + len(before)).to(embeds.device)
        row_index = torch.arange(ids.shape[0], device=embeds.device).repeat_interleave(tokens)
        col_index = (start[:, None] + torch.arange(tokens, device=embeds.device)).reshape(-1)
        embeds = embeds.index_put((row_index, col_index), soft.reshape(-1, soft.shape[-1]))
        return embeds, mask

    def logits(self, predictor, input_ids, attention_mask=None, label_positions=None, asked=None):
        """(batch, K, bins), or (batch, 1, bins) with ``asked``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = input_ids.shape[0]
        if asked is not None:
            asked = asked.long().reshape(-1)
            if asked.shape[0] != batch or int(asked.min()) < 0 or int(asked.max()) >= len(self.config.neurons):
                raise ValueError(f"asked must give each of the batch's {batch} rows an index among its {len(self.config.neurons)} neurons.")
            embeds, mask = self.prompt_embeddings(predictor, input_ids, attention_mask, label_positions, asked)
            return answer_logits(predictor, mask, inputs_embeds=embeds)[:, None, :]
        out = []
        for j in range(len(self.config.neurons)):  # one forward per neuron: the batch's rows stay the forward's rows
            embeds, mask = self.prompt_embeddings(predictor, input_ids, attention_mask, label_positions,
                                                  torch.full((batch,), j, dtype=torch.long))
            out.append(answer_logits(predictor, mask, inputs_embeds=embeds))
        return torch.stack(out, 1)

    def shared_centers(self, ref: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.config.label_transform["shared_bin_centers"], dtype=torch.float32, device=ref.device)

    def readouts(self, predictor, logits):
        centers = self.shared_centers(logits)
        probs = logits.float().softmax(-1)
        return probs @ centers, centers[logits.argmax(-1)]

    def loss(self, predictor, output, labels):
        logits = output.logits
        target = bins_of(labels.float(), self.config.label_transform["shared_bin_edges"]).to(logits.device)
        weight = None if self.config.class_weights is None else torch.as_tensor(self.config.class_weights, dtype=torch.float32,
                                                                                device=logits.device)
        return nn.functional.cross_entropy(logits.reshape(-1, self.config.num_bins).float(), target.reshape(-1), weight=weight)

    def report_path(self, layer, read):
        return TokenHead.prompted_report_path(layer, read)

    def direction(self, module, column):
        raise ValueError("The conditioned token head reports through the LM head after a prompt: there is no head weight vector to align.")

    def card_words(self, predictor) -> str:
        c = self.config
        return (f"{self.name} (any neuron; {c.conditioning} query as {c.query_tokens} prompt embeddings, nsr_hf.modeling.neuron_queries), "
                f"{c.num_bins} bins shared by every neuron, report tokens {c.report_tokens}")

    def reads_in_words(self, predictor) -> str:
        c = self.config
        last = c.effective_read_layer == num_layers(predictor.base) - 1
        how = ("the model's own next token" if last
               else f"an early exit: block {c.effective_read_layer}, the final norm and the LM head (the logit lens)")
        return (f"{how}, after the prompt: the text up to the labelled token (rule: {c.position}), then "
                f"{c.prompt_suffix!r} with {{neuron}} the neuron's {c.query_tokens} query embeddings")


HEAD_TYPES = tuple(HEADS)
