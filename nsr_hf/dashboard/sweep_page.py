"""The sweep page: one row per neuron × seed with the headline figures, the medians and spreads over the runs on top
(the ``summary`` that ``nsr_hf.sweep.summarise_runs`` wrote into ``sweep.json``: read, not computed again), each row linking
to its run's neuron page. (The sweep imports this layer to build the page, so this module reads ``sweep.json`` only.)"""
from __future__ import annotations

import math
import os
from pathlib import Path

from nsr_hf.methods import fmt

# (key, label, where the figure is in a run's figures: method, figure)
COLUMNS = (("natural_r2", "natural R²", "self", "r2"),
           ("counterfactual_r2", "counterfactual R²", "self", "counterfactual_r2"),
           ("slope_ratio", "slope ratio", "self", "slope_ratio"),
           ("honest_reader_cf_r2", "honest reader's CF R²", "faithfulness:ridge_probe_intervened", "counterfactual_r2"),
           ("self_minus_honest_reader", "self − honest reader (CF R²)", "faithfulness:self_vs_ridge_probe_intervened",
            "delta_counterfactual_r2"),
           ("self_minus_original_reader", "self − the original model's honest reader (CF R²)",
            "faithfulness:self_vs_ridge_probe_intervened_original", "delta_counterfactual_r2"),
           ("self_minus_probe", "self − probe (R²)", "self_vs_ridge_probe", "delta_r2"),
           ("self_minus_cross", "self − cross (R²)", "self_vs_cross:", "delta_r2"))


def run_headline(figures: dict) -> dict[str, float | None]:
    """A run's headline figures (``COLUMNS``) from its ``sweep.json`` figures; self − cross is the first cross model's."""
    out = {}
    for key, _, method, figure in COLUMNS:
        method = _method_of(figures, method)
        value = (figures.get(method) or {}).get(figure) if method else None
        out[key] = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    return out


def _method_of(summary_or_figures: dict, method: str) -> str | None:
    if method.endswith(":"):
        return next((m for m in sorted(summary_or_figures) if m.startswith(method)), None)
    return method


def sweep_page(folder: Path, result: dict, page_of_run) -> dict:
    """The template's context of the sweep page for ``sweep.json`` content ``result``. ``page_of_run(run_folder)``: the
    path of that run's dashboard page, or None when it has none."""
    rows = []
    here = Path(folder) / "dashboard"
    for run in result.get("runs") or []:
        figures = run.get("figures") or {}
        headline = run_headline(figures)
        page = page_of_run(Path(folder) / str(run["neuron"]) / f"seed-{run['seed']}")
        # a run's status in sweep.json is what the last `nsr sweep` call did with it ("trained", "skipped (finished before)"):
        # the page says what the run is
        status = "failed" if run.get("error") else "finished" if figures else run.get("status", "")
        rows.append({"neuron": run["neuron"], "seed": run["seed"], "status": status,
                     "error": run.get("error"), "values": headline, "shown": {k: fmt(v) for k, v in headline.items()},
                     "link": os.path.relpath(page, here) if page else None})
    summary = []
    recorded = result.get("summary") or {}
    for key, label, method, figure in COLUMNS:
        method = _method_of(recorded, method)
        stats = (recorded.get(method) or {}).get(figure) if method else None
        summary.append({"label": label, "n": stats["n"] if stats else 0,
                        "median": fmt(stats["median"]) if stats else "n/a",
                        "iqr": f"[{fmt(stats['q1'])}, {fmt(stats['q3'])}]" if stats else "n/a",
                        "range": f"{fmt(stats['min'])} to {fmt(stats['max'])}" if stats else "n/a"})
    done = sum(1 for r in result.get("runs") or [] if r.get("figures"))
    return {"folder": str(folder), "neurons": result.get("neurons") or [], "seeds": result.get("seeds") or [],
            "split": result.get("split", "test"), "finished": done, "total": len(result.get("runs") or []),
            "columns": [(key, label) for key, label, _, _ in COLUMNS], "rows": rows, "summary": summary,
            "verdicts": sweep_verdicts(summary, done, len(result.get("runs") or []), result.get("runs"))}


# (method of a run's figures whose ``beats`` is 1 when the paired interval lies above 0, what the sentence says it beats)
BEATEN = (("faithfulness:self_vs_ridge_probe_intervened", "the honest outside reader (a ridge probe fitted on intervened rows) "
                                                          "on counterfactual rows"),
          ("self_vs_ridge_probe", "the ridge probe of the same representation on natural rows"))


def sweep_verdicts(summary: list[dict], done: int, total: int, runs: list[dict] | None = None) -> list[str]:
    """One sentence per headline figure (its median and spread over the runs), then in how many runs the report beats each
    reader with an interval above 0."""
    lines = [f"{done} of {total} runs finished."]
    for s in summary:
        if s["n"]:
            lines.append(f"{s['label']}: median {s['median']} over {s['n']} runs (interquartile range {s['iqr']}, {s['range']}).")
    for method, reader in BEATEN:
        beats = [(r.get("figures") or {}).get(method, {}).get("beats") for r in runs or []]
        beats = [b for b in beats if b is not None]
        if beats:
            lines.append(f"The report beats {reader} in {int(sum(beats))} of {len(beats)} runs (paired interval above 0).")
    return lines
