"""The evaluation's figures, drawn from its saved results (``metrics.json``, ``predictions.json``, ``drift.json``,
``log_history.json``) with numpy and matplotlib alone: the report (``nsr_hf.evaluation.report``) writes them as PNG files
and the dashboard draws the same functions inline, without torch, the Trainer or a model.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nsr_hf.methods import figures_of, method_rows
from nsr_hf.metrics import finite_median
from nsr_hf.plotting import figure, new_figure, save_figure


def plot_causal(result: dict):
    """Report against the value given to the neuron: per-value mean +- std, the causal fit, the natural line."""
    fig, ax = new_figure()
    x = np.asarray(result["mean_activation"])
    ax.errorbar(x, result["mean_report"], yerr=result["std_report"], fmt="o", capsize=3, label="mean report under intervention")
    grid = np.linspace(x.min(), x.max(), 50)
    ax.plot(grid, result["intercept"] + result["slope"] * grid, "-",
            label=f"causal fit: slope {result['slope']:.3f}" + (f" ± {result['slope_se']:.3f}" if result["slope_se"] is not None else ""))
    if result["natural_slope"] is not None:
        ax.plot(grid, result["natural_intercept"] + result["natural_slope"] * grid, "--",
                label=f"natural: slope {result['natural_slope']:.3f}")
    ax.set_xlabel(f"value given to neuron {result['neuron']} ({result['mode']})")
    ax.set_ylabel("report (activation units)")
    title = f"Causal test, {result['rows']} rows"
    ax.set_title(title if result["meaningful"] else title + " (not meaningful: head reads the target layer or earlier)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_pred_vs_true(predictions: dict, path: Path, r2: dict | None = None) -> Path:
    """``predictions``: {split: {"true", "self", optional "self_greedy", "ridge_probe"}}; one panel per split."""
    splits = list(predictions)
    fig = figure(4.6 * len(splits), 4.4)
    for i, split in enumerate(splits):
        p = predictions[split]
        true = np.asarray(p["true"], dtype=np.float64)
        ax = fig.add_subplot(1, len(splits), i + 1)
        if "ridge_probe" in p:
            ax.scatter(true, np.asarray(p["ridge_probe"]), s=8, alpha=0.35, color="tab:grey", label="ridge probe")
        if "self_greedy" in p:
            ax.scatter(true, np.asarray(p["self_greedy"]), s=10, alpha=0.5, marker="x", color="tab:orange", label="self (greedy)")
        ax.scatter(true, np.asarray(p["self"]), s=10, alpha=0.7, color="tab:blue", label="self (expected value)")
        values = np.concatenate([true] + [np.asarray(p[k], dtype=np.float64) for k in ("self", "self_greedy", "ridge_probe") if k in p])
        low, high = float(values.min()), float(values.max())
        pad = 0.05 * (high - low or 1.0)
        ax.plot([low - pad, high + pad], [low - pad, high + pad], color="black", linewidth=1, label="identity (y = x)")
        ax.set_xlim(low - pad, high + pad)
        ax.set_ylim(low - pad, high + pad)
        ax.set_xlabel("true activation")
        ax.set_ylabel("predicted activation")
        title = f"{split}" + (f": R² = {r2[split]:.3f}" if r2 and split in r2 else "")
        ax.set_title(title)
        ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path, crop=False)


def plot_residuals(predictions: dict, path: Path) -> Path:
    """Residuals (self − true) against the true value (top) and their histogram (bottom), one column per split."""
    splits = list(predictions)
    fig = figure(4.6 * len(splits), 6.4)
    for i, split in enumerate(splits):
        true = np.asarray(predictions[split]["true"], dtype=np.float64)
        residual = np.asarray(predictions[split]["self"], dtype=np.float64) - true
        ax = fig.add_subplot(2, len(splits), i + 1)
        ax.scatter(true, residual, s=10, alpha=0.7, color="tab:blue")
        ax.axhline(0, color="black", linewidth=1)
        ax.set_xlabel("true activation")
        ax.set_ylabel("predicted − true")
        ax.set_title(f"{split}: residuals (mean {residual.mean():.3f})")
        ax = fig.add_subplot(2, len(splits), len(splits) + i + 1)
        ax.hist(residual, bins=max(5, min(40, residual.size // 3)), color="tab:blue")
        ax.axvline(0, color="black", linewidth=1)
        ax.set_xlabel("predicted − true")
        ax.set_ylabel("rows")
    return save_figure(fig, path, crop=False)


def plot_methods(evaluation: dict, path: Path, split: str = "test") -> Path:
    """R^2 and r of every method on ``split`` with their confidence intervals (horizontal bars)."""
    metrics = evaluation["metrics"][split]
    methods = method_rows(metrics)
    fig = figure(11, 0.45 * len(methods) + 1.6)
    for i, (key, label) in enumerate((("r2", "R²"), ("pearson", "Pearson r"))):
        ax = fig.add_subplot(1, 2, i + 1)
        values = np.array([figures_of(metrics, m).get(key, np.nan) for m in methods], dtype=np.float64)
        cis = [figures_of(metrics, m).get(f"{key}_ci") for m in methods]
        err = np.array([[max(v - c[0], 0), max(c[1] - v, 0)] if c else [0, 0] for v, c in zip(values, cis)]).T
        colours = ["tab:blue" if m.startswith("self") else "tab:red" if m.startswith("cross:") else "tab:grey" for m in methods]
        y = np.arange(len(methods))
        ax.barh(y, values, xerr=err, color=colours, capsize=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(y, methods)
        ax.invert_yaxis()
        lows = [c[0] for c in cis if c] + list(values)
        ax.set_xlim(max(min(min(lows), 0) - 0.05, -1.05), 1.05)
        ax.set_xlabel(f"{label} ({split})")
        if key == "r2" and min(lows) < -1:
            ax.set_title("values below −1 are cut off", fontsize=8)
    return save_figure(fig, path, crop=False)


def plot_r2_by_layer(probe_by_layer: dict, path: Path, read_layer: int | None = None, target_layer: int | None = None) -> Path:
    """The ridge probe's R^2 by the layer it reads, for every ``*_r2`` key of ``probe_by_layer``."""
    layers = sorted(probe_by_layer, key=lambda x: int(x))
    keys = sorted({k for entry in probe_by_layer.values() for k in entry if k.endswith("_r2")}, key=lambda k: (k != "validation_r2", k))
    fig = figure(6.4, 4.0)
    ax = fig.add_subplot()
    x = [int(layer) for layer in layers]
    lowest = 0.0
    for key in keys:
        y = [probe_by_layer[layer].get(key) for layer in layers]
        y = np.array([np.nan if v is None else v for v in y], dtype=np.float64)
        lowest = min(lowest, np.nanmin(y) if np.isfinite(y).any() else 0.0)
        ax.plot(x, y, marker="o", label=key.removesuffix("_r2"))
    if read_layer is not None:
        ax.axvline(read_layer, color="tab:blue", linestyle="--", linewidth=1, label=f"read layer {read_layer}")
    if target_layer is not None:
        ax.axvline(target_layer, color="tab:red", linestyle=":", linewidth=1, label=f"target layer {target_layer}")
    ax.set_ylim(max(lowest - 0.05, -1.05), 1.05)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer the probe reads")
    ax.set_ylabel("R²")
    ax.set_title("ridge probe R² by layer")
    ax.legend(fontsize=7)
    return save_figure(fig, path, crop=False)


def plot_training_curves(log_history: Sequence[dict], path: Path) -> Path | None:
    """Training loss and evaluation loss against the step (left) and the evaluation's r / R^2 (right)."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [e for e in log_history if "eval_loss" in e and "step" in e]
    metric_keys = [k for k in ("eval_r2", "eval_pearson", "eval_spearman", "eval_accuracy", "eval_qwk") if any(k in e for e in evals)]
    if not train and not evals:
        return None
    fig = figure(11 if metric_keys else 6, 4.0)
    ax = fig.add_subplot(1, 2 if metric_keys else 1, 1)
    if train:
        ax.plot(*zip(*train), label="training loss")
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], marker="o", label="evaluation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log" if all(v > 0 for _, v in train) and train else "linear")
    ax.legend(fontsize=8)
    if metric_keys:
        ax = fig.add_subplot(1, 2, 2)
        for key in metric_keys:
            points = [(e["step"], e[key]) for e in evals if key in e]
            ax.plot(*zip(*points), marker="o", label=key.removeprefix("eval_"))
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xlabel("step")
        ax.set_title("validation figures during training")
        ax.legend(fontsize=8)
    return save_figure(fig, path, crop=False)


def drift_history(drift=None, log_history: Sequence[dict] | None = None) -> tuple[list[dict], dict | None]:
    """``(history, summary)`` of the target neuron's drift from whatever the caller has: the drift monitor's
    history (a list of ``{"step", ...}``, keys with or without the ``drift/`` prefix the Trainer's log adds), its
    ``drift.json`` (a dict with ``history``), a one-off summary such as the train stage's ``neuron_drift``
    (a dict without ``history``: no curve), or nothing, in which case the ``drift/...`` entries of the Trainer's
    ``log_history`` are used. Keys come back without the ``drift/`` prefix; the summary is the last measurement."""
    summary = None
    if isinstance(drift, dict):
        if "history" in drift:
            history = drift.get("history") or []
            summary = drift.get("final")
        else:
            history, summary = [], {k: v for k, v in drift.items() if isinstance(v, (int, float, str))}
    elif drift:
        history = list(drift)
    else:
        history = [e for e in (log_history or []) if any(str(k).startswith("drift/") for k in e)]
    history = [{str(k).removeprefix("drift/"): v for k, v in e.items()} for e in history if isinstance(e, dict)]
    if summary is None and history:
        summary = history[-1]
    return history, summary


FAITHFULNESS_PANELS = (("self", "self (report)"), ("compare", "plainly trained predictor"),
                       ("ridge_probe", "ridge probe, natural rows"), ("ridge_probe_intervened", "ridge probe, intervened rows"),
                       ("ridge_probe_intervened_original", "ridge probe, intervened rows,\noriginal model"))


def plot_faithfulness(counterfactual: dict, path: Path, section: dict | None = None) -> Path | None:
    """Report against the value the neuron was set to, with the identity line: one panel per reader (self next to the
    probes). ``counterfactual``: {"set": (rows,), "self": (rows,), optional "ridge_probe", ...} of one split."""
    compared = ((section or {}).get("compare") or {}).get("words", "").removeprefix("the ")  # how the compare_predictor was trained
    panels = [(k, compared if k == "compare" and compared else label) for k, label in FAITHFULNESS_PANELS if k in counterfactual]
    if not panels or "set" not in counterfactual:
        return None
    set_to = np.asarray(counterfactual["set"], dtype=np.float64)
    values = np.concatenate([set_to] + [np.asarray(counterfactual[k], dtype=np.float64) for k, _ in panels])
    low, high = float(values.min()), float(values.max())
    pad = 0.05 * (high - low or 1.0)
    fig = figure(3.8 * len(panels), 3.8)
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.scatter(set_to, np.asarray(counterfactual[key]), s=8, alpha=0.6, color="tab:blue" if key == "self" else "tab:grey")
        ax.plot([low - pad, high + pad], [low - pad, high + pad], color="black", linewidth=1, label="identity (y = x)")
        ax.set_xlim(low - pad, high + pad)
        ax.set_ylim(low - pad, high + pad)
        ax.set_xlabel("value the neuron was set to")
        if i == 0:
            ax.set_ylabel("report (activation units)")
        r2 = ((section or {}).get("methods") or {}).get(key, {}).get("r2")
        ax.set_title(label + (f": R² = {r2:.3f}" if r2 is not None else ""), fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path, crop=False)


def plot_any_neuron(per_neuron: dict, conditionings: list[str], path: Path) -> Path:
    """An any-neuron run's neurons (``nsr_hf.any_neuron``: ``any_neuron.json``'s ``per_neuron``): natural R² (left) and
    slope ratio (right) of every neuron by group (train, validation, held-out neurons), for each reporter, and the ridge
    probe's R²; a bar at each median."""
    fig, (left, right) = new_figure(11, 4.2, ncols=2)
    groups = [g for g in ("train", "validation", "held_out") if any(s["group"] == g for s in per_neuron.values())]
    methods = [*conditionings, "ridge_probe"]
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        for g, group in enumerate(groups):
            rows = [s for s in per_neuron.values() if s["group"] == group]
            r2 = [s["ridge_probe_r2"] if method == "ridge_probe" else s[method]["natural_r2"] for s in rows]
            x = g + (m - (len(methods) - 1) / 2) * width
            jitter = np.random.default_rng(g * 10 + m).uniform(-width / 3, width / 3, len(r2))
            left.scatter(x + jitter, np.clip(r2, -1, 1), s=9, color=f"C{m}", alpha=0.6, label=method if g == 0 else None)
            left.hlines(finite_median(r2), x - width / 2, x + width / 2, color=f"C{m}", lw=2)
            if method != "ridge_probe":
                ratio = [s[method]["slope_ratio"] for s in rows if s[method]["slope_ratio"] is not None]
                right.scatter(x + jitter[: len(ratio)], np.clip(ratio, -0.5, 1.5), s=9, color=f"C{m}", alpha=0.6,
                              label=method if g == 0 else None)
                right.hlines(finite_median(ratio), x - width / 2, x + width / 2, color=f"C{m}", lw=2)
    for ax, title in ((left, "natural R² on held-out documents (clipped to [-1, 1])"),
                      (right, "causal slope ratio (clipped to [-0.5, 1.5])")):
        ax.set_xticks(range(len(groups)), [g.replace("_", "-") + " neurons" for g in groups])
        ax.set_title(title, fontsize=10)
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=8)
    right.axhline(1, color="grey", lw=0.5, ls="--")
    return save_figure(fig, path)
