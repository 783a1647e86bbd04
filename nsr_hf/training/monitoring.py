"""``DriftMonitor``: watch the target neurons, the head and the language model while a predictor trains.

Fine-tuning anything at or below a target neuron's layer moves the neuron the head is asked to report
(PITFALL 4), and fine-tuning a language model for self-report can damage its language modelling. The monitor
measures both on a fixed probe set, during training rather than only at its end:

    from nsr_hf.training.monitoring import DriftMonitor
    trainer = PredictorTrainer(model=predictor, args=args, train_dataset=dd["train"], unfreeze="full")
    monitor = DriftMonitor(dd["validation"], every_n_steps=50, output_dir="outputs/train").bind(trainer)
    trainer.train()          # logs drift/... every 50 steps; writes drift.json and drift.png at the end
    monitor.history[-1]      # {"step": ..., "1.3/std_ratio": ..., "head_r_live": ..., "lm_loss": ...}

What one measurement holds (keys of ``history`` entries; logged with the prefix ``drift/``):

* per target neuron ``<layer.index>/``: ``mean_shift`` (live mean - reference mean, in reference standard
  deviations), ``std_ratio`` (live std / reference std), ``correlation`` (Pearson r of live vs reference) and
  ``max_abs_change`` (activation units). The *reference* values are the probe rows' ``activations`` column (the
  frozen original model); the *live* values are the neuron read from the current weights at each row's
  ``label_position``, the token its label was read at.
* the head's agreement: ``head_r_live`` / ``head_r2_live`` (Pearson r and R^2 of the head's report against the
  live neuron) and ``head_r_reference`` / ``head_r2_reference`` (against the reference labels it is trained on),
  the mean over the target neurons (and ``<neuron>/head_...`` each, with several neurons).
* ``lm_loss``: mean next-token cross-entropy over the real tokens of held-out text, with the base model's own LM
  head, and ``lm_loss_delta``, its change since the first measurement of the run (step 0).
* ``seconds``: the wall time of the measurement.

The measurement runs under ``torch.no_grad()`` with the model in eval mode; every module's train/eval mode is
restored afterwards, and no random number is drawn, so training with the monitor is the same as without it.
The predictor is taken out of PEFT and DDP wrappers (``nsr_hf.utils.unwrap``); with PEFT the LoRA layers stay
injected in it, so the report and the live neurons are those of the adapted model. Sharded parameters (FSDP,
DeepSpeed ZeRO-3) are not supported: every process must hold the whole model. Every process measures (each holds
a replica, so it costs no extra wall time) and logs; only the main process writes the files.

Cost of one measurement (P probe rows, L held-out rows; a forward pass costs about a third of a training step per
row): one predictor forward over the P rows gives the head's report *and* the live neurons (read on the way by
``nsr_hf.capture.read_live_neurons``, in the text the head runs: the token head's prompt holds the text up to the
labelled token); a ``read_layer`` below a target layer adds a forward through the blocks up to the highest target
layer. The LM loss is one full forward (with the LM head) over the L rows. That is about (P + L) / 3 rows' worth
of training, against ``every_n_steps * batch`` rows trained
between two measurements: with the defaults (P = 128, L = 32, every 50 steps) and 16 rows per step, ~7% of the
training compute (~3% with 32 rows per step), plus one measurement at the start and, if needed, one at the end.
Measured on the CPU with a 4-block, 256-wide GPT-2, 48-token rows, full unfreezing, 16 rows per step: one
measurement took as long as 3.4 training steps, 6.8% of the time at ``every_n_steps=50``.
The probe statistics are paired (the same rows before and after), so 128 rows are enough to see a drift.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from transformers import TrainerCallback

from nsr_hf.capture import model_inputs, pad_right, read_live_neurons
from nsr_hf.metrics import pearson_r, r2_score
from nsr_hf.training.collator import PredictorDataCollator
from nsr_hf.training.drift_figure import HEAD_KEYS, plot_drift
from nsr_hf.training.prefix_cache import PrefixCache
from nsr_hf.utils import unwrap, write_json

logger = logging.getLogger(__name__)

JSON_FILE, PLOT_FILE = "drift.json", "drift.png"
HISTORY_FILE = "drift_history.json"  # in each checkpoint: the history up to it, for a resumed run


# ----------------------------------------------------------------------------------------------------------
# Rows


def _select_rows(rows, required: Sequence[str], name: str, limit: int) -> list[dict]:
    """At most ``limit`` rows of a ``datasets.Dataset`` or a list of row dicts, as dicts of the needed columns.
    The subsample is deterministic (a fixed seed) and kept in the rows' order."""
    from datasets import Dataset, DatasetDict, IterableDataset

    if isinstance(rows, (DatasetDict, dict)):
        raise ValueError(f"{name} is a dict (of splits?): pass one split, e.g. dataset['validation'], or a list of row dicts.")
    if isinstance(rows, IterableDataset):
        raise ValueError(f"{name} is an IterableDataset: the monitor needs a fixed probe set; use .take(n) and Dataset.from_list, "
                         "or a map-style split.")
    if isinstance(rows, Dataset):
        columns = rows.column_names
        n = len(rows)
    else:
        rows = list(rows)
        n = len(rows)
        if any(not isinstance(r, dict) for r in rows):
            raise ValueError(f"{name} must be a datasets.Dataset split or a list of row dicts.")
        columns = [c for c in (rows[0] if rows else {}) if all(c in r for r in rows)]
    if n == 0:
        raise ValueError(f"{name} is empty: the monitor needs at least one row.")
    missing = [c for c in required if c not in columns]
    if missing:
        hint = (" The probe set must be rows of an activation dataset (nsr dataset): its 'activations' column holds the reference "
                "values of the target neurons, read from the frozen original model.") if "activations" in missing else ""
        raise ValueError(f"{name} has no column(s) {missing}.{hint}")
    keep = [c for c in (*required, "attention_mask") if c in columns]
    index = np.arange(n)
    if n > limit:
        index = np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))
    if isinstance(rows, Dataset):
        return rows.select(index.tolist()).select_columns(keep).to_list()
    return [{c: rows[i][c] for c in keep} for i in index]


def _real_ids(row: dict) -> list[int]:
    """A row's real tokens (its ``input_ids`` where ``attention_mask`` is 1)."""
    mask = row.get("attention_mask")
    return list(row["input_ids"]) if mask is None else [t for t, m in zip(row["input_ids"], mask) if m]


def _real_length(row: dict) -> int:
    return int(np.sum(row["attention_mask"])) if "attention_mask" in row else len(row["input_ids"])


def _pad(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` (padding is never read: positions and losses use the mask)."""
    ids, mask = pad_right([r["input_ids"] for r in rows], 0, [r.get("attention_mask") for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def _batches(rows: Sequence[dict], size: int):
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


# ----------------------------------------------------------------------------------------------------------
# Statistics


def neuron_drift_stats(live, reference) -> dict[str, float]:
    """Drift of one neuron over paired rows: ``mean_shift`` (in reference standard deviations), ``std_ratio``,
    ``correlation`` (Pearson) and ``max_abs_change`` (activation units). The reference must not be constant."""
    live = np.asarray(live, dtype=np.float64).reshape(-1)
    reference = np.asarray(reference, dtype=np.float64).reshape(-1)
    std = reference.std()
    if not std > 0:
        raise ValueError("The reference values are constant: drift in units of their standard deviation is undefined.")
    return {"mean_shift": float((live.mean() - reference.mean()) / std), "std_ratio": float(live.std() / std),
            "correlation": pearson_r(live, reference, "live vs reference neuron over the probe rows"),
            "max_abs_change": float(np.max(np.abs(live - reference)))}


def _agreement(report: np.ndarray, target: np.ndarray, what: str) -> tuple[float, float]:
    """(Pearson r, R^2) of the head's report against ``target``, by the rule of ``nsr_hf.metrics`` for constant sides."""
    return pearson_r(report, target, what), r2_score(target, report)


# ----------------------------------------------------------------------------------------------------------
# The callback


class DriftMonitor(TrainerCallback):
    """Measures target-neuron drift, the head's agreement with the live neuron and LM damage during training
    (see the module docstring for the quantities and their cost).

    Args:
        probe_rows: a ``datasets.Dataset`` split (or a list of row dicts) of an activation dataset: ``input_ids``,
            ``label_position``, ``activations`` (the reference values, from the frozen original model), optionally
            ``attention_mask``. Use held-out rows (validation or test).
        lm_rows: rows with ``input_ids`` (and optionally ``attention_mask``) of held-out text for the LM loss;
            default: the probe rows.
        every_n_steps: measure every this many optimizer steps (and at step 0 and at the end).
        output_dir: where ``drift.json`` and ``drift.png`` go at the end of training; default: the Trainer's
            ``args.output_dir``.
        batch_size: rows per forward pass.
        max_probe_rows / max_lm_rows: larger sets are subsampled to this many rows, deterministically.

    Measurements go to ``history`` (a list of dicts with ``step``, ``epoch`` and the keys above) and, once the
    monitor is bound to a Trainer (``bind``), through ``trainer.log`` with the prefix ``drift/``: so they reach
    every ``report_to`` integration (wandb, tensorboard ...) and ``trainer.state.log_history``. A monitor that is
    only passed in ``callbacks=`` and never bound cannot reach the Trainer's logger: it keeps ``history`` and
    writes its files, nothing more. ``trainer.log`` calls the callbacks' ``on_log``, never ``on_step_end``, so
    logging from a measurement cannot trigger another one. ``history`` holds the latest ``train()`` run: it is
    reset at the start of each.
    """

    def __init__(self, probe_rows, lm_rows=None, every_n_steps: int = 50, output_dir: Optional[str] = None, batch_size: int = 16,
                 max_probe_rows: int = 128, max_lm_rows: int = 32):
        for name, value in (("every_n_steps", every_n_steps), ("batch_size", batch_size), ("max_probe_rows", max_probe_rows),
                            ("max_lm_rows", max_lm_rows)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer of at least 1, got {value!r}.")
        self.every_n_steps, self.batch_size = int(every_n_steps), int(batch_size)
        self.output_dir = None if output_dir is None else str(output_dir)

        probe = _select_rows(probe_rows, ("input_ids", "label_position", "activations"), "probe_rows", int(max_probe_rows))
        for i, row in enumerate(probe):
            if not 0 <= int(row["label_position"]) < _real_length(row):
                raise ValueError(f"probe row {i}: label_position {row['label_position']} is outside its {_real_length(row)} real tokens.")
        widths = {np.asarray(r["activations"]).size for r in probe}
        if len(widths) != 1:
            raise ValueError(f"The probe rows' activations have different lengths {sorted(widths)}: one value per target neuron each.")
        lm_default = list(probe)
        # Sorted by length so that batches carry little padding; the statistics do not depend on the order.
        self.probe = probe = sorted(probe, key=lambda r: len(r["input_ids"]))
        self.reference = np.asarray([np.asarray(r["activations"], dtype=np.float64).reshape(-1) for r in probe])
        if not np.all(np.isfinite(self.reference)):
            raise ValueError("The probe rows' reference activations contain NaN or infinite values.")
        constant = [j for j in range(self.reference.shape[1]) if not self.reference[:, j].std() > 0]
        if constant:
            raise ValueError(f"The reference values of target neuron column(s) {constant} are constant over the {len(probe)} probe rows: "
                             "drift in units of their standard deviation is undefined. Use more (or other) probe rows.")

        lm = _select_rows(lm_default if lm_rows is None else lm_rows, ("input_ids",), "lm_rows", int(max_lm_rows))
        lm.sort(key=lambda r: len(r["input_ids"]))
        self.lm_tokens = sum(max(_real_length(r) - 1, 0) for r in lm)
        if self.lm_tokens == 0:
            raise ValueError("The LM rows hold no next-token pair (every row has fewer than 2 tokens): "
                             "pass longer held-out text as lm_rows.")
        self.lm_rows = lm

        self.trainer = None
        self.prefixes: dict[str, PrefixCache] = {}  # start_from: the probe and LM rows' states entering one block
        self.neurons: Optional[list[str]] = None
        self.history: list[dict[str, Any]] = []
        self._lm_loss_start: Optional[float] = None
        self._last_step: Optional[int] = None
        # the checkpoint a resumed training starts from (``resume_from``): its history is read back instead of measured again
        self.resume_from: Optional[str] = None

    # -- wiring --------------------------------------------------------------------------------------------

    def bind(self, trainer) -> DriftMonitor:
        """Log measurements through ``trainer.log`` (and add the monitor to the trainer's callbacks if it is not
        there yet). Returns the monitor."""
        if not callable(getattr(trainer, "log", None)):
            raise ValueError(f"bind() needs a transformers Trainer, got {type(trainer).__name__}.")
        self.trainer = trainer
        if all(cb is not self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        return self

    def start_from(self, states) -> DriftMonitor:
        """``states``: a ``RecordedStates`` (``nsr_hf.training.prefix_cache.recording_states``) holding the probe and LM
        rows' residual stream entering one block, from blocks below it that training never changes. A measurement then runs
        only the blocks from there (the neurons of that block and above are still read live), while the bound trainer's
        frozen-prefix cache sits at that block or above it: the proof that the blocks below stay frozen and unchanged.
        Rows it lacks keep the whole pass. Returns the monitor."""
        probe = PrefixCache.from_states(states, self.probe)
        lm = PrefixCache.from_states(states, [{"input_ids": _real_ids(r), "label_position": -1} for r in self.lm_rows])
        self.prefixes = {name: cache for name, cache in (("probe", probe), ("lm", lm)) if cache is not None}
        return self

    def _feeding(self, name: str, model, batch: dict):
        """``PrefixCache.feeding`` of ``start_from``'s states for ``name``'s rows when they may be used now, else nothing."""
        prefix = self.prefixes.get(name)
        cache = getattr(self.trainer, "prefix_cache", None)
        prompts = name == "probe" and unwrap(model).head.takes_prompt  # the token head runs prompts, not the rows the states are of
        if prefix is None or cache is None or cache.layer < prefix.layer or prompts:
            return contextlib.nullcontext()
        return prefix.feeding(model, batch)

    # -- measuring -----------------------------------------------------------------------------------------

    def _predictor(self, model):
        inner = unwrap(model)
        neurons = getattr(getattr(inner, "config", None), "neurons", None)
        if not hasattr(inner, "base") or not neurons:
            raise ValueError(f"DriftMonitor watches an ActivationPredictor (possibly PEFT- or DDP-wrapped), got {type(inner).__name__}.")
        if len(neurons) != self.reference.shape[1]:
            raise ValueError(f"The probe rows hold {self.reference.shape[1]} activation(s) per row but the predictor reports "
                             f"{len(neurons)} neuron(s) {list(neurons)}: use the probe rows of this predictor's dataset.")
        return inner, list(neurons)

    def _probe_pass(self, inner, neurons: list[str], device) -> tuple[np.ndarray, np.ndarray]:
        """(live neuron values, head's report), each (rows, K) in activation units."""
        collate = PredictorDataCollator(pad_token_id=0)
        live, report = [], []
        for rows in _batches(self.probe, self.batch_size):
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            ids, mask, positions = (batch[k] for k in ("input_ids", "attention_mask", "label_positions"))

            def head_pass(ids=ids, mask=mask, positions=positions):
                return inner(input_ids=ids, attention_mask=mask, label_positions=positions).predictions.float().cpu()

            # the neurons come from the head's own pass when it runs their blocks, else from a partial pass of the text
            with self._feeding("probe", inner, batch):
                predictions, values = read_live_neurons(inner.base, neurons, batch, positions, run=head_pass,
                                                        offset=inner.head.label_offset(mask))
            report.append(predictions)
            live.append(values.cpu())
        return torch.cat(live).numpy().astype(np.float64), torch.cat(report).numpy().astype(np.float64)

    def _lm_loss(self, base, device) -> float:
        total = 0.0
        for rows in _batches(self.lm_rows, self.batch_size):
            batch = {k: v.to(device) for k, v in _pad(rows).items()}
            with self._feeding("lm", base, batch):
                logits = base(**model_inputs(batch), use_cache=False).logits
            real = batch["attention_mask"].bool()
            pairs = real[:, :-1] & real[:, 1:]
            next_tokens = batch["input_ids"][:, 1:][pairs]
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1][pairs].float(), next_tokens, reduction="sum"))
        return total / self.lm_tokens

    def measure(self, model) -> dict[str, float]:
        """One measurement of ``model`` (an ``ActivationPredictor``, PEFT- or DDP-wrapped or not): the keys of the
        module docstring, unprefixed. ``lm_loss_delta`` is against the first measurement recorded in ``history``
        (0.0 when there is none yet). Does not record it: the callback events do."""
        inner, neurons = self._predictor(model)
        device = next(inner.parameters()).device
        modes = [(m, m.training) for m in model.modules()]
        start = time.perf_counter()
        model.eval()
        try:
            with torch.no_grad():
                live, report = self._probe_pass(inner, neurons, device)
                lm_loss = self._lm_loss(inner.base, device)
        finally:
            for module, training in modes:
                module.training = training
        out: dict[str, float] = {}
        head = {k: [] for k in HEAD_KEYS}
        for j, name in enumerate(neurons):
            for key, value in neuron_drift_stats(live[:, j], self.reference[:, j]).items():
                out[f"{name}/{key}"] = value
            r, r2 = _agreement(report[:, j], live[:, j], f"head report vs live neuron {name}")
            head["head_r_live"].append(r)
            head["head_r2_live"].append(r2)
            r, r2 = _agreement(report[:, j], self.reference[:, j], f"head report vs reference of neuron {name}")
            head["head_r_reference"].append(r)
            head["head_r2_reference"].append(r2)
        for key, values in head.items():
            out[key] = float(np.mean(values))
            if len(neurons) > 1:
                out.update({f"{name}/{key}": v for name, v in zip(neurons, values)})
        out["lm_loss"] = lm_loss
        out["lm_loss_delta"] = lm_loss - (lm_loss if self._lm_loss_start is None else self._lm_loss_start)
        out["seconds"] = time.perf_counter() - start
        return out

    def _model(self, model):
        if model is not None:
            return model
        if self.trainer is None:
            raise RuntimeError("DriftMonitor got no model from the Trainer: bind it to the trainer (monitor.bind(trainer)).")
        return self.trainer.model

    def _record(self, model, state) -> None:
        metrics = self.measure(self._model(model))
        if self._lm_loss_start is None:
            self._lm_loss_start = metrics["lm_loss"]
        self.history.append({"step": int(state.global_step), "epoch": state.epoch, **metrics})
        self._last_step = int(state.global_step)
        if self.trainer is not None:
            # Trainer.log ends in CallbackHandler.on_log, which clears control.should_log: the training loss due at
            # this very step would never be logged. Keep the flags as they were.
            control = self.trainer.control
            flags = (control.should_log, control.should_evaluate, control.should_save)
            self.trainer.log({f"drift/{k}": v for k, v in metrics.items()})
            control = self.trainer.control
            control.should_log, control.should_evaluate, control.should_save = flags

    # -- Trainer events ------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # One run, one history: the first measurement is the baseline of lm_loss_delta. A resumed run continues the history
        # its checkpoint kept (the Trainer calls this before it loads the checkpoint's state, so the step is not known here).
        _, self.neurons = self._predictor(self._model(model))
        self.history, self._lm_loss_start, self._last_step = [], None, None
        kept = Path(self.resume_from) / HISTORY_FILE if self.resume_from else None
        if kept is not None and kept.is_file():
            saved = json.loads(kept.read_text())
            self.history, self._lm_loss_start, self._last_step = saved["history"], saved["lm_loss_start"], saved["last_step"]
        else:
            self._record(model, state)
        return control

    def on_save(self, args, state, control, **kwargs):
        # the history so far goes with each checkpoint, so that a resumed run's drift.json is the uninterrupted run's
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_json(folder / HISTORY_FILE, {"history": self.history, "lm_loss_start": self._lm_loss_start,
                                                   "last_step": self._last_step})
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0 and state.global_step != self._last_step:
            self._record(model, state)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self._last_step:
            self._record(model, state)
        if state.is_world_process_zero:
            self.save(self.output_dir or args.output_dir)
        return control

    # -- output --------------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """What ``drift.json`` holds: the neurons, the probe set, the reference statistics and the history."""
        neurons = self.neurons or [f"column{j}" for j in range(self.reference.shape[1])]
        return {
            "neurons": neurons,
            "every_n_steps": self.every_n_steps,
            "probe_rows": len(self.probe),
            "lm_rows": len(self.lm_rows),
            "lm_tokens": self.lm_tokens,
            "reference": {name: {"mean": float(self.reference[:, j].mean()), "std": float(self.reference[:, j].std()),
                                 "min": float(self.reference[:, j].min()), "max": float(self.reference[:, j].max())}
                          for j, name in enumerate(neurons)},
            "history": self.history,
            "final": self.history[-1] if self.history else None,
        }

    def save(self, output_dir) -> tuple[Path, Path]:
        """Write ``drift.json`` and ``drift.png`` to ``output_dir``; returns their paths."""
        if not self.history:
            raise ValueError("Nothing to save: no measurement has been made yet.")
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / JSON_FILE
        write_json(json_path, self.summary(), indent=2)
        plot_path = out / PLOT_FILE
        plot_drift(self.history, self.neurons or [], plot_path)
        return json_path, plot_path


