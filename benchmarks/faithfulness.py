"""Accuracy against faithfulness: plain training against intervention training, on the same neurons, rows and seeds.

    python benchmarks/faithfulness.py --output_dir outputs/bench_faithful                       # everything below
    python benchmarks/faithfulness.py --heads regression --neurons 7.268 --seeds 0              # one pair of runs
    python benchmarks/faithfulness.py --output_dir outputs/bench_faithful --table_only          # re-read finished runs
    python benchmarks/faithfulness.py --output_dir outputs/bench_4800 --dataset_documents 4800 --heads regression \
        --trainings faithful --neurons 0.333                                                    # more data (README)

For every head (``--heads``: ``regression`` = recipes/quickstart.yaml, ``token_exit`` = recipes/quickstart_token_exit.yaml,
``token`` = recipes/quickstart_token.yaml, the model's own next token: ~25 min a run on 2 CPU cores) two sweeps run
(``nsr_hf.sweep.run_sweep``): ``<head>-plain`` with ``intervention_rate`` 0 and ``<head>-faithful`` with the settings in which
the head's faithful recipe differs from its plain one (rate, source, epochs, learning rate): recipes/quickstart_faithful.yaml
for the regression head, recipes/quickstart_token_exit_faithful.yaml for the early exit, recipes/quickstart_token_faithful.yaml
for the own next token. Where the faithful recipe also changes the head itself (the own next token's is read at the labelled
token, with k-means bins: ``HEAD_KEYS``), the plain runs take that head too, so that the two differ in their training only.
Every sweep after the first takes the first one's datasets (``--datasets_from``), so all runs of a neuron score exactly the
same held-out rows. A finished run is not run again: the benchmark resumes where it stopped.

The evaluation is cut to what the table needs (``--eval_methods ridge_probe``: the natural figures, the ridge probe, and
the faithfulness section with both outside readers); the drift monitor runs once at the end of training.

``--dataset_documents N`` builds every dataset from N documents instead of the recipes' 1200 (the same split fractions):
the honest reader and the reporter both train on more rows. The runs of one output folder share their datasets, so a run
into a folder whose runs were built from another number of documents is refused before anything runs.

Written to ``output_dir``: ``faithfulness.json`` (every figure of every run, with intervals) and ``faithfulness.md``, one
row per neuron x head x seed x training: natural R², counterfactual R², slope ratio, the ridge probe's natural R² and its
counterfactual R², the counterfactual R² of the ridge probe fitted on intervened rows, the report minus that reader
(paired bootstrap interval), the same two for that reader of the original model (before training), the same two for the
plainly trained predictor (a faithful run scores its plain twin on the same counterfactual rows: ``compare_predictor``,
when the plain run of that head, neuron and seed finished first, as it does in the default order), and the training
time. The README's figures come from it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from nsr_hf.parsing import load_recipe
from nsr_hf.sweep import SweepConfig, finished, run_dir, run_sweep
from nsr_hf.utils import write_json

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"regression": "recipes/quickstart.yaml", "token_exit": "recipes/quickstart_token_exit.yaml",
           "token": "recipes/quickstart_token.yaml"}
FAITHFUL = {"regression": "recipes/quickstart_faithful.yaml", "token_exit": "recipes/quickstart_token_exit_faithful.yaml",
            "token": "recipes/quickstart_token_faithful.yaml"}
# The keys the faithful recipe sets on top of the plain quickstart: the intervention and what it needs to be learnt.
TRAINING_KEYS = ("intervention_rate", "intervention_source", "intervention_shift_scale", "num_train_epochs", "learning_rate")
# The keys that define the head itself (where the report is read, its bins): taken from the faithful recipe by the plain
# runs too, so that plain and faithful differ in their training only.
HEAD_KEYS = ("prompt_suffix", "bin_strategy")
NEURONS = ("7.268", "0.1524", "0.333", "0.1194", "6.868")  # the quickstart's neuron and four of the first sweep's
CHEAP = {"eval_methods": ["ridge_probe"], "drift_every_n_steps": 100000}


def faithful_overrides(head: str, keys: tuple = TRAINING_KEYS) -> dict:
    """The settings of ``head``'s faithful recipe among ``keys`` (by default its training: the intervention, and the epochs
    and rate it was tuned with) that differ from its plain recipe."""
    faithful, plain = load_recipe(str(ROOT / FAITHFUL[head])), load_recipe(str(ROOT / RECIPES[head]))
    return {k: faithful[k] for k in keys if k in faithful and faithful[k] != plain.get(k)}


def overrides_for(head: str, training: str, dataset_documents: int | None = None) -> dict:
    """The recipe keys that a run of ``training`` (``plain`` or ``faithful``) sets on ``head``'s recipe; both are scored on
    counterfactual rows drawn as in the faithful training. ``dataset_documents``: the datasets' size (None: the recipe's)."""
    head_keys = faithful_overrides(head, HEAD_KEYS)
    overrides = ({**CHEAP, **head_keys, "intervention_rate": 0.0} if training == "plain"
                 else {**CHEAP, **head_keys, **faithful_overrides(head)})
    overrides["counterfactual_source"] = load_recipe(str(ROOT / FAITHFUL[head])).get("intervention_source", "interchange")
    if dataset_documents is not None:
        overrides["dataset_documents"] = int(dataset_documents)
    return overrides


def dataset_documents_of(out: Path, requested: int | None) -> int:
    """The number of documents of this benchmark's datasets: ``requested`` (None: the recipes'), checked against the runs
    already in ``out`` (their ``run_config.json``), which share their datasets with every later run. Raises ValueError
    before anything runs when they differ (the recipe's own check refuses too few documents)."""
    recorded = {}
    for config in sorted(out.glob("*/*/seed-*/run_config.json")):
        documents = json.loads(config.read_text()).get("dataset_documents")
        if documents is not None:
            recorded.setdefault(int(documents), config.parent)
    if requested is None:
        if len(recorded) == 1:  # an existing folder: go on with its setting
            return next(iter(recorded))
        requested = int(load_recipe(str(ROOT / RECIPES["regression"]))["dataset_documents"])
    others = {n: folder for n, folder in recorded.items() if n != int(requested)}
    if others:
        n, folder = next(iter(others.items()))
        raise ValueError(f"{out} holds runs built from {n} documents ({folder}), and this benchmark asks for {requested}: "
                         f"their runs share datasets, so the two cannot be mixed. Give another --output_dir, or "
                         f"--dataset_documents {n} to go on with this one.")
    return int(requested)


def _dataset_source(out: Path, neuron: str, folder: Path) -> str | None:
    """A sweep folder under ``out`` (not ``folder`` itself) with a finished run of ``neuron`` that has its dataset: the
    runs of every head and training then score the same rows. None: ``folder``'s run builds it."""
    for other in sorted(out.iterdir()):
        if other != folder and other.is_dir() and any((d / "dataset").is_dir() and finished(d)
                                                      for d in (other / neuron).glob("seed-*")):
            return str(other)
    return None


def plain_comparison(out: Path, head: str, training: str, neuron: str, seed: int) -> dict:
    """``compare_predictor`` for a faithful run whose plain twin (same head, neuron and seed) has finished in ``out``: its
    evaluation then scores the plain predictor on its own counterfactual rows, next to the report (the ``self − plain``
    column). Nothing for a plain run, or before its twin has run."""
    twin = run_dir(out / f"{head}-plain", neuron, seed)
    if training != "faithful" or not finished(twin) or not (twin / "predictor").is_dir():
        return {}
    return {"compare_predictor": str(twin / "predictor")}


def _ci(d: dict | None, key: str = "r2_ci"):
    return None if not d or d.get(key) is None else [float(x) for x in d[key]]


def run_row(folder: Path, split: str = "test") -> dict | None:
    """The table's figures of one finished run (``metrics.json``), or None."""
    path = folder / "metrics.json"
    if not finished(folder):
        return None
    summary = json.loads(path.read_text())
    evaluation = summary.get("evaluation") or {}
    natural = ((evaluation.get("metrics") or {}).get(split)) or {}
    section = ((evaluation.get("faithfulness") or {}).get(split)) or {}
    methods, ratio = section.get("methods") or {}, section.get("slope_ratio") or {}
    honest = (section.get("comparisons") or {}).get("ridge_probe_intervened") or {}
    before = (section.get("comparisons") or {}).get("ridge_probe_intervened_original") or {}
    plain = (section.get("comparisons") or {}).get("compare") or {}
    self_natural = natural.get("self") or {}
    return {
        "natural_r2": self_natural.get("r2"), "natural_r2_ci": _ci(self_natural),
        "counterfactual_r2": (methods.get("self") or {}).get("r2"), "counterfactual_r2_ci": _ci(methods.get("self")),
        "slope_ratio": ratio.get("ratio"), "slope_ratio_ci": [ratio.get("low"), ratio.get("high")] if ratio else None,
        "probe_natural_r2": (natural.get("ridge_probe") or {}).get("r2"),
        "probe_counterfactual_r2": (methods.get("ridge_probe") or {}).get("r2"),
        "intervened_probe_counterfactual_r2": (methods.get("ridge_probe_intervened") or {}).get("r2"),
        "self_minus_intervened_probe": honest.get("difference"),
        "self_minus_intervened_probe_ci": [honest.get("low"), honest.get("high")] if honest else None,
        "original_reader_counterfactual_r2": (methods.get("ridge_probe_intervened_original") or {}).get("r2"),
        "self_minus_original_reader": before.get("difference"),
        "self_minus_original_reader_ci": [before.get("low"), before.get("high")] if before else None,
        "plain_counterfactual_r2": (methods.get("compare") or {}).get("r2"),
        "self_minus_plain": plain.get("difference"),
        "self_minus_plain_ci": [plain.get("low"), plain.get("high")] if plain else None,
        "train_seconds": (summary.get("train") or {}).get("train_runtime"),
        "intervention": summary.get("intervention"),
        "meaningful": section.get("meaningful"),
    }


def _num(x, digits=3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _with_ci(x, ci) -> str:
    if x is None:
        return "n/a"
    return _num(x) + (f" [{_num(ci[0], 2)}, {_num(ci[1], 2)}]" if ci and None not in ci else "")


def table(rows: list[dict]) -> str:
    lines = ["| neuron | head | seed | training | natural R² | counterfactual R² | slope ratio | probe R² (natural) | "
             "probe CF R² | intervened-row probe CF R² | self − that probe (CF R²) | the original model's intervened-row probe "
             "CF R² | self − that probe (CF R²) | the plain predictor's CF R² | self − plain (CF R²) | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['neuron']} | {r['head']} | {r['seed']} | {r['training']} | {_with_ci(r['natural_r2'], r['natural_r2_ci'])} | "
                     f"{_with_ci(r['counterfactual_r2'], r['counterfactual_r2_ci'])} | {_with_ci(r['slope_ratio'], r['slope_ratio_ci'])} | "
                     f"{_num(r['probe_natural_r2'])} | {_num(r['probe_counterfactual_r2'])} | "
                     f"{_num(r['intervened_probe_counterfactual_r2'])} | "
                     f"{_with_ci(r['self_minus_intervened_probe'], r['self_minus_intervened_probe_ci'])} | "
                     f"{_num(r['original_reader_counterfactual_r2'])} | "
                     f"{_with_ci(r['self_minus_original_reader'], r['self_minus_original_reader_ci'])} | "
                     f"{_num(r['plain_counterfactual_r2'])} | {_with_ci(r['self_minus_plain'], r['self_minus_plain_ci'])} | "
                     f"{_num(r['train_seconds'], 0)} |")
    return "\n".join(lines)


def medians(rows: list[dict]) -> str:
    """Median of each figure per head and training, over neurons and seeds."""
    keys = ("natural_r2", "counterfactual_r2", "slope_ratio", "intervened_probe_counterfactual_r2", "self_minus_intervened_probe",
            "original_reader_counterfactual_r2", "self_minus_original_reader", "self_minus_plain", "train_seconds")
    lines = ["| head | training | runs | " + " | ".join(keys) + " |", "| --- | --- | --- |" + " --- |" * len(keys)]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["head"], r["training"]), []).append(r)
    for (head, training), group in groups.items():
        cells = []
        for k in keys:
            values = [r[k] for r in group if r[k] is not None]
            cells.append(_num(float(np.median(values)), 0 if k == "train_seconds" else 3) if values else "n/a")
        lines.append(f"| {head} | {training} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/bench_faithful")
    parser.add_argument("--neurons", nargs="+", default=list(NEURONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--heads", nargs="+", default=["regression", "token_exit"], choices=sorted(RECIPES))
    parser.add_argument("--trainings", nargs="+", default=["plain", "faithful"], choices=["plain", "faithful"])
    parser.add_argument("--dataset_documents", type=int, default=None,
                        help="documents of every dataset, all splits (default: the recipes' 1200, or the folder's runs')")
    parser.add_argument("--table_only", action="store_true", help="only read the finished runs and write the table")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    documents = dataset_documents_of(out, args.dataset_documents)
    folders = {(head, training): out / f"{head}-{training}" for head in args.heads for training in args.trainings}
    if not args.table_only:
        # seed-major: every neuron's first seed before any second seed, so a benchmark cut short still covers the neurons
        for seed in args.seeds:
            for neuron in args.neurons:
                for (head, training), folder in folders.items():
                    if finished(run_dir(folder, neuron, seed)):
                        continue
                    print(f"\n== neuron {neuron}, seed {seed}, {head} head, {training} training", flush=True)
                    run_sweep(SweepConfig(recipe=str(ROOT / RECIPES[head]), neurons=[neuron], seeds=[seed], output_dir=str(folder),
                                          datasets_from=_dataset_source(out, neuron, folder)),
                              {**overrides_for(head, training, documents), **plain_comparison(out, head, training, neuron, seed)})
    rows = []
    for (head, training), folder in folders.items():
        done = [n for n in args.neurons if all(finished(run_dir(folder, n, s)) for s in args.seeds)]
        if done and not args.table_only:  # sweep.json and sweep.md over every finished run of this head and training
            run_sweep(SweepConfig(recipe=str(ROOT / RECIPES[head]), neurons=done, seeds=args.seeds, output_dir=str(folder)),
                      overrides_for(head, training, documents))
        for neuron in args.neurons:
            for seed in args.seeds:
                row = run_row(run_dir(folder, neuron, seed))
                if row is not None:
                    rows.append({"neuron": neuron, "head": head, "seed": seed, "training": training, **row})
    rows.sort(key=lambda r: (args.neurons.index(r["neuron"]), r["head"], r["seed"], r["training"] != "plain"))
    write_json(out / "faithfulness.json", {"neurons": args.neurons, "seeds": args.seeds, "heads": args.heads,
                                           "dataset_documents": documents, "rows": rows}, indent=2)
    text = (f"# Accuracy against faithfulness ({len(rows)} runs)\n\nTest split (held-out documents; datasets of {documents} "
            "documents). CF: counterfactual rows "
            "(the neuron set at the labelled token to drawn values). Intervals: 95% bootstrap.\n\n"
            f"{medians(rows)}\n\n{table(rows)}\n")
    (out / "faithfulness.md").write_text(text)
    print(text)
    return {"rows": rows}


if __name__ == "__main__":
    main(sys.argv[1:])
