"""What a scan found (``ScanResult``): the ranked table, the top neurons with their examples, the files a scan
writes and ``load_scan`` that reads them back."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nsr_hf.capture import Neuron
from nsr_hf.scanner.plots import plot_histograms, plot_score_heatmap
from nsr_hf.utils import write_json

if TYPE_CHECKING:
    import pandas

TABLE_FILE = "neurons.parquet"
TOP_FILE = "top_neurons.json"
HEATMAP_FILE = "score_heatmap.png"
HISTOGRAM_FILE = "top_histograms.png"
STAT_COLUMNS = ("count", "mean", "std", "variance", "min", "max", "skewness", "kurtosis", "frac_above")


def finite(x):
    """A JSON-safe float (None for NaN and infinities)."""
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class ScanResult:
    """What a scan found.

    Attributes:
        table: one row per scanned neuron (``layer``, ``neuron``, statistics, ``dead``, ``score_<name>`` for
            every score, ``rank`` by the chosen score), sorted by rank.
        top_neurons: the ranked top N as dicts (stats, scores, top examples with their text windows).
        config: the ``ScanConfig`` as a dict.
        metadata: corpus ``describe()``, model provenance, documents and tokens scanned.
        histograms: ``{"layer.index": values}`` of the top neurons from a second short pass (may be empty).
    """

    table: pandas.DataFrame
    top_neurons: list[dict]
    config: dict
    metadata: dict
    histograms: dict = field(default_factory=dict)

    @property
    def score(self) -> str:
        return self.config["score"]

    def top(self, n: int = 10):
        """The first ``n`` rows of the table (best first)."""
        return self.table.head(n)

    def neuron_at_rank(self, rank: int = 1) -> Neuron:
        """The neuron ranked ``rank`` (1 = best): what a recipe's ``neuron: auto`` (rank 1) or ``neuron: <rank>`` means."""
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= len(self.table):
            raise ValueError(f"rank must be an integer from 1 to {len(self.table)} (the number of scanned neurons), got {rank!r}.")
        row = self.table.iloc[int(rank) - 1]
        return Neuron(int(row["layer"]), int(row["neuron"]))

    def format_table(self, n: int | None = None) -> str:
        """A readable table of the top ``n`` neurons (default: the top N of the scan) with their best example."""
        n = len(self.top_neurons) if n is None else n
        examples = {entry["neuron"]: entry.get("examples") or [] for entry in self.top_neurons}
        threshold = self.config["threshold"]
        header = (f"{'rank':>4} {'neuron':>9} {self.score:>11} {'mean':>8} {'std':>8} {'min':>8} {'max':>8} "
                  f"{'skew':>7} {'kurt':>8} {'>' + format(threshold, 'g'):>7}  top example")
        lines = [header, "-" * len(header)]
        for row in self.table.head(n).itertuples(index=False):
            name = f"{row.layer}.{row.neuron}"
            ex = examples.get(name) or []
            shown = ""
            if ex:
                e = ex[0]
                shown = " ".join((e["before"][-30:] + "[" + e["token"] + "]" + e["after"][:20]).split())
                shown = f"{e['value']:.3g} {shown!r}"
            lines.append(
                f"{row.rank:>4} {name:>9} {getattr(row, 'score_' + self.score):>11.4g} {row.mean:>8.3g} {row.std:>8.3g} {row.min:>8.3g} "
                f"{row.max:>8.3g} {row.skewness:>7.2f} {row.kurtosis:>8.2f} {row.frac_above:>7.3f}  {shown}"
            )
        meta = self.metadata
        lines.append(f"({meta.get('documents')} documents, {meta.get('positions')} positions ({self.config['position']}), "
                     f"{meta.get('neurons')} neurons, ranked by {self.score})")
        return "\n".join(lines)

    def save(self, output_dir: str | Path) -> Path:
        """Write ``neurons.parquet``, ``top_neurons.json``, ``score_heatmap.png`` and (when histograms were
        computed) ``top_histograms.png`` into ``output_dir``."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.table.to_parquet(out / TABLE_FILE, index=False)
        payload = {"config": self.config, **self.metadata, "top_neurons": self.top_neurons}
        write_json(out / TOP_FILE, payload, indent=2)
        plot_score_heatmap(self.table, self.score, out / HEATMAP_FILE)
        if self.histograms:
            plot_histograms(self.histograms, self.config["threshold"], out / HISTOGRAM_FILE)
        return out


def holds_scan(folder: str | Path) -> bool:
    """Whether ``folder`` holds a finished scan: ``top_neurons.json``, which ``nsr scan`` writes into a folder that appears
    whole (``nsr_hf.run_folder.written_atomically``)."""
    return (Path(folder) / TOP_FILE).is_file()


def load_scan(output_dir: str | Path) -> ScanResult:
    """Read back a scan written by ``ScanResult.save`` (histogram values are not stored, only their plot)."""
    import pandas as pd

    out = Path(output_dir)
    if not (out / TABLE_FILE).exists() or not (out / TOP_FILE).exists():
        raise FileNotFoundError(f"{out} holds no scan: expected {TABLE_FILE} and {TOP_FILE} (run `nsr scan --output_dir {out}`).")
    payload = json.loads((out / TOP_FILE).read_text())
    top = payload.pop("top_neurons")
    config = payload.pop("config")
    table = pd.read_parquet(out / TABLE_FILE).sort_values("rank", kind="stable").reset_index(drop=True)
    return ScanResult(table=table, top_neurons=top, config=config, metadata=payload)
