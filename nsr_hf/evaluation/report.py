"""The evaluation report: ``report.md`` and its plots, from the dict ``nsr_hf.evaluation.protocol.run_evaluate`` returns
(the content of ``metrics.json``).

    from nsr_hf.evaluation.report import write_report
    from nsr_hf.methods import headline_table
    write_report(evaluation, "outputs/eval", predictions=..., log_history=trainer.state.log_history)
    print(headline_table(evaluation))          # the table the model card carries

Plots (PNG, matplotlib's Agg canvas, no pyplot state), each written only when its data is there:

* ``pred_vs_true.png``: the predictor's predictions against the true values, with the identity line.
* ``residuals.png``: prediction minus truth against the truth, and their histogram.
* ``methods.png``: R^2 and r of every method with their bootstrap confidence intervals.
* ``r2_by_layer.png``: the ridge probe's R^2 when it reads each layer (read layer and target layer marked).
* ``training_curves.png``: the Trainer's ``log_history`` (training loss, evaluation loss and metrics).
* ``drift.png``: the drift monitor's figure (``nsr_hf.training.drift_figure.plot_drift``) of its history (``drift_history``
  says which inputs it accepts).
* ``causal.png``: ``nsr_hf.evaluation.figures.plot_causal`` of the causal test.
* ``faithfulness.png``: ``plot_faithfulness``: the report against the value the neuron was set to, self next to the probes.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from nsr_hf.evaluation.figures import (
    drift_history,
    plot_causal,
    plot_faithfulness,
    plot_methods,
    plot_pred_vs_true,
    plot_r2_by_layer,
    plot_residuals,
    plot_training_curves,
)
from nsr_hf.methods import describe, figures_of, fmt, headline_table, method_rows, verdicts, with_ci
from nsr_hf.plotting import save_figure
from nsr_hf.training.drift_figure import DRIFT_SKIP, plot_drift

logger = logging.getLogger(__name__)


def _warnings(metrics: dict) -> list[str]:
    out = []
    for method in method_rows(metrics):
        f = figures_of(metrics, method)
        if f.get("pearson", 0) > 0.5 and f.get("r2", 0) < 0:
            out.append(f"{method}: r = {f['pearson']:.2f} but R² = {f['r2']:.2f}: correlated yet wrongly scaled or shifted "
                       f"(calibration slope {f['calibration_slope']:.2f}, intercept {f['calibration_intercept']:.2f}); "
                       "a failure, not a finding.")
    return out


def _bin_table(metrics: dict) -> str | None:
    rows = [m for m in method_rows(metrics) if "accuracy" in figures_of(metrics, m)]
    if not rows:
        return None
    lines = ["| method | accuracy | balanced accuracy | QWK | majority-class rate |", "| --- | --- | --- | --- | --- |"]
    majority = metrics["self"].get("majority_class_rate") if "self" in metrics else None
    for method in rows:
        f = figures_of(metrics, method)
        lines.append(f"| {method} | {fmt(f.get('accuracy'))} | {fmt(f.get('balanced_accuracy'))} | {fmt(f.get('qwk'))} | "
                     f"{fmt(f.get('majority_class_rate', majority))} |")
    return "\n".join(lines)


def _subset_table(metrics: dict) -> str | None:
    lines = ["| method | subset | rows | R² [CI] | r [CI] | MSE | true range |", "| --- | --- | --- | --- | --- | --- | --- |"]
    notes = set()
    for method in [m for m in method_rows(metrics) if m != "self (greedy)"]:
        for subset, f in (metrics[method].get("subsets") or {}).items():
            if "r2" not in f:
                notes.add(f"{subset}: {f.get('note', 'no figures')}")
                continue
            lines.append(f"| {method} | {subset} | {f['rows']} | {with_ci(f, 'r2')} | {with_ci(f, 'pearson')} | {fmt(f.get('mse'), 4)} | "
                         f"{fmt(f.get('true_min'))} to {fmt(f.get('true_max'))} |")
    text = "\n".join(lines) if len(lines) > 2 else ""
    return "\n\n".join(x for x in [text, "; ".join(sorted(notes))] if x) or None


def _selectivity_lines(selectivity: dict) -> list[str]:
    out = []
    for real, s in selectivity.items():
        ci = f" [{s['low']:.2f}, {s['high']:.2f}]" if "low" in s else ""
        out.append(f"- {real}: selectivity = R²({real}) − R²({s['control']}) = {s['selectivity']:.2f}{ci}")
    return out


def _causal_lines(causal: dict) -> list[str]:
    def get(key):
        value = causal.get(key)
        return value if isinstance(value, (int, float)) else None

    lines = []
    slope, se = get("slope"), get("slope_se")
    if slope is not None:
        lines.append(f"- slope of the mean report on the set value: {slope:.3f}"
                     + (f" ± {se:.3f} (standard error)" if se is not None else ""))
    if get("natural_slope") is not None:
        lines.append(f"- slope of a faithful reporter (natural slope): {causal['natural_slope']:.3f}")
    if get("intercept") is not None:
        lines.append(f"- intercept: {causal['intercept']:.3f}; fit R²: {fmt(get('fit_r2'))}")
    if "meaningful" in causal:
        lines.append(f"- meaningful: {bool(causal['meaningful'])}")
    if causal.get("skipped"):
        lines.append(f"- skipped: {causal['skipped']}")
    if causal.get("note"):
        lines.append(f"- note: {causal['note']}")
    if causal.get("split"):
        lines.append(f"- rows: {causal['split']} split" + (f", {causal['rows']} rows" if isinstance(causal.get("rows"), int) else ""))
    return lines


# ----------------------------------------------------------------------------------------------------------
# Plots


def _faithfulness_lines(evaluation: dict, splits: list[str]) -> list[str]:
    """What the faithfulness figures of the split sections (``faithfulness_table``) mean and how they were made."""
    section = evaluation.get("faithfulness") or {}
    lines = ["## Faithfulness", "",
             "Accuracy on natural rows does not say why the report is right: a reporter that recomputes its neuron from the "
             "context scores as well as one that reads it. Here the neuron is set, at the labelled token, to values its context "
             "does not predict; a reporter that reads the neuron reports the value that was set (counterfactual R² and slope "
             "ratio near 1), one that recomputes it reports the natural value (R² against the natural value). The tables are in "
             "the split sections, next to the accuracy table.", ""]
    if section.get("skipped"):
        return lines + [f"- skipped: {section['skipped']}", ""]
    for split in [s for s in splits if isinstance(section.get(s), dict) and "methods" in section[s]]:
        f = section[split]
        values = f.get("values") or {}
        probes = f.get("probes") or {}
        train_rows = next((p.get("train_rows") for p in probes.values()), None)
        lines.append(f"- {split}: {f['rows']} rows; values drawn by `{f['source']}` from the train split "
                     f"({values.get('train_rows', 'n/a')} rows; 1st–99th percentile {fmt((values.get('low') or [None])[0])} to "
                     f"{fmt((values.get('high') or [None])[0])})" + (f"; probes fitted on {train_rows} train rows" if train_rows else ""))
        ratio = f.get("slope_ratio") or {}
        if ratio.get("ratio") is not None:
            lines.append(f"  - slope ratio: causal slope {fmt(ratio['causal_slope'])} / natural slope {fmt(ratio['natural_slope'])} "
                         f"(the causal test's rows; {ratio.get('dropped', 0)} resamples without a natural slope left out)")
        if not f.get("meaningful", True):
            lines.append(f"  - ⚠ not meaningful: {f['note']}")
    return lines + [""]


def _plot_causal(causal: dict, path: Path) -> Path:
    return save_figure(plot_causal(causal), path)


# ----------------------------------------------------------------------------------------------------------
# The report


def _split_section(evaluation: dict, split: str) -> list[str]:
    metrics = evaluation["metrics"][split]
    rows = evaluation.get("rows", {}).get(split)
    lines = [f"## {split}" + (f" ({rows} rows)" if rows else ""), "", headline_table(evaluation, split), ""]
    lines += [f"- {v}" for v in verdicts(evaluation, split)]
    lines += [f"- ⚠ {w}" for w in _warnings(metrics)]
    spread = ((evaluation.get("spread") or {}).get(split) or {}).get("warning")
    if spread:
        lines.append(f"- ⚠ {spread}")
    selectivity = (evaluation.get("selectivity") or {}).get(split) or {}
    if selectivity:
        lines += ["", "Selectivity (real minus shuffled-label control, paired bootstrap):", ""] + _selectivity_lines(selectivity)
    if "self" in metrics:
        f = metrics["self"]
        lines += ["", (f"Calibration of the self-reporter (true = intercept + slope × predicted): slope {fmt(f['calibration_slope'])}, "
                       f"intercept {fmt(f['calibration_intercept'])}; MAE {fmt(f['mae'], 4)}; Spearman ρ {fmt(f['spearman'])}.")]
    bins = _bin_table(metrics)
    if bins:
        p = evaluation.get("predictor") or {}
        kind = f"{p['num_bins']} {p.get('bin_strategy') or 'unrecorded-strategy'} bins, " if p.get("num_bins") else ""
        lines += ["", f"Bins ({kind}train-fitted edges):", "", bins]
    subsets = _subset_table(metrics)
    if subsets:
        lines += ["", "Subsets of equal size: the top decile by true value and a random sample:", "", subsets]
    return lines + [""]


def _write_plots(evaluation: dict, out: Path, splits: list[str], headline_split: str, predictions: dict | None,
                 log_history: Sequence[dict] | None, history: list[dict], counterfactual: dict | None = None) -> dict[str, Path]:
    """Every PNG whose data is there, by name; a plot whose optional dependency is missing is skipped with a warning."""
    neuron = evaluation.get("neuron") or (evaluation.get("neurons") or ["?"])[0]
    info = evaluation.get("predictor") or {}
    plots: dict[str, Path] = {}

    def attempt(name: str, make):
        try:
            written = make(out / name)
        except ImportError as err:  # an optional stage (e.g. the causal module) is missing: say so, keep the report
            logger.warning("%s not written: %s", name, err)
            return
        if written is not None:
            plots[name] = written

    if predictions:
        shown = {s: predictions[s] for s in splits if s in predictions}
        r2 = {s: evaluation["metrics"][s]["self"]["r2"] for s in shown if "self" in evaluation["metrics"][s]}
        if shown:
            attempt("pred_vs_true.png", lambda p: plot_pred_vs_true(shown, p, r2))
            attempt("residuals.png", lambda p: plot_residuals(shown, p))
    attempt("methods.png", lambda p: plot_methods(evaluation, p, headline_split))
    if evaluation.get("probe_by_layer"):
        target_layer = int(str(neuron).split(".")[0]) if "." in str(neuron) else None
        attempt("r2_by_layer.png", lambda p: plot_r2_by_layer(evaluation["probe_by_layer"], p, info.get("read_layer"), target_layer))
    if log_history:
        attempt("training_curves.png", lambda p: plot_training_curves(log_history, p))
    if history:
        attempt("drift.png", lambda p: plot_drift(history, [], p))
    if (evaluation.get("causal") or {}).get("mean_report"):
        attempt("causal.png", lambda p: _plot_causal(evaluation["causal"], p))
    if counterfactual and headline_split in counterfactual:
        section = (evaluation.get("faithfulness") or {}).get(headline_split)
        attempt("faithfulness.png", lambda p: plot_faithfulness(counterfactual[headline_split], p, section))
    return plots


def _precision(evaluation: dict, method: str) -> str:
    """`` (run in bfloat16: baseline_dtype)`` for a baseline whose other model ran below float32, else nothing."""
    dtype = ((evaluation.get("baselines_info") or {}).get(method) or {}).get("dtype")
    return f" (run in {dtype}: baseline_dtype)" if dtype and dtype != "float32" else ""


def _header_lines(evaluation: dict) -> list[str]:
    info = evaluation.get("predictor") or {}
    neuron = evaluation.get("neuron") or (evaluation.get("neurons") or ["?"])[0]
    lines = [f"# Self-report of neuron {neuron}", ""]
    lines += [f"- Predictor: `{info.get('path') or 'in memory'}` ({info.get('head_type')} head, reads block {info.get('read_layer')})",
              f"- Base model: `{info.get('base_model')}`; dataset: `{info.get('dataset')}`",
              "- Rows: " + ", ".join(f"{s} {n}" for s, n in (evaluation.get("rows") or {}).items())]
    boot = evaluation.get("bootstrap") or {}
    if boot.get("n"):
        lines.append(f"- Intervals: {boot.get('level', 0.95):.0%} percentile bootstrap over rows, "
                     f"{boot['n']} resamples (seed {boot.get('seed')}); "
                     "differences between methods use the same resamples for both (paired)")
    return lines + ["- Units: activation units of the neuron (MSE in squared units); R² below 0 is worse than predicting the mean", ""]


def _probe_by_layer_lines(pbl: dict) -> list[str]:
    keys = sorted({k for e in pbl.values() for k in e if k.endswith("_r2")}, key=lambda k: (k != "validation_r2", k))
    lines = ["## Ridge probe by layer", "", "| layer | alpha | " + " | ".join(keys) + " |",
             "| --- | --- | " + " | ".join("---" for _ in keys) + " |"]
    for layer in sorted(pbl, key=lambda x: int(x)):
        e = pbl[layer]
        alpha = e.get("alpha")
        lines.append(f"| {layer} | {alpha:.3g} | " if isinstance(alpha, (int, float)) else f"| {layer} | n/a | ")
        lines[-1] += " | ".join(fmt(e.get(k)) for k in keys) + " |"
    return lines + [""]


def _every_neuron_lines(by_neuron: dict, headline_split: str) -> list[str]:
    faithful = any(isinstance((r.get("faithfulness") or {}).get(headline_split), dict) for r in by_neuron.values())
    extra = " slope ratio [CI] | counterfactual R² [CI] |" if faithful else ""
    lines = ["## Every neuron", "", f"| neuron | self R² [CI] ({headline_split}) | self r [CI] | ridge probe R² |{extra}",
             "| --- | --- | --- | --- |" + (" --- | --- |" if faithful else "")]
    for name, result in by_neuron.items():
        m = (result.get("metrics") or {}).get(headline_split) or {}
        probe = fmt(m["ridge_probe"]["r2"]) if "ridge_probe" in m else "n/a"
        line = f"| {name} | {with_ci(m.get('self', {}), 'r2')} | {with_ci(m.get('self', {}), 'pearson')} | {probe} |"
        if faithful:
            f = (result.get("faithfulness") or {}).get(headline_split) or {}
            ratio = f.get("slope_ratio") or {}
            slope = fmt(ratio.get("ratio")) + (f" [{fmt(ratio['low'])}, {fmt(ratio['high'])}]" if ratio.get("low") is not None else "")
            line += f" {slope} | {with_ci((f.get('methods') or {}).get('self', {}), 'r2')} |"
        lines.append(line)
    return lines + [""]


def write_report(evaluation: dict, output_dir, *, predictions: dict | None = None, log_history: Sequence[dict] | None = None,
                 drift=None, counterfactual: dict | None = None) -> Path:
    """Write ``report.md`` and the PNGs (module docstring) into ``output_dir``; returns the report's path.

    Args:
        evaluation: what ``run_evaluate`` returns (or ``metrics.json`` read back).
        predictions: {split: {"true": (rows,), "self": (rows,), optional "self_greedy", "ridge_probe", ...}} of the
            headline neuron, for the scatter and residual plots (``predictions.json``'s ``by_neuron[neuron]``).
        log_history: the Trainer's ``log_history`` for ``training_curves.png``.
        drift: the drift monitor's history, its ``drift.json``, or a summary without history (``drift_history``); when
            None, the ``drift/...`` entries of ``log_history`` are used.
        counterfactual: {split: {"set", "self", "ridge_probe", ...}} of the headline neuron's faithfulness rows
            (``predictions.json``'s ``counterfactual[neuron]``), for ``faithfulness.png``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = [s for s in (evaluation.get("splits") or list(evaluation.get("metrics") or {})) if s in (evaluation.get("metrics") or {})]
    if not splits:
        raise ValueError("The evaluation holds no metrics by split: pass what run_evaluate returns (or its metrics.json).")
    history, drift_summary = drift_history(drift, log_history)
    headline_split = "test" if "test" in splits else splits[0]
    plots = _write_plots(evaluation, out, splits, headline_split, predictions, log_history, history, counterfactual)

    lines = _header_lines(evaluation)
    for split in [headline_split] + [s for s in splits if s != headline_split]:
        lines += _split_section(evaluation, split)
    methods = method_rows(evaluation["metrics"][headline_split])
    lines += ["Methods:", ""] + [f"- **{m}**: {describe(m)}{_precision(evaluation, m)}" for m in methods if describe(m)] + [""]
    if evaluation.get("probe_by_layer"):
        lines += _probe_by_layer_lines(evaluation["probe_by_layer"])
    if evaluation.get("causal"):
        lines += ["## Causal test", "",
                  "The neuron is set to a range of values during the forward pass; a reporter that reads it moves with it.", ""]
        lines += _causal_lines(evaluation["causal"]) + [""]
    if evaluation.get("faithfulness"):
        lines += _faithfulness_lines(evaluation, [headline_split] + [s for s in splits if s != headline_split])
    if drift_summary:
        shown = ", ".join(f"{k} {fmt(v, 4)}" for k, v in drift_summary.items() if k not in DRIFT_SKIP and isinstance(v, (int, float)))
        when = f"At step {drift_summary['step']}" if "step" in drift_summary else "After training"
        lines += ["## Drift of the target neuron", "", f"{when}: {shown}.", ""]
    by_neuron = evaluation.get("by_neuron") or {}
    if len(by_neuron) > 1:
        lines += _every_neuron_lines(by_neuron, headline_split)
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
