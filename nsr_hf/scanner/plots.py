"""The scan's figures: the score heat map by layer and neuron, and the top neurons' histograms."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nsr_hf.plotting import figure, save_figure


def plot_score_heatmap(table, score: str, path: Path) -> None:
    """Heat map of ``score`` by layer (rows) and neuron (columns); dead neurons grey. Colours span the
    1st to 99th percentile of the live scores, so a few extreme neurons do not wash out the rest."""
    import matplotlib

    layers = np.sort(table["layer"].unique())
    width = int(table["neuron"].max()) + 1
    grid = np.full((len(layers), width), np.nan)
    row_of = {layer: i for i, layer in enumerate(layers)}
    values = table[f"score_{score}"].to_numpy(dtype=np.float64)
    grid[table["layer"].map(row_of).to_numpy(), table["neuron"].to_numpy()] = np.where(np.isfinite(values), values, np.nan)
    finite = values[np.isfinite(values)]
    vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    fig = figure(12, max(2.5, 0.25 * len(layers) + 1.5))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers] if len(layers) <= 40 else None)
    ax.set_xlabel("neuron")
    ax.set_ylabel("layer")
    ax.set_title(f"score '{score}' by layer and neuron (grey: dead)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    save_figure(fig, path)


def plot_histograms(histograms: dict, threshold: float, path: Path, max_panels: int = 20) -> None:
    """Histograms of the top neurons' activations (the first ``max_panels``), with the threshold marked."""
    items = list(histograms.items())[:max_panels]
    cols = min(5, len(items))
    rows = math.ceil(len(items) / cols)
    fig = figure(3.2 * cols, 2.4 * rows)
    for i, (name, values) in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.hist(np.asarray(values, dtype=np.float64), bins=60, color="tab:blue", histtype="stepfilled")  # one patch, not 60
        ax.axvline(threshold, color="tab:red", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(f"#{i + 1}  neuron {name}", fontsize=9)
        ax.tick_params(labelsize=7)
    positions = len(next(iter(histograms.values()))) if histograms else 0
    fig.suptitle(f"activations of the top neurons ({positions} positions each; red: threshold)")
    save_figure(fig, path, dpi=100, crop=False)
