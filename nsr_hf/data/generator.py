"""Activation datasets: a corpus turned into a ``datasets.DatasetDict`` of neuron values, with the label
transforms fitted on train and the provenance a reviewer needs, saved, pushed and loaded like any dataset.

    from nsr_hf.data.generator import DatasetConfig, ActivationDatasetGenerator, load_activation_dataset
    dd = ActivationDatasetGenerator(DatasetConfig(neurons=["15.100"], output_dir="out/ds")).generate()
    dd, meta = load_activation_dataset("out/ds")          # or a Hub id, or a folder in the Hub's layout

    nsr dataset --neurons 15.100 15.7 --max_documents 2000 --output_dir out/ds [--push_to_hub me/nsr-15-100]

Splits: ``train`` / ``validation`` / ``test`` by document (``corpus.split_of`` on the document id, after exact
duplicates are dropped), and ``test_ood`` holding every document of an optional second corpus (deduplicated
against the first, so an out-of-domain text never repeats an in-domain one).

Columns (one row per document, or per token for ``position="all"`` with ``every_token_layout="rows"``):

* ``text``: the document's original text, never cut. ``input_ids`` is what the model saw: ``encode_texts``
  (the one tokenisation rule) cut at ``max_length`` tokens, stored without padding (int32);
  ``encode_texts(tokenizer, text, max_length)`` gives these ids again.
* ``doc_id``; ``attention_mask`` (int8, all ones, kept for HF collators).
* ``label_position`` (int32): index in ``input_ids`` of the labelled token; ``label_token_id`` its id.
* ``activations``: float32, a fixed-length list of the K requested neurons in the order given.
* ``activations_z`` (float32, K) and ``bin`` (int32, K): the transforms fitted on train (below).

For ``every_token_layout="column"`` a row is a document and ``activations`` / ``activations_z`` / ``bin`` are
per-token lists of K-lists (one per id in ``input_ids``); there is no ``label_position``.

Position rules are those of ``nsr_hf.capture``. ``"max"`` with several neurons labels the token where the
*first* neuron is largest and stores every neuron's value at that same token, so a row is one token as for
every other rule. A document too short for an integer rule (``position=5`` on a 3-token text) is skipped and
counted in the metadata (``skipped_documents``).

Transforms (``LabelTransform``) are fitted on the train split only, before balancing: z-score statistics and
``num_bins + 1`` bin edges per neuron (quantile or equal-width), and the report tokens the bins map to.

Generation runs in shards of ``shard_size`` documents per split, each written atomically to
``output_dir/shards/<split>-<index>`` with a manifest: an interrupted run resumes without recomputing finished
shards, a resume with a different configuration is refused, and under ``accelerate launch`` shard ``g`` (in
corpus order over all splits) goes to process ``g % num_processes``. The main process then joins the shards
(memory-mapped), fits the transforms, adds their columns, balances train if asked, and saves the
``DatasetDict`` with its card (``README.md``) in ``output_dir``. Rows never accumulate in memory beyond one shard.

Provenance and transforms live in the card's YAML under ``nsr_hf:`` and, as JSON ``{"nsr_hf": ...}``, in each
split's ``info.description`` (which survives ``save_to_disk``; the card is what survives the Hub).
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from nsr_hf.capture import Neuron, capture_activations, encode_texts, label_positions, select_positions, validate_neuron, validate_position
from nsr_hf.data.corpus import SPLITS, Document, TextSource, check_fractions, deduplicate, load_corpus, split_of
from nsr_hf.models import load_model_and_tokenizer, model_provenance
from nsr_hf.report_tokens import default_report_tokens
from nsr_hf.shared_config import CorpusFields, SplitFields
from nsr_hf.utils import to_jsonable
from nsr_hf.version import __version__

logger = logging.getLogger(__name__)

OOD_SPLIT = "test_ood"
LAYOUTS = ("rows", "column")
BIN_STRATEGIES = ("quantile", "equal_width", "kmeans")
METADATA_KEY = "nsr_hf"
HUB_CARD_KEYS = ("configs", "dataset_info")  # written by datasets' push_to_hub; they describe the files
BASE_COLUMNS = ("text", "doc_id", "input_ids", "attention_mask", "activations")
LABEL_COLUMNS = ("label_position", "label_token_id")
TRANSFORM_COLUMNS = ("activations_z", "bin")
CARD_TAGS = ["nsr_hf", "interpretability", "neuron-activations"]
POSITION_TEXT = {
    "last": "the last real token",
    "all": "every token",
    "max": "the token where the first neuron is largest; every neuron is read at that token",
}
HUB_SHARD_BYTES = 500 << 20  # datasets' default max_shard_size for push_to_hub
# Fields that decide the rows of a shard: a resume must match them. Bins, balancing and output options are
# applied when the shards are joined, so they may change between an interrupted run and its resume.
_CONTENT_FIELDS = ("neurons", "text_field", "id_field", "position", "every_token_layout", "max_length", "max_documents",
                   "max_ood_documents", "split_seed", "split_fractions", "shard_size")


def parse_position(value: "str | int"):
    """``"last"`` / ``"all"`` / ``"max"``, or an integer token index given as text (``"-1"`` -> ``-1``)."""
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return value.strip()
    return value


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DatasetConfig(CorpusFields, SplitFields):
    """Generate a dataset of neuron activations (train/validation/test by document) with train-fitted bins."""

    neurons: list[str] = field(kw_only=True, metadata={"help": "Neurons as layer.index, e.g. 15.100 15.7 (one or more; the activations column keeps this order)"})
    model_revision: Optional[str] = field(default=None, metadata={"help": "Model revision (branch, tag or commit) for Hub models"})
    id_field: Optional[str] = field(default=None, metadata={"help": "Column that holds a stable document id (splits hash it); default: the row index"})
    ood_corpus: Optional[str] = field(default=None, metadata={"help": "A second corpus whose documents all go to an out-of-domain 'test_ood' split"})
    position: str = field(default="last", metadata={"help": "Labelled token: 'last' (last real token), 'max' (argmax of the first neuron), 'all' (every token), or an integer index (0 first, -1 last)"})
    every_token_layout: str = field(default="rows", metadata={"help": "For position 'all': 'rows' (one row per token) or 'column' (one row per document, per-token lists)"})
    max_length: int = field(default=128, metadata={"help": "Texts are cut to this many tokens (at token boundaries; never padded in storage)"})
    max_documents: Optional[int] = field(default=None, metadata={"help": "At most this many documents from the corpus (after de-duplication); all when unset"})
    max_ood_documents: Optional[int] = field(default=None, metadata={"help": "At most this many documents from the out-of-domain corpus"})
    num_bins: int = field(default=10, metadata={"help": "Number of activation bins (at least 2); 10 maps to the report digits 0-9"})
    bin_strategy: str = field(default="quantile", metadata={"help": "'quantile' (equal counts on train), 'equal_width' (train min to max) or 'kmeans' (1-D k-means, Lloyd-Max: the bins whose means reproduce the train values with the least squared error; for a skewed neuron far closer than quantile bins)"})
    report_tokens: Optional[list[str]] = field(default=None, metadata={"help": "Token string of each bin (default: the tokenizer's single-token digits, e.g. ' 0'..' 9' or '0'..'9'; off/on for 2 bins)"})
    balance: bool = field(default=False, metadata={"help": "Equalise the train rows per bin (of the first neuron) by dropping rows from over-full bins"})
    balance_min_keep: float = field(default=0.5, metadata={"help": "Balancing keeps at least this fraction of the train rows"})
    balance_seed: int = field(default=0, metadata={"help": "Seed of the rows balancing drops"})
    batch_size: int = field(default=16, metadata={"help": "Texts per forward pass"})
    shard_size: int = field(default=256, metadata={"help": "Documents per shard (the unit of resuming and of work per process)"})
    output_dir: str = field(default="outputs/dataset", metadata={"help": "Folder of the saved dataset (save_to_disk layout, with README.md and shards/ while running)"})
    overwrite: bool = field(default=False, metadata={"help": "Delete a previous dataset or unfinished shards in output_dir instead of refusing or resuming"})
    keep_shards: bool = field(default=False, metadata={"help": "Keep output_dir/shards after saving (a rerun then only re-fits bins and re-saves)"})
    push_to_hub: Optional[str] = field(default=None, metadata={"help": "Push the dataset and its card to this Hub repo id (owner/name)"})
    private: bool = field(default=False, metadata={"help": "Make the pushed repo private"})

    def __post_init__(self):
        if isinstance(self.neurons, (str, Neuron)):
            self.neurons = [self.neurons]
        names = [part for item in self.neurons for part in (str(item).replace(",", " ").split() or [""])]
        if not names:
            raise ValueError("neurons is empty: name at least one neuron as layer.index, e.g. --neurons 15.100")
        self.neurons = [str(Neuron.parse(name)) for name in names]
        repeated = sorted({n for n in self.neurons if self.neurons.count(n) > 1})
        if repeated:
            raise ValueError(f"neurons {repeated} are listed more than once; list each neuron once")
        self.position = str(validate_position(parse_position(self.position)))
        if self.every_token_layout not in LAYOUTS:
            raise ValueError(f"every_token_layout must be one of {LAYOUTS}, got {self.every_token_layout!r}")
        for name in ("max_length", "batch_size", "shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_documents", "max_ood_documents"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or unset (all documents), got {value!r}")
        fractions = list(check_fractions(self.split_fractions, "split_fractions"))
        if fractions[0] == 0:
            raise ValueError("split_fractions gives train no documents: the bins and z-scores are fitted on train")
        self.split_fractions = fractions
        if isinstance(self.num_bins, bool) or not isinstance(self.num_bins, int) or self.num_bins < 2:
            raise ValueError(f"num_bins must be an integer >= 2, got {self.num_bins!r} (one bin says nothing about the value; 10 gives digits 0-9)")
        if self.bin_strategy not in BIN_STRATEGIES:
            raise ValueError(f"bin_strategy must be one of {BIN_STRATEGIES}, got {self.bin_strategy!r}")
        if self.report_tokens is not None and (len(self.report_tokens) != self.num_bins or len(set(self.report_tokens)) != self.num_bins):
            raise ValueError(f"report_tokens must be {self.num_bins} distinct strings (one per bin), got {self.report_tokens}")
        if not 0 < self.balance_min_keep <= 1:
            raise ValueError(f"balance_min_keep is the fraction of train rows balancing must keep: a number in (0, 1], got {self.balance_min_keep}")
        if self.balance and self.position == "all" and self.every_token_layout == "column":
            raise ValueError("balance works on rows with one value per neuron: with position 'all' use every_token_layout 'rows'")
        if not str(self.output_dir).strip():
            raise ValueError("output_dir is empty: name the folder the dataset is saved in")
        if self.push_to_hub is not None and not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", self.push_to_hub):
            raise ValueError(f"push_to_hub must be a Hub repo id like 'owner/name', got {self.push_to_hub!r}")

    @property
    def parsed_position(self):
        return parse_position(self.position)

    @property
    def layout(self) -> str:
        """``"document"`` (one row per text), ``"rows"`` or ``"column"`` (position ``"all"``)."""
        return self.every_token_layout if self.position == "all" else "document"


# ----------------------------------------------------------------------------------------------------------
# Label transforms


KMEANS_ATOMS = 2048


def kmeans_edges(values, num_bins: int, max_atoms: int = KMEANS_ATOMS, max_iter: int = 500) -> np.ndarray:
    """Bin edges (``num_bins + 1``, train min to max) of optimal 1-D k-means: the partition whose bin means reproduce
    ``values`` with the least squared error (the Lloyd-Max quantizer). Each inner edge is halfway between the means of
    the bins on either side. Deterministic.

    Exact (dynamic programming over the sorted values, O(num_bins * m^2) for m distinct values) when there are at most
    ``max_atoms`` distinct values. Above that, the sorted values are grouped into at most ``max_atoms`` runs, cut at
    equal counts (resolving the bulk) and at equal widths (resolving the tail), the exact optimum over cuts between
    runs is found, and Lloyd's iterations on all the values polish it (they can
    only lower the error). Lloyd's iterations alone, from quantile or equal-width bins, stall with empty bins on a
    skewed neuron with outliers, at 2-9 times the optimal error."""
    x = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    if len(x) == 0:
        raise ValueError("kmeans_edges needs at least one value")
    if not np.isfinite(x).all():
        raise ValueError("kmeans_edges: the values hold NaN or infinite values")
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    lo, hi = x[0], x[-1]
    if lo == hi:
        return np.linspace(lo, hi, num_bins + 1)
    shift, scale = x.mean(), hi - lo
    u = (x - shift) / scale  # centred and scaled: the prefix sums of squares keep their precision
    # atoms: the distinct values with their counts, or (above max_atoms) runs of the sorted values
    distinct, counts = np.unique(u, return_counts=True)
    if len(distinct) > max_atoms:  # runs cut at equal counts (the bulk) and at equal widths (the tail), half each
        by_count = np.linspace(0, len(u), max_atoms // 2 + 1).round().astype(np.int64)
        by_width = np.searchsorted(u, np.linspace(u[0], u[-1], max_atoms // 2 + 1)[1:-1], side="left")
        bounds = np.unique(np.concatenate([by_count, by_width, [0, len(u)]]))
        w = np.diff(bounds).astype(np.float64)
        s1 = np.add.reduceat(u, bounds[:-1])
    else:
        w, s1 = counts.astype(np.float64), distinct * counts
    m = len(w)
    W, S = np.concatenate([[0.0], np.cumsum(w)]), np.concatenate([[0.0], np.cumsum(s1)])
    k = min(num_bins, m)
    # cost[i, j]: squared error (less the constant within-atom part) of one bin over atoms i..j-1
    i, j = np.arange(m + 1)[:, None], np.arange(m + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(j > i, -((S[None, :] - S[:, None]) ** 2) / (W[None, :] - W[:, None]), np.inf)
    best = cost[0].copy()  # best[j]: one bin over atoms 0..j-1
    back = []
    for _ in range(1, k):
        total = best[:, None] + cost
        back.append(np.argmin(total, axis=0))
        best = total[back[-1], np.arange(m + 1)]
    cuts, end = [], m
    for b in reversed(back):
        end = int(b[end])
        cuts.append(end)
    cuts = [0, *reversed(cuts), m]
    centres = np.array([(S[b] - S[a]) / (W[b] - W[a]) for a, b in zip(cuts[:-1], cuts[1:])])
    inner = (centres[1:] + centres[:-1]) / 2
    inner = _lloyd(u, inner, max_iter) if len(distinct) > max_atoms else inner
    inner = np.concatenate([inner, np.full(num_bins - 1 - len(inner), inner[-1] if len(inner) else (u[0] + u[-1]) / 2)])
    return np.concatenate([[lo], inner * scale + shift, [hi]])


def _lloyd(x: np.ndarray, inner: np.ndarray, max_iter: int) -> np.ndarray:
    """Lloyd's iterations on sorted ``x`` from inner edges ``inner`` (bins by the rule of ``LabelTransform.bin_of``)."""
    csum = np.concatenate([[0.0], np.cumsum(x)])
    for _ in range(max_iter):
        b = np.concatenate([[0], np.searchsorted(x, inner, side="left"), [len(x)]])
        counts = np.diff(b)
        if (counts == 0).any():
            break
        centres = (csum[b[1:]] - csum[b[:-1]]) / counts
        new = (centres[1:] + centres[:-1]) / 2
        if np.array_equal(new, inner):
            break
        inner = new
    return inner


def _strictly_increasing(edges: np.ndarray) -> np.ndarray:
    """Edges with the first and last fixed (train min and max) and the inner ones moved, by the fewest float
    steps, into the open interval (min, max) and strictly increasing. Quantiles of tied values repeat: the
    nudged bins stay empty and the tied values land in the lowest of them (or, tied at the max, in the last
    bin), so the min still falls in bin 0 and the max in the last bin."""
    edges = np.array(edges, dtype=np.float64)
    lo, hi = edges[0], edges[-1]
    top = np.nextafter(hi, -np.inf)
    inner = np.clip(edges[1:-1], np.nextafter(lo, np.inf), top)
    for i in range(1, len(inner)):
        inner[i] = max(inner[i], np.nextafter(inner[i - 1], np.inf))
    if len(inner):
        inner[-1] = min(inner[-1], top)
    for i in range(len(inner) - 2, -1, -1):
        inner[i] = min(inner[i], np.nextafter(inner[i + 1], -np.inf))
    out = np.concatenate([[lo], inner, [hi]])
    if not np.all(np.diff(out) > 0):
        raise ValueError(f"cannot place {len(edges) - 1} distinct bins between {lo!r} and {hi!r}; use fewer bins")
    return out


@dataclass
class LabelTransform:
    """z-score statistics, bin edges and report tokens of K neurons, fitted on one split (train).

    >>> t = LabelTransform.fit(train_values, ["15.100"], num_bins=10)    # train_values: (n, K)
    >>> t.bin_of(values), t.zscore(values), t.inverse_zscore(z)
    >>> t.report_tokens[t.bin_of(values)[:, 0]]                          # the digit each row should report

    Bins: ``num_bins + 1`` edges per neuron, ``edges[0]`` = train min, ``edges[-1]`` = train max. A value goes to
    bin ``i`` when ``edges[i] <= value < edges[i + 1]``, except that the train max goes to the last bin; values
    outside the train range go to the end bins. Edges are strictly increasing (see ``_strictly_increasing`` for
    quantiles of tied values). ``std`` is the population standard deviation (ddof 0).

    ``bin_centers``: the value each bin reports (the greedy readout; the expected value weighs them), the mean of the
    fitted values that fall in the bin: the squared-error-optimal value of a bin (Lloyd). The midpoint of the edges
    is not: for a skewed neuron the top bin spans the long tail and its midpoint sits far above most of its values
    (neuron 0.1524 of SmolLM2: a perfect classifier scores R² 0.52 with midpoints, 0.86 with bin means). An empty
    bin (or a transform saved before centres were fitted) falls back to the midpoint.
    """

    neurons: list[str]
    mean: list[float]
    std: list[float]
    bin_edges: list[list[float]]
    bin_strategy: str = "quantile"
    report_tokens: list[str] = field(default_factory=list)
    report_token_ids: Optional[list[Optional[int]]] = None
    fitted_on: str = "train"
    num_values: int = 0
    bin_centers: Optional[list[list[float]]] = None

    def __post_init__(self):
        k = len(self.neurons)
        if not (len(self.mean) == len(self.std) == len(self.bin_edges) == k) or k == 0:
            raise ValueError(f"a LabelTransform needs one mean, std and edge list per neuron ({k} neurons)")
        if len({len(e) for e in self.bin_edges}) != 1 or len(self.bin_edges[0]) < 3:
            raise ValueError("every neuron needs the same number (>= 3) of bin edges")
        if not self.report_tokens:
            self.report_tokens = [str(i) for i in range(self.num_bins)]
        if len(self.report_tokens) != self.num_bins:
            raise ValueError(f"{len(self.report_tokens)} report tokens for {self.num_bins} bins")
        if self.bin_centers is not None and (len(self.bin_centers) != k or any(len(c) != self.num_bins for c in self.bin_centers)):
            raise ValueError(f"bin_centers needs one list of {self.num_bins} values per neuron ({k} neurons)")

    @property
    def num_bins(self) -> int:
        return len(self.bin_edges[0]) - 1

    @classmethod
    def fit(cls, values, neurons: Sequence[str], num_bins: int = 10, strategy: str = "quantile",
            report_tokens: Optional[Sequence[str]] = None, fitted_on: str = "train") -> "LabelTransform":
        """Fit on ``values`` of shape ``(n, K)`` (or ``(n,)`` for one neuron)."""
        neurons = [str(n) for n in neurons]
        values = np.asarray(values, dtype=np.float64).reshape(-1, len(neurons))
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        if strategy not in BIN_STRATEGIES:
            raise ValueError(f"bin strategy must be one of {BIN_STRATEGIES}, got {strategy!r}")
        if len(values) == 0:
            raise ValueError(f"no values to fit the label transform on: the {fitted_on} split is empty (use more documents)")
        if not np.isfinite(values).all():
            raise ValueError(f"the {fitted_on} activations hold NaN or infinite values")
        lo, hi = values.min(0), values.max(0)
        constant = [f"{n} (= {v:g})" for n, v, h in zip(neurons, lo, hi) if h <= v]
        if constant:
            raise ValueError(f"neuron(s) {constant} take a single value on the {fitted_on} split: they cannot be binned or "
                             "z-scored; choose other neurons or more documents")
        quantiles = np.linspace(0.0, 1.0, num_bins + 1)
        edges = []
        for k in range(len(neurons)):
            if strategy == "quantile":
                raw = np.quantile(values[:, k], quantiles)
            elif strategy == "kmeans":
                raw = kmeans_edges(values[:, k], num_bins)
            else:
                raw = np.linspace(lo[k], hi[k], num_bins + 1)
            raw[0], raw[-1] = lo[k], hi[k]
            edges.append(_strictly_increasing(raw).tolist())
        fitted = cls(neurons=neurons, mean=values.mean(0).tolist(), std=values.std(0).tolist(), bin_edges=edges,
                     bin_strategy=strategy, report_tokens=list(report_tokens or [str(i) for i in range(num_bins)]),
                     fitted_on=fitted_on, num_values=len(values))
        return fitted.with_bin_centers(values)

    def with_bin_centers(self, values) -> "LabelTransform":
        """A copy whose ``bin_centers`` are the means of ``values`` ``(n, K)`` (the split it was fitted on) in each
        bin; an empty bin keeps its midpoint."""
        values = self._as_2d(values).reshape(-1, len(self.neurons))
        bins, centers = self.bin_of(values), self.bin_midpoints()
        for k in range(len(self.neurons)):
            counts = np.bincount(bins[:, k], minlength=self.num_bins)
            sums = np.bincount(bins[:, k], weights=values[:, k], minlength=self.num_bins)
            filled = counts > 0
            centers[k, filled] = sums[filled] / counts[filled]
        return LabelTransform(**{**self.to_dict(), "bin_centers": centers.tolist()})

    def _as_2d(self, values) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if values.shape[-1:] != (len(self.neurons),):
            if len(self.neurons) == 1:
                values = values[..., None]
            else:
                raise ValueError(f"values must end in a dimension of {len(self.neurons)} neurons, got shape {values.shape}")
        return values

    def bin_of(self, values) -> np.ndarray:
        """Bin index (int64, same shape as ``values``; a trailing neuron dimension of K)."""
        values = self._as_2d(values)
        if np.isnan(values).any():
            raise ValueError("cannot bin NaN values")
        out = np.empty(values.shape, dtype=np.int64)
        for k, edges in enumerate(self.bin_edges):
            out[..., k] = np.searchsorted(np.asarray(edges[1:-1]), values[..., k], side="right")
        return out

    def zscore(self, values) -> np.ndarray:
        return ((self._as_2d(values) - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)

    def inverse_zscore(self, z) -> np.ndarray:
        return (self._as_2d(z) * np.asarray(self.std) + np.asarray(self.mean)).astype(np.float32)

    def bin_midpoints(self) -> np.ndarray:
        """``(K, num_bins)`` midpoint of each bin's edges in activation units."""
        edges = np.asarray(self.bin_edges)
        return (edges[:, 1:] + edges[:, :-1]) / 2

    def centers(self) -> np.ndarray:
        """``(K, num_bins)`` the value each bin reports: ``bin_centers`` when fitted, else the midpoints."""
        return np.asarray(self.bin_centers, dtype=np.float64) if self.bin_centers is not None else self.bin_midpoints()

    def with_token_ids(self, tokenizer, strict: bool = True) -> "LabelTransform":
        """A copy with ``report_token_ids`` from ``tokenizer``: one id per report token. A token that is not one
        token of this vocabulary raises (``strict``) or gets ``None`` with a warning."""
        ids, bad = [], []
        for token in self.report_tokens:
            encoded = tokenizer.encode(token, add_special_tokens=False)
            ids.append(encoded[0] if len(encoded) == 1 else None)
            if len(encoded) != 1:
                bad.append(f"{token!r} -> {encoded}")
        if bad:
            message = (f"report tokens that are not a single token of this tokenizer: {', '.join(bad)}. "
                       "Choose single-token strings with --report_tokens (one per bin), or fewer bins.")
            if strict:
                raise ValueError(message)
            warnings.warn(message)
        return LabelTransform(**{**self.to_dict(), "report_token_ids": ids})

    def to_dict(self) -> dict:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "LabelTransform":
        return cls(**data)


def balance_indices(bins, num_bins: int, min_keep: float, seed: int) -> tuple[np.ndarray, list[int], list[int]]:
    """Rows to keep so that bins are as equal as the floor allows: every bin is cut to a common cap ``t``
    (rows drawn with ``numpy.random.default_rng(seed)``), ``t`` being the smallest cap that keeps at least
    ``ceil(min_keep * n)`` rows. Returns ``(sorted row indices, counts before, counts after)``."""
    bins = np.asarray(bins, dtype=np.int64).reshape(-1)
    if not 0 < min_keep <= 1:
        raise ValueError(f"min_keep must be in (0, 1], got {min_keep}")
    counts = np.bincount(bins, minlength=num_bins)
    if len(bins) == 0:
        return np.zeros(0, dtype=np.int64), counts.tolist(), counts.tolist()
    floor = math.ceil(min_keep * len(bins))
    lo, hi = int(counts[counts > 0].min()), int(counts.max())
    while lo < hi:  # smallest cap whose kept total reaches the floor (the total grows with the cap)
        mid = (lo + hi) // 2
        if np.minimum(counts, mid).sum() >= floor:
            hi = mid
        else:
            lo = mid + 1
    rng = np.random.default_rng(seed)
    keep = []
    for b in range(len(counts)):
        rows = np.flatnonzero(bins == b)
        keep.append(rng.choice(rows, lo, replace=False) if len(rows) > lo else rows)
    kept = np.sort(np.concatenate(keep))
    return kept, counts.tolist(), np.bincount(bins[kept], minlength=num_bins).tolist()


# ----------------------------------------------------------------------------------------------------------
# Arrow columns (built from numpy: datasets' row writer turns every numpy row into a Python list, PITFALLS HF-13)


def _lists(flat: np.ndarray, lengths: np.ndarray, value_type) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


def _fixed(values: np.ndarray, value_type) -> pa.Array:
    values = np.asarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=value_type), values.shape[-1])


def _token_lists(values: np.ndarray, lengths: np.ndarray, value_type) -> pa.Array:
    """``(total_tokens, K)`` values as one list of K-lists per document."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), _fixed(values, value_type))


def _column_values(table_or_column, k: int) -> np.ndarray:
    """``(n, K)`` numpy values of an ``activations``-like column (fixed K-lists, or per-token lists of them)."""
    column = table_or_column
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    while pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type):
        column = pc.list_flatten(column)
    return column.to_numpy(zero_copy_only=False).reshape(-1, k)


def read_column(dataset, name: str, k: int, batch_size: int = 10_000) -> np.ndarray:
    """All values of a column of a (memory-mapped) Dataset, read in Arrow batches."""
    parts = [_column_values(batch[name], k) for batch in dataset.with_format("arrow").iter(batch_size=batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, k), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class _OutOfDomainDocument(Document):
    """A document of the out-of-domain corpus (its class carries its split through de-duplication)."""


@dataclass
class _Shard:
    number: int  # global, in corpus order over all splits: decides the process
    split: str
    index: int  # within the split: names the folder
    documents: list[Document]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


def _config_hash(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ActivationDatasetGenerator:
    """Turns a corpus into an activation ``DatasetDict`` (see the module docstring for splits and columns).

    >>> gen = ActivationDatasetGenerator(DatasetConfig(neurons=["15.100"], max_documents=500, output_dir="out/ds"))
    >>> dd = gen.generate()          # resumes from output_dir/shards when a previous run was interrupted
    >>> gen.metadata["transform"]    # what also sits in the card and in each split's info.description

    ``model``/``tokenizer`` and ``corpus``/``ood_corpus`` (a ``TextSource``) may be passed in; otherwise they are
    loaded from the config. Under ``accelerate launch`` every process runs ``generate()``; each computes its
    shards, and all return the dataset saved by the main process.
    """

    def __init__(self, config: DatasetConfig, model=None, tokenizer=None, corpus: Optional[TextSource] = None,
                 ood_corpus: Optional[TextSource] = None):
        from accelerate import PartialState

        self.config = config
        # Without CUDA, accelerate only joins the processes of `accelerate launch` into one group (gloo) when
        # told it runs on the CPU; alone, the state is a single process either way.
        self.state = PartialState(cpu=not torch.cuda.is_available())
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model= and tokenizer=, or neither (then config.model is loaded)")
        self._loaded_model = model is None  # else config.model names nothing: provenance comes from the model itself
        if model is None:
            model, tokenizer = load_model_and_tokenizer(config.model, revision=config.model_revision, device=self.state.device)
        self.model, self.tokenizer = model, tokenizer
        self.neurons = [validate_neuron(model, n) for n in config.neurons]
        self.position = config.parsed_position
        # capture_activations groups neurons by layer; remember where each requested neuron lands.
        self._by_layer: dict[int, list[int]] = {}
        for n in self.neurons:
            self._by_layer.setdefault(n.layer, []).append(n.index)
        self._columns = [(n.layer, self._by_layer[n.layer].index(n.index)) for n in self.neurons]
        if corpus is None:
            corpus = load_corpus(config.corpus, text_field=config.text_field, id_field=config.id_field, model=model, tokenizer=tokenizer)
        if ood_corpus is None and config.ood_corpus:
            ood_corpus = load_corpus(config.ood_corpus, text_field=config.text_field, id_field=config.id_field, model=model, tokenizer=tokenizer)
        self.corpus = corpus
        self.ood_corpus = ood_corpus
        self.splits = list(SPLITS) + ([OOD_SPLIT] if ood_corpus is not None else [])
        self.output_dir = Path(config.output_dir)
        self.shards_dir = self.output_dir / "shards"
        self.metadata: dict = {}
        self.transform: Optional[LabelTransform] = None
        # The tokenizer's single-token digits (or off/on for 2 bins); past 10 bins, the bin numbers, which a
        # token head cannot use (checked leniently here, strictly by the predictor).
        self._strict_tokens = config.report_tokens is not None or config.num_bins <= 10
        self._report_tokens = list(config.report_tokens or (default_report_tokens(tokenizer, config.num_bins)
                                                            if config.num_bins <= 10 else [str(i) for i in range(config.num_bins)]))

    # ------------------------------------------------------------------ identity

    def content_config(self) -> dict:
        """What decides the rows of every shard (compared on resume)."""

        content = {name: getattr(self.config, name) for name in _CONTENT_FIELDS}
        content["model"] = model_provenance(self.model)
        content["corpus"] = self.corpus.describe()
        content["ood_corpus"] = self.ood_corpus.describe() if self.ood_corpus is not None else None
        content["tokenizer"] = {"name": getattr(self.tokenizer, "name_or_path", None), "vocab_size": len(self.tokenizer)}
        return to_jsonable(content)

    # ------------------------------------------------------------------ documents and shards

    def documents(self) -> Iterator[tuple[str, Document]]:
        """``(split, document)`` in corpus order, exact duplicates dropped across both corpora."""
        cfg = self.config
        main = self.corpus.iter_documents(limit=cfg.max_documents)
        ood = ()
        if self.ood_corpus is not None:
            ood = (_OutOfDomainDocument(d.doc_id, d.text) for d in self.ood_corpus.iter_documents(limit=cfg.max_ood_documents))
        for doc in deduplicate(itertools.chain(main, ood)):
            if isinstance(doc, _OutOfDomainDocument):
                yield OOD_SPLIT, Document(doc.doc_id, doc.text)
            else:
                yield split_of(doc.doc_id, cfg.split_seed, cfg.split_fractions), doc

    def shards(self) -> Iterator[_Shard]:
        """Shards of ``shard_size`` documents per split, in the order their last document arrives."""
        buffers: dict[str, list[Document]] = {s: [] for s in self.splits}
        count = dict.fromkeys(self.splits, 0)
        number = 0
        for split, doc in self.documents():
            buffers[split].append(doc)
            if len(buffers[split]) == self.config.shard_size:
                yield _Shard(number, split, count[split], buffers[split])
                buffers[split], count[split], number = [], count[split] + 1, number + 1
        for split in self.splits:
            if buffers[split]:
                yield _Shard(number, split, count[split], buffers[split])
                number += 1

    # ------------------------------------------------------------------ one shard

    def schema(self) -> pa.Schema:
        k = len(self.neurons)
        ids = [("text", pa.string()), ("doc_id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8()))]
        if self.config.layout == "column":
            return pa.schema(ids + [("activations", pa.list_(pa.list_(pa.float32(), k)))])
        return pa.schema(ids + [("label_position", pa.int32()), ("label_token_id", pa.int32()), ("activations", pa.list_(pa.float32(), k))])

    def _capture(self, docs: list[Document]) -> list[Optional[dict]]:
        """Per document: unpadded ids, per-token values ``(L, K)`` and labelled positions (``None``: skipped)."""
        batch = encode_texts(self.tokenizer, [d.text for d in docs], max_length=self.config.max_length)
        cap = capture_activations(self.model, batch, self._by_layer, position="all")
        acts = torch.stack([cap[layer][..., col] for layer, col in self._columns], -1).float().cpu()  # (b, seq, K)
        mask = batch["attention_mask"].bool()
        lengths = mask.sum(-1)
        first = mask.long().argmax(-1)
        pos = self.position
        valid = torch.ones(len(docs), dtype=torch.bool)
        if isinstance(pos, int):
            valid = (lengths > pos) if pos >= 0 else (lengths >= -pos)
        labelled = torch.full((len(docs),), -1, dtype=torch.long)
        if valid.any():
            if pos == "max":  # the first neuron's argmax labels the row
                labelled[valid] = select_positions(acts[valid][..., :1], mask[valid], "max")[1][:, 0]
            elif pos != "all":
                labelled[valid] = label_positions(mask[valid], pos)
        out = []
        for i in range(len(docs)):
            if not valid[i]:
                out.append(None)
                continue
            m = mask[i]
            out.append({
                "ids": batch["input_ids"][i][m].numpy().astype(np.int32),
                "values": acts[i][m].numpy(),
                "position": int(labelled[i] - first[i]) if pos != "all" else None,
            })
        return out

    def shard_table(self, docs: list[Document]) -> tuple[pa.Table, int]:
        """The Arrow table of one shard's rows, and how many documents were skipped."""
        bs = self.config.batch_size
        order = sorted(range(len(docs)), key=lambda i: len(docs[i].text))  # similar lengths batch with less padding
        results: list[Optional[dict]] = [None] * len(docs)
        for start in range(0, len(order), bs):
            chunk = order[start : start + bs]
            for i, res in zip(chunk, self._capture([docs[i] for i in chunk])):
                results[i] = res
        kept = [(d, r) for d, r in zip(docs, results) if r is not None]
        skipped = len(docs) - len(kept)
        if not kept:
            return self.schema().empty_table(), skipped
        layout = self.config.layout
        lengths = np.array([len(r["ids"]) for _, r in kept], dtype=np.int64)
        ids = [r["ids"] for _, r in kept]
        if layout == "rows":  # one row per token: each row repeats its document
            per_row = np.repeat(np.arange(len(kept)), lengths)
            texts = [kept[j][0].text for j in per_row]
            doc_ids = [kept[j][0].doc_id for j in per_row]
            id_rows = np.concatenate([np.tile(x, len(x)) for x in ids])
            row_lengths = lengths[per_row]
            positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
            values = np.concatenate([r["values"] for _, r in kept])
        else:
            texts, doc_ids = [d.text for d, _ in kept], [d.doc_id for d, _ in kept]
            id_rows, row_lengths = np.concatenate(ids), lengths
            if layout == "document":
                positions = np.array([r["position"] for _, r in kept], dtype=np.int32)
                values = np.stack([r["values"][r["position"]] for _, r in kept])
            else:
                values = np.concatenate([r["values"] for _, r in kept])
        columns = {
            "text": pa.array(texts, pa.string()),
            "doc_id": pa.array(doc_ids, pa.string()),
            "input_ids": _lists(id_rows, row_lengths, pa.int32()),
            "attention_mask": _lists(np.ones(len(id_rows), dtype=np.int8), row_lengths, pa.int8()),
        }
        if layout == "column":
            columns["activations"] = _token_lists(values.astype(np.float32), lengths, pa.float32())
        else:
            row_starts = np.concatenate([[0], np.cumsum(row_lengths)[:-1]]).astype(np.int64)
            columns["label_position"] = pa.array(positions, pa.int32())
            columns["label_token_id"] = pa.array(id_rows[row_starts + positions], pa.int32())
            columns["activations"] = _fixed(values.astype(np.float32), pa.float32())
        return pa.table(columns, schema=self.schema()), skipped

    def _write_shard(self, shard: _Shard, content_hash: str) -> dict:
        from datasets import Dataset
        from datasets.table import InMemoryTable

        table, skipped = self.shard_table(shard.documents)
        manifest = {
            "config_hash": content_hash, "split": shard.split, "index": shard.index, "number": shard.number,
            "num_documents": len(shard.documents), "skipped_documents": skipped, "num_rows": table.num_rows,
            "process_index": self.state.process_index, "num_processes": self.state.num_processes,
        }
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{shard.name}-", dir=self.shards_dir))
        try:
            Dataset(InMemoryTable(table)).save_to_disk(str(tmp / "data"))
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            try:
                os.rename(tmp, self.shards_dir / shard.name)  # atomic: a shard folder is complete or absent
            except OSError:
                if self._finished(shard, content_hash) is None:  # not the same shard finished by another process
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return manifest

    def _finished(self, shard: _Shard, content_hash: str) -> Optional[dict]:
        path = self.shards_dir / shard.name / "manifest.json"
        if not path.exists():
            return None
        manifest = json.loads(path.read_text())
        if manifest.get("config_hash") != content_hash or manifest.get("num_documents") != len(shard.documents):
            raise ValueError(f"shard {path.parent} was made with another configuration or corpus; delete output_dir/shards "
                             "or pass --overwrite to start again")
        return manifest

    # ------------------------------------------------------------------ the whole run

    def _prepare_output(self, content: dict, content_hash: str) -> None:
        """Main process: start, resume or refuse (a finished dataset, or shards of another configuration)."""
        out, cfg = self.output_dir, self.config
        if cfg.overwrite:
            remove_generated(out)
        manifest_path = self.shards_dir / "manifest.json"
        if manifest_path.exists():
            previous = json.loads(manifest_path.read_text())
            if previous["config_hash"] != content_hash:
                old = previous["content"]
                changed = sorted(k for k in set(old) | set(content) if old.get(k) != content.get(k))
                details = "; ".join(f"{k}: {old.get(k)!r} -> {content.get(k)!r}" for k in changed)
                raise ValueError(f"{out} holds unfinished shards of a different configuration ({details}). Resume with the "
                                 "same settings, choose another --output_dir, or pass --overwrite to delete them.")
            logger.warning("Resuming the unfinished dataset in %s", out)
        elif (out / "dataset_dict.json").exists():
            raise ValueError(f"{out} already holds a finished dataset: choose another --output_dir or pass --overwrite to replace it")
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.shards_dir.glob(".tmp-*"):  # shards interrupted while being written
            shutil.rmtree(stale, ignore_errors=True)
        manifest_path.write_text(json.dumps({"config_hash": content_hash, "content": content}, indent=1))

    def generate(self):
        """Compute (or resume) every shard, then join, fit, balance and save. Returns the saved ``DatasetDict``."""
        import datasets

        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # one bar per shard save would bury ours
        try:
            return self._generate()
        finally:
            if bars:
                datasets.enable_progress_bars()

    def _generate(self):
        from datasets import load_from_disk
        from tqdm.auto import tqdm

        state = self.state
        content = self.content_config()
        content_hash = _config_hash(content)
        if state.is_main_process:
            self._prepare_output(content, content_hash)
        state.wait_for_everyone()
        plan: dict[str, list[dict]] = {s: [] for s in self.splits}  # every shard, as the main process will join them
        computed = reused = 0
        total = self.config.max_documents if self.ood_corpus is None else None
        bar = tqdm(desc=f"dataset ({len(self.neurons)} neuron{'s' * (len(self.neurons) > 1)})", unit="doc",
                   total=total, disable=not state.is_local_main_process)
        for shard in self.shards():
            plan[shard.split].append({"name": shard.name, "num_documents": len(shard.documents)})
            if shard.number % state.num_processes == state.process_index:
                if self._finished(shard, content_hash) is None:
                    self._write_shard(shard, content_hash)
                    computed += 1
                else:
                    reused += 1
            bar.update(len(shard.documents))
            bar.set_postfix(computed=computed, resumed=reused)
        bar.close()
        self.shard_counts = {"computed": computed, "resumed": reused}
        state.wait_for_everyone()
        if state.is_main_process:
            self._finalise(plan, content)
        state.wait_for_everyone()
        dataset_dict = load_from_disk(str(self.output_dir))
        if not self.metadata:
            self.metadata = read_metadata(self.output_dir, dataset_dict)
        return dataset_dict

    def _join(self, split: str, shards: list[dict], content_hash: str):
        from datasets import Dataset, concatenate_datasets, load_from_disk
        from datasets.table import InMemoryTable

        parts = []
        for shard in shards:
            folder = self.shards_dir / shard["name"]
            manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").exists() else None
            if manifest is None or manifest["config_hash"] != content_hash:
                raise RuntimeError(f"shard {folder} is missing or stale after every process finished: rerun to compute it")
            parts.append(load_from_disk(str(folder / "data")))
        parts = [p for p in parts if len(p)]
        return concatenate_datasets(parts) if parts else Dataset(InMemoryTable(self.schema().empty_table()))

    def _finalise(self, plan: dict[str, list[dict]], content: dict) -> None:
        from datasets import DatasetDict

        cfg, k = self.config, len(self.neurons)
        content_hash = _config_hash(content)
        joined = {split: self._join(split, plan[split], content_hash) for split in self.splits}
        skipped = {}
        for split in self.splits:
            manifests = [json.loads((self.shards_dir / s["name"] / "manifest.json").read_text()) for s in plan[split]]
            skipped[split] = sum(m["skipped_documents"] for m in manifests)
        train_values = read_column(joined["train"], "activations", k)
        transform = LabelTransform.fit(train_values, cfg.neurons, cfg.num_bins, cfg.bin_strategy, self._report_tokens)
        transform = transform.with_token_ids(self.tokenizer, strict=self._strict_tokens)
        self.transform = transform
        balance = None
        cache = self.output_dir / ".cache"
        cache.mkdir(parents=True, exist_ok=True)
        out = {}
        for split, ds in joined.items():
            ds = ds.with_format("arrow").map(
                _TransformColumns(transform, cfg.layout), batched=True, batch_size=1000, desc=f"bins ({split})",
                cache_file_name=str(cache / f"{split}.arrow"), new_fingerprint=_config_hash({"split": split, "content": content,
                                                                                             "transform": transform.to_dict()}),
            ).with_format(None)
            out[split] = ds
        if cfg.balance:
            keep, before, after = balance_indices(transform.bin_of(train_values)[:, 0], cfg.num_bins, cfg.balance_min_keep, cfg.balance_seed)
            out["train"] = out["train"].select(keep)
            balance = {"neuron": cfg.neurons[0], "min_keep": cfg.balance_min_keep, "seed": cfg.balance_seed,
                       "rows_before": len(train_values), "rows_after": len(keep), "before": before, "after": after}
            print(format_balance(balance, transform.report_tokens))
        del train_values
        self.metadata = self._metadata(out, plan, skipped, transform, balance, content)
        description = json.dumps({METADATA_KEY: self.metadata})
        for ds in out.values():
            ds.info.description = description
        dataset_dict = DatasetDict(out)
        for name in [*self.splits, "dataset_dict.json", "README.md"]:
            _remove(self.output_dir / name)
        dataset_dict.save_to_disk(str(self.output_dir))
        dataset_card(self.metadata).save(self.output_dir / "README.md")
        del dataset_dict, out, joined
        shutil.rmtree(cache, ignore_errors=True)
        if not cfg.keep_shards:
            shutil.rmtree(self.shards_dir, ignore_errors=True)

    def _metadata(self, out: dict, plan: dict, skipped: dict, transform: LabelTransform, balance, content: dict) -> dict:
        cfg, k = self.config, len(self.neurons)
        stats = {}
        for split, ds in out.items():
            values = read_column(ds, "activations", k).astype(np.float64)
            stats[split] = {n: ({"mean": float(values[:, j].mean()), "std": float(values[:, j].std()),
                                 "min": float(values[:, j].min()), "max": float(values[:, j].max())} if len(values) else None)
                            for j, n in enumerate(cfg.neurons)}
        return to_jsonable({
            "nsr_hf_version": __version__,
            "model": {**content["model"], **({"requested": cfg.model, "requested_revision": cfg.model_revision} if self._loaded_model else {})},
            "tokenizer": content["tokenizer"],
            "neurons": list(cfg.neurons),
            "layers": sorted({n.layer for n in self.neurons}),
            "position": self.position,
            "layout": cfg.layout,
            "max_length": cfg.max_length,
            "corpus": content["corpus"],
            "ood_corpus": content["ood_corpus"],
            "split_seed": cfg.split_seed,
            "split_fractions": list(cfg.split_fractions),
            "splits": list(self.splits),
            "num_rows": {split: len(ds) for split, ds in out.items()},
            "num_documents": {split: sum(s["num_documents"] for s in plan[split]) - skipped[split] for split in self.splits},
            "skipped_documents": skipped,
            "statistics": stats,
            "transform": transform.to_dict(),
            "balance": balance,
            "columns": column_descriptions(cfg.layout),
            "config": asdict(cfg),
            "config_hash": _config_hash(content),
        })


class _TransformColumns:
    """``map`` function adding ``activations_z`` and ``bin`` to an Arrow batch (picklable, no closure)."""

    def __init__(self, transform: LabelTransform, layout: str):
        self.transform, self.layout = transform, layout

    def __call__(self, batch: pa.Table) -> pa.Table:
        k = len(self.transform.neurons)
        values = _column_values(batch["activations"], k)
        z, bins = self.transform.zscore(values), self.transform.bin_of(values).astype(np.int32)
        if self.layout == "column":
            lengths = pc.list_value_length(batch["activations"]).to_numpy(zero_copy_only=False)
            z_col, bin_col = _token_lists(z, lengths, pa.float32()), _token_lists(bins, lengths, pa.int32())
        else:
            z_col, bin_col = _fixed(z, pa.float32()), _fixed(bins, pa.int32())
        for name in TRANSFORM_COLUMNS:
            if name in batch.column_names:
                batch = batch.drop_columns([name])
        return batch.append_column("activations_z", z_col).append_column("bin", bin_col)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def remove_generated(output_dir: "str | os.PathLike") -> None:
    """Delete what a generation wrote in ``output_dir`` (its splits, card, shards and cache), nothing else."""
    out = Path(output_dir)
    splits = []
    if (out / "dataset_dict.json").exists():
        splits = json.loads((out / "dataset_dict.json").read_text()).get("splits", [])
    for name in [*splits, "dataset_dict.json", "README.md", "shards", ".cache"]:
        _remove(out / name)


# ----------------------------------------------------------------------------------------------------------
# Cards, metadata, saving and loading


def column_descriptions(layout: str) -> dict[str, str]:
    columns = {
        "text": "the document's original text (not cut)",
        "doc_id": "the document's id in its corpus (splits are assigned by it)",
        "input_ids": "token ids the model saw: encode_texts(text, max_length), no padding",
        "attention_mask": "all ones, same length as input_ids (for HF collators)",
    }
    if layout == "column":
        columns["activations"] = "per token of input_ids, the K neuron values (float32)"
        columns["activations_z"] = "per token, z-scores with train mean and std"
        columns["bin"] = "per token, bin index per neuron (train edges)"
    else:
        columns["label_position"] = "index in input_ids of the labelled token" + (" (one row per token)" if layout == "rows" else "")
        columns["label_token_id"] = "input_ids[label_position]"
        columns["activations"] = "the K neuron values at label_position (float32)"
        columns["activations_z"] = "z-scores with train mean and std (float32)"
        columns["bin"] = "bin index per neuron (train edges); report_tokens[bin] is the report"
    return columns


def required_columns(layout: Optional[str] = None) -> list[str]:
    """Columns an activation dataset must have (``layout`` ``None``: the per-document/per-row set)."""
    columns = list(BASE_COLUMNS)
    if layout != "column":
        columns += list(LABEL_COLUMNS)
    return columns


def validate_columns(dataset_dict, layout: Optional[str] = None) -> None:
    """Raise a ``ValueError`` naming the missing columns (and those present) of each split that lacks some."""
    needed = required_columns(layout)
    problems = []
    for split, ds in dataset_dict.items():
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            problems.append(f"split {split!r} lacks {missing} (it has {ds.column_names})")
    if problems:
        raise ValueError("not an nsr_hf activation dataset: " + "; ".join(problems) +
                         f". An activation dataset has the columns {needed}; make one with `nsr dataset`.")


def _card_yaml(metadata: dict) -> dict:
    neurons = ", ".join(metadata.get("neurons", []))
    model = (metadata.get("model") or {}).get("name")
    return {"pretty_name": f"Neuron activations of {model} ({neurons})", "tags": list(CARD_TAGS), METADATA_KEY: metadata}


def _card_body(metadata: dict) -> str:
    m = metadata
    model = m.get("model") or {}
    transform = m.get("transform") or {}
    lines = [
        f"# Neuron activations: {model.get('name')} — {', '.join(m.get('neurons', []))}",
        "",
        "Generated by `nsr dataset` of nsr_hf (neuron self-report: a model fine-tuned to report its own MLP neurons). Load it with",
        "",
        "```python",
        "from datasets import load_dataset",
        "ds = load_dataset(\"<this repo id or folder>\")",
        "# or, with the label transform and provenance:",
        "from nsr_hf.data.generator import load_activation_dataset",
        "ds, metadata = load_activation_dataset(\"<this repo id or folder>\")",
        "```",
        "",
        "## Provenance",
        "",
        f"- model: `{model.get('name')}` revision `{model.get('revision')}`; quantisation: {model.get('quantization') or 'none'}",
        f"- neurons (layer.index, MLP hidden activation): {', '.join(m.get('neurons', []))}; layers {m.get('layers')}",
        (f"- labelled token: position rule `{m.get('position')}` ({POSITION_TEXT.get(str(m.get('position')), 'that index among real tokens')}; "
         f"{m.get('layout')} layout); texts cut to {m.get('max_length')} tokens, never padded"),
        f"- corpus: `{json.dumps(m.get('corpus'))}`",
        f"- out-of-domain corpus: `{json.dumps(m.get('ood_corpus'))}`",
        f"- splits by document id (seed {m.get('split_seed')}, fractions {m.get('split_fractions')}) after removing exact duplicates",
        f"- nsr_hf {m.get('nsr_hf_version')}",
        "",
        "## Splits",
        "",
        "| split | rows | documents | skipped (too short) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for split in m.get("splits", []):
        lines.append(f"| {split} | {m['num_rows'].get(split)} | {m['num_documents'].get(split)} | {m['skipped_documents'].get(split)} |")
    lines += ["", "## Columns", ""] + [f"- `{name}`: {text}" for name, text in (m.get("columns") or {}).items()]
    if transform:
        lines += ["", f"## Label transform (fitted on {transform.get('fitted_on')} only: {transform.get('num_values')} values)", "",
                  (f"Bins: {transform.get('bin_strategy')}, {len(transform['bin_edges'][0]) - 1} per neuron; a value v is in bin i when "
                   "edge[i] <= v < edge[i+1] (the train max in the last bin, values outside the train range in the end bins)."),
                  f"Report tokens per bin: {transform.get('report_tokens')} (ids {transform.get('report_token_ids')}).", "",
                  "| neuron | train mean | train std | bin edges |", "| --- | ---: | ---: | --- |"]
        for j, n in enumerate(transform["neurons"]):
            edges = ", ".join(f"{e:.4g}" for e in transform["bin_edges"][j])
            lines.append(f"| {n} | {transform['mean'][j]:.4g} | {transform['std'][j]:.4g} | {edges} |")
    if m.get("balance"):
        b = m["balance"]
        lines += ["", (f"Train balanced by the bins of {b['neuron']} (seed {b['seed']}, floor {b['min_keep']}): "
                       f"{b['rows_before']} -> {b['rows_after']} rows; per bin before {b['before']}, after {b['after']}.")]
    lines += ["", "The full configuration and per-split statistics are in the `nsr_hf` block of this card's metadata.", ""]
    return "\n".join(lines)


def _card_from_yaml(data: dict, body: str):
    import yaml
    from huggingface_hub import DatasetCard

    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)
    return DatasetCard(f"---\n{text}---\n\n{body}")


def dataset_card(metadata: dict):
    """The ``DatasetCard`` of an activation dataset: YAML with ``pretty_name``, ``tags`` and our ``nsr_hf`` block
    (provenance, neurons, position, transform), and a readable body."""
    return _card_from_yaml(_card_yaml(metadata), _card_body(metadata))


def merge_card_metadata(auto_yaml: dict, ours: dict) -> dict:
    """Card YAML that keeps what ``push_to_hub`` wrote (``configs`` and ``dataset_info`` describe the files and
    win over ours) and adds our keys; ``tags`` are united, other keys of ours replace theirs."""
    merged = copy.deepcopy(dict(auto_yaml or {}))
    for key, value in (ours or {}).items():
        if key in HUB_CARD_KEYS and key in merged:
            continue
        if key == "tags" and isinstance(merged.get(key), list):
            merged[key] = merged[key] + [t for t in value if t not in merged[key]]
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _card_parts(card) -> tuple[dict, str]:
    if card is None:
        return {}, ""
    if isinstance(card, str):
        from huggingface_hub import DatasetCard

        card = DatasetCard(card)
    return card.data.to_dict(), card.text


def _metadata_of(dataset_dict) -> dict:
    for ds in dataset_dict.values():
        try:
            return json.loads(ds.info.description or "")[METADATA_KEY]
        except (ValueError, KeyError, TypeError):
            continue
    return {}


def save_hub_layout(dataset_dict, folder: "str | os.PathLike", card=None, max_shard_size: int = HUB_SHARD_BYTES) -> Path:
    """Write ``dataset_dict`` as ``push_to_hub`` lays it out in a repo: ``data/<split>-XXXXX-of-YYYYY.parquet`` and a
    README.md whose YAML has ``configs`` and ``dataset_info`` merged with ``card``'s (default: the card made from
    the datasets' metadata). ``datasets.load_dataset(folder)`` then loads it like the Hub repo."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for old in (folder / "data").glob("*.parquet"):
        old.unlink()
    if card is None:
        card = dataset_card(_metadata_of(dataset_dict))
    ours, body = _card_parts(card)
    info = DatasetInfo(config_name="default", splits=SplitDict(), download_size=0, dataset_size=0)
    for split, ds in dataset_dict.items():
        info.features = ds.features
        nbytes = ds.data.nbytes
        num_shards = max(1, math.ceil(nbytes / max_shard_size))
        for index in range(num_shards):
            path = folder / "data" / f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
            ds.shard(num_shards=num_shards, index=index, contiguous=True).to_parquet(str(path))
            info.download_size += path.stat().st_size
        info.splits.add(SplitInfo(name=split, num_bytes=nbytes, num_examples=len(ds)))
        info.dataset_size += nbytes
    info.size_in_bytes = info.download_size + info.dataset_size
    auto = DatasetCardData()
    DatasetInfosDict({"default": info}).to_dataset_card_data(auto)
    MetadataConfigs({"default": {"data_files": [{"split": s, "path": f"data/{s}-*"} for s in dataset_dict]}}).to_dataset_card_data(auto)
    _card_from_yaml(merge_card_metadata(auto.to_dict(), ours), body).save(folder / "README.md")
    return folder


def push_to_hub(dataset_dict, repo_id: str, card=None, *, private: bool = False, token: Optional[str] = None,
                commit_message: str = "Upload nsr_hf activation dataset"):
    """``DatasetDict.push_to_hub``, then the card: the auto-written one is loaded, our YAML merged into it
    (``merge_card_metadata``: its ``configs``/``dataset_info`` kept) and its text replaced by ours."""
    from huggingface_hub import DatasetCard

    if card is None:
        card = dataset_card(_metadata_of(dataset_dict))
    ours, body = _card_parts(card)
    dataset_dict.push_to_hub(repo_id, private=private, token=token, commit_message=commit_message)
    auto = DatasetCard.load(repo_id, repo_type="dataset", token=token)
    merged = _card_from_yaml(merge_card_metadata(auto.data.to_dict(), ours), body)
    merged.push_to_hub(repo_id, repo_type="dataset", token=token, commit_message="Dataset card (nsr_hf provenance and label transform)")
    return merged


def read_metadata(path: "str | os.PathLike", dataset_dict=None) -> dict:
    """Our ``nsr_hf`` block from the README.md in ``path``, else from the splits' ``info.description``."""
    readme = Path(path) / "README.md"
    if readme.exists():
        from huggingface_hub import DatasetCard

        data = DatasetCard.load(readme).data.to_dict()
        if METADATA_KEY in data:
            return data[METADATA_KEY]
    return _metadata_of(dataset_dict) if dataset_dict is not None else {}


def load_activation_dataset(path_or_repo_id: "str | os.PathLike", *, cache_dir: Optional[str] = None,
                            revision: Optional[str] = None, token: Optional[str] = None):
    """``(DatasetDict, metadata)`` from a ``save_to_disk`` folder, a local folder in the Hub's layout, or a Hub id.

    >>> dd, meta = load_activation_dataset("outputs/dataset")
    >>> transform = LabelTransform.from_dict(meta["transform"])

    The columns are checked (a missing one is named) and so is the presence of our metadata.
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = Path(path_or_repo_id).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = load_from_disk(str(path))
        dataset_dict = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
        metadata = read_metadata(path, dataset_dict)
    elif path.is_dir():
        dataset_dict = load_dataset(str(path), cache_dir=cache_dir)
        metadata = read_metadata(path)
    elif path.exists() or str(path_or_repo_id).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{str(path_or_repo_id)!r} is not a dataset folder (save_to_disk or Hub layout)")
    else:
        from huggingface_hub import DatasetCard

        dataset_dict = load_dataset(str(path_or_repo_id), cache_dir=cache_dir, revision=revision, token=token)
        metadata = DatasetCard.load(str(path_or_repo_id), repo_type="dataset", token=token).data.to_dict().get(METADATA_KEY, {})
    if isinstance(dataset_dict, Dataset):
        dataset_dict = DatasetDict({"train": dataset_dict})
    validate_columns(dataset_dict, (metadata or {}).get("layout"))
    if not metadata:
        raise ValueError(f"{path_or_repo_id}: no '{METADATA_KEY}' metadata in its README.md card or dataset info; "
                         "the label transform and provenance are unknown (was it made by `nsr dataset`?)")
    return dataset_dict, metadata


# ----------------------------------------------------------------------------------------------------------
# Command line


def format_balance(balance: dict, report_tokens: Sequence[str]) -> str:
    lines = [(f"balancing train by the bins of {balance['neuron']} (seed {balance['seed']}, keep >= {balance['min_keep']:.0%}): "
              f"{balance['rows_before']} -> {balance['rows_after']} rows"), f"{'bin':>5} {'token':>6} {'before':>8} {'after':>8}"]
    for i, (b, a) in enumerate(zip(balance["before"], balance["after"])):
        lines.append(f"{i:>5} {report_tokens[i]!s:>6} {b:>8} {a:>8}")
    return "\n".join(lines)


def format_summary(dataset_dict, metadata: dict, output_dir: Optional[str] = None) -> str:
    """Rows per split, activation mean/std/min/max per neuron and split, and the bins."""
    lines = [(f"activation dataset{' in ' + str(output_dir) if output_dir else ''}: model {metadata['model'].get('name')}, "
             f"neurons {', '.join(metadata['neurons'])}, position {metadata['position']!r} ({metadata['layout']}), "
             f"max_length {metadata['max_length']}"), "",
             f"{'split':<10} {'rows':>8} {'documents':>10} {'skipped':>8}"]
    for split in metadata["splits"]:
        lines.append(f"{split:<10} {len(dataset_dict[split]):>8} {metadata['num_documents'][split]:>10} {metadata['skipped_documents'][split]:>8}")
    lines += ["", f"{'neuron':<10} {'split':<10} {'mean':>10} {'std':>10} {'min':>10} {'max':>10}"]
    for n in metadata["neurons"]:
        for split in metadata["splits"]:
            s = metadata["statistics"][split][n]
            if s:
                lines.append(f"{n:<10} {split:<10} {s['mean']:>10.4f} {s['std']:>10.4f} {s['min']:>10.4f} {s['max']:>10.4f}")
    t = metadata["transform"]
    lines += ["", (f"bins: {len(t['bin_edges'][0]) - 1} {t['bin_strategy']} bins fitted on train ({t['num_values']} values), "
                   f"report tokens {t['report_tokens']}")]
    for j, n in enumerate(t["neurons"]):
        lines.append(f"  {n}: edges " + " ".join(f"{e:.4g}" for e in t["bin_edges"][j]))
    if metadata.get("balance"):
        b = metadata["balance"]
        lines.append(f"balanced train: {b['rows_before']} -> {b['rows_after']} rows")
    return "\n".join(lines)


def run_dataset(config: DatasetConfig, model=None, tokenizer=None):
    """What ``nsr dataset`` does: generate (resuming if interrupted), save to ``output_dir``, print a summary,
    push to the Hub when ``push_to_hub`` is set. Returns the ``DatasetDict``."""
    generator = ActivationDatasetGenerator(config, model=model, tokenizer=tokenizer)
    dataset_dict = generator.generate()
    if generator.state.is_main_process:
        print(format_summary(dataset_dict, generator.metadata, config.output_dir))
        if config.push_to_hub:
            push_to_hub(dataset_dict, config.push_to_hub, dataset_card(generator.metadata), private=config.private)
            print(f"pushed to https://huggingface.co/datasets/{config.push_to_hub}")
    return dataset_dict
