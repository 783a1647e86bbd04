"""The drift monitor's figure and the names of its figures: drawn from a drift history (``drift.json``) with numpy and
matplotlib alone, so that a reader of a run's files (the report, the dashboard) draws it without torch or the Trainer
(``nsr_hf.training.monitoring`` measures; this module draws)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nsr_hf.plotting import figure, save_figure

NEURON_KEYS = ("mean_shift", "std_ratio", "correlation", "max_abs_change")
HEAD_KEYS = ("head_r_live", "head_r2_live", "head_r_reference", "head_r2_reference")
DRIFT_SKIP = ("step", "epoch", "seconds")
_NEURON_PANELS = (("mean_shift", "mean shift (reference std)", 0.0), ("std_ratio", "std ratio (live / reference)", 1.0),
                  ("correlation", "correlation (live vs reference)", 1.0))
_HEAD_LINES = (("head_r_live", "vs live neuron", "o"), ("head_r_reference", "vs reference labels", "s"))


def _drift_keys(history: Sequence[dict]) -> list[str]:
    return sorted({k for e in history for k, v in e.items()
                   if k not in DRIFT_SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)})


def _other_keys(keys: Sequence[str]) -> list[str]:
    """Keys outside the monitor's own families (e.g. an older record's ``max_abs``): drawn in a panel of their own."""
    known = (*NEURON_KEYS, *HEAD_KEYS)
    return [k for k in keys if k.rsplit("/", 1)[-1] not in known and not k.startswith("lm_loss")]


def plot_drift(history: Sequence[dict], neurons: Sequence[str], path) -> Path | None:
    """Panels against the step, each drawn when the history has its keys: mean shift, std ratio and correlation of
    each neuron (with the no-drift value dashed), the head's r against the live neuron and against the reference, the
    LM loss, and any other number. ``neurons`` default to the ``<neuron>/...`` keys' names. None when nothing is plotted."""
    history = [e for e in history if isinstance(e, dict) and "step" in e]
    keys = _drift_keys(history)
    if not keys:
        return None
    neurons = list(neurons) or sorted({k.split("/", 1)[0] for k in keys if "/" in k and k.rsplit("/", 1)[-1] in NEURON_KEYS})
    steps = [h["step"] for h in history]
    panels = [(key, title, ideal) for key, title, ideal in _NEURON_PANELS if any(f"{n}/{key}" in keys for n in neurons)]
    head = [line for line in _HEAD_LINES if line[0] in keys]
    other = _other_keys(keys)
    count = len(panels) + bool(head) + ("lm_loss" in keys) + bool(other)
    fig = figure(3.6 * count, 3.2)
    axes = list(np.atleast_1d(fig.subplots(1, count)))
    for ax, (key, title, ideal) in zip(axes, panels):
        for name in neurons:
            ax.plot(steps, [h.get(f"{name}/{key}", np.nan) for h in history], marker="o", ms=3, label=name)
        ax.axhline(ideal, color="grey", ls="--", lw=0.8)
        ax.set_title(title, fontsize=9)
    if panels and len(neurons) <= 8:
        axes[0].legend(fontsize=7)
    rest = axes[len(panels):]
    if head:
        ax = rest.pop(0)
        for key, label, marker in head:
            ax.plot(steps, [h.get(key, np.nan) for h in history], marker=marker, ms=3, label=label)
        ax.set_title("head agreement (Pearson r)", fontsize=9)
        ax.legend(fontsize=7)
    if "lm_loss" in keys:
        ax = rest.pop(0)
        ax.plot(steps, [h.get("lm_loss", np.nan) for h in history], marker="o", ms=3, color="black")
        ax.set_title("LM loss on held-out text", fontsize=9)
    if other:
        ax = rest.pop(0)
        for key in other:
            ax.plot(steps, [h.get(key, np.nan) for h in history], marker=".", label=key)
        ax.set_title("other drift figures", fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    return save_figure(fig, path, dpi=100, crop=False)
