"""The R² a *perfect* bin classifier would score: each row reports the train mean of its own bin. The bins alone cap
what a classification or token head can reach, whatever it learns; this shows the cap of each ``bin_strategy`` on a
dataset's splits, next to nothing else (compare it with the ridge probe's R² in the run's evaluation).

    python benchmarks/bin_ceiling.py DATASET [DATASET ...] [--split test] [--num_bins 10] [--json out.json]

DATASET: a folder written by ``nsr dataset`` / ``nsr train`` (``.../dataset``). Bins are fitted on its train split
(as ``train_label_transform`` would refit them) and scored on ``--split``; one row per dataset and neuron.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from nsr_hf.data.binning import BIN_STRATEGIES
from nsr_hf.data.columns import read_column
from nsr_hf.data.labels import LabelTransform
from nsr_hf.data.storage import load_activation_dataset


def ceiling(train: np.ndarray, values: np.ndarray, neuron: str, num_bins: int, strategy: str) -> float:
    """R² on ``values`` of reporting the train mean of each value's bin (bins of ``strategy`` fitted on ``train``)."""
    t = LabelTransform.fit(train, [neuron], num_bins, strategy)
    reported = t.centers()[0, t.bin_of(values)[:, 0]]
    return float(1 - ((reported - values) ** 2).sum() / ((values - values.mean()) ** 2).sum())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num_bins", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    results = {}
    print(f"| dataset | neuron | train rows | {args.split} rows | " + " | ".join(BIN_STRATEGIES) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in BIN_STRATEGIES) + " |")
    for path in args.datasets:
        dataset, metadata = load_activation_dataset(path)
        if args.split not in dataset:
            raise SystemExit(f"{path} has no {args.split!r} split (it has {list(dataset)}): pass --split")
        neurons = list(metadata["neurons"])
        train = read_column(dataset["train"], "activations", len(neurons)).astype(np.float64)
        values = read_column(dataset[args.split], "activations", len(neurons)).astype(np.float64)
        for j, neuron in enumerate(neurons):
            row = {s: ceiling(train[:, j], values[:, j], neuron, args.num_bins, s) for s in BIN_STRATEGIES}
            results.setdefault(path, {})[neuron] = {"train_rows": len(train), "rows": len(values), "split": args.split, "r2": row}
            print(f"| {path} | {neuron} | {len(train)} | {len(values)} | " + " | ".join(f"{row[s]:.3f}" for s in BIN_STRATEGIES) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
