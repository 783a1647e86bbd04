"""``TrainConfig``: a training recipe's fields, in the Trainer's own style.

``TrainConfig`` subclasses ``transformers.TrainingArguments`` (as TRL's ``SFTConfig`` does): every Trainer option
(``lr_scheduler_type``, ``max_grad_norm``, ``gradient_checkpointing``, ``optim``, ``bf16``, ...) is a recipe key,
validated and documented by transformers itself, and reaches the ``PredictorTrainer``. The fields below add the
pipeline's own keys in groups, and give some Trainer options the defaults that suit a self-reporter. A recipe and
``--key value`` flags become a ``TrainConfig`` through ``nsr_hf.parsing.RecipeParser`` (defaults < recipe < command line).
"""
from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from nsr_hf.capture import Neuron
from nsr_hf.data.binning import BIN_STRATEGIES
from nsr_hf.data.corpus import check_fractions
from nsr_hf.data.counterfactuals import SOURCES, check_source
from nsr_hf.errors import UserError
from nsr_hf.methods import BASELINE_METHODS
from nsr_hf.modeling.heads import HEAD_TYPES, head_class
from nsr_hf.modeling.predictor import check_compare_neurons, saved_neurons
from nsr_hf.report_tokens import DEFAULT_PROMPT_SUFFIX
from nsr_hf.shared_config import CorpusFields, EvaluationFields, SplitFields, check_evaluation_fields
from nsr_hf.training.prefix_cache import check_mode, strategy_refusal
from nsr_hf.training.unfreezing import STRATEGIES

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig(TrainingArguments, EvaluationFields, SplitFields, CorpusFields):  # fields in the order corpus, split, evaluation
    """Train a self-reporter for one neuron: scan, dataset, fine-tune, evaluate (a recipe's fields).

    Besides the keys below and those it shares with the stages (``nsr_hf.shared_config``: model, corpus, text_field;
    split_seed, split_fractions; cross_models, probe_layers, n_bootstrap), every ``transformers.TrainingArguments``
    option is a key (``nsr train --help`` lists them all).
    """

    # -- the neuron
    neuron: str = field(default="auto", metadata={
        "help": "'auto' (the scan's best), a scan rank (e.g. 3), or a neuron 'layer.index' (quote it in YAML)"})
    layers: list[int] | None = field(default=None, metadata={"help": "Layers to scan (default: all)"})
    select: str = field(default="score", metadata={
        "help": "How 'auto' / a rank picks the neuron: 'score' (the scan's ranking) or 'readable' (of the top select_candidates, the one a "
                "ridge probe reads best from the head's representation, cross-validated on the scanned train documents)"})
    select_candidates: int = field(default=20, metadata={"help": "select 'readable': how many of the scan's top neurons compete"})
    scan_documents: int = field(default=600, metadata={"help": "Training documents to scan"})

    # -- the activation dataset
    dataset: str | None = field(default=None, metadata={"help": "Load this activation dataset (folder or Hub id) instead of building one"})
    dataset_documents: int = field(default=1500, metadata={"help": "Documents of the built dataset (all splits)"})
    max_length: int = field(default=128, metadata={"help": "Texts are cut to this many tokens"})
    position: str = field(default="last", metadata={"help": "The labelled token: 'last' or an integer index"})
    num_bins: int = field(default=10, metadata={"help": "Bins of the classification and token heads"})
    bin_strategy: str | None = field(default=None, metadata={
        "help": "Bins of the classification and token heads: 'quantile' (equal counts), 'equal_width' or 'kmeans' (1-D k-means: the least "
                "squared error of reporting a bin's mean; the best for a skewed neuron's R²). Unset: the dataset's bins ('quantile' when "
                "the run builds the dataset). Set on a dataset binned otherwise (or into another num_bins), the bins are refitted on its "
                "train split at train time; the dataset is not changed"})

    # -- the predictor's head
    head_type: str = field(default="regression", metadata={"help": f"The head: one of {', '.join(HEAD_TYPES)} (nsr_hf.modeling.heads)"})
    read_layer: str | None = field(default=None, metadata={
        "help": "Block whose output the head reads: an index, 'target+K' (K blocks after the target's), or none (the last). For the token "
                "head a block below the last is an early exit (final norm + LM head on that block: the logit lens)"})
    prompt_suffix: str = field(default=DEFAULT_PROMPT_SUFFIX, metadata={
        "help": "Token head: the text after the labelled token that asks for the report ({neuron} is filled in). An empty string reports "
                "as the labelled token's own next token (the representation the regression head and the ridge probe read)"})
    expected_value_loss_weight: float = field(default=0.0, metadata={
        "help": "Token head: weight of the squared error of the expected value (z-scored) added to the cross-entropy"})
    head_init: str = field(default="random", metadata={
        "help": "Regression head: 'random' or 'probe' "
                "(the closed-form ridge probe of its representation on train, then fine-tuning: LP-FT)"})

    # -- what trains, and on which labels
    unfreeze: str = field(default="head_only", metadata={
        "help": "head_only, last_k, after_target, full, lora, lora_after_target or gradual (nsr_hf.training.unfreezing)"})
    unfreeze_k: int | None = field(default=None, metadata={"help": "Blocks for last_k (and lora: LoRA on the last k blocks only)"})
    unfreeze_every_n_steps: int = field(default=50, metadata={"help": "gradual: steps between two blocks joining"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    labels: str = field(default="reference", metadata={
        "help": "'reference' (the dataset's values, from the original model) or 'live' (recomputed from the current weights each step)"})
    live_guard_weight: float = field(default=10.0, metadata={
        "help": "labels 'live': weight of the guard that keeps the neuron's mean and spread (0: off)"})
    intervention_rate: float = field(default=0.0, metadata={
        "help": "Intervention training: the probability that a training row's target neuron is set, at the labelled token, to a "
                "value its context does not predict, and the row labelled with that value (0: off; 0.5: half the rows). Teaches "
                "the report to follow the neuron rather than recompute it from the context (nsr_hf.training.interventions)"})
    intervention_source: str = field(default="interchange", metadata={
        "help": f"Intervention training: where set values come from: {', '.join(SOURCES)} (interchange: another training row's "
                "value of the neuron; uniform: over the train split's 1st-99th percentile; shift: the natural value plus a normal shift)"})
    intervention_shift_scale: float = field(default=1.0, metadata={
        "help": "intervention_source 'shift': the shift's standard deviation, in training standard deviations of the neuron"})
    prefix_cache: str = field(default="auto", metadata={
        "help": "The frozen-prefix cache: where the blocks below the first trainable one stay frozen (after_target, last_k, "
                "lora_after_target, head_only), their output is computed once per training row and each step runs only the blocks "
                "from there: the same losses and weights, faster. 'auto' (use it where it applies, else log why not), 'on' (an "
                "error where it does not apply: full, lora on every block, gradual, gradient_checkpointing, dropout in the frozen "
                "blocks) or 'off' (nsr_hf.training.prefix_cache)"})
    prefix_cache_max_gb: float = field(default=2.0, metadata={
        "help": "The prefix cache's largest size in memory (float32 states of every training token); beyond it the frozen blocks "
                "are recomputed at every step"})
    drift_every_n_steps: int = field(default=50, metadata={
        "help": "Measure the neuron's drift, the head's agreement and the LM loss every this many steps (nsr_hf.training.monitoring)"})
    drift_probe_rows: int = field(default=128, metadata={
        "help": "The drift monitor's probe set: this many rows of the validation split (the neuron and the head's agreement)"})
    drift_lm_rows: int = field(default=32, metadata={"help": "The drift monitor's held-out texts for the LM loss: this many rows"})

    # -- the evaluation after training
    evaluate: bool = field(default=True, metadata={
        "help": "Run the evaluation protocol (baselines, controls, causal test, report) after training"})
    eval_methods: list[str] | None = field(default=None, metadata={
        "help": f"Baselines and controls to run: {', '.join(BASELINE_METHODS)} (default: all; registry: nsr_hf.methods.METHODS)"})

    # -- TrainingArguments with the defaults of a self-reporter (the Trainer's own help, where it says more)
    output_dir: str = field(default="outputs/train", metadata={
        "help": "Where everything is written (the Trainer's checkpoints go to output_dir/checkpoints). An unfinished run there is "
                "resumed by the same command; a finished one is refused unless overwrite"})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace the run in output_dir (finished or not) by a new one: it is written beside it and replaces it only once it "
                "succeeded, evaluation included"})
    keep_checkpoints: bool = field(default=False, metadata={
        "help": "Keep output_dir/checkpoints when the run finishes (by default they are deleted then: they only serve to resume)"})
    push_to_hub: str | None = field(default=None, metadata={
        "help": "Push the saved predictor (not the Trainer's checkpoints) to this Hub repo id (owner/name)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "'latest' (the newest checkpoint in output_dir/checkpoints) or a checkpoint folder. Not needed to resume an "
                "interrupted run: the same command continues it from its latest checkpoint, its dataset reused"})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over train"})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Rows per step and process"})
    per_device_eval_batch_size: int = field(default=32, metadata={
        "help": "Rows per evaluation batch (also the probes' and the evaluation's batches)"})
    eval_strategy: str = field(default="epoch", metadata={"help": "Evaluate on validation during training: 'no', 'steps' or 'epoch'"})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every this many steps"})
    save_strategy: str = field(default="epoch", metadata={
        "help": "Checkpoints to resume an interrupted run from: 'epoch', 'steps' or 'no' (a rerun then trains from the start)"})
    save_steps: float = field(default=500, metadata={"help": "With save_strategy 'steps' (below 1: a fraction of the training steps)"})
    save_total_limit: int | None = field(default=1, metadata={
        "help": "Keep at most this many checkpoints (the latest is all a resume needs)"})
    seed: int = field(default=0, metadata={"help": "Seed of the head's initialisation and of the data order"})
    report_to: str = field(default="none", metadata={
        "help": "'none', 'wandb', 'tensorboard', ... (set explicitly: transformers 5 defaults to none)"})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Keep the dataset's columns: the collator reads labels, positions and bins from them"})
    label_names: list[str] | None = field(default_factory=lambda: ["labels"], metadata={
        "help": "The batch keys the Trainer treats as labels"})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={
        "help": "Every trainable parameter reaches the loss by construction of the unfreezing strategies "
                "(blocks after read_layer stay frozen)"})

    def __post_init__(self):
        self._check_pipeline_fields()
        if not torch.cuda.is_available():  # bf16 autocast on a CPU-only machine needs it said (transformers refuses otherwise)
            self.use_cpu = True
        if self.disable_tqdm is None:  # progress bars in a terminal, not in logs
            self.disable_tqdm = not sys.stderr.isatty()
        super().__post_init__()

    def _check_pipeline_fields(self):
        """The pipeline's own rules (the Trainer's options are checked by ``TrainingArguments.__post_init__``)."""
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {', '.join(HEAD_TYPES)}, got {self.head_type!r}.")
        if self.unfreeze not in STRATEGIES:
            raise ValueError(f"unfreeze must be one of {', '.join(STRATEGIES)}, got {self.unfreeze!r}.")
        if self.labels not in ("reference", "live"):
            raise ValueError(f"labels must be 'reference' or 'live', got {self.labels!r}.")
        if not float(self.expected_value_loss_weight) >= 0:
            raise ValueError(f"expected_value_loss_weight must be >= 0, got {self.expected_value_loss_weight!r}.")
        if self.prompt_suffix:
            try:
                self.prompt_suffix.format(neuron="0.0")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"prompt_suffix {self.prompt_suffix!r} is not a valid format string ({err!r}): the only field "
                                 "is {neuron}; write a literal brace as {{ or }}.") from None
        if self.bin_strategy is not None:
            if self.bin_strategy not in BIN_STRATEGIES:
                raise ValueError(f"bin_strategy must be one of {', '.join(BIN_STRATEGIES)}, got {self.bin_strategy!r}.")
        if self.num_bins < 2:
            raise ValueError(f"num_bins must be at least 2, got {self.num_bins}.")
        if self.head_init not in ("random", "probe"):
            raise ValueError(f"head_init must be 'random' or 'probe', got {self.head_init!r}.")
        head_class(self.head_type).check_training(self)  # what this head refuses (nsr_hf.modeling.heads.Head.check_training)
        if self.select not in ("score", "readable"):
            raise ValueError(f"select must be 'score' or 'readable', got {self.select!r}.")
        check_evaluation_fields(self)  # here too, so that a typo fails before training, not in the evaluation after it
        if self.compare_predictor and "." in str(self.neuron):  # a named neuron: a compare_predictor of another fails now
            check_compare_neurons(self.compare_predictor, saved_neurons(self.compare_predictor), [str(self.neuron)])
        if self.counterfactual_source is not None:
            check_source(self.counterfactual_source)
        if self.save_strategy not in ("no", "steps", "epoch"):
            raise ValueError(f"save_strategy must be 'no', 'steps' or 'epoch', got {self.save_strategy!r}.")
        if self.resume_from_checkpoint and self.unfreeze == "gradual":
            raise ValueError("resume_from_checkpoint is not supported with gradual unfreezing "
                             "(the optimizer's groups depend on the step): use last_k or lora.")
        self.read_layer_rule()  # validates
        if self.unfreeze == "last_k" and self.unfreeze_k is None:
            raise ValueError("unfreeze 'last_k' needs unfreeze_k (how many blocks, counted down from the block the head reads).")
        if self.unfreeze == "lora_after_target" and self.unfreeze_k is not None:
            raise ValueError("unfreeze 'lora_after_target' chooses its blocks (every block after the target's): drop unfreeze_k, "
                             "or use unfreeze 'lora' with unfreeze_k.")
        self.neuron_choice()  # validates
        self._check_interventions()
        check_mode(self.prefix_cache)
        if isinstance(self.prefix_cache_max_gb, bool) or not isinstance(self.prefix_cache_max_gb, (int, float)) or \
                not self.prefix_cache_max_gb >= 0:
            raise ValueError(f"prefix_cache_max_gb must be a number of GB >= 0, got {self.prefix_cache_max_gb!r}.")
        refusal = strategy_refusal(self.unfreeze, self.unfreeze_k, self.gradient_checkpointing)
        if self.prefix_cache == "on" and refusal:
            raise UserError(f"prefix_cache 'on' cannot be used: {refusal} (or set prefix_cache auto or off).")
        if self.position != "last":
            try:
                int(self.position)
            except ValueError:
                raise ValueError(f"position must be 'last' or an integer token index, got {self.position!r}.") from None
        for name in ("scan_documents", "max_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "lora_r", "unfreeze_every_n_steps", "drift_every_n_steps", "save_steps",
                     "select_candidates", "drift_probe_rows", "drift_lm_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        fractions = list(check_fractions(self.split_fractions, "split_fractions"))
        if 0 in fractions:
            raise ValueError(f"split_fractions {fractions} gives {('train', 'validation', 'test')[fractions.index(0)]} no documents: "
                             "train fits the head, bins and z-scores, validation chooses the probes' regularisation, test is where "
                             "the evaluation reports.")
        self.split_fractions = fractions
        if self.dataset is None and self.dataset_documents < 10:
            raise ValueError("dataset_documents must be at least 10 (three splits need documents).")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}.")

    def _check_interventions(self):
        """Intervention training's keys, and the combinations it cannot train."""
        rate = self.intervention_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ValueError(f"intervention_rate must be a number from 0 (off) to 1 (every training row), got {rate!r}; e.g. 0.5.")
        if self.intervention_source not in SOURCES:
            raise ValueError(f"intervention_source must be one of {', '.join(SOURCES)}, got {self.intervention_source!r}.")
        if not (self.intervention_shift_scale > 0 and math.isfinite(self.intervention_shift_scale)):
            raise ValueError(f"intervention_shift_scale must be a positive number of training standard deviations, "
                             f"got {self.intervention_shift_scale!r}.")
        if not rate:
            return
        if self.gradient_checkpointing:
            raise ValueError("intervention_rate > 0 cannot run with gradient_checkpointing: the blocks are recomputed in the backward "
                             "pass without the interventions. Turn gradient_checkpointing off.")
        rule, choice = self.read_layer_rule(), self.neuron_choice()
        if rule is not None and rule[0] == "abs" and isinstance(choice, str) and rule[1] < Neuron.parse(choice).layer:
            raise ValueError(f"intervention_rate > 0 with read_layer {rule[1]}, before the target neuron's layer "
                             f"{Neuron.parse(choice).layer}: the set value cannot reach the head. Read a later block (e.g. target+2).")

    def read_layer_rule(self) -> tuple[str, int] | None:
        """``None`` (the last block), ``("abs", L)`` or ``("target", K)`` for ``'target+K'``."""
        if self.read_layer is None:
            return None
        text = str(self.read_layer).strip().replace(" ", "")
        if text.lstrip("-").isdigit():
            if int(text) < 0:
                raise ValueError(f"read_layer must be a block index >= 0, 'target+K' or none, got {self.read_layer!r}.")
            return ("abs", int(text))
        if text.startswith("target"):
            rest = text[len("target"):] or "+0"
            if rest[0] == "+" and rest[1:].isdigit():
                return ("target", int(rest[1:]))
        raise ValueError(f"read_layer must be a block index, 'target+K' (e.g. target+2) or none, got {self.read_layer!r}.")

    def read_layer_for(self, target_layer: int, num_layers: int) -> int | None:
        """The block the head reads for a target neuron in ``target_layer`` (``None``: the last)."""
        rule = self.read_layer_rule()
        if rule is None:
            return None
        layer = rule[1] if rule[0] == "abs" else target_layer + rule[1]
        if layer < target_layer:  # a neuron the scan chose is known only now; a named one is refused before the model loads
            raise UserError(f"read_layer {layer} is before the layer of the target neuron (layer {target_layer}): the head would read "
                            f"a block where the neuron is not yet computed. Read block {target_layer} or later (e.g. read_layer "
                            "target+2, or none for the last block).")
        if layer >= num_layers:
            if rule[0] == "target":
                logger.warning("read_layer %s is past the last block for a target in layer %d: reading the last block.",
                               self.read_layer, target_layer)
                return num_layers - 1
            raise ValueError(f"read_layer {layer} is out of range: the model has blocks 0..{num_layers - 1}.")
        return layer

    def neuron_choice(self) -> int | str:
        """The scan rank to take (an int) or a neuron name ``"layer.index"``."""

        text = str(self.neuron).strip()
        if text == "auto":
            return 1
        if text.isdigit():
            if int(text) < 1:
                raise ValueError("neuron: a scan rank counts from 1 (the best neuron).")
            return int(text)
        try:
            return str(Neuron.parse(text))
        except ValueError:
            raise ValueError(f"neuron must be 'auto', a scan rank (1, 2, ...) or 'layer.index', got {self.neuron!r}.") from None
