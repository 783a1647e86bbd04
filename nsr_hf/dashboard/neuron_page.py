"""The neuron page: every panel of one target neuron of a run, as data for the template (``templates/neuron.html.j2``).

Each panel is a ``Panel``: figures (inline SVG), tables (the report's own Markdown tables as HTML), facts, examples
with per-token values, or, when the run has no data for it, ``missing``: the reason in words, never an empty box.
"""
from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field

from nsr_hf.dashboard import figures as fig
from nsr_hf.dashboard.run_files import RunFiles, dataset_values, scan_row
from nsr_hf.evaluation.figures import (
    drift_history,
    plot_faithfulness,
    plot_methods,
    plot_pred_vs_true,
    plot_r2_by_layer,
    plot_residuals,
    plot_training_curves,
)
from nsr_hf.evaluation.token_examples import examples_of
from nsr_hf.methods import fmt, headline_table, verdicts
from nsr_hf.training.drift_figure import plot_drift


@dataclass
class Panel:
    """One box of a page. ``missing``: why the run has nothing to show here (then the rest is empty)."""

    id: str
    title: str
    missing: str | None = None
    notes: list[str] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)
    code: str | None = None
    command: str | None = None
    links: list[tuple[str, str]] = field(default_factory=list)

    def add_figure(self, caption: str, svg: str | None) -> None:
        if svg:
            self.figures.append((caption, svg))


# ----------------------------------------------------------------------------------------------------------
# Markdown tables of the report, as HTML


def _inline(text: str) -> str:
    """Escaped text with the report's **bold** and `code` marks."""
    text = html.escape(text.strip())
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def markdown_html(text: str) -> str:
    """The Markdown that ``nsr_hf.methods`` writes (pipe tables and paragraphs) as HTML: one writer of the figures, so
    the page shows exactly what ``report.md`` and the model card show."""
    out, table = [], []

    def flush():
        if table:
            cells = [[c for c in row.strip().strip("|").split("|")] for row in table if not re.fullmatch(r"[|\s:-]+", row)]
            head, body = cells[0], cells[1:]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body) + "</tbody></table>")
            table.clear()

    for line in text.splitlines():
        if line.lstrip().startswith("|"):
            table.append(line)
            continue
        flush()
        if line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------
# What one neuron's evaluation is


def neuron_evaluation(evaluation: dict | None, neuron: str) -> dict | None:
    """The evaluation of ``neuron``: the top level for the headline neuron, its ``by_neuron`` entry (over the shared
    fields) for another."""
    if not evaluation:
        return None
    by_neuron = evaluation.get("by_neuron") or {}
    if neuron in by_neuron and neuron != evaluation.get("neuron"):
        return {**evaluation, **by_neuron[neuron], "neuron": neuron}
    # the top level is the headline neuron's: never shown as another neuron's figures
    return evaluation if neuron == evaluation.get("neuron", neuron) else None


def headline_split(evaluation: dict | None) -> str | None:
    """The split the headline figures are on, as ``nsr train`` prints them (test first)."""
    metrics = (evaluation or {}).get("metrics") or {}
    return next((s for s in ("test", "test_ood", "validation") if s in metrics), next(iter(metrics), None))


def no_evaluation_reason(run: RunFiles) -> str:
    """Why a panel that needs the evaluation has nothing to show, and how to get it."""
    if run.evaluation:
        return "The run's evaluation holds no figures for this neuron (its by_neuron section lacks it)."
    if run.summary is not None and not (run.summary.get("config") or {}).get("evaluate", True):
        return "This run was trained with the evaluation off (evaluate: false): run `nsr evaluate --predictor PREDICTOR` for these figures."
    return "This run has no evaluation (no evaluation/metrics.json): run `nsr evaluate` on its predictor, then `nsr report` again."


def verdict_lines(run: RunFiles, evaluation: dict | None, split: str | None) -> list[str]:
    """The verdicts in one sentence each, as ``nsr train`` prints them; without an evaluation, why there are none."""
    if not evaluation or not split:
        return [no_evaluation_reason(run)]
    return verdicts(evaluation, split) or [f"The evaluation on {split} has no comparison to state (no baselines were run)."]


# ----------------------------------------------------------------------------------------------------------
# The panels


def identity_panel(run: RunFiles, neuron: str, evaluation: dict | None) -> Panel:
    panel = Panel("identity", f"Neuron {neuron}")
    summary, config = run.summary or {}, run.config
    layer, index = neuron.split(".")
    model = summary.get("model") or {}
    predictor = (evaluation or {}).get("predictor") or {}
    panel.facts = [("neuron", f"layer {layer}, index {index} (the MLP hidden activation, the input of the down projection)"),
                   ("model", str(model.get("name") or config.get("model") or predictor.get("base_model") or "not recorded")),
                   ("head", f"{summary.get('head_type') or predictor.get('head_type')}, reads block "
                            f"{summary.get('read_layer', predictor.get('read_layer'))}"),
                   ("unfreeze / labels", f"{summary.get('unfreeze', 'not recorded')} / {summary.get('labels', 'not recorded')}")]
    if model.get("quantization"):
        panel.facts.append(("weights", f"{model['quantization']} ({model.get('package', '')})"))
    rows = summary.get("rows") or (evaluation or {}).get("rows")
    if rows:
        panel.facts.append(("rows", ", ".join(f"{s} {n}" for s, n in rows.items())))
    choice = run.neuron_choice or {}
    how = summary.get("select") or choice.get("select")
    if how:
        panel.facts.append(("chosen by", f"{how}" + (f", scan rank {choice['scan_rank']}" if choice.get("scan_rank") else "")))
    return panel


def scan_panel(run: RunFiles, neuron: str) -> Panel:
    panel = Panel("scan", "Scan statistics")
    row = scan_row(run.folder, neuron)
    if row is None:
        given = run.config.get("dataset")
        panel.missing = (f"This run was given its dataset ({given}) and ran no scan: no scan statistics." if given
                         else "This run has no scan/neurons.parquet entry for the neuron: no scan statistics.")
        return panel
    threshold = ((run.scan_top or {}).get("config") or {}).get("threshold", "?")
    names = {"frac_above": f"sparsity: fraction of tokens above {threshold}", "count": "tokens scanned"}
    panel.facts = [(names.get(k, k), fmt(row[k], 4) if isinstance(row[k], float) else str(row[k]))
                   for k in ("mean", "std", "min", "max", "skewness", "kurtosis", "frac_above", "count") if k in row]
    panel.facts.append(("rank", f"{row.get('rank')} of {row['scanned_neurons']} scanned neurons"
                                + (f" (by {run.scan_top['config'].get('score')})" if run.scan_top else "")))
    panel.facts += [(k.removeprefix("score_") + " score", fmt(v, 4)) for k, v in row.items() if k.startswith("score_")]
    if run.selection and run.selection.get("candidates"):
        rule = run.selection.get("rule", "")
        lines = ["| scan rank | neuron | cross-validated probe R² |", "| --- | --- | --- |"]
        lines += [f"| {c['rank']} | {'**' + c['neuron'] + '**' if c['neuron'] == neuron else c['neuron']} | {fmt(c.get('cv_r2'))} |"
                  for c in run.selection["candidates"][:10]]
        panel.notes.append(f"Chosen among the scan's candidates by readability ({rule}):")
        panel.tables.append(markdown_html("\n".join(lines)))
    return panel


def histogram_panel(run: RunFiles, neuron: str, column: int) -> Panel:
    panel = Panel("histogram", "Activation histogram by split")
    try:
        values = dataset_values(run.dataset_dir, column)
    except Exception as err:  # noqa: BLE001 (a dataset this reader cannot open: the panel says so)
        panel.missing = f"The run's dataset could not be read ({type(err).__name__}: {err})."
        return panel
    if not values:
        panel.missing = ("This run folder holds no dataset/, and the evaluation read none that is still on this disk (or it has no "
                         "activations): no histogram.")
        return panel
    panel.add_figure("The neuron's value at the labelled token in each split of the dataset (density).",
                     fig.svg_of(lambda p: fig.histogram_by_split(values, neuron, p)))
    return panel


def _token_colour(value: float, scale: float) -> str:
    """Background of a token: orange for positive values, blue for negative, stronger the larger |value| is."""
    alpha = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    rgb = "255,140,0" if value >= 0 else "30,110,255"
    return f"rgba({rgb},{alpha * 0.85:.3f})"


def highlighted_examples(examples: list[dict]) -> list[dict]:
    """Each example's tokens with their value, colour and whether it is the labelled token, for the template."""
    scale = max((abs(v) for e in examples for v in e["values"]), default=0.0)
    rows = []
    for e in examples:
        tokens = [{"text": t.replace("\n", "↵\n"), "value": v, "shown": f"{v:.4g}", "colour": _token_colour(v, scale),
                   "labelled": i == e["label_position"]} for i, (t, v) in enumerate(zip(e["tokens"], e["values"]))]
        rows.append({"group": e["group"], "label": _group_label(e["group"]), "doc_id": e.get("doc_id"), "row": e.get("row"),
                     "label_value": f"{e['label_value']:.4g}", "tokens": tokens})
    return rows


def _group_label(group: str) -> str:
    return "top-activating" if group == "top" else f"near the {group[1:]}th percentile"


def examples_panel(run: RunFiles, neuron: str) -> Panel:
    panel = Panel("examples", "Examples: per-token values of the neuron")
    data = run.examples or {}
    mine = examples_of(data, neuron)
    if mine and mine.get("examples"):
        panel.notes.append(f"Rows of the {mine['split']} split: the top-activating ones and one near each of several quantiles of the "
                           "labelled value. Each token is coloured by the neuron's value there "
                           f"(read in {mine.get('source', 'the model')}); "
                           "the labelled token is boxed; hover a token for its value.")
        panel.examples = highlighted_examples(mine["examples"])
    elif mine and mine.get("skipped"):
        panel.notes.append(f"No per-token examples: {mine['skipped']}.")
    elif neuron in (data.get("not_shown") or []):
        panel.notes.append(f"Per-token examples are written for the run's first {len(data.get('neurons') or [])} neurons; "
                           f"{neuron} is not among them.")
    elif data.get("neuron"):
        panel.notes.append(f"This evaluation wrote per-token examples for the run's first neuron ({data['neuron']}) only: rerun "
                           "`nsr evaluate --overwrite` for every neuron's.")
    elif run.evaluation_dir is not None:
        panel.notes.append("The evaluation of this run predates per-token examples (evaluation/examples.json): rerun "
                           "`nsr evaluate --overwrite` for them.")
    scan = _scan_examples(run, neuron)
    if scan:
        panel.tables.append(scan)
    if not panel.examples and not scan:
        panel.missing = " ".join(panel.notes) or "This run has neither an evaluation's examples nor a scan's: no examples."
        panel.notes = []
    return panel


def _scan_examples(run: RunFiles, neuron: str) -> str | None:
    """The scan's top examples: each window token by token, coloured by the neuron's value there (scans that recorded
    ``window_values``), else the text with the labelled token's value only (older scans kept one value per example)."""
    entry = next((e for e in (run.scan_top or {}).get("top_neurons") or [] if e.get("neuron") == neuron), None)
    if not entry or not entry.get("examples"):
        return None
    examples = entry["examples"][:10]
    if all("window_values" in e for e in examples):
        scale = max((abs(v) for e in examples for v in e["window_values"]), default=0.0)
        rows = "".join(
            f"<tr><td>{fmt(e['value'], 4)}</td><td class=\"context\">"
            + "".join(f"<span class=\"tok{' labelled' if i == e['window_label'] else ''}\" data-scan-value=\"{v:.6g}\" "
                      f"title=\"{v:.4g}\" style=\"background: {_token_colour(v, scale)}\">{html.escape(t.replace(chr(10), '↵'))}</span>"
                      for i, (t, v) in enumerate(zip(e["window_tokens"], e["window_values"])))
            + f"</td><td>{html.escape(str(e.get('doc_id', '')))}</td></tr>" for e in examples)
        intro = ("The scan's top examples (its top-activating tokens over the scanned documents), each token coloured by the "
                 "neuron's value there; the labelled token is boxed; hover a token for its value:")
    else:
        rows = "".join(f"<tr><td>{fmt(e['value'], 4)}</td><td class=\"context\">{html.escape(e.get('before', ''))}"
                       f"<span class=\"tok labelled\" data-value=\"{e['value']:.6g}\" title=\"{e['value']:.4g}\">"
                       f"{html.escape(e['token'])}</span>{html.escape(e.get('after', ''))}</td>"
                       f"<td>{html.escape(str(e.get('doc_id', '')))}</td></tr>" for e in examples)
        intro = "The scan's top examples (this scan kept one value per example: the labelled token's own):"
    return (f"<p>{intro}</p>"
            f"<table><thead><tr><th>value</th><th>context</th><th>document</th></tr></thead><tbody>{rows}</tbody></table>")


def _split_predictions(run: RunFiles, neuron: str) -> dict:
    return (((run.predictions or {}).get("by_neuron") or {}).get(neuron)) or {}


def accuracy_panel(run: RunFiles, neuron: str, evaluation: dict | None, split: str | None) -> Panel:
    panel = Panel("accuracy", "Report against truth")
    predictions = _split_predictions(run, neuron)
    if not evaluation or not split:
        panel.missing = no_evaluation_reason(run)
        return panel
    if split not in predictions:
        panel.missing = "The evaluation folder has no predictions.json for this neuron: no scatter, residuals or calibration."
        return panel
    shown = {split: predictions[split]}
    self_figures = (evaluation["metrics"][split] or {}).get("self") or {}
    r2 = {split: self_figures["r2"]} if "r2" in self_figures else None
    panel.add_figure(f"Report against the true value on {split}, with the identity line.",
                     fig.svg_of(lambda p: plot_pred_vs_true(shown, p, r2)))
    panel.add_figure("Residuals (report − true).", fig.svg_of(lambda p: plot_residuals(shown, p)))
    panel.add_figure("Calibration: the mean true value in bins of the report.",
                     fig.svg_of(lambda p: fig.calibration_curve(shown[split]["true"], shown[split]["self"], p)))
    if "calibration_slope" in self_figures:
        panel.facts = [("calibration (true = intercept + slope × report)",
                        f"slope {fmt(self_figures['calibration_slope'])}, intercept {fmt(self_figures['calibration_intercept'])}"),
                       ("MAE / MSE", f"{fmt(self_figures.get('mae'), 4)} / {fmt(self_figures.get('mse'), 4)}")]
    return panel


def methods_panel(run: RunFiles, evaluation: dict | None, split: str | None) -> Panel:
    panel = Panel("methods", "Methods, with intervals")
    if not evaluation or not split:
        panel.missing = no_evaluation_reason(run)
        return panel
    table = headline_table(evaluation, split)
    accuracy = table.split("\n\nFaithfulness")[0]  # the faithfulness half has its own panel
    level = (evaluation.get("bootstrap") or {}).get("level", 0.95)
    panel.notes.append(f"{split} split, {(evaluation.get('rows') or {}).get(split, '?')} rows; {level:.0%} bootstrap intervals; "
                       "every method on the same rows.")
    panel.tables.append(markdown_html(accuracy))
    panel.add_figure("R² and r of every method with their intervals.", fig.svg_of(lambda p: plot_methods(evaluation, p, split)))
    return panel


def layers_panel(run: RunFiles, neuron: str, evaluation: dict | None) -> Panel:
    panel = Panel("layers", "R² by layer")
    by_layer = (evaluation or {}).get("probe_by_layer")
    if not evaluation:
        panel.missing = no_evaluation_reason(run)
    elif not by_layer:
        panel.missing = ("The evaluation ran no probe by layer (probe_layers off, or no ridge probe among the methods): "
                         "no R² by layer.")
    else:
        read = ((evaluation.get("predictor") or {}).get("read_layer"))
        panel.add_figure("A ridge probe of the frozen original model at each layer; the reporter reads the dashed layer.",
                         fig.svg_of(lambda p: plot_r2_by_layer(by_layer, p, read, int(neuron.split(".")[0]))))
    return panel


def faithfulness_panel(run: RunFiles, neuron: str, evaluation: dict | None, split: str | None) -> Panel:
    panel = Panel("faithfulness", "Faithfulness: does the report follow the neuron when it is set?")
    if not evaluation or not split:
        panel.missing = no_evaluation_reason(run)
        return panel
    section = (evaluation.get("faithfulness") or {}).get(split)
    causal = evaluation.get("causal") or {}
    if isinstance(section, dict) and section.get("verdict"):
        panel.notes.append(section["verdict"])
    table = headline_table(evaluation, split)
    if "\n\nFaithfulness" in table:
        panel.tables.append(markdown_html("Faithfulness" + table.split("\n\nFaithfulness", 1)[1]))
    if causal.get("mean_report"):
        panel.add_figure(f"Dose-response: the mean report when the neuron is set (slope {fmt(causal.get('slope'))}), next to the "
                         f"natural slope {fmt(causal.get('natural_slope'))}.", fig.svg_of(lambda p: fig.causal_plot(causal, p)))
    counterfactual = (((run.predictions or {}).get("counterfactual") or {}).get(neuron) or {}).get(split)
    if counterfactual:
        panel.add_figure("Report against the value the neuron was set to, next to the outside readers.",
                         fig.svg_of(lambda p: plot_faithfulness(counterfactual, p, section)))
    if not (panel.notes or panel.tables or panel.figures):
        skipped = (evaluation.get("faithfulness") or {}).get("skipped")
        panel.missing = (f"Faithfulness not measured: {skipped}" if skipped else
                         "The evaluation has no causal test and no faithfulness section (counterfactual_rows: 0, causal off).")
    return panel


def drift_panel(run: RunFiles, neuron: str, evaluation: dict | None) -> Panel:
    panel = Panel("drift", "Drift of the neuron and LM loss")
    summary = run.summary or {}
    history, last = drift_history(run.drift, run.log_history)
    if history:
        panel.add_figure("The drift monitor: the neuron against its reference values, the head's agreement, the LM loss.",
                         fig.svg_of(lambda p: plot_drift(history, [neuron], p)))
    last = last or (evaluation or {}).get("drift") or summary.get("drift_monitor") or {}
    if "lm_loss" in last:
        panel.facts.append(("LM loss on held-out text (last)", f"{fmt(last['lm_loss'], 4)} (change {fmt(last.get('lm_loss_delta'), 4)})"))
    moved = summary.get("neuron_drift") or {}
    if "max_abs" in moved:
        panel.facts.append((f"neuron change after training ({moved.get('split')}, {moved.get('rows')} rows)",
                            f"max |Δ| {moved['max_abs']:.3g}, mean |Δ|/std {moved.get('mean_abs_over_std', float('nan')):.3g}"))
    if not (panel.figures or panel.facts):
        panel.missing = "This run has no drift.json and no drift figures (an evaluation alone, or drift monitoring off)."
    return panel


def training_panel(run: RunFiles) -> Panel:
    panel = Panel("training", "Training")
    summary = run.summary or {}
    if summary.get("trainable_parameters") is not None:
        total = summary.get("total_parameters") or 0
        share = f" ({summary['trainable_parameters'] / total:.2%} of {total:,})" if total else ""
        panel.facts.append(("trainable parameters", f"{summary['trainable_parameters']:,}{share}"))
    train = summary.get("train") or {}
    if train:
        panel.facts.append(("steps / epochs / seconds",
                            f"{summary.get('global_step')} / {train.get('epoch')} / {train.get('train_runtime')}"))
    if run.log_history:
        panel.add_figure("Training loss (and validation figures when the run evaluated during training).",
                         fig.svg_of(lambda p: plot_training_curves(run.log_history, p)))
        if not panel.figures:
            panel.notes.append(f"No training curve: the run logged no loss ({summary.get('global_step')} steps, fewer than "
                               f"logging_steps {run.config.get('logging_steps')}).")
    if not (panel.facts or panel.figures):
        panel.missing = "This folder holds an evaluation only (no metrics.json of a train run, no log_history.json): no training figures."
    return panel


def recipe_panel(run: RunFiles) -> Panel:
    panel = Panel("recipe", "Command, recipe and versions")
    recorded, source = run.run_config, "the keys that decide this run's result (run_config.json)"
    if recorded is None:
        recorded, source = run.config or None, "its whole configuration (metrics.json config; this run has no run_config.json)"
    if recorded is None:
        panel.missing = "This folder records no configuration (no run_config.json, no config in metrics.json)."
        return panel
    folder = run.folder
    command = (run.summary or {}).get("command") if run.summary is not None else (run.evaluation or {}).get("command")
    if command:
        panel.command = command
    else:
        panel.notes.append("The command was not recorded (a run from Python, or from before nsr_hf recorded its command).")
    if run.summary is not None:
        panel.notes.append(f"The recipe: {source}. To run it again: save it as recipe.yaml, then "
                           f"nsr train recipe.yaml --output_dir {folder} (add --overwrite to replace it).")
    else:
        panel.notes.append("The evaluation's options (metrics.json config); run it again with nsr evaluate --key value ...")
    panel.code = "\n".join(f"{k}: {json.dumps(v)}" for k, v in sorted(recorded.items()))
    panel.facts = versions(run)
    return panel


def versions(run: RunFiles) -> list[tuple[str, str]]:
    """The versions the run recorded: the model's provenance, the predictor's transformers, nsr_hf where recorded."""
    out = []
    model = (run.summary or {}).get("model") or {}
    if model.get("package"):
        out.append(("model package", f"{model['package']} ({model.get('file', '')}, sha256 {str(model.get('sha256', ''))[:12]}…)"))
    config = run.predictor_config or {}
    if config.get("transformers_version"):
        out.append(("transformers (predictor saved with)", str(config["transformers_version"])))
    if config.get("nsr_hf_version"):
        out.append(("nsr_hf (predictor saved with)", str(config["nsr_hf_version"])))
    from nsr_hf.version import __version__

    out.append(("nsr_hf (dashboard built with)", __version__))
    return out


def cards_panel(run: RunFiles) -> Panel:
    panel = Panel("cards", "Cards and files")
    for label, relative in (("model card", "predictor/README.md"), ("dataset card", "dataset/README.md"),
                            ("evaluation report", "evaluation/report.md"), ("evaluation metrics", "evaluation/metrics.json"),
                            ("run summary", "metrics.json"), ("scan's top neurons", "scan/top_neurons.json")):
        if run.path(*relative.split("/")).is_file():
            panel.links.append((label, f"../{relative}"))
    if not panel.links:
        panel.missing = "This folder holds none of a run's cards (predictor/README.md, dataset/README.md)."
    return panel


def neuron_column(run: RunFiles, neuron: str) -> int:
    """The neuron's column in the dataset's ``activations`` (the dataset's own order, which may differ from the predictor's)."""
    neurons = run.dataset_neurons
    return neurons.index(neuron) if neuron in neurons else 0


def neuron_page(run: RunFiles, neuron: str) -> dict:
    """The template's context of one neuron's page: the verdicts and every panel."""
    evaluation = neuron_evaluation(run.evaluation, neuron)
    split = headline_split(evaluation)
    panels = [identity_panel(run, neuron, evaluation), scan_panel(run, neuron), histogram_panel(run, neuron, neuron_column(run, neuron)),
              examples_panel(run, neuron), accuracy_panel(run, neuron, evaluation, split), methods_panel(run, evaluation, split),
              layers_panel(run, neuron, evaluation), faithfulness_panel(run, neuron, evaluation, split),
              drift_panel(run, neuron, evaluation), training_panel(run), recipe_panel(run), cards_panel(run)]
    return {"neuron": neuron, "split": split, "verdicts": verdict_lines(run, evaluation, split), "panels": panels,
            "folder": str(run.folder)}
