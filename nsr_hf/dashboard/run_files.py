"""What a run folder holds, read from its files alone (no model): the data every panel of the dashboard draws from.

A train run (``nsr train`` / ``nsr quickstart``) writes ``metrics.json`` (its summary, with the evaluation), ``scan/``,
``dataset/``, ``predictor/``, ``evaluation/``, ``drift.json``, ``log_history.json`` and ``run_config.json``; an ``nsr evaluate``
folder holds an evaluation's ``metrics.json`` alone. Every file is optional here: a panel whose file is missing says so.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nsr_hf.methods import is_evaluation


def read_json(path: Path):
    """The JSON content of ``path``; None when it is missing or unreadable (a panel then says the file is missing)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def is_run_folder(folder: Path) -> bool:
    """A train run's folder or an evaluation's: it has a ``metrics.json`` that is a JSON object."""
    return isinstance(read_json(Path(folder) / "metrics.json"), dict)


def is_sweep_folder(folder: Path) -> bool:
    """A sweep's folder: it has ``sweep.json`` (``nsr sweep``)."""
    return isinstance(read_json(Path(folder) / "sweep.json"), dict)


@dataclass
class RunFiles:
    """A run folder's contents, as read from disk. ``summary``: the train run's ``metrics.json`` (None for an evaluation
    folder); ``evaluation``: the evaluation (from the summary, or ``evaluation/metrics.json``, or the folder's own)."""

    folder: Path
    summary: dict | None = None
    evaluation: dict | None = None
    evaluation_dir: Path | None = None
    predictions: dict | None = None
    examples: dict | None = None
    drift: dict | None = None
    log_history: list | None = None
    run_config: dict | None = None
    neuron_choice: dict | None = None
    scan_top: dict | None = None
    selection: dict | None = None
    predictor_config: dict | None = None
    sources: dict = field(default_factory=dict)

    @property
    def neurons(self) -> list[str]:
        for holder in (self.summary, self.evaluation):
            if holder and holder.get("neurons"):
                return [str(n) for n in holder["neurons"]]
        return []

    @property
    def config(self) -> dict:
        """The run's full configuration (``metrics.json`` ``config``), or the evaluation's."""
        return ((self.summary or {}).get("config") or (self.evaluation or {}).get("config") or {})

    def path(self, *parts: str) -> Path:
        return self.folder.joinpath(*parts)

    @property
    def dataset_dir(self) -> Path | None:
        """The run's dataset folder: its own ``dataset/``, else (an ``nsr evaluate`` folder) the local dataset folder the
        evaluation read (its config's ``dataset``), when it is still there; None otherwise."""
        own = self.path("dataset")
        if own.is_dir():
            return own
        given = self.config.get("dataset")
        return Path(given) if given and (Path(given) / "dataset_dict.json").is_file() else None

    @property
    def dataset_neurons(self) -> list[str]:
        """The neurons of the dataset's ``activations`` columns, in their order (the dataset's own record, in each split's
        ``dataset_info.json``); the run's neurons when the dataset does not say."""
        path = self.dataset_dir
        splits = (read_json(path / "dataset_dict.json") or {}).get("splits") if path else None
        for split in splits or []:
            try:
                recorded = json.loads((read_json(path / split / "dataset_info.json") or {}).get("description") or "{}")
            except ValueError:
                continue
            neurons = (recorded.get("nsr_hf") or {}).get("neurons") if isinstance(recorded, dict) else None
            if neurons:
                return [str(n) for n in neurons]
        return self.neurons


def read_run(folder) -> RunFiles:
    """Every file of the run folder ``folder`` that a panel reads (a missing one stays None)."""
    folder = Path(folder)
    own = read_json(folder / "metrics.json")
    if not isinstance(own, dict):
        raise FileNotFoundError(f"{folder} holds no metrics.json: not a run folder.")
    run = RunFiles(folder=folder)
    if is_evaluation(own):
        run.evaluation, run.evaluation_dir = own, folder
    else:
        run.summary = own
        # the evaluation folder's own file first: an `nsr evaluate --overwrite` after training replaced it, not the summary's copy
        evaluated = read_json(folder / "evaluation" / "metrics.json")
        run.evaluation = evaluated if is_evaluation(evaluated) else own.get("evaluation")
        run.evaluation_dir = folder / "evaluation" if (folder / "evaluation").is_dir() else None
    if run.evaluation_dir is not None:
        run.predictions = read_json(run.evaluation_dir / "predictions.json")
        run.examples = read_json(run.evaluation_dir / "examples.json")
    run.drift = read_json(folder / "drift.json")
    run.log_history = read_json(folder / "log_history.json")
    run.run_config = read_json(folder / "run_config.json")
    run.neuron_choice = read_json(folder / "neuron.json")
    run.scan_top = read_json(folder / "scan" / "top_neurons.json")
    run.selection = read_json(folder / "scan" / "selection.json")
    run.predictor_config = read_json(folder / "predictor" / "config.json")
    return run


def scan_row(folder: Path, neuron: str) -> dict | None:
    """The scan's table row of ``neuron`` (statistics, scores, rank) from ``scan/neurons.parquet``; None without a scan."""
    path = Path(folder) / "scan" / "neurons.parquet"
    if not path.is_file():
        return None
    import pandas as pd

    layer, index = (int(x) for x in neuron.split("."))
    table = pd.read_parquet(path)
    row = table[(table["layer"] == layer) & (table["neuron"] == index)]
    if row.empty:
        return None
    out = row.iloc[0].to_dict()
    out["scanned_neurons"] = len(table)
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in out.items()}


def dataset_values(path: Path | None, column: int) -> dict[str, list[float]] | None:
    """The labelled value of activation column ``column`` in every split of the dataset folder ``path`` (a run's
    ``dataset/``), read from its Arrow files with pyarrow (the files ``save_to_disk`` writes, listed in each split's
    ``state.json``; no model, and none of ``datasets``' import time); None without a dataset folder."""
    import pyarrow as pa

    if path is None:
        return None
    path = Path(path)
    splits = (read_json(path / "dataset_dict.json") or {}).get("splits")
    if not splits:
        return None
    out = {}
    for split in splits:
        files = [f["filename"] for f in (read_json(path / split / "state.json") or {}).get("_data_files") or []]
        tables = [pa.ipc.open_stream(pa.memory_map(str(path / split / name))).read_all() for name in files]
        rows = [np.asarray(v, dtype=np.float64).reshape(-1)[column] for t in tables if "activations" in t.column_names
                for v in t.column("activations").to_numpy(zero_copy_only=False)]
        if rows:
            out[split] = [float(v) for v in rows]
    return out or None
