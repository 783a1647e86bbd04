"""The page of an any-neuron run (``nsr any-neuron``: ``any_neuron.json``): the medians of each group of neurons (train,
validation, held-out), the per-neuron figure, and one sortable row per neuron with its group, each reporter's natural R² and
slope ratio, and the ridge probe's R². It reads ``any_neuron.json`` only.

The page of an any-neuron sweep (``nsr sweep`` of an any-neuron recipe: ``sweep.json`` with ``kind: any_neuron``): per group
and reporter, the spread over the seeds of the runs' medians; one row per run (its held-out medians, a link to its page); and
one sortable row per neuron with its medians over the runs where it was held out, validation or train. It reads ``sweep.json``
only (the sweep computed every figure)."""
from __future__ import annotations

import os
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
            "unfreeze": result["unfreeze"], "head_type": result.get("head_type", "conditioned"),
            "intervention_rate": result.get("intervention_rate") or 0, "conditionings": conditionings,
            "summary": summary, "rows": rows, "figure": figure, "split": result["split"]}


SWEEP_FIGURES = (("natural_r2", "R²"), ("slope_ratio", "slope ratio"))
PROBE = "ridge_probe"


def _reporter_words(reporter: str) -> str:
    return "ridge probe (own labels)" if reporter == PROBE else reporter


def _spread_cells(stats: dict | None) -> tuple[str, str]:
    if not stats:
        return "n/a", ""
    return fmt(stats["median"]), f"[{fmt(stats['q1'])}, {fmt(stats['q3'])}] ({fmt(stats['min'])} to {fmt(stats['max'])})"


def any_neuron_sweep_page(folder: Path, result: dict, page_of_run) -> dict:
    """The template's context of the page of an any-neuron sweep (``sweep.json`` content ``result``); ``page_of_run(run_folder)``:
    the path of that run's page, or None."""
    here = Path(folder) / "dashboard"
    reporters = list(result.get("reporters") or [])
    conditionings = [r for r in reporters if r != PROBE]
    summary = []
    for group, entry in (result.get("summary") or {}).items():
        for reporter in reporters:
            stats = entry.get(reporter) or {}
            if not stats:
                continue
            cells = [_spread_cells(stats.get(figure)) for figure, _ in SWEEP_FIGURES]
            summary.append({"group": GROUP_WORDS.get(group, group), "reporter": _reporter_words(reporter),
                            "n": max(s["n"] for s in stats.values()), "cells": cells})
    runs = []
    for run in result.get("runs") or []:
        held = (run.get("summary") or {}).get("held_out") or {}
        values = [(held.get(c) or {}).get(figure) for c in conditionings for figure, _ in SWEEP_FIGURES] + [held.get("ridge_probe_r2")]
        page = page_of_run(Path(run["output_dir"])) if run.get("summary") else None
        status = "failed" if run.get("error") else "finished" if run.get("summary") else run.get("status", "")
        runs.append({"seed": run["seed"], "status": status, "error": run.get("error"), "values": values,
                     "shown": [fmt(v) for v in values], "link": os.path.relpath(page, here) if page else None})
    neurons = []
    for neuron, entry in (result.get("per_neuron") or {}).items():
        medians = entry.get("medians") or {}
        groups = {g: medians[g]["runs"] for g in medians}
        held = medians.get("held_out") or {}
        values = [(held.get(c) or {}).get(figure) for c in conditionings for figure, _ in SWEEP_FIGURES]
        values.append((held.get(PROBE) or {}).get("natural_r2") if held else None)
        neurons.append({"neuron": neuron, "held_out_runs": groups.get("held_out", 0), "train_runs": groups.get("train", 0),
                        "validation_runs": groups.get("validation", 0), "values": values, "shown": [fmt(v) for v in values]})
    columns = [f"{c}: {label}" for c in conditionings for _, label in SWEEP_FIGURES] + ["ridge probe R²"]
    done = sum(1 for r in result.get("runs") or [] if r.get("summary"))
    return {"folder": str(folder), "seeds": result.get("seeds") or [], "neurons": result.get("neurons") or [],
            "finished": done, "total": len(result.get("runs") or []), "summary": summary, "runs": runs, "neuron_rows": neurons,
            "columns": columns, "figures": [label for _, label in SWEEP_FIGURES]}
