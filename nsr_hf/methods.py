"""The evaluation's methods in words, and the headline every summary of an evaluation prints.

``headline_table`` and ``verdicts`` read the dict ``nsr_hf.evaluation.protocol.run_evaluate`` returns (the content of
its ``metrics.json``); the report, the model card, ``nsr train``'s last lines and the sweep all print them, so they
sit below every one of those layers.
"""
from __future__ import annotations

import math

METHOD_ORDER = ("self", "self (greedy)", "ridge_probe", "token_lookup", "mean", "random_init", "shuffled_labels", "self_shuffled")
METHOD_DESCRIPTIONS = {
    "self": "the fine-tuned self-reporter (expected value)",
    "self (greedy)": "the self-reporter's most likely bin (greedy readout)",
    "mean": "the training mean",
    "token_lookup": "mean value per labelled token, from the training split",
    "ridge_probe": "closed-form ridge probe of the representation the head reads (frozen original model)",
    "random_init": "the same probe on a randomly initialised model",
    "shuffled_labels": "the probe trained on shuffled labels (control)",
    "self_shuffled": "a self-reporter trained on shuffled labels (control)",
}


def method_rows(metrics: dict) -> list[str]:
    """Method rows in reading order: self, its greedy readout, the baselines, the cross models, anything else."""
    rows = []
    for name in metrics:
        rows.append(name)
        if name == "self" and "greedy_r2" in metrics[name]:
            rows.append("self (greedy)")
    known = [m for m in METHOD_ORDER if m in rows]
    cross = sorted(m for m in rows if m.startswith("cross:"))
    return known + cross + [m for m in rows if m not in known and m not in cross]


def figures_of(metrics: dict, method: str) -> dict:
    """The figures of a row: ``self (greedy)`` is the ``greedy_`` keys of ``self``."""
    if method == "self (greedy)":
        return {k.removeprefix("greedy_"): v for k, v in metrics["self"].items() if k.startswith("greedy_")}
    return metrics[method]


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}f}"


def with_ci(figures: dict, key: str) -> str:
    ci = figures.get(f"{key}_ci")
    text = fmt(figures.get(key))
    return f"{text} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else text


def describe(method: str) -> str:
    if method.startswith("cross:"):
        return f"another model ({method.split(':', 1)[1]}) trained on this model's labels (cross-prediction control)"
    return METHOD_DESCRIPTIONS.get(method, "")


def headline_table(evaluation: dict, split: str = "test") -> str:
    """Markdown table: method x {R^2 [CI], r [CI], MSE} on ``split`` for the headline neuron."""
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
    return "\n".join(lines)


def verdicts(evaluation: dict, split: str = "test") -> list[str]:
    """The plain-English verdict of every comparison on ``split`` (self against cross-report and the probe)."""
    return [c["verdict"] for c in ((evaluation.get("comparisons") or {}).get(split) or {}).values() if c.get("verdict")]
