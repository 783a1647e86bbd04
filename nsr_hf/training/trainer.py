"""``PredictorTrainer``: a small ``transformers.Trainer`` for an ``ActivationPredictor``.

    from nsr_hf.training.trainer import PredictorDataCollator, PredictorTrainer
    trainer = PredictorTrainer(model=predictor, args=TrainingArguments("out", report_to="none"),
                               train_dataset=dd["train"], eval_dataset=dd["validation"],
                               data_collator=PredictorDataCollator(tokenizer), unfreeze="head_only")
    trainer.train(); trainer.evaluate()

What it changes from ``Trainer`` and why:

* ``remove_unused_columns=False`` and ``label_names=["labels"]`` are forced: the activation columns are not
  arguments of ``forward`` and would be dropped silently, and a PEFT wrapper hides the signature the Trainer
  reads ``label_names`` from (PITFALLS HF-5, HF-6).
* The loss is ``outputs.loss`` and is never re-scaled by a token count computed from the float labels: the
  Trainer's ``model_accepts_loss_kwargs`` is forced to ``False`` (PITFALLS HF-4).
* Evaluation keeps, per row, only ``[expected value, greedy value]`` per neuron in activation units, never the
  head's logits (for the token head those would be vocabulary-sized without care; PITFALL 14).
* ``compute_metrics`` (``PredictorMetrics``) is numpy/scipy only (no ``evaluate.load``, which fails offline).
* ``label_mode="live"``: the labels are the target neurons' values in the *current* weights, read in the same
  forward pass (detached: no gradient through the label), instead of the dataset's reference values from the
  original model. See ``LiveLabels`` for the guard against flattening the neuron.
* ``interventions=`` (an ``InterventionSampler``): in training steps only, some rows' target neurons are set at the
  labelled token and those rows are trained on the set value (``nsr_hf.training.interventions``); evaluation and
  ``prediction_step`` always see the natural model.
* ``prefix_cache="auto"`` (the default): where the blocks below the first trainable one stay frozen, their output is
  computed once per training row and training steps run only the blocks from there (``nsr_hf.training.prefix_cache``):
  the same losses and weights, to float round-off. Evaluation and ``prediction_step`` always run the whole model.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_pt_utils import nested_gather

from nsr_hf.capture import intervene, read_live_neurons
from nsr_hf.data.labels import bins_of
from nsr_hf.errors import UserError
from nsr_hf.metrics import bin_metrics, regression_metrics
from nsr_hf.modeling.heads import head_class
from nsr_hf.modeling.predictor import asked_labels
from nsr_hf.stage_clock import timed
from nsr_hf.training.collator import PredictorDataCollator
from nsr_hf.training.interventions import InterventionSampler
from nsr_hf.training.prefix_cache import PrefixCache, build_prefix_cache, cache_point, check_mode, row_keys, strategy_refusal
from nsr_hf.training.unfreezing import GradualUnfreezing, apply_unfreezing
from nsr_hf.utils import unwrap

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Metrics

@dataclass
class PredictorMetrics:
    """``compute_metrics`` for ``PredictorTrainer``. ``predictions`` are (rows, 2, K): the expected value and the
    greedy value (NaN for the regression head) in activation units; ``label_ids`` are (rows, K).

    Keys: the regression metrics of the expected value (``pearson``, ``r2`` ...); for a head with bins (classification,
    token: ``Head.has_bins``) also ``greedy_*`` (the same for the greedy readout) and the bin metrics of both readouts (``accuracy``,
    ``balanced_accuracy``, ``qwk`` and ``greedy_accuracy`` ...), bins from the label transform's train-fitted edges.
    With several neurons every key is the mean over neurons, and ``<neuron>/<key>`` gives each one.
    """

    neurons: Sequence[str]
    head_type: str = "regression"
    bin_edges: Optional[Sequence[Sequence[float]]] = None

    @classmethod
    def for_model(cls, model) -> "PredictorMetrics":
        config = unwrap(model).config
        return cls(list(config.neurons), config.head_type, (config.label_transform or {}).get("bin_edges"))

    def neuron_metrics(self, expected, greedy, true, j: int) -> dict[str, float]:
        out = regression_metrics(expected, true)
        has_bins = head_class(self.head_type).has_bins
        if has_bins and not np.all(np.isnan(greedy)):
            out.update({f"greedy_{k}": v for k, v in regression_metrics(greedy, true).items()})
        if has_bins and self.bin_edges is not None:
            edges = self.bin_edges[j]
            num_bins = len(edges) - 1
            true_bins = bins_of(true, edges)
            out.update(bin_metrics(bins_of(expected, edges), true_bins, num_bins))
            out.update({f"greedy_{k}": v for k, v in bin_metrics(bins_of(greedy, edges), true_bins, num_bins).items()})
        return out

    def __call__(self, eval_prediction) -> dict[str, float]:
        preds = np.asarray(eval_prediction.predictions, dtype=np.float64)
        labels = np.asarray(eval_prediction.label_ids, dtype=np.float64)
        if preds.ndim == 2:  # predictions only, no greedy readout
            preds = np.stack([preds, np.full_like(preds, np.nan)], 1)
        labels = labels.reshape(labels.shape[0], -1)
        per_neuron = [self.neuron_metrics(preds[:, 0, j], preds[:, 1, j], labels[:, j], j) for j in range(labels.shape[1])]
        if len(per_neuron) == 1:
            return per_neuron[0]
        out = {k: float(np.mean([m[k] for m in per_neuron])) for k in per_neuron[0]}
        for name, m in zip(self.neurons, per_neuron):
            out.update({f"{name}/{k}": v for k, v in m.items()})
        return out


# ----------------------------------------------------------------------------------------------------------
# Live labels


LABEL_MODES = ("reference", "live")


class LiveLabels:
    """Reads the target neurons at each row's labelled token during the predictor's own forward pass.

    Live labels (``label_mode="live"``) train the head on the neuron as the weights are *now*, so a strategy
    that moves the neuron (``full``, ``last_k`` reaching the target layer, ``lora`` on it) is asked to report
    the neuron it has, not the one it had. That invites a trivial solution: any pressure that flattens the neuron
    (weight decay, or the gradient through the representation) also makes it trivially easy to predict, since a
    constant is. **The guard** adds to the loss, with weight ``guard_weight``,

        mean over target neurons of  ((std_live - std_ref) / s)**2 + ((mean_live - mean_ref) / s)**2

    where ``live`` are this batch's live values (with gradient: the guard pushes the weights, the label does
    not), ``ref`` the same rows' reference values from the original model (the dataset's ``activations``) and
    ``s`` the training-split standard deviation. The neuron may change which rows it fires on, but not collapse
    to a constant or shift its scale. ``guard_weight=0`` turns it off. ``last`` holds the latest batch's
    ``{"live_std_ratio", "live_mean_shift", "live_guard"}`` for logging.
    """

    def __init__(self, guard_weight: float = 10.0):
        if not guard_weight >= 0:
            raise ValueError(f"guard_weight must be a number >= 0, got {guard_weight!r}.")
        self.guard_weight = float(guard_weight)
        self.last: dict[str, float] = {}

    def forward(self, model, inputs: dict) -> tuple[Any, torch.Tensor]:
        """(outputs without loss, live values (batch, K) with gradient) for one batch."""
        inner = unwrap(model)
        positions = inputs["label_positions"].long()

        def own_forward():
            return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], label_positions=positions)

        # read in the head's own pass, where the labelled token sits `label_offset` to the left (the token head's prompt)
        return read_live_neurons(inner.base, inner.config.target_neurons, inputs, positions, run=own_forward,
                                 offset=inner.head.label_offset(inputs["attention_mask"]), keep_grad=True)

    def loss(self, model, inputs: dict, return_outputs: bool = False):
        inner = unwrap(model)
        outputs, live = self.forward(model, inputs)
        loss = inner.head_loss(outputs, live.detach())
        ref = inputs["labels"].float().reshape(live.shape)
        scale = torch.as_tensor(inner.config.label_transform["std"], dtype=live.dtype, device=live.device)
        std_live, std_ref = live.std(0, unbiased=False), ref.std(0, unbiased=False)
        shift = (live.mean(0) - ref.mean(0)) / scale
        guard = (((std_live - std_ref) / scale) ** 2 + shift**2).mean()
        if self.guard_weight and guard.requires_grad:
            loss = loss + self.guard_weight * guard
        with torch.no_grad():
            self.last = {"live_std_ratio": float((std_live / std_ref.clamp_min(1e-12)).mean()), "live_mean_shift": float(shift.mean()),
                         "live_guard": float(guard)}
        outputs.loss = loss
        outputs["live_labels"] = live.detach()
        return (loss, outputs) if return_outputs else loss


# ----------------------------------------------------------------------------------------------------------
# Trainer


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, tied weights counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def apply_peft(model, peft_config):
    """``get_peft_model`` with the predictor's head trained and saved in full (``modules_to_save``)."""
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError("The model is already a PeftModel: pass the plain ActivationPredictor with peft_config, "
                         "or a PeftModel without it.")
    inner = unwrap(model)
    if inner.neuron_head is not None and "neuron_head" not in (peft_config.modules_to_save or []):
        raise ValueError("peft_config.modules_to_save must list 'neuron_head': otherwise the predictor's head stays at its random "
                         "initialisation in the saved adapter (PITFALLS HF-7).")
    return get_peft_model(model, peft_config)


class InterventionEpochs(TrainerCallback):
    """Tells the intervention sampler which epoch begins: a row's draws change from epoch to epoch, reproducibly."""

    def __init__(self, sampler: InterventionSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.epoch = int(math.floor(state.epoch + 1e-6)) if state.epoch else 0


class TrainingClock(TrainerCallback, ExportableState):
    """The training's seconds over every attempt: a run resumed from a checkpoint counts the seconds its earlier attempts
    spent up to that checkpoint (kept in the checkpoint's ``trainer_state.json``), so that ``train_runtime`` is the time
    the trained weights cost, not only the last attempt's (which is ~0 s when the run stopped after its last checkpoint).
    The steps an interruption threw away (after the newest checkpoint) are not counted: they are redone and counted then."""

    NAME = "TrainingClock"

    def __init__(self):
        self.saved_seconds = 0.0  # the earlier attempts' seconds, up to the checkpoint this attempt started from
        self.start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        stored = (state.stateful_callbacks or {}).get(self.NAME) if state.global_step else None
        if isinstance(stored, list):  # Trainer keeps a list where several callbacks share a name
            stored = stored[0] if stored else None
        self.saved_seconds = float(((stored or {}).get("attributes") or {}).get("saved_seconds", 0.0))
        self.start = time.perf_counter()
        # a checkpoint written before this callback existed has no entry, and Trainer's save looks the name up
        state.stateful_callbacks.setdefault(self.NAME, self.state())

    @property
    def seconds(self) -> float:
        """Training seconds so far, earlier attempts included."""
        return self.saved_seconds + (time.perf_counter() - self.start if self.start is not None else 0.0)

    def state(self) -> dict:
        return {"args": {}, "attributes": {"saved_seconds": round(self.seconds, 3)}}


class PredictorTrainer(Trainer):
    """``Trainer`` for ``ActivationPredictor`` (see the module docstring).

    Args beyond ``Trainer``'s:
        peft_config: a PEFT config (e.g. ``apply_unfreezing(predictor, "lora")``); the model is wrapped with it.
        unfreeze: an unfreezing strategy name (``nsr_hf.training.unfreezing.STRATEGIES``) or a dict of
            ``apply_unfreezing`` keyword arguments (``{"strategy": "last_k", "k": 2}``); applied before the optimizer
            is built. ``"lora"`` becomes ``peft_config``; ``"gradual"`` adds its callback.
        label_mode: ``"reference"`` (the dataset's ``activations``, from the original model) or ``"live"``
            (recomputed from the current weights at every step; see ``LiveLabels``). With live labels, evaluation
            also compares the report with the live neuron; the reference comparison is the drift monitor's.
        live_guard_weight: weight of the live-label guard against flattening the neuron (``LiveLabels``).
        interventions: an ``InterventionSampler`` (``nsr_hf.training.interventions``): intervention training, in training
            steps only; with live labels the label of a set neuron is the set value, read in the same pass. The fraction
            of set (row, neuron) pairs is logged with the training loss as ``intervened_fraction``.
        prefix_cache: ``"auto"`` (use the frozen-prefix cache where it applies, else say in one log line why not), ``"on"``
            (a ``UserError`` where it does not apply) or ``"off"`` (``nsr_hf.training.prefix_cache``). ``prefix_cache_info``
            holds what was decided (``{"used": True, "layer", "rows", "bytes"}`` or ``{"used": False, "reason"}``).
        prefix_cache_max_gb: the cache's largest size; beyond it the frozen blocks are recomputed at every step.
        prefix_start: a ``PrefixCache`` of the training rows at a lower block (or the cache point itself), computed by this
            model's frozen blocks below it (``nsr train`` keeps it from the head's probe pass): the cache is built from there.
    """

    def __init__(self, model=None, args: Optional[TrainingArguments] = None, *, data_collator=None, peft_config=None, unfreeze=None,
                 label_mode: str = "reference", live_guard_weight: float = 10.0, interventions: InterventionSampler | None = None,
                 prefix_cache: str = "auto", prefix_cache_max_gb: float = 2.0, prefix_start: PrefixCache | None = None,
                 compute_metrics=None, callbacks=None, processing_class=None, **kwargs):
        if model is None:
            raise ValueError("PredictorTrainer needs model= (an ActivationPredictor).")
        if args is None:
            raise ValueError("PredictorTrainer needs args= (TrainingArguments with report_to set explicitly, e.g. report_to='none').")
        if args.remove_unused_columns:
            logger.info("Setting remove_unused_columns=False: the activation columns are not forward() arguments (PITFALLS HF-5).")
            args.remove_unused_columns = False
        if args.label_names not in (None, ["labels"]):
            raise ValueError(f"label_names must be ['labels'] (the collator's key), got {args.label_names}.")
        args.label_names = ["labels"]
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {', '.join(LABEL_MODES)}, got {label_mode!r}.")
        self.live_labels = LiveLabels(live_guard_weight) if label_mode == "live" else None
        self.prefix_cache_mode = check_mode(prefix_cache)
        if not (isinstance(prefix_cache_max_gb, (int, float)) and prefix_cache_max_gb >= 0):
            raise ValueError(f"prefix_cache_max_gb must be a number of GB >= 0, got {prefix_cache_max_gb!r}.")
        self.prefix_cache_max_gb = float(prefix_cache_max_gb)
        self.prefix_cache: PrefixCache | None = None
        self.keep_prefix_cache = False  # keep it after train() for take_prefix_cache (nsr train's evaluation reads it)
        self.prefix_cache_info: dict | None = None
        self.prefix_start = prefix_start
        callbacks = list(callbacks or [])
        if interventions is not None and not isinstance(interventions, InterventionSampler):
            raise ValueError("interventions must be an InterventionSampler (nsr_hf.training.interventions), "
                             f"got {type(interventions).__name__}.")
        self.interventions = interventions if interventions is not None and interventions.rate > 0 else None
        if self.interventions is not None and args.gradient_checkpointing:
            raise ValueError("Intervention training cannot run with gradient_checkpointing: the blocks are recomputed in the backward "
                             "pass, after the interventions are lifted, so the gradients would be those of the natural model. "
                             "Turn gradient_checkpointing off (or set intervention_rate 0).")
        if self.interventions is not None:
            callbacks.append(InterventionEpochs(self.interventions))
        callbacks.append(TrainingClock())
        if unfreeze is not None:
            plan = apply_unfreezing(model, **(unfreeze if isinstance(unfreeze, dict) else {"strategy": unfreeze}))
            if isinstance(plan, GradualUnfreezing):
                callbacks.append(plan)
            elif not isinstance(plan, list):  # a PEFT config
                if peft_config is not None:
                    raise ValueError("Both peft_config and unfreeze='lora' were given: pass one.")
                peft_config = plan
        if peft_config is not None:
            model = apply_peft(model, peft_config)
        if data_collator is None:
            tokenizer = processing_class or getattr(unwrap(model), "tokenizer", None)
            data_collator = PredictorDataCollator(tokenizer)
        if compute_metrics is None:
            compute_metrics = PredictorMetrics.for_model(model)
        super().__init__(model=model, args=args, data_collator=data_collator, compute_metrics=compute_metrics, callbacks=callbacks,
                         processing_class=processing_class, **kwargs)
        # Float labels must never become a token count that re-scales the loss (PITFALLS HF-4). transformers 5
        # reads `accepts_loss_kwargs` (not `model_accepts_loss_kwargs`) and sees forward's **kwargs, so force it.
        self.model_accepts_loss_kwargs = False
        self._live_log = {}
        self._intervention_log: list[float] = []

    def train(self, *args, **kwargs):
        trainable, total = count_parameters(self.model)
        message = f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"
        print(message, flush=True)
        logger.info(message)
        if trainable == 0:
            raise ValueError("No parameter is trainable: choose an unfreezing strategy (nsr_hf.training.unfreezing).")
        with timed("prefix cache"):
            self.prepare_prefix_cache()
        try:
            output = super().train(*args, **kwargs)
            # resumed: the earlier attempts' training time counts (TrainingClock; looked up, as a Trainer that restores
            # callback states from the checkpoint replaces the instance)
            clock = next((c for c in self.callback_handler.callbacks if isinstance(c, TrainingClock)), None)
            if clock is not None and clock.saved_seconds:
                output.metrics["train_runtime_this_attempt"] = output.metrics.get("train_runtime")
                output.metrics["train_runtime"] = round(clock.seconds, 4)
            return output
        finally:
            # its memory goes back once training ends, unless the caller asked to take it (``keep_prefix_cache``)
            self.trained_prefix_cache = self.prefix_cache if self.keep_prefix_cache else None
            self.prefix_cache = None

    def take_prefix_cache(self) -> PrefixCache | None:
        """The frozen-prefix cache the last ``train`` used (the train rows' states entering its first trainable block, from
        blocks that stayed frozen), when ``keep_prefix_cache`` was set before it; handed over once: the trainer keeps no
        reference to it."""
        cache, self.trained_prefix_cache = getattr(self, "trained_prefix_cache", None), None
        return cache

    def prepare_prefix_cache(self) -> None:
        """Decide whether training steps use the frozen-prefix cache, and build it (``prefix_cache_info`` says what happened)."""
        self.prefix_cache = None
        if self.prefix_cache_mode == "off":
            self.prefix_cache_info = {"used": False, "reason": "prefix_cache off"}
            return
        layer, why = self._prefix_cache_point()
        if why is None:
            # the given states were computed without autocast: under mixed precision the cache is built in the steps' own precision
            mixed = self.args.bf16 or self.args.fp16
            start = self.prefix_start if self.prefix_start is not None and self.prefix_start.layer <= layer and not mixed else None
            self.prefix_cache, why = build_prefix_cache(self.model, layer, self._cache_batches(), self._cache_batches(),
                                                        self.prefix_cache_max_gb * 1e9, context=self.compute_loss_context_manager,
                                                        start=start)
            if self.prefix_cache is not None:
                self._say(self.prefix_cache.describe())
                self.prefix_cache_info = self.prefix_cache.summary()
                return
        elif self.prefix_cache_mode == "on":
            raise UserError(f"prefix_cache 'on' cannot be used: {why} (or set prefix_cache auto or off).")
        self._say(f"prefix cache not used: {why}")
        self.prefix_cache_info = {"used": False, "reason": why}

    def _say(self, message: str) -> None:
        """One line on the console (like the trainable-parameter count) and in the log."""
        if self.is_world_process_zero():
            print(message, flush=True)
        logger.info(message)

    def _prefix_cache_point(self) -> tuple[int | None, str | None]:
        gradual = any(isinstance(c, GradualUnfreezing) for c in self.callback_handler.callbacks)
        why = strategy_refusal("gradual" if gradual else "", gradient_checkpointing=self.args.gradient_checkpointing)
        if why:
            return None, why
        if not hasattr(self.train_dataset, "__len__") or not hasattr(self.train_dataset, "__getitem__"):
            return None, "the train dataset has no length or rows by index (an iterable dataset)"
        return cache_point(self.model, target_block_runs=self.interventions is not None or self.live_labels is not None)

    def _cache_batches(self):
        """The training rows, collated as a training step collates them, on the model's device."""
        size = max(self.args.per_device_train_batch_size, self.args.per_device_eval_batch_size)
        dataset = self.train_dataset
        for start in range(0, len(dataset), size):
            rows = [dataset[i] for i in range(start, min(len(dataset), start + size))]
            yield self._prepare_inputs(self.data_collator(rows))

    _live_log: dict

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        # the live-label statistics since the last log, next to the training loss
        if self.live_labels is not None and "loss" in logs and getattr(self, "_live_log", None):
            logs = {**logs, **{key: float(np.mean(values)) for key, values in self._live_log.items()}}
            self._live_log = {}
        if self.interventions is not None and "loss" in logs and self._intervention_log:
            logs = {**logs, "intervened_fraction": self._intervened_fraction()}
        super().log(logs, start_time)

    def _intervened_fraction(self) -> float:
        """The fraction of set (row, neuron) pairs since the last log, over every process (each draws the same number of
        batches of the same size, and every process logs: the gather is collective)."""
        fraction = torch.tensor(float(np.mean(self._intervention_log)), device=self.args.device)
        self._intervention_log = []
        if self.args.world_size > 1:
            fraction = nested_gather(fraction[None], self.args.parallel_mode).mean()
        return float(fraction)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cached = self.prefix_cache is not None and model.training
        with self.prefix_cache.feeding(model, inputs) if cached else contextlib.nullcontext():
            if self.interventions is not None and model.training:
                return self.intervened_loss(model, inputs, return_outputs)
            return self.natural_loss(model, inputs, return_outputs)

    def intervened_loss(self, model, inputs, return_outputs=False):
        """The loss of a training batch in which the sampler's rows have their target neurons set at the labelled token
        (in the sequence the head runs: the token head's prompt starts ``label_offset`` tokens in) and are labelled with
        the set values. The read-back pass of live labels, when the head's pass does not reach a target layer, runs the
        text itself: the same positions, since the collator pads on the right (offset 0 for every head)."""
        inner = unwrap(model)
        plan = self.interventions.plan(inputs, dtype=self.neuron_dtype(inner))
        self._intervention_log.append(plan.fraction)
        positions = inputs["label_positions"].long()
        positions = positions - inner.head.label_offset(inputs["attention_mask"]).to(positions.device)
        with intervene(inner.base, plan.interventions(inner.config.target_neurons, positions)):
            return self.natural_loss(model, {**inputs, "labels": plan.labels}, return_outputs)

    def neuron_dtype(self, inner) -> torch.dtype:
        """The dtype a target neuron's value is held in during a training step, which the set values are rounded to so that
        a label is exactly what the neuron held: the autocast dtype under mixed precision (``bf16`` / ``fp16``: the
        projections' outputs are computed in it, whatever the weights' dtype), else the weights'."""
        if self.args.bf16:
            return torch.bfloat16
        if self.args.fp16:
            return torch.float16
        return next(inner.base.parameters()).dtype

    def natural_loss(self, model, inputs, return_outputs=False):
        """The loss of a batch as it is (reference or live labels)."""
        if self.live_labels is not None:
            loss = self.live_labels.loss(model, inputs, return_outputs)
            if model.training:
                for key, value in self.live_labels.last.items():
                    self._live_log.setdefault(key, []).append(value)
            return loss
        outputs = model(**inputs)
        if outputs.loss is None:
            raise ValueError("The batch has no 'labels': the collator builds them from the 'activations' column.")
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def held_out_start(self, model, inputs: dict):
        """``prefix_start``'s ``feeding`` for an evaluation batch whose rows it holds (the dataset pass's states of every split,
        ``nsr_hf.pipeline``), when training's own cache proved the blocks below it frozen and no mixed precision is on; else
        nothing. Only the blocks from the cached one run, as in the training steps."""
        start, info = self.prefix_start, self.prefix_cache_info or {}
        frozen_below = start is not None and info.get("used") and info.get("layer", -1) >= start.layer
        mixed = self.args.bf16 or self.args.fp16  # the given states were computed without autocast
        if not frozen_below or mixed or unwrap(model).head.takes_prompt or not start.holds(row_keys(inputs)):
            return contextlib.nullcontext()
        return start.feeding(model, inputs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """(loss, (batch, 2, K) [expected value, greedy value] in activation units, labels): never the logits."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager(), self.held_out_start(model, inputs):
            if self.live_labels is not None:
                _, outputs = self.live_labels.loss(model, inputs, return_outputs=True)
                inputs = {**inputs, "labels": outputs["live_labels"]}
            else:
                outputs = model(**inputs)
        loss = None if outputs.loss is None else outputs.loss.detach().float()
        if prediction_loss_only:
            return loss, None, None
        expected = outputs.predictions.detach().float()
        greedy = outputs.greedy_predictions
        greedy = torch.full_like(expected, float("nan")) if greedy is None else greedy.detach().float()
        labels = inputs.get("labels")
        if labels is not None:
            labels = asked_labels(labels, inputs.get("asked"))  # rows that ask about one neuron are scored on that one
        return loss, torch.stack([expected, greedy], 1), None if labels is None else labels.detach().float()
