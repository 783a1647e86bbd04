"""Figures without pyplot: a matplotlib ``Figure`` on the Agg canvas (no global state, no display needed) and one way
to write it as a PNG. Every plot of the package (scanner, drift monitor, evaluation report, causal test, analyses)
is drawn on these; matplotlib is imported only when a figure is made, so ``import nsr_hf`` stays light."""
from __future__ import annotations

from pathlib import Path


def figure(width: float, height: float):
    """An empty ``matplotlib.figure.Figure`` of ``width`` x ``height`` inches on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def new_figure(width: float = 6.0, height: float = 4.5, ncols: int = 1):
    """``(figure, axes)`` with ``ncols`` panels side by side (one ``Axes`` when ``ncols`` is 1, else an array)."""
    fig = figure(width, height)
    return fig, fig.subplots(1, ncols)


def save_figure(fig, path, dpi: int = 110, crop: bool = True) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parent folders are created) and return the path. ``crop``: cut the image to
    what is drawn (``bbox_inches="tight"``); otherwise lay the panels out tightly inside the figure's own size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if crop:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    else:
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    return path
