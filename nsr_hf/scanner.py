"""Find the neurons worth self-reporting: streaming statistics of every MLP neuron over a whole corpus.

    nsr scan --corpus embedded --max_documents 2000 --top_n 20 --output_dir outputs/scan
    accelerate launch -m nsr_hf.cli scan ...          # each process scans its share, merged exactly

>>> scanner = NeuronScanner(model, tokenizer, ScanConfig(layers=[10, 11], top_n=5))
>>> result = scanner.scan(load_corpus("embedded", limit=500))
>>> print(result.format_table())
>>> result.neuron_at_rank(1)          # Neuron(11, 345): what a recipe's ``neuron: auto`` takes

How it works. A ``NeuronRecorder`` hands each layer's neuron vector to a callback while the forward
pass runs, so activations are reduced layer by layer and never stored for the whole model; the forward
stops after the deepest scanned layer (no logits). For every neuron of the scanned layers the scan keeps,
in float64 and in memory that does not grow with the corpus:

* count, mean and the central moment sums M2, M3, M4 (merged batch by batch with the exact pairwise
  formulas of Chan et al. and Pébay, so two shards merge into exactly what one pass gives),
* min, max, and the number of positions whose value is strictly above ``threshold``,
* the ``top_k_examples`` largest values with the document and token they came from.

Positions (``position``): ``"all"`` reads every real (non-padding) token, ``"last"`` the last real token
of each document (the readout rule of nsr_hf.capture).

Statistics are population statistics over positions: ``variance`` = M2 / n (numpy's ``var``),
``skewness`` = sqrt(n) M3 / M2^1.5 and ``kurtosis`` = n M4 / M2^2 - 3, the *excess* kurtosis (0 for a
Gaussian), as ``scipy.stats.skew`` / ``kurtosis`` with their defaults. They are NaN for a constant neuron.

The scores are documented in ``SCORES`` and ``compute_scores``. Dead neurons (constant on the corpus, or
with a standard deviation below ``dead_std_ratio`` times the median one) get ``-inf`` in every score, so
they are never ranked ahead of a live one.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from nsr_hf.architectures import num_layers, num_neurons
from nsr_hf.capture import Neuron, NeuronRecorder, encode_texts, position_ids_from_mask, real_token_bounds, validate_layer
from nsr_hf.data.corpus import Document, TextSource, load_corpus
from nsr_hf.models import load_model_and_tokenizer, model_provenance
from nsr_hf.shared_config import CorpusFields

if TYPE_CHECKING:
    import pandas

logger = logging.getLogger(__name__)

POSITIONS = ("all", "last")

SCORES = {
    "variance": "population variance of the neuron over the scanned positions",
    "range": "max - min over the scanned positions",
    "kurtosis": "excess kurtosis (heavy tails: rare, large values)",
    "selectivity": "4 p (1 - p) with p = fraction of positions above threshold: 1 when the neuron fires half the time, "
    "0 when it never or always fires (the sparsity score)",
    "seed": "the earlier prototype's rule: w * variance / max variance + (1 - w) * range / max range (w = seed_variance_weight)",
    "composite": "selectivity * std / max std: large swings, neither dead nor always above threshold (default)",
}

TABLE_FILE = "neurons.parquet"
TOP_FILE = "top_neurons.json"
HEATMAP_FILE = "score_heatmap.png"
HISTOGRAM_FILE = "top_histograms.png"
STAT_COLUMNS = ("count", "mean", "std", "variance", "min", "max", "skewness", "kurtosis", "frac_above")


@dataclass
class ScanConfig(CorpusFields):
    """Scan a corpus for the MLP neurons worth self-reporting (statistics, scores, top examples, plots)."""

    max_documents: Optional[int] = field(default=2000, metadata={"help": "Scan at most this many documents (after dropping duplicates); 0 or None: all"})
    layers: Optional[list[int]] = field(default=None, metadata={"help": "Layers to scan, e.g. --layers 10 11 12 (None: all layers)"})
    position: str = field(default="all", metadata={"help": "'all': every real token; 'last': the last real token of each document"})
    threshold: float = field(
        default=0.5,
        metadata={"help": "A neuron 'fires' at a position when its value is strictly above this (frac_above, selectivity, composite). "
                  "Never a test of == 0: GELU/SiLU outputs are almost never exactly 0. The default suits SmolLM2, whose values "
                  "centre on 0 with a std of 0.1 to 0.5 per layer"},
    )
    score: str = field(default="composite", metadata={"help": f"Ranking score, one of: {', '.join(SCORES)}"})
    seed_variance_weight: float = field(default=0.5, metadata={"help": "Weight of normalised variance in the 'seed' score (range gets 1 - this)"})
    dead_std_ratio: float = field(
        default=1e-3,
        metadata={"help": "A neuron whose std is at most this times the median std of the scanned neurons is dead "
                  "(constant ones always are): -inf in every score"},
    )
    top_n: int = field(default=20, metadata={"help": "How many top-ranked neurons to report with examples"})
    top_k_examples: int = field(default=10, metadata={"help": "Top activating examples kept per neuron"})
    example_window: int = field(default=8, metadata={"help": "Tokens of context shown on each side of an example's token"})
    batch_size: int = field(default=8, metadata={"help": "Documents per forward pass"})
    max_length: int = field(default=256, metadata={"help": "Documents are cut to this many tokens"})
    histogram_documents: int = field(default=200, metadata={"help": "Documents read again for the top neurons' histograms (0: no histograms)"})
    output_dir: Optional[str] = field(default="outputs/scan", metadata={"help": "Where to write the table, top_neurons.json and plots (None: do not write)"})
    seed: int = field(default=0, metadata={"help": "Random seed (the synthetic corpus samples with it)"})

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"Unknown score {self.score!r}: choose one of {', '.join(SCORES)}.")
        if self.position not in POSITIONS:
            raise ValueError(f"Unknown position rule {self.position!r} for a scan: use 'all' (every real token) or 'last' (last real token).")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold}.")
        if not 0.0 <= self.seed_variance_weight <= 1.0:
            raise ValueError(f"seed_variance_weight must be in [0, 1], got {self.seed_variance_weight}.")
        if not 0.0 <= self.dead_std_ratio < 1.0:
            raise ValueError(f"dead_std_ratio must be in [0, 1), got {self.dead_std_ratio}.")
        for name in ("top_n", "top_k_examples", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("example_window", "histogram_documents"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}.")
        if self.max_documents == 0:  # the command line cannot say None
            self.max_documents = None
        if self.max_documents is not None and self.max_documents < 0:
            raise ValueError(f"max_documents must be at least 1 (or 0 / None for the whole corpus), got {self.max_documents}.")
        if self.layers is not None:
            layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
            if not layers:
                raise ValueError("layers is empty: name at least one layer, or leave it unset to scan all layers.")
            if any(isinstance(x, bool) or not isinstance(x, int) for x in layers):
                raise ValueError(f"layers must be integers, got {self.layers!r}.")
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers lists a layer twice: {self.layers!r}.")
            self.layers = sorted(layers)


# ----------------------------------------------------------------------------------------------
# Streaming statistics


def _combine_moments(n_a, mean_a, m2_a, m3_a, m4_a, n_b, mean_b, m2_b, m3_b, m4_b):
    """Count, mean and central moment sums of the union of two sets (Chan et al. 1979; Pébay 2008).

    Exact in exact arithmetic whatever the split, so merging shards gives what one pass gives.
    """
    n = n_a + n_b
    delta = mean_b - mean_a
    delta_n = delta / n.clamp(min=1)  # n == 0 only when both sides are empty: every term is 0 then
    delta_n2 = delta_n * delta_n
    ab = n_a * n_b
    mean = mean_a + delta_n * n_b
    m2 = m2_a + m2_b + delta * delta_n * ab
    m3 = m3_a + m3_b + delta * delta_n2 * ab * (n_a - n_b) + 3 * delta_n * (n_a * m2_b - n_b * m2_a)
    m4 = (
        m4_a + m4_b
        + delta * delta_n * delta_n2 * ab * (n_a * n_a - ab + n_b * n_b)
        + 6 * delta_n2 * (n_a * n_a * m2_b + n_b * n_b * m2_a)
        + 4 * delta_n * (n_a * m3_b - n_b * m3_a)
    )
    return n, mean, m2, m3, m4


class MomentStats:
    """Streaming statistics of ``rows x neurons`` neurons (a row is a layer), all float64.

    Holds count, mean, M2, M3, M4 (central moment sums), min, max and n_above (positions with a value
    strictly above ``threshold``). ``update`` stages a batch of one row, ``flush`` merges what is staged
    (all rows at once: one vectorised merge per forward pass, not one per layer), ``merge`` adds another
    ``MomentStats``; both use the same pairwise formula. Properties (which flush first) give population
    variance, skewness and excess kurtosis.
    """

    FIELDS = ("count", "mean", "m2", "m3", "m4", "min", "max", "n_above")

    def __init__(self, rows: int, neurons: int, threshold: float, device: torch.device | str = "cpu"):
        self.threshold = float(threshold)
        for name, tensor in self._empty(rows, neurons, device).items():
            setattr(self, name, tensor)
        self._batch: dict | None = None  # staged batch statistics; rows without a batch have count 0
        self._staged: set[int] = set()

    @classmethod
    def _empty(cls, rows: int, neurons: int, device) -> dict[str, torch.Tensor]:
        """Statistics of no values: merging them changes nothing."""
        empty = {name: torch.zeros(rows, neurons, dtype=torch.float64, device=device) for name in cls.FIELDS}
        empty["min"].fill_(math.inf)
        empty["max"].fill_(-math.inf)
        return empty

    def update(self, row: int, values: torch.Tensor) -> torch.Tensor:
        """Stage ``values`` of shape ``(positions, neurons)`` for ``row``; returns the batch max per neuron.

        This runs inside the forward hooks: the batch's own central moments are computed in the
        activations' precision (float32; few passes); ``flush`` merges them in float64.
        """
        if row in self._staged:  # a second batch for the same row: merge the first one before
            self.flush()
        x = values if values.dtype in (torch.float32, torch.float64) else values.float()
        mean = x.mean(0)
        d = x - mean
        d2 = d * d
        m2 = d2.sum(0)
        m3 = d.mul_(d2).sum(0)  # in place: d is not needed any more
        m4 = d2.mul_(d2).sum(0)
        hi, lo = x.amax(0), x.amin(0)
        above = (x > self.threshold).sum(0, dtype=torch.int32)  # int32: a cheaper reduction than the default int64
        if self._batch is None:
            self._batch = self._empty(*self.count.shape, self.count.device)
        for name, value in zip(self.FIELDS, (x.shape[0], mean, m2, m3, m4, lo, hi, above)):
            self._batch[name][row] = value
        self._staged.add(row)
        return hi

    def flush(self) -> None:
        """Merge the staged batches into the totals."""
        if self._batch is not None:
            batch, self._batch = self._batch, None
            self._staged.clear()
            self._absorb(batch)

    def _absorb(self, other: dict) -> None:
        own = (self.count, self.mean, self.m2, self.m3, self.m4)
        moments = _combine_moments(*own, *(other[name] for name in ("count", "mean", "m2", "m3", "m4")))
        self.count, self.mean, self.m2, self.m3, self.m4 = moments
        self.min = torch.minimum(self.min, other["min"])
        self.max = torch.maximum(self.max, other["max"])
        self.n_above = self.n_above + other["n_above"]

    def merge(self, other: MomentStats) -> MomentStats:
        """Add another shard's statistics (same rows and neurons) in place; returns self."""
        if self.count.shape != other.count.shape:
            raise ValueError(f"Cannot merge statistics of shape {tuple(other.count.shape)} into {tuple(self.count.shape)}.")
        if self.threshold != other.threshold:
            raise ValueError(f"Cannot merge statistics with thresholds {self.threshold} and {other.threshold}.")
        self.flush()
        other.flush()
        self._absorb({name: getattr(other, name).to(self.count.device) for name in self.FIELDS})
        return self

    def state_dict(self) -> dict:
        self.flush()
        return {"threshold": self.threshold, **{name: getattr(self, name).cpu() for name in self.FIELDS}}

    @classmethod
    def from_state_dict(cls, state: dict) -> MomentStats:
        rows, neurons = state["count"].shape
        stats = cls(rows, neurons, state["threshold"])
        for name in cls.FIELDS:
            setattr(stats, name, state[name].clone())
        return stats

    @property
    def variance(self) -> torch.Tensor:
        """Population variance M2 / n (numpy's ``var`` with ``ddof=0``)."""
        self.flush()
        return self.m2 / self.count

    @property
    def std(self) -> torch.Tensor:
        return self.variance.sqrt()

    @property
    def skewness(self) -> torch.Tensor:
        """sqrt(n) M3 / M2^1.5 (``scipy.stats.skew``, biased); NaN for a constant neuron."""
        self.flush()
        m2 = self.m2.where(self.m2 > 0, torch.nan)
        return self.count.sqrt() * self.m3 / m2.pow(1.5)

    @property
    def kurtosis(self) -> torch.Tensor:
        """Excess kurtosis n M4 / M2^2 - 3 (``scipy.stats.kurtosis``, Fisher, biased); NaN for a constant neuron."""
        self.flush()
        m2 = self.m2.where(self.m2 > 0, torch.nan)
        return self.count * self.m4 / (m2 * m2) - 3.0

    @property
    def frac_above(self) -> torch.Tensor:
        """Fraction of positions with a value strictly above ``threshold``."""
        self.flush()
        return self.n_above / self.count


class TopExamples:
    """For every neuron, the ``k`` largest values seen, with the document index and token index of each.

    Memory is ``rows x k x neurons``, whatever the corpus size. Values are sorted, largest first; unused
    slots hold ``-inf`` and index ``-1``. Which of several exactly equal values is kept depends on the
    order of the documents: such ties come from identical contexts (documents that start with the same
    tokens), whose examples are interchangeable.
    """

    def __init__(self, rows: int, neurons: int, k: int, device: torch.device | str = "cpu"):
        self.k = k
        self.values = torch.full((rows, k, neurons), -math.inf, dtype=torch.float32, device=device)
        self.doc = torch.full((rows, k, neurons), -1, dtype=torch.long, device=device)
        self.token = torch.full((rows, k, neurons), -1, dtype=torch.long, device=device)

    def update(self, row: int, values: torch.Tensor, doc: torch.Tensor, token: torch.Tensor, batch_max: torch.Tensor | None = None) -> None:
        """Offer ``values`` ``(positions, neurons)`` whose positions come from documents ``doc`` and
        tokens ``token`` (both ``(positions,)``)."""
        cols = slice(None)
        if not values.is_cuda:
            # Only neurons whose batch maximum beats their current k-th value can change: every neuron
            # during the first batches, a shrinking minority after. On a CPU the top-k then runs on those
            # only; on a GPU it is cheap for all, and finding them would stall the stream (nonzero syncs).
            if batch_max is None:
                batch_max = values.amax(0)
            cols = (batch_max.float() > self.values[row, -1]).nonzero().squeeze(1)
            if cols.numel() == 0:
                return
            if cols.numel() == values.shape[1]:
                cols = slice(None)
        sub = values[:, cols].float()
        best, where = sub.topk(min(self.k, sub.shape[0]), dim=0)
        self._keep(row, cols, best, doc[where], token[where])

    def _keep(self, row: int, cols, values, doc, token) -> None:
        """Merge candidates ``(values, doc, token)``, each ``(c, len(cols))``, into the kept top-k of ``cols``."""
        cand_values = torch.cat([self.values[row][:, cols], values])
        cand_doc = torch.cat([self.doc[row][:, cols], doc])
        cand_token = torch.cat([self.token[row][:, cols], token])
        best, where = cand_values.topk(self.k, dim=0)
        self.values[row][:, cols] = best
        self.doc[row][:, cols] = cand_doc.gather(0, where)
        self.token[row][:, cols] = cand_token.gather(0, where)

    def merge(self, other: TopExamples) -> TopExamples:
        """Keep the top ``k`` of both (another shard); returns self."""
        if self.values.shape != other.values.shape:
            raise ValueError(f"Cannot merge top examples of shape {tuple(other.values.shape)} into {tuple(self.values.shape)}.")
        for row in range(self.values.shape[0]):
            self._keep(row, slice(None), *(t[row].to(self.values.device) for t in (other.values, other.doc, other.token)))
        return self

    def state_dict(self) -> dict:
        return {"values": self.values.cpu(), "doc": self.doc.cpu(), "token": self.token.cpu()}

    @classmethod
    def from_state_dict(cls, state: dict) -> TopExamples:
        rows, k, neurons = state["values"].shape
        top = cls(rows, neurons, k)
        top.values, top.doc, top.token = (state[name].clone() for name in ("values", "doc", "token"))
        return top


@dataclass
class ScanState:
    """What a scan accumulates over one shard of the corpus; ``merge`` combines shards exactly."""

    layers: list[int]
    stats: MomentStats
    examples: TopExamples
    documents: int = 0
    tokens: int = 0  # real tokens read (the positions scanned are fewer for position="last")

    def merge(self, other: ScanState) -> ScanState:
        if self.layers != other.layers:
            raise ValueError(f"Cannot merge scans of layers {other.layers} and {self.layers}.")
        self.stats.merge(other.stats)
        self.examples.merge(other.examples)
        self.documents += other.documents
        self.tokens += other.tokens
        return self

    def state_dict(self) -> dict:
        return {"layers": self.layers, "stats": self.stats.state_dict(), "examples": self.examples.state_dict(),
                "documents": self.documents, "tokens": self.tokens}

    @classmethod
    def from_state_dict(cls, state: dict) -> ScanState:
        return cls(list(state["layers"]), MomentStats.from_state_dict(state["stats"]), TopExamples.from_state_dict(state["examples"]),
                   state["documents"], state["tokens"])


# ----------------------------------------------------------------------------------------------
# Scores and ranking


def dead_neurons(std: np.ndarray, value_range: np.ndarray, dead_std_ratio: float) -> np.ndarray:
    """Constant neurons (max == min), and those whose std is at most ``dead_std_ratio`` x the median std."""
    floor = dead_std_ratio * float(np.median(std)) if std.size else 0.0
    return (value_range <= 0) | ~np.isfinite(std) | (std <= floor)


def compute_scores(table: dict, seed_variance_weight: float = 0.5, dead: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every score of ``SCORES`` for neurons given as arrays (``variance``, ``std``, ``min``, ``max``,
    ``kurtosis``, ``frac_above``). Higher is better; dead neurons and undefined values get ``-inf``.

    * ``variance``: population variance.
    * ``range``: max - min.
    * ``kurtosis``: excess kurtosis; large for neurons that are quiet most of the time and sometimes large.
    * ``selectivity``: 4 p (1 - p), p = fraction of positions above ``threshold``: 1 when a neuron fires on
      half of the positions, 0 when it never or always does.
    * ``seed``: the earlier prototype's rule, w * variance / max variance + (1 - w) * range / max range,
      maxima over live neurons, w = ``seed_variance_weight``.
    * ``composite`` (default): selectivity * std / max std. Needs both a large swing and a neuron that is
      neither dead nor always above threshold; the product is 0 for one that never or always fires.
    """
    variance = np.asarray(table["variance"], dtype=np.float64)
    std = np.asarray(table["std"], dtype=np.float64)
    value_range = np.asarray(table["max"], dtype=np.float64) - np.asarray(table["min"], dtype=np.float64)
    p = np.asarray(table["frac_above"], dtype=np.float64)
    live = np.ones_like(variance, dtype=bool) if dead is None else ~np.asarray(dead)

    def normalised(x):
        top = x[live].max() if live.any() else 0.0
        return x / top if top > 0 else np.zeros_like(x)

    selectivity = 4.0 * p * (1.0 - p)
    scores = {
        "variance": variance,
        "range": value_range,
        "kurtosis": np.asarray(table["kurtosis"], dtype=np.float64),
        "selectivity": selectivity,
        "seed": seed_variance_weight * normalised(variance) + (1.0 - seed_variance_weight) * normalised(value_range),
        "composite": selectivity * normalised(std),
    }
    return {name: np.where(live & np.isfinite(s), s, -np.inf) for name, s in scores.items()}


def rank_order(score: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Indices from best to worst: by score, ties broken by the larger std, then by (layer, neuron) order."""
    std = np.where(np.isfinite(std), std, -np.inf)
    return np.lexsort((np.arange(score.size), -std, -score))


# ----------------------------------------------------------------------------------------------
# Results


def _finite(x):
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
        (out / TOP_FILE).write_text(json.dumps(payload, indent=2, allow_nan=False))
        plot_score_heatmap(self.table, self.score, out / HEATMAP_FILE)
        if self.histograms:
            plot_histograms(self.histograms, self.config["threshold"], out / HISTOGRAM_FILE)
        return out


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


def plot_score_heatmap(table, score: str, path: Path) -> None:
    """Heat map of ``score`` by layer (rows) and neuron (columns); dead neurons grey. Colours span the
    1st to 99th percentile of the live scores, so a few extreme neurons do not wash out the rest."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = np.sort(table["layer"].unique())
    width = int(table["neuron"].max()) + 1
    grid = np.full((len(layers), width), np.nan)
    row_of = {layer: i for i, layer in enumerate(layers)}
    values = table[f"score_{score}"].to_numpy(dtype=np.float64)
    grid[table["layer"].map(row_of).to_numpy(), table["neuron"].to_numpy()] = np.where(np.isfinite(values), values, np.nan)
    finite = values[np.isfinite(values)]
    vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    fig = Figure(figsize=(12, max(2.5, 0.25 * len(layers) + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers] if len(layers) <= 40 else None)
    ax.set_xlabel("neuron")
    ax.set_ylabel("layer")
    ax.set_title(f"score '{score}' by layer and neuron (grey: dead)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def plot_histograms(histograms: dict, threshold: float, path: Path, max_panels: int = 20) -> None:
    """Histograms of the top neurons' activations (the first ``max_panels``), with the threshold marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    items = list(histograms.items())[:max_panels]
    cols = min(5, len(items))
    rows = math.ceil(len(items) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows))
    FigureCanvasAgg(fig)
    for i, (name, values) in enumerate(items):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.hist(np.asarray(values, dtype=np.float64), bins=60, color="tab:blue")
        ax.axvline(threshold, color="tab:red", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(f"#{i + 1}  neuron {name}", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"activations of the top neurons ({len(next(iter(histograms.values()))) if histograms else 0} positions each; red: threshold)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------------------------
# The scanner


def as_source(source):
    """A ``TextSource`` from a source, a spec string for ``load_corpus``, or a list of ``Document``s / texts
    (texts get ids ``"text:<i>"``)."""

    if isinstance(source, TextSource):
        return source
    if isinstance(source, str):
        return load_corpus(source)
    docs = tuple(d if isinstance(d, Document) else Document(f"text:{i}", str(d)) for i, d in enumerate(source))

    class InMemory(TextSource):
        kind = "in_memory"

        def _documents(self):
            return iter(docs)

        def _provenance(self):
            return {"documents": len(docs)}

    return InMemory("in_memory")


class NeuronScanner:
    """Streams documents through ``model`` and accumulates per-neuron statistics and top examples.

    ``scan(source)`` does it all (sharding across ``accelerate`` processes, merging, ranking, text windows);
    ``accumulate`` and ``finish`` are its two halves, for scanning shards by hand and merging them.
    """

    def __init__(self, model, tokenizer, config: ScanConfig | None = None, **overrides):
        self.model, self.tokenizer = model, tokenizer
        self.config = ScanConfig(**{**(asdict(config) if config else {}), **overrides})
        self.layers = list(range(num_layers(model))) if self.config.layers is None else self.config.layers
        for layer in self.layers:
            validate_layer(model, layer)
        self.neurons = num_neurons(model)
        self.device = next(model.parameters()).device

    # -- batches -------------------------------------------------------------------------------

    def iter_batches(self, documents: Iterable[tuple[int, Document]]) -> Iterator[tuple[torch.Tensor, dict]]:
        """``(document indices, tokenised batch)`` for ``(index, Document)`` pairs.

        Documents of similar length are batched together (sorted within a window of 16 batches) to
        waste less compute on padding; indices say which document each row is.
        """
        size = self.config.batch_size
        window: list = []

        def flush():
            window.sort(key=lambda item: len(item[1].text))
            for start in range(0, len(window), size):
                chunk = window[start : start + size]
                batch = encode_texts(self.tokenizer, [doc.text for _, doc in chunk], max_length=self.config.max_length)
                yield torch.tensor([i for i, _ in chunk]), batch
            window.clear()

        for item in documents:
            window.append(item)
            if len(window) == 16 * size:
                yield from flush()
        yield from flush()

    def _positions(self, attention_mask: torch.Tensor, doc_index: torch.Tensor):
        """Which positions to read: ``(flat index into batch x sequence, document index, token index)``,
        one entry per read position. Token indices count real tokens (0 = first), so they do not depend
        on the padding side. ``None`` as flat index means every position (no copy needed)."""
        attention_mask = attention_mask.cpu()  # small; the indices are moved to the model's device by the caller
        mask = attention_mask.bool()
        seq = mask.shape[1]
        if self.config.position == "all":
            token = position_ids_from_mask(attention_mask)[mask]
            flat = None if mask.all() else mask.flatten().nonzero().squeeze(1)
            return flat, doc_index[:, None].expand_as(mask)[mask], token
        first, last = real_token_bounds(attention_mask)
        return torch.arange(mask.shape[0]) * seq + last, doc_index, last - first

    @staticmethod
    def _read(acts: torch.Tensor, flat: torch.Tensor | None) -> torch.Tensor:
        """``(positions, neurons)`` from ``(batch, seq, neurons)`` activations (index_select: much
        cheaper than boolean-mask indexing on CPU)."""
        acts = acts.reshape(-1, acts.shape[-1])
        return acts if flat is None else acts.index_select(0, flat)

    # -- the two halves of a scan ---------------------------------------------------------------

    def new_state(self) -> ScanState:
        rows = len(self.layers)
        return ScanState(list(self.layers), MomentStats(rows, self.neurons, self.config.threshold, self.device),
                         TopExamples(rows, self.neurons, self.config.top_k_examples, self.device))

    def accumulate(self, documents: Iterable[tuple[int, Document]], state: ScanState | None = None, progress: bool = False,
                   total: int | None = None) -> ScanState:
        """Scan ``(global index, Document)`` pairs into ``state`` (a new one by default) and return it."""
        return self.accumulate_batches(self.iter_batches(documents), state, progress, total)

    def accumulate_batches(self, batches: Iterable[tuple[torch.Tensor, dict]], state: ScanState | None = None, progress: bool = False,
                           total: int | None = None) -> ScanState:
        """Scan ``(document indices, tokenised batch)`` pairs (as ``iter_batches`` makes them) into ``state``."""
        from tqdm.auto import tqdm

        state = state or self.new_state()
        row_of = {layer: i for i, layer in enumerate(self.layers)}
        current: dict = {}

        def consume(layer: int, acts: torch.Tensor) -> None:
            flat, doc, token = current["positions"]
            x = self._read(acts, flat)
            row = row_of[layer]
            batch_max = state.stats.update(row, x)
            state.examples.update(row, x, doc, token, batch_max)

        recorder = NeuronRecorder(self.model, {layer: None for layer in self.layers}, stop_early=True, callback=consume)
        bar = tqdm(total=total, desc="scan", unit="doc", disable=not progress, dynamic_ncols=True)
        start = time.perf_counter()
        with torch.inference_mode():
            for doc_index, batch in batches:
                mask = batch["attention_mask"]
                current["positions"] = tuple(None if t is None else t.to(self.device) for t in self._positions(mask, doc_index))
                recorder.run(batch)
                state.stats.flush()
                state.documents += len(doc_index)
                state.tokens += int(mask.sum())
                bar.update(len(doc_index))
                bar.set_postfix(tokens_per_s=f"{state.tokens / (time.perf_counter() - start):.0f}", refresh=False)
        bar.close()
        return state

    def finish(self, state: ScanState, source, metadata: dict | None = None) -> ScanResult:
        """Scores, ranking, and the top N neurons' examples with text windows. The examples' documents are
        read again from ``source``: the indices in ``state`` must be positions in
        ``source.iter_documents(limit=max_documents)``, as ``scan`` makes them."""
        import pandas as pd

        source = as_source(source)
        if state.documents == 0:
            raise ValueError(f"The corpus gave no documents to scan ({source.describe()}): check the corpus, its text_field and "
                             f"max_documents (empty texts and exact duplicates are dropped).")
        cfg = self.config
        stats = state.stats
        stats.flush()
        rows, neurons = stats.count.shape
        columns = {
            "layer": np.repeat(np.asarray(self.layers), neurons),
            "neuron": np.tile(np.arange(neurons), rows),
            "count": stats.count.flatten().cpu().numpy().astype(np.int64),
        }
        for name in STAT_COLUMNS[1:]:
            columns[name] = getattr(stats, name).flatten().cpu().numpy()
        dead = dead_neurons(columns["std"], columns["max"] - columns["min"], cfg.dead_std_ratio)
        columns["dead"] = dead
        scores = compute_scores(columns, cfg.seed_variance_weight, dead)
        for name, values in scores.items():
            columns[f"score_{name}"] = values
        order = rank_order(scores[cfg.score], columns["std"])
        rank = np.empty(order.size, dtype=np.int64)
        rank[order] = np.arange(1, order.size + 1)
        columns["rank"] = rank
        table = pd.DataFrame(columns).iloc[order].reset_index(drop=True)
        if cfg.score in ("selectivity", "composite") and not (table["frac_above"][~table["dead"]] > 0).any():
            logger.warning("No neuron is ever above threshold %g: the '%s' score is 0 for all; lower --threshold.", cfg.threshold, cfg.score)

        top = table.head(cfg.top_n)
        windows = self._example_windows(state, top, source)
        top_neurons = []
        for row in top.itertuples(index=False):
            name = f"{row.layer}.{row.neuron}"
            top_neurons.append({
                "rank": int(row.rank), "neuron": name, "layer": int(row.layer), "index": int(row.neuron), "dead": bool(row.dead),
                "score": _finite(getattr(row, f"score_{cfg.score}")),
                "scores": {s: _finite(getattr(row, f"score_{s}")) for s in SCORES},
                "stats": {s: (int(row.count) if s == "count" else _finite(getattr(row, s))) for s in STAT_COLUMNS},
                "examples": windows[(int(row.layer), int(row.neuron))],
            })
        meta = {"documents": state.documents, "tokens": state.tokens, "positions": int(stats.count[0, 0]),
                "neurons": int(rows * neurons), "layers": list(self.layers), "threshold_rule": "value > threshold", **(metadata or {})}
        return ScanResult(table=table, top_neurons=top_neurons, config=asdict(cfg), metadata=meta)

    def _example_windows(self, state: ScanState, top, source) -> dict:
        """``{(layer, neuron): [example, ...]}`` for the ``top`` rows, reading only the documents they need."""
        row_of = {layer: i for i, layer in enumerate(self.layers)}
        ex = state.examples
        wanted = {}
        for layer, neuron in zip(top["layer"], top["neuron"]):
            r, n = row_of[int(layer)], int(neuron)
            keep = torch.isfinite(ex.values[r, :, n])
            wanted[(int(layer), n)] = list(zip(ex.values[r, keep, n].tolist(), ex.doc[r, keep, n].tolist(), ex.token[r, keep, n].tolist()))
        needed = {doc for items in wanted.values() for _, doc, _ in items}
        docs = {}
        if needed:
            last_needed = max(needed)
            for i, doc in enumerate(source.iter_documents(limit=self.config.max_documents)):
                if i in needed:
                    ids = encode_texts(self.tokenizer, [doc.text], max_length=self.config.max_length)["input_ids"][0].tolist()
                    docs[i] = (doc.doc_id, ids)
                if i >= last_needed:
                    break
        decode = lambda ids: self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        w = self.config.example_window
        out = {}
        for key, items in wanted.items():
            out[key] = []
            for value, doc, token in items:
                if doc not in docs:
                    raise RuntimeError(f"Document {doc} could not be read again: the corpus must iterate the same way twice.")
                doc_id, ids = docs[doc]
                out[key].append({
                    "value": value, "doc_id": doc_id, "doc_index": doc, "token_index": token, "token": decode(ids[token : token + 1]),
                    "before": decode(ids[max(0, token - w) : token]), "after": decode(ids[token + 1 : token + 1 + w]),
                })
        return out

    # -- the whole scan --------------------------------------------------------------------------

    def scan(self, source, progress: bool = True) -> ScanResult:
        """Scan a ``TextSource`` (or any iterable of ``Document`` with ``iter_documents``); every process of
        an ``accelerate launch`` takes documents ``i`` with ``i % num_processes == process_index``, and the
        shards' statistics are gathered and merged exactly. Every process returns the same result."""
        from accelerate.utils import gather_object

        source = as_source(source)
        dist = distributed_state()
        world, rank = dist.num_processes, dist.process_index
        limit = self.config.max_documents
        mine = ((i, doc) for i, doc in enumerate(source.iter_documents(limit=limit)) if i % world == rank)
        total = None if limit is None else len(range(rank, limit, world))
        state = self.accumulate(mine, progress=progress and dist.is_main_process, total=total)
        per_process = [state.documents]
        if world > 1:
            # Every process gets every shard and merges them in rank order: all return the same result.
            shards = gather_object([state.state_dict()])
            per_process = [shard["documents"] for shard in shards]
            state = ScanState.from_state_dict(shards[0])
            for shard in shards[1:]:
                state.merge(ScanState.from_state_dict(shard))
        metadata = {"corpus": source.describe(), "model": model_provenance(self.model), "num_processes": world,
                    "documents_per_process": per_process}
        return self.finish(state, source, metadata)

    def activation_samples(self, source, neurons: Sequence[Neuron], documents: int | None = None) -> dict[str, np.ndarray]:
        """``{"layer.index": values}`` of ``neurons`` at the scan's positions over the first ``documents``
        documents (``histogram_documents`` by default): a short second pass that captures only those neurons."""
        documents = self.config.histogram_documents if documents is None else documents
        source = as_source(source)
        if not neurons or documents == 0:
            return {}
        wanted: dict[int, list[int]] = {}
        for n in neurons:
            wanted.setdefault(n.layer, []).append(n.index)
        values = {n: [] for n in map(str, neurons)}
        current: dict = {}

        def consume(layer: int, acts: torch.Tensor) -> None:
            x = self._read(acts, current["flat"]).float().cpu()
            for j, index in enumerate(wanted[layer]):
                values[f"{layer}.{index}"].append(x[:, j])

        recorder = NeuronRecorder(self.model, wanted, stop_early=True, callback=consume)
        with torch.inference_mode():
            for doc_index, batch in self.iter_batches(enumerate(source.iter_documents(limit=documents))):
                flat = self._positions(batch["attention_mask"], doc_index)[0]
                current["flat"] = None if flat is None else flat.to(self.device)
                recorder.run(batch)
        return {name: torch.cat(parts).numpy() for name, parts in values.items() if parts}


def distributed_state():
    """accelerate's ``PartialState``. Under ``accelerate launch`` on a machine without CUDA it must be asked
    for CPU explicitly, or each process believes it is alone (torchrun's env is only read as multi-CPU)."""
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=launched and not torch.cuda.is_available())


def run_scan(config: ScanConfig, model=None, tokenizer=None, source=None) -> ScanResult:
    """``nsr scan``: load the model and corpus (unless given), scan, and on the main process write the
    outputs into ``config.output_dir`` and print the table of top neurons."""
    dist = distributed_state()
    torch.manual_seed(config.seed)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(config.model, device=dist.device)
    if source is None:
        extra = {"seed": config.seed} if config.corpus == "synthetic" else {}
        source = load_corpus(config.corpus, text_field=config.text_field, model=model, tokenizer=tokenizer, **extra)
    scanner = NeuronScanner(model, tokenizer, config)
    result = scanner.scan(source)
    if dist.is_main_process:
        top = [Neuron(int(r.layer), int(r.neuron)) for r in result.top(config.top_n).itertuples(index=False)]
        result.histograms = scanner.activation_samples(source, top)
        if config.output_dir:
            result.save(config.output_dir)
        print(result.format_table())
        if config.output_dir:
            print(f"wrote {Path(config.output_dir) / TABLE_FILE}, {TOP_FILE} and plots")
    return result
