"""The label transform: the one rule that turns a neuron's value into a z-score and a bin, and a bin back into a
value, for numpy arrays (the dataset's columns, the metrics) and torch tensors (the predictor's loss and readout).

    >>> t = LabelTransform.fit(train_values, ["15.100"], num_bins=10)    # train_values: (n, K)
    >>> zscore_of(values, t.mean, t.std), bins_of(values, t.bin_edges), centers_of(t.bin_edges, t.bin_centers)

The rule, written once here:

* z-score: ``(value - mean) / std`` per neuron, computed in float64 and returned as float32.
* bins: ``num_bins + 1`` edges per neuron; a value is in bin ``i`` when ``edges[i] <= value < edges[i + 1]``, the
  last bin includes its upper edge (the train max) and values outside the edges fall in the end bins.
* bin centres: the value each bin reports, its train mean (``LabelTransform.with_bin_centers``); a transform
  saved before centres were fitted reports the midpoints of the edges.

Numpy in gives numpy out, a tensor in gives a tensor out on its device; both give the same numbers (a tensor's
z-scores stay differentiable).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from nsr_hf.data.binning import BIN_STRATEGIES, fit_edges


def zscore_of(values, mean, std):
    """``(values - mean) / std`` over a trailing neuron axis (``mean`` and ``std``: one per neuron), in float64,
    returned as float32: a numpy array for numpy input, a tensor on the input's device for a tensor."""
    if isinstance(values, torch.Tensor):
        mean = torch.as_tensor(np.asarray(mean, dtype=np.float64), device=values.device)
        std = torch.as_tensor(np.asarray(std, dtype=np.float64), device=values.device)
        return ((values.double() - mean) / std).float()
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    return ((np.asarray(values, dtype=np.float64) - mean) / std).astype(np.float32)


def unzscore_of(z, mean, std):
    """Activation values from z-scores, the inverse of ``zscore_of``: ``z * std + mean`` per neuron, in ``z``'s float
    precision (a tensor keeps its gradient and device: the regression head's readout), float32 for numpy input."""
    if isinstance(z, torch.Tensor):
        return z * torch.as_tensor(std, dtype=z.dtype, device=z.device) + torch.as_tensor(mean, dtype=z.dtype, device=z.device)
    return (np.asarray(z) * np.asarray(std) + np.asarray(mean)).astype(np.float32)


def bins_of(values, edges):
    """Bin index (int64) of each value: ``edges[i] <= v < edges[i + 1]``, the last bin includes its upper edge,
    values outside the edges fall in the end bins.

    ``edges``: one neuron's ``num_bins + 1`` edges (any shape of ``values``), or ``(K, num_bins + 1)``, one list per
    neuron on the trailing axis of ``values``. A tensor is binned on its device; the edges are then compared in
    the tensor's precision, each rounded up to the next representable value, which decides ``v >= edge`` exactly
    as float64 does: a float32 tensor gets the bins of the same values in numpy."""
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim == 2:
        if isinstance(values, torch.Tensor):
            return torch.stack([bins_of(values[..., k], e) for k, e in enumerate(edges)], -1)
        return np.stack([bins_of(np.asarray(values)[..., k], e) for k, e in enumerate(edges)], -1)
    inner = edges[1:-1]
    if isinstance(values, torch.Tensor):
        values = values if values.dtype == torch.float64 else values.float()
        precision = np.float64 if values.dtype == torch.float64 else np.float32
        bounds = torch.as_tensor(_rounded_up(inner, precision), device=values.device)
        return torch.bucketize(values.contiguous(), bounds, right=True)
    return np.searchsorted(inner, np.asarray(values, dtype=np.float64), side="right")


def _rounded_up(edges: np.ndarray, precision) -> np.ndarray:
    """``edges`` in ``precision``, each the smallest representable value at or above it: for a value ``v`` of that
    precision, ``v >= rounded`` exactly when ``v >= edge``."""
    rounded = edges.astype(precision)
    low = rounded.astype(np.float64) < edges
    rounded[low] = np.nextafter(rounded[low], precision(np.inf))
    return rounded


def centers_of(edges, centers=None) -> np.ndarray:
    """``(K, num_bins)`` float64: the value each bin reports. ``centers`` (each bin's train mean) when given, else
    the midpoints of ``edges`` ``(K, num_bins + 1)`` (transforms saved before centres were fitted)."""
    if centers is not None and len(centers):
        return np.asarray(centers, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    return (edges[:, 1:] + edges[:, :-1]) / 2


def shared_bins(values, num_bins: int, strategy: str = "quantile") -> dict:
    """One set of bins for many neurons (the conditioned token head reports every neuron, one it never saw too, on one scale):
    ``shared_bin_edges`` fitted on the pooled values ``(rows, K)`` (``fit_edges``) and ``shared_bin_centers``, each bin's mean
    of the pooled values in it (its midpoint when it holds none)."""
    pooled = np.asarray(values, dtype=np.float64).reshape(-1)
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0 or pooled.min() == pooled.max():
        raise ValueError("The neurons' pooled values are constant (or there are none): shared bins need values that vary.")
    edges = fit_edges(pooled, num_bins, strategy)
    index = bins_of(pooled, edges)
    centers = [float(pooled[index == b].mean()) if np.any(index == b) else float((edges[b] + edges[b + 1]) / 2) for b in range(num_bins)]
    return {"shared_bin_edges": edges.tolist(), "shared_bin_centers": centers}


def with_shared_bins(statistics: dict, neurons_count: int, shared: dict) -> dict:
    """A label transform of ``neurons_count`` neurons: ``statistics`` (``mean``, ``std``) and the shared bins, also as every
    neuron's own ``bin_edges`` and ``bin_centers`` (what the bin metrics read)."""
    return {**statistics, **shared, "bin_edges": [list(shared["shared_bin_edges"])] * neurons_count,
            "bin_centers": [list(shared["shared_bin_centers"])] * neurons_count}


@dataclass
class LabelTransform:
    """z-score statistics, bin edges and report tokens of K neurons, fitted on one split (train).

    >>> t = LabelTransform.fit(train_values, ["15.100"], num_bins=10)    # train_values: (n, K)
    >>> t.bin_of(values), t.zscore(values), t.inverse_zscore(z)
    >>> t.report_tokens[t.bin_of(values)[:, 0]]                          # the digit each row should report

    Bins: ``num_bins + 1`` edges per neuron (``nsr_hf.data.binning``), ``edges[0]`` = train min, ``edges[-1]`` =
    train max, strictly increasing; values go to bins by ``bins_of``. ``std`` is the population standard deviation
    (ddof 0).

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
            report_tokens: Optional[Sequence[str]] = None, fitted_on: str = "train") -> LabelTransform:
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
        edges = [fit_edges(values[:, k], num_bins, strategy).tolist() for k in range(len(neurons))]
        fitted = cls(neurons=neurons, mean=values.mean(0).tolist(), std=values.std(0).tolist(), bin_edges=edges,
                     bin_strategy=strategy, report_tokens=list(report_tokens or [str(i) for i in range(num_bins)]),
                     fitted_on=fitted_on, num_values=len(values))
        return fitted.with_bin_centers(values)

    def with_bin_centers(self, values) -> LabelTransform:
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
        """Bin index (int64, same shape as ``values``; a trailing neuron dimension of K), by ``bins_of``."""
        values = self._as_2d(values)
        if np.isnan(values).any():
            raise ValueError("cannot bin NaN values")
        return bins_of(values, self.bin_edges)

    def zscore(self, values) -> np.ndarray:
        """float32 z-scores with the fitted mean and std, by ``zscore_of``."""
        return zscore_of(self._as_2d(values), self.mean, self.std)

    def inverse_zscore(self, z) -> np.ndarray:
        return unzscore_of(self._as_2d(z), self.mean, self.std)

    def bin_midpoints(self) -> np.ndarray:
        """``(K, num_bins)`` midpoint of each bin's edges in activation units."""
        return centers_of(self.bin_edges)

    def centers(self) -> np.ndarray:
        """``(K, num_bins)`` the value each bin reports: ``bin_centers`` when fitted, else the midpoints."""
        return centers_of(self.bin_edges, self.bin_centers)

    def with_token_ids(self, tokenizer, strict: bool = True) -> LabelTransform:
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
            warnings.warn(message, stacklevel=2)
        return LabelTransform(**{**self.to_dict(), "report_token_ids": ids})

    def to_dict(self) -> dict:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> LabelTransform:
        return cls(**data)
