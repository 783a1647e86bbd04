"""Values to set a neuron to that its context does not predict: the counterfactuals of intervention training and of
the faithfulness evaluation (Geiger et al. 2022, interchange-intervention training).

A reporter that is asked about a neuron whose value was *set* can only be right by reading the neuron; one that
recomputes the neuron from its context reports the natural value instead. ``CounterfactualValues`` is fitted on the
training split's values of each target neuron and offers three sources:

* ``interchange``: another training row's value of the same neuron (the neuron's natural marginal);
* ``uniform``: uniform over the training split's 1st to 99th percentile;
* ``shift``: the row's natural value plus a normal shift of ``shift_scale`` training standard deviations.

Draws are a deterministic function of uniform numbers in ``[0, 1)`` that the caller supplies (``draw(natural, u)``),
so the caller decides how randomness is seeded (per row, per step, per process) and the distribution is defined once.

>>> values = CounterfactualValues.fit(train_activations, ["7.268"], source="interchange")
>>> set_to = values.draw(natural, torch.rand(natural.shape, generator=g))     # (rows, K)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

SOURCES = ("interchange", "uniform", "shift")
PERCENTILES = (1.0, 99.0)


@dataclass
class CounterfactualValues:
    """The training split's values of each target neuron, and the rule that draws counterfactual values from them.

    Attributes: ``neurons`` (K names), ``source`` (one of ``SOURCES``), ``shift_scale`` (``shift``: the normal shift's
    standard deviation in training standard deviations), and per neuron the sorted training ``values``, the ``low`` and
    ``high`` percentiles (``PERCENTILES``) and the ``std``.
    """

    neurons: list[str]
    source: str
    values: list[list[float]]
    low: list[float]
    high: list[float]
    std: list[float]
    shift_scale: float = 1.0
    percentiles: tuple[float, float] = field(default=PERCENTILES)

    def __post_init__(self):
        check_source(self.source)
        if not self.shift_scale > 0:
            raise ValueError(f"shift_scale must be a positive number of training standard deviations, got {self.shift_scale!r}.")
        if not (len(self.values) == len(self.low) == len(self.high) == len(self.std) == len(self.neurons)):
            raise ValueError("CounterfactualValues needs one list of values, low, high and std per neuron.")

    @classmethod
    def fit(cls, train_values, neurons, source: str = "interchange", shift_scale: float = 1.0) -> CounterfactualValues:
        """Fit on ``train_values`` ``(rows, K)`` (or ``(rows,)`` for one neuron): the training split only, never the
        rows that will be evaluated."""
        check_source(source)
        array = np.asarray(train_values, dtype=np.float64)
        array = array[:, None] if array.ndim == 1 else array
        if array.ndim != 2 or array.shape[0] < 2 or array.shape[1] != len(neurons):
            raise ValueError(f"fit needs (rows >= 2, {len(neurons)}) training values, one column per neuron; got shape {array.shape}.")
        if not np.isfinite(array).all():
            raise ValueError("the training values hold NaN or infinite values.")
        low, high = np.percentile(array, PERCENTILES, axis=0)
        return cls(neurons=[str(n) for n in neurons], source=source, values=np.sort(array, axis=0).T.tolist(), low=low.tolist(),
                   high=high.tolist(), std=array.std(0).tolist(), shift_scale=float(shift_scale))

    def draw(self, natural: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``(rows, K)`` values to set, from the rows' ``natural`` values ``(rows, K)`` (used by ``shift`` only) and
        uniform numbers ``u`` in ``[0, 1)`` of the same shape; float32 on ``natural``'s device."""
        natural = torch.as_tensor(natural, dtype=torch.float64)
        u = torch.as_tensor(u, dtype=torch.float64, device=natural.device)
        if natural.dim() != 2 or natural.shape[1] != len(self.neurons) or u.shape != natural.shape:
            raise ValueError(f"draw needs natural values and uniform numbers of shape (rows, {len(self.neurons)}); "
                             f"got {tuple(natural.shape)} and {tuple(u.shape)}.")
        device = natural.device
        if self.source == "interchange":
            table = torch.as_tensor(self.values, dtype=torch.float64, device=device)  # (K, n), sorted
            index = (u * table.shape[1]).long().clamp(max=table.shape[1] - 1)
            out = torch.gather(table, 1, index.T).T
        elif self.source == "uniform":
            low = torch.as_tensor(self.low, dtype=torch.float64, device=device)
            high = torch.as_tensor(self.high, dtype=torch.float64, device=device)
            out = low + (high - low) * u
        else:  # shift: a normal deviate by the inverse normal CDF of u (kept away from 0 and 1)
            std = torch.as_tensor(self.std, dtype=torch.float64, device=device)
            out = natural + self.shift_scale * std * torch.special.ndtri(u.clamp(1e-6, 1 - 1e-6))
        return out.float()

    def to_dict(self) -> dict:
        """Everything but the training values (what a card or ``metrics.json`` records)."""
        out = asdict(self)
        out.pop("values")
        out["train_rows"] = len(self.values[0]) if self.values else 0
        return out


def check_source(source: str) -> str:
    """``source`` if it is one of ``SOURCES``; a ValueError that lists them otherwise."""
    if source not in SOURCES:
        raise ValueError(f"Unknown counterfactual source {source!r}: use one of {', '.join(SOURCES)} "
                         "(interchange: another training row's value; uniform: over the train 1st-99th percentile; "
                         "shift: the natural value plus a normal shift).")
    return source
