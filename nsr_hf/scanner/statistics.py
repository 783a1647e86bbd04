"""Streaming statistics of every scanned neuron, in memory that does not grow with the corpus, and merged exactly
across shards: the moments (count, mean, M2, M3, M4, min, max, positions above threshold) and the top examples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
