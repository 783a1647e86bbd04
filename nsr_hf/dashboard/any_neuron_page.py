"""The page of an any-neuron run (``nsr any-neuron``: ``any_neuron.json``): the medians of each group of neurons (train,
validation, held-out), the per-neuron figure, and one sortable row per neuron with its group, each reporter's natural R² and
slope ratio, and the ridge probe's R². It reads ``any_neuron.json`` only."""
from __future__ import annotations

from pathlib import Path

from nsr_hf.dashboard.figures import svg_of
from nsr_hf.dashboard.run_files import read_json
from nsr_hf.evaluation.figures import plot_any_neuron
from nsr_hf.methods import fmt

RESULT_FILE = "any_neuron.json"
GROUP_WORDS = {"train": "train neurons", "validation": "validation neurons", "held_out": "held-out neurons (never trained on)"}


def is_any_neuron_folder(folder: Path) -> bool:
    """An any-neuron run's folder: it has ``any_neuron.json``."""
    return isinstance(read_json(Path(folder) / RESULT_FILE), dict)


def any_neuron_page(folder: Path) -> dict:
    """The template's context of the page of the any-neuron run in ``folder``."""
    result = read_json(Path(folder) / RESULT_FILE)
    conditionings = list(result["conditionings"])
    summary = []
    for group, entry in result["summary"].items():
        summary.append({"group": GROUP_WORDS.get(group, group), "n": entry["neurons"], "probe": fmt(entry["ridge_probe_r2"]),
                        "reporters": [(fmt(entry[c]["natural_r2"]), fmt(entry[c]["slope_ratio"])) for c in conditionings]})
    rows = []
    for neuron, scores in result["per_neuron"].items():
        values = [(scores[c]["natural_r2"], scores[c]["slope_ratio"]) for c in conditionings]
        rows.append({"neuron": neuron, "group": scores["group"].replace("_", "-"), "probe": scores["ridge_probe_r2"],
                     "probe_shown": fmt(scores["ridge_probe_r2"]), "values": values,
                     "shown": [(fmt(r2), fmt(ratio)) for r2, ratio in values]})
    figure = svg_of(lambda path: plot_any_neuron(result["per_neuron"], conditionings, path))
    return {"folder": str(folder), "model": result["model"], "layers": result["layers"], "read_layer": result["read_layer"],
            "unfreeze": result["unfreeze"], "intervention_rate": result.get("intervention_rate") or 0, "conditionings": conditionings,
            "summary": summary, "rows": rows, "figure": figure, "split": result["split"]}
