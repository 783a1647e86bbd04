"""The dashboard's figures as inline SVG: the evaluation's own plots (``nsr_hf.evaluation.report``, the causal test's, the
drift monitor's) drawn again as SVG from the run's files, plus the two the run does not draw (the activation histogram of
each split and the calibration curve). Text stays text in the SVG (``svg.fonttype: none``): smaller, and searchable."""
from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nsr_hf.plotting import figure, save_figure

SPLIT_COLOURS = {"train": "tab:grey", "validation": "tab:orange", "test": "tab:blue", "test_ood": "tab:red"}


def svg_of(draw: Callable[[Path], Path | None]) -> str | None:
    """The ``<svg>`` element that ``draw(path)`` writes at an ``.svg`` path (None when it draws nothing)."""
    import matplotlib

    with tempfile.TemporaryDirectory() as tmp, matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "nsr_hf"}):
        written = draw(Path(tmp) / "figure.svg")
        if written is None:
            return None
        text = Path(written).read_text()
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", text[text.index("<svg"):], count=1, flags=re.S)  # no creation date: a page
    # built twice from the same files is the same page
    # the figure keeps its own size (in points) but shrinks with a narrow window (CSS: max-width 100%, height auto)
    return re.sub(r"<svg ", '<svg class="figure" ', svg, count=1)


def histogram_by_split(values: dict[str, list[float]], neuron: str, path: Path) -> Path:
    """The neuron's labelled values in every split of the dataset: a density histogram each, on shared bins."""
    every = np.concatenate([np.asarray(v, dtype=np.float64) for v in values.values()])
    bins = np.histogram_bin_edges(every, bins=min(60, max(10, every.size // 20)))
    fig = figure(6.4, 3.6)
    ax = fig.add_subplot()
    for split, v in values.items():
        ax.hist(v, bins=bins, density=True, histtype="step", linewidth=1.5, color=SPLIT_COLOURS.get(split),
                label=f"{split} ({len(v)} rows)")
    ax.set_xlabel(f"neuron {neuron} at the labelled token")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return save_figure(fig, path, crop=False)


def calibration_curve(true, predicted, path: Path, bins: int = 10) -> Path:
    """Mean true value against mean report in equal-count bins of the report, with the identity line: a calibrated
    reporter's points lie on it."""
    true, predicted = np.asarray(true, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    order = np.argsort(predicted, kind="stable")
    groups = [g for g in np.array_split(order, min(bins, max(1, predicted.size))) if g.size]
    x = np.array([predicted[g].mean() for g in groups])
    y = np.array([true[g].mean() for g in groups])
    err = np.array([true[g].std() / np.sqrt(g.size) for g in groups])
    low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    pad = 0.05 * (high - low or 1.0)
    fig = figure(4.4, 4.2)
    ax = fig.add_subplot()
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="black", linewidth=1, label="identity (calibrated)")
    ax.errorbar(x, y, yerr=err, fmt="o-", color="tab:blue", capsize=3, label=f"mean true per report bin ({len(groups)} bins)")
    ax.set_xlabel("report (mean in bin)")
    ax.set_ylabel("true activation (mean in bin)")
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path, crop=False)


def causal_plot(causal: dict, path: Path) -> Path:
    """The causal test's dose-response (``nsr_hf.evaluation.figures.plot_causal``): report against the set value, next to
    the natural slope."""
    from nsr_hf.evaluation.figures import plot_causal

    return save_figure(plot_causal(causal), path, crop=False)
