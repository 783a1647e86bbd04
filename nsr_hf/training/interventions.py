"""Intervention training: set the target neuron at the labelled token of some training rows to a value its context does
not predict, and train the report on the value that was set (interchange-intervention training, Geiger et al. 2022).

A reporter trained on natural rows only can be right by recomputing the neuron from the features around it; on a row
whose neuron was *set*, only reading the neuron gives the right answer. ``InterventionSampler`` decides, per (row,
target neuron), whether to set it (probability ``rate``) and to what (``CounterfactualValues``: interchange, uniform or
shift, fitted on the train split); ``PredictorTrainer`` applies the plan in training steps only.

Reproducibility: a row's uniform numbers come from a hash of (seed, epoch, the row's real ``input_ids``, its
``label_position``), never from a stream shared by the batch. A row gets the same draw whatever batch or process it is
in, so two processes of ``b`` rows give the same interventions as one process of ``2b`` rows. (Two identical rows, same
tokens and same labelled token, get the same draw in an epoch.)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from nsr_hf.capture import Intervention, Neuron
from nsr_hf.data.counterfactuals import CounterfactualValues


@dataclass
class InterventionPlan:
    """One batch's interventions: ``mask`` (batch, K) bool (which neuron of which row is set), ``values`` (batch, K)
    float32 (what it is set to; natural rows hold their natural label), and ``labels`` (batch, K): the set value where
    set, the natural label elsewhere."""

    mask: torch.Tensor
    values: torch.Tensor
    labels: torch.Tensor

    @property
    def fraction(self) -> float:
        """The fraction of (row, neuron) pairs that were set."""
        return float(self.mask.float().mean())

    def interventions(self, neurons, positions: torch.Tensor) -> list[Intervention]:
        """One ``Intervention`` per target layer, setting the chosen rows' neurons at ``positions`` (batch,): the labelled
        token in the sequence the head runs through the blocks."""
        neurons = [Neuron.parse(n) for n in neurons]
        out = []
        for layer in sorted({n.layer for n in neurons}):
            columns = [j for j, n in enumerate(neurons) if n.layer == layer]
            out.append(Intervention(layer, [neurons[j].index for j in columns], "set", self.values[:, columns], positions,
                                    rows=self.mask[:, columns]))
        return out


class InterventionSampler:
    """Draws an ``InterventionPlan`` for a training batch (see the module docstring).

    Args:
        values: the fitted ``CounterfactualValues`` (one column per target neuron, in the predictor's order).
        rate: probability that a (row, neuron) pair is set, in [0, 1] (0: never; the batch is left as it is).
        seed: the run's seed; with the epoch and the row's tokens it fixes every draw.
    """

    def __init__(self, values: CounterfactualValues, rate: float, seed: int = 0):
        check_rate(rate)
        self.values = values
        self.rate = float(rate)
        self.seed = int(seed)
        self.epoch = 0

    @property
    def num_neurons(self) -> int:
        return len(self.values.neurons)

    def row_uniforms(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_positions: torch.Tensor) -> np.ndarray:
        """(batch, 2, K) uniform numbers in [0, 1): [whether to set, what to set] per neuron, a function of each row alone."""
        ids = input_ids.detach().cpu().numpy()
        mask = attention_mask.detach().cpu().numpy().astype(bool)
        positions = label_positions.detach().cpu().numpy()
        out = np.empty((ids.shape[0], 2, self.num_neurons))
        for i in range(ids.shape[0]):
            digest = hashlib.blake2b(np.asarray(ids[i][mask[i]], dtype=np.int64).tobytes(), digest_size=16,
                                     key=f"{self.seed}/{self.epoch}/{int(positions[i])}".encode()).digest()
            rng = np.random.default_rng(np.frombuffer(digest, dtype=np.uint32))
            out[i] = rng.random((2, self.num_neurons))
        return out

    def plan(self, inputs: dict, dtype: torch.dtype = torch.float32) -> InterventionPlan:
        """The plan for one collated batch (``input_ids``, ``attention_mask``, ``label_positions``, ``labels``). Set values
        are rounded to ``dtype`` (the one the neuron is held in: ``PredictorTrainer.neuron_dtype``), so that the label is
        exactly the value the neuron holds."""
        labels = inputs["labels"].float().reshape(inputs["input_ids"].shape[0], -1)
        if labels.shape[1] != self.num_neurons:
            raise ValueError(f"The batch has labels for {labels.shape[1]} neuron(s) but the counterfactual values were fitted for "
                             f"{self.num_neurons} ({', '.join(self.values.neurons)}): fit them on the same neurons.")
        u = torch.as_tensor(self.row_uniforms(inputs["input_ids"], inputs["attention_mask"], inputs["label_positions"]),
                            dtype=torch.float64, device=labels.device)
        mask = u[:, 0] < self.rate
        drawn = self.values.draw(labels, u[:, 1]).to(labels.device).to(dtype).float()
        values = torch.where(mask, drawn, labels)
        return InterventionPlan(mask=mask, values=values, labels=values.clone())

    def describe(self) -> dict:
        """What the predictor's config and ``metrics.json`` record: ``rate``, ``source``, ``shift_scale``, ``seed`` and the
        fitted values' summary (``CounterfactualValues.to_dict``)."""
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in self.values.to_dict().items()}  # as JSON reads it back
        return {"rate": self.rate, "source": self.values.source, "shift_scale": self.values.shift_scale, "seed": self.seed,
                "values": values}


def check_rate(rate) -> float:
    """``rate`` if it is a number in [0, 1]; a ValueError that says so otherwise."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= float(rate) <= 1:
        raise ValueError(f"intervention_rate must be a number from 0 (off) to 1 (every training row intervened), got {rate!r}; "
                         "e.g. 0.5 sets the neuron in half the training rows.")
    return float(rate)
