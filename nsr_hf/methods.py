"""The registry of evaluation methods, and the headline every summary of an evaluation prints.

``METHODS`` is the one list of what an evaluation scores: the self-reporter, its greedy readout, the baselines and
the controls, in the order the report shows them. The evaluation (``EvaluateConfig.methods``, ``run_baselines``),
the report, the model card, ``nsr train``'s last lines and the sweep read it; a new baseline is a row here and its
code in ``nsr_hf.evaluation.baselines``.

``headline_table`` and ``verdicts`` read the dict ``nsr_hf.evaluation.protocol.run_evaluate`` returns (the content of
its ``metrics.json``); the report, the model card, ``nsr train``'s last lines and the sweep all print them, so they
sit below every one of those layers. Next to the accuracy table they show the faithfulness table (``faithfulness_table``:
slope ratio and counterfactual R² of the report and the probes, ``nsr_hf.evaluation.faithfulness``) and its verdict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One evaluation method.

    ``name``: its key in ``metrics.json`` (``cross`` gives one row ``cross:<model>`` per cross model);
    ``description``: the report's line about it; ``needs``: what it reads (``"predictor"``: the trained predictor,
    ``"labels"``: the training labels alone, ``"features"``: the original model's representation, ``"cross model"``:
    another model, ``"shuffled predictor"``: a predictor trained on shuffled labels); ``baseline``: run by
    ``run_baselines`` and chosen with ``EvaluateConfig.methods``; ``default``: on unless the user says otherwise;
    ``has_predictions``: it predicts every row, so it is a row of the tables (``probe_by_layer`` gives R² per layer).
    """

    name: str
    description: str
    needs: str
    baseline: bool = True
    default: bool = True
    has_predictions: bool = True


# The ``kind`` of an evaluation's ``metrics.json`` (a train run's own ``metrics.json`` has none): what tells the two apart.
EVALUATION_KIND = "nsr_hf.evaluation.protocol"


def is_evaluation(content) -> bool:
    """Whether a ``metrics.json`` content is an evaluation's (``nsr evaluate``), not a train run's summary."""
    return isinstance(content, dict) and content.get("kind") == EVALUATION_KIND


METHODS = (
    Method("self", "the fine-tuned self-reporter (expected value)", "predictor", baseline=False),
    Method("self (greedy)", "the self-reporter's most likely bin (greedy readout)", "predictor", baseline=False),
    Method("ridge_probe", "closed-form ridge probe of the original model's state after the read layer at the labelled token (what a head "
           "without a prompt reads)", "features"),
    Method("token_lookup", "mean value per labelled token, from the training split", "labels"),
    Method("mean", "the training mean", "labels"),
    Method("random_init", "the same probe on a randomly initialised model", "features"),
    Method("shuffled_labels", "the probe trained on shuffled labels (control)", "features"),
    Method("self_shuffled", "a self-reporter trained on shuffled labels (control)", "shuffled predictor", baseline=False, default=False),
    Method("probe_by_layer", "the ridge probe at every layer (R² by layer)", "features", has_predictions=False),
    Method("cross", "another model trained on this model's labels (cross-prediction control)", "cross model"),
)
METHOD_ORDER = tuple(m.name for m in METHODS if m.has_predictions and m.name != "cross")
METHOD_DESCRIPTIONS = {m.name: m.description for m in METHODS if m.has_predictions and m.name != "cross"}
BASELINE_METHODS = tuple(m.name for m in METHODS if m.baseline)
DEFAULT_BASELINES = tuple(m.name for m in METHODS if m.baseline and m.default)


def display_order(names) -> list[str]:
    """``names`` in the report's order: the registry's rows, then the ``cross:<model>`` rows sorted, then anything else."""
    names = list(names)
    known = [m for m in METHOD_ORDER if m in names]
    cross = sorted(m for m in names if m.startswith("cross:"))
    return known + cross + [m for m in names if m not in known and m not in cross]


def method_rows(metrics: dict) -> list[str]:
    """Method rows in reading order: self, its greedy readout, the baselines, the cross models, anything else."""
    rows = []
    for name, figures in metrics.items():
        rows.append(name)
        if name == "self" and "greedy_r2" in figures:
            rows.append("self (greedy)")
    return display_order(rows)


def figures_of(metrics: dict, method: str) -> dict:
    """The figures of a row: ``self (greedy)`` is the ``greedy_`` keys of ``self``."""
    if method == "self (greedy)":
        return {k.removeprefix("greedy_"): v for k, v in metrics["self"].items() if k.startswith("greedy_")}
    return metrics[method]


def fmt(value, digits: int = 3) -> str:
    """A figure as the tables show it: ``n/a`` for None or a non-finite value, integers as they are."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}f}"


def with_ci(figures: dict, key: str) -> str:
    """``figures[key]`` followed by its ``[low, high]`` interval when ``figures`` has ``<key>_ci``."""
    ci = figures.get(f"{key}_ci")
    text = fmt(figures.get(key))
    return f"{text} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else text


def describe(method: str) -> str:
    """The report's line about ``method`` (a ``cross:<model>`` row names its model)."""
    if method.startswith("cross:"):
        return f"another model ({method.split(':', 1)[1]}) trained on this model's labels (cross-prediction control)"
    return METHOD_DESCRIPTIONS.get(method, "")


FAITHFULNESS_READERS = {"self": "**self**", "compare": "plainly trained predictor", "ridge_probe": "ridge probe (natural rows)",
                        "ridge_probe_intervened": "ridge probe (intervened rows)",
                        "ridge_probe_intervened_original": "ridge probe (intervened rows, original model)"}


def faithfulness_table(evaluation: dict, split: str = "test") -> str | None:
    """Markdown table of the faithfulness section on ``split`` (``nsr_hf.evaluation.faithfulness``): each reader's
    counterfactual R² [CI] and R² against the natural value, and the report's slope ratio [CI]; None without one."""
    section = (evaluation.get("faithfulness") or {}).get(split)
    if not isinstance(section, dict) or "methods" not in section:
        return None
    level = (evaluation.get("bootstrap") or {}).get("level", 0.95)
    flag = "" if section.get("meaningful", True) else " (not meaningful: the set value cannot reach the report through computation)"
    lines = [f"Faithfulness: {section['rows']} {split} rows with neuron {section['neuron']} set to {section['source']} values{flag}", "",
             f"| reader | counterfactual R² [{level:.0%} CI] | R² against the natural value | slope ratio [{level:.0%} CI] | "
             f"report − reader, counterfactual R² [{level:.0%} CI] |",
             "| --- | --- | --- | --- | --- |"]
    ratio, comparisons = section.get("slope_ratio") or {}, section.get("comparisons") or {}
    for method in [m for m in FAITHFULNESS_READERS if m in section["methods"]]:
        figures = section["methods"][method]
        slope = "n/a"
        if method == "self" and ratio.get("ratio") is not None:
            slope = fmt(ratio["ratio"]) + (f" [{fmt(ratio['low'])}, {fmt(ratio['high'])}]" if ratio.get("low") is not None else "")
        c = comparisons.get(method)
        delta = "n/a" if not c else fmt(c["difference"]) + (f" [{fmt(c['low'])}, {fmt(c['high'])}]" if c.get("low") is not None else "")
        name = FAITHFULNESS_READERS[method]
        if method == "compare":  # named for how it was trained (nsr_hf.evaluation.faithfulness.compared)
            name = (section.get("compare") or {}).get("words", "").removeprefix("the ") or name
        lines.append(f"| {name} | {with_ci(figures, 'r2')} | {fmt(figures.get('r2_vs_natural'))} | {slope} "
                     f"| {delta} |")
    return "\n".join(lines)


def headline_table(evaluation: dict, split: str = "test") -> str:
    """Markdown table: method x {R^2 [CI], r [CI], MSE} on ``split`` for the headline neuron; beside it, when the
    evaluation has one, the faithfulness table (``faithfulness_table``): accuracy and faithfulness side by side."""
    metrics = (evaluation.get("metrics") or {}).get(split)
    if not metrics:
        available = ", ".join(evaluation.get("metrics") or {}) or "none"
        raise ValueError(f"The evaluation has no split {split!r} (it has: {available}).")
    level = (evaluation.get("bootstrap") or {}).get("level", 0.95)
    lines = [f"| method | R² [{level:.0%} CI] | r [{level:.0%} CI] | MSE |", "| --- | --- | --- | --- |"]
    for method in method_rows(metrics):
        figures = figures_of(metrics, method)
        name = f"**{method}**" if method == "self" else method
        lines.append(f"| {name} | {with_ci(figures, 'r2')} | {with_ci(figures, 'pearson')} | {fmt(figures.get('mse'), 4)} |")
    faithfulness = faithfulness_table(evaluation, split)
    return "\n".join(lines) + (f"\n\n{faithfulness}" if faithfulness else "")


def verdicts(evaluation: dict, split: str = "test") -> list[str]:
    """The plain-English verdict of every comparison on ``split`` (self against cross-report and the probe), then the
    faithfulness verdict (which readers follow the neuron when it is set) when the evaluation has one."""
    out = [c["verdict"] for c in ((evaluation.get("comparisons") or {}).get(split) or {}).values() if c.get("verdict")]
    faithfulness = evaluation.get("faithfulness") or {}
    section = faithfulness.get(split)
    if isinstance(section, dict) and section.get("verdict"):
        out.append(section["verdict"])
    elif faithfulness.get("skipped"):
        out.append(f"Faithfulness not measured: {faithfulness['skipped']}")
    return out
