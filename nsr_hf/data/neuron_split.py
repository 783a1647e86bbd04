"""Splits by neuron: which neurons a reporter of many neurons trains on, which choose its settings, which it never sees.

    split = NeuronSplit.draw(neurons, validation=16, held_out=32, seed=0)
    train_dd, train_meta = neuron_columns(dd, metadata, split.train)       # only the train neurons' columns
    held_dd, held_meta = neuron_columns(dd, metadata, split.held_out)      # for the evaluation only

An activation dataset holds one column entry per neuron (``activations``, ``activations_z``, ``bin``: K values per row).
``neuron_columns`` makes a dataset of the same rows that holds only the given neurons' entries, in the given order, with
the metadata's neurons and label transform cut to match. A reporter trained on ``neuron_columns(dd, meta, split.train)``
has never had a held-out neuron's value in its data: the split by neuron is a property of the data, not a promise of the
training loop. The split by document (train, validation, test rows) is the dataset's own and applies to every group.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from nsr_hf.capture import Neuron
from nsr_hf.data.columns import TRANSFORM_COLUMNS

GROUPS = ("train", "validation", "held_out")
NEURON_COLUMNS = ("activations", *TRANSFORM_COLUMNS)
PER_NEURON_FIELDS = ("mean", "std", "bin_edges", "bin_centers")  # the label transform's lists of one entry per neuron


@dataclass
class NeuronSplit:
    """Three disjoint lists of neurons (``"layer.index"``): ``train``, ``validation`` and ``held_out``."""

    train: list[str]
    validation: list[str]
    held_out: list[str]

    def __post_init__(self):
        self.train, self.validation, self.held_out = ([str(Neuron.parse(n)) for n in group] for group in
                                                      (self.train, self.validation, self.held_out))
        seen: dict[str, str] = {}
        for name, group in self.groups().items():
            for n in group:
                if n in seen:
                    raise ValueError(f"Neuron {n} is in both {seen[n]} and {name}: a split by neuron needs disjoint groups.")
                seen[n] = name
        if not self.train:
            raise ValueError("A split by neuron needs at least one train neuron.")

    @classmethod
    def draw(cls, neurons: Sequence[str], validation: int, held_out: int, seed: int = 0) -> "NeuronSplit":
        """A seeded random split of ``neurons``: ``validation`` and ``held_out`` of them, the rest train (order kept within a group)."""
        neurons = [str(Neuron.parse(n)) for n in neurons]
        if len(set(neurons)) != len(neurons):
            raise ValueError("The neurons to split repeat a neuron: give each once.")
        validation, held_out = int(validation), int(held_out)
        if validation < 0 or held_out < 0 or validation + held_out >= len(neurons):
            raise ValueError(f"Cannot hold out {held_out} and validate on {validation} of {len(neurons)} neurons: at least one must "
                             "be left to train on. Use more neurons, or fewer held out.")
        order = np.random.default_rng(seed).permutation(len(neurons))
        pick = lambda idx: [neurons[i] for i in sorted(idx)]  # noqa: E731
        return cls(train=pick(order[validation + held_out:]), validation=pick(order[:validation]),
                   held_out=pick(order[validation:validation + held_out]))

    @classmethod
    def read(cls, path) -> "NeuronSplit":
        """The split a ``neuron_split.json`` (``nsr any-neuron``) holds; a ValueError that names a file that is not one."""
        import json
        from pathlib import Path

        try:
            recorded = json.loads(Path(path).read_text())
            return cls(**{g: recorded[g] for g in GROUPS})
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a split by neuron (a neuron_split.json written by nsr any-neuron, with lists "
                             f"{', '.join(GROUPS)}): {err}") from None

    def groups(self) -> dict[str, list[str]]:
        return {"train": self.train, "validation": self.validation, "held_out": self.held_out}

    def group_of(self, neuron) -> str:
        name = str(Neuron.parse(neuron))
        return next(g for g, members in self.groups().items() if name in members)

    def to_dict(self) -> dict:
        return asdict(self)


class SelectColumns:
    """``map`` function keeping the given entries of every per-neuron column (picklable, so ``datasets`` can fingerprint it)."""

    def __init__(self, indices: Sequence[int]):
        self.indices = list(indices)

    def __call__(self, batch: dict) -> dict:
        return {name: [[values[i] for i in self.indices] for values in batch[name]] for name in NEURON_COLUMNS if name in batch}


def column_indices(metadata: dict, neurons: Sequence[str]) -> list[int]:
    """Each neuron's column in the dataset (``metadata["neurons"]``); a ValueError that names the ones it lacks."""
    held = [str(Neuron.parse(n)) for n in metadata["neurons"]]
    wanted = [str(Neuron.parse(n)) for n in neurons]
    missing = [n for n in wanted if n not in held]
    if missing:
        raise ValueError(f"The dataset has no column for neuron(s) {', '.join(missing)}: it holds {len(held)} neurons "
                         f"({', '.join(held[:8])}{', ...' if len(held) > 8 else ''}). Build it with those neurons.")
    return [held.index(n) for n in wanted]


def neuron_columns(dataset, metadata: dict, neurons: Sequence[str]):
    """``(dataset, metadata)`` holding only ``neurons``' entries of the per-neuron columns, in that order (module docstring).
    ``dataset``: a ``DatasetDict`` or a ``Dataset`` of one value per neuron per row (the ``row`` layout)."""
    if metadata.get("layout") == "column":
        raise ValueError("neuron_columns needs one labelled token per row; this dataset holds every token of a document per row "
                         "(every_token_layout 'column'). Build it with a position ('last' or an index).")
    indices = column_indices(metadata, neurons)
    select = SelectColumns(indices)
    tag = "-".join(str(Neuron.parse(n)) for n in neurons)

    def one(ds):
        fingerprint = hashlib.blake2b(f"{ds._fingerprint}/{tag}".encode(), digest_size=8).hexdigest()
        return ds.map(select, batched=True, new_fingerprint=fingerprint, desc=None)

    if hasattr(dataset, "keys"):
        from datasets import DatasetDict

        out = DatasetDict({split: one(ds) for split, ds in dataset.items()})
    else:
        out = one(dataset)
    meta = dict(metadata)
    meta["neurons"] = [str(Neuron.parse(n)) for n in neurons]
    transform = dict(metadata.get("transform") or {})
    for key in PER_NEURON_FIELDS:
        if isinstance(transform.get(key), list) and len(transform[key]) == len(metadata["neurons"]):
            transform[key] = [transform[key][i] for i in indices]
    if transform:
        transform["neurons"] = meta["neurons"]
        meta["transform"] = transform
    statistics = metadata.get("statistics") or {}
    meta["statistics"] = {split: {n: by_neuron[n] for n in meta["neurons"] if n in by_neuron} for split, by_neuron in statistics.items()}
    meta["layers"] = sorted({Neuron.parse(n).layer for n in meta["neurons"]})
    return out, meta


def varying_neurons(metadata: dict, min_std: float = 1e-6) -> list[str]:
    """The dataset's neurons whose train standard deviation (``metadata["transform"]["std"]``) exceeds ``min_std``: a neuron
    that never varies on the train documents has no value to report and no R² to score."""
    std = (metadata.get("transform") or {}).get("std") or []
    return [n for n, s in zip(metadata["neurons"], std) if s is not None and float(s) > min_std]


def asking(rows, neurons_count: int, per_row: int, seed: int = 0):
    """The training rows of a head that asks about one neuron per prompt (``conditioned_token``): every row ``per_row`` times
    (at most ``neurons_count``), each time with an ``asked`` column naming another of the ``neurons_count`` neurons (an index
    into them). Row ``i`` asks about neurons ``start_i, start_i + 1, ...`` (mod ``neurons_count``), where the starts cycle
    through a seeded permutation of the neurons and are shuffled over the rows: a row never asks about the same neuron twice,
    and over all (row, neuron) pairs every neuron is asked about equally often, to within ``per_row``."""
    from datasets import concatenate_datasets

    if neurons_count < 1 or per_row < 1:
        raise ValueError(f"asking needs at least one neuron and one question per row, got {neurons_count} and {per_row}.")
    if "asked" in rows.column_names:
        raise ValueError("These rows already have an 'asked' column: expand the rows of the dataset once.")
    rng = np.random.default_rng(seed)
    per_row = min(per_row, neurons_count)
    starts = np.resize(rng.permutation(neurons_count), len(rows))[rng.permutation(len(rows))]
    return concatenate_datasets([rows.add_column("asked", ((starts + t) % neurons_count).tolist()) for t in range(per_row)])
