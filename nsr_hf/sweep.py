"""A sweep: one training recipe over the top N scanned neurons and several seeds, summarised as a table.

    nsr sweep recipes/quickstart.yaml --top_n 5 --seeds 0 1 2 --output_dir outputs/sweep
    nsr sweep recipes/quickstart.yaml --top_n 3 --seeds 0 1 --learning_rate 3e-4   # recipe keys overridden

Steps (``run_sweep``), everything under ``output_dir``:

1. ``scan/``: the training documents are scanned once, exactly as ``nsr train`` scans them (the recipe's
   corpus, ``scan_documents``, ``layers``, ``split_seed``: train documents only), and the neurons ranked 1..N
   are taken. An existing ``scan/`` is read back instead (delete it to scan again); ``--neurons`` skips the scan.
2. ``<layer.index>/seed-<s>/``: ``run_train`` with the recipe, ``neuron`` and ``seed`` set, for every neuron and
   seed. The first finished run of a neuron builds its activation dataset; the other seeds load that dataset
   (``dataset`` set), so a neuron's seeds differ only in training. A finished run (``finished``: its ``metrics.json``
   holds the evaluation) is not run again: an interrupted sweep resumes where it stopped. A failed run is recorded and
   the sweep goes on.
3. ``sweep.json`` and ``sweep.md``: per method and figure, over the finished runs, the median, the interquartile
   range (q1, q3, iqr), min, max and mean, and a per-run table. Figures come from the run's evaluation
   (``metrics.json["evaluation"]``, the content of ``nsr_hf.evaluation.protocol.run_evaluate``'s ``metrics.json``) when
   there is one: every method's figures on ``split``, the comparisons (``self_vs_<method>``: ``delta_r2`` and
   ``beats``, 1 when the interval of the difference lies above 0) and the selectivity; otherwise the
   predictor's own figures of ``metrics.json["metrics"][split]`` (method ``self``). The target neuron's drift
   is figure ``drift_max_abs`` of ``self``. Faithfulness (``nsr_hf.evaluation.faithfulness``): ``slope_ratio`` and
   ``counterfactual_r2`` of ``self``, and ``counterfactual_r2`` of each outside reader as ``faithfulness:<reader>``;
   the report's difference from each reader (``delta_counterfactual_r2``, ``beats``) as
   ``faithfulness:self_vs_<reader>``. ``train_seconds`` of ``self``: the Trainer's training time.

``--datasets_from DIR`` sweeps another sweep's neurons on that sweep's datasets (no scan, no new dataset): the runs of
both sweeps score exactly the same rows, e.g. a token head next to the regression head of the same neurons::

    nsr sweep recipes/quickstart.yaml --top_n 5 --seeds 0 1 --output_dir outputs/sweep
    nsr sweep recipes/quickstart_token.yaml --datasets_from outputs/sweep --seeds 0 1 --output_dir outputs/sweep_token

**An any-neuron recipe** (one that sets a key only ``nsr any-neuron`` has: ``neuron_layer``, ``neuron_count``,
``conditionings``, ...; ``is_any_neuron_recipe``) is swept over its seeds instead (``run_any_neuron_sweep``)::

    nsr sweep recipes/any_neuron.yaml --seeds 0 1 2 --output_dir outputs/any_neuron_sweep

Each seed ``s`` is one ``nsr any-neuron`` run in ``seed-<s>/`` with ``seed`` and ``neuron_split_seed`` set to ``s``: the
same drawn neurons (one dataset: the first run builds it, the others read it), split anew into train, validation and
held-out groups, and trained from that seed. ``--neurons`` names the neurons instead of the recipe's draw; ``--top_n``
does not apply. ``sweep.json`` (``kind: any_neuron``) and ``sweep.md`` hold, per group of neurons and per reporter (each
conditioning, and the per-neuron ridge probes), the spread over the seeds of the runs' medians (natural R², slope ratio);
one row per run; and per neuron, its figures in every run with its group there, and their medians per group.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nsr_hf.any_neuron import FIGURES as ANY_NEURON_FIGURES
from nsr_hf.any_neuron import RESULT_FILE as ANY_NEURON_RESULT
from nsr_hf.any_neuron import AnyNeuronConfig, run_any_neuron
from nsr_hf.capture import Neuron
from nsr_hf.dashboard import build_dashboard_after
from nsr_hf.data.neuron_split import GROUPS
from nsr_hf.errors import debug_requested, error_boundary, explain
from nsr_hf.evaluation.scoring import LOW_SPREAD_RATIO
from nsr_hf.methods import display_order
from nsr_hf.metrics import finite_median
from nsr_hf.models import load_model_and_tokenizer, process_device
from nsr_hf.parsing import RecipeParser, load_recipe
from nsr_hf.pipeline import SharedPasses, read_run_config, run_train, scan_train_documents, select_readable
from nsr_hf.pipeline import finished_run as finished  # one rule for a finished run (sweep.finished is its public name)
from nsr_hf.preflight import check_sweep
from nsr_hf.scanner import TOP_FILE, load_scan
from nsr_hf.training.config import TrainConfig
from nsr_hf.utils import write_json

logger = logging.getLogger(__name__)

RESERVED_KEYS = {"neuron": "--neurons (or the scan's --top_n)", "seed": "--seeds", "output_dir": "the sweep's --output_dir",
                 "dataset": "--datasets_from (another sweep's datasets); otherwise a sweep builds one dataset per neuron"}
TABLE_FIGURES = (("r2", "R²"), ("pearson", "r"), ("mse", "MSE"))


@dataclass
class SweepConfig:
    """Train one recipe over the top N scanned neurons and several seeds; summarise the figures (median, spread)."""

    recipe: str | None = field(default=None, metadata={
        "help": "The training recipe (YAML of TrainConfig fields); also the first positional argument"})
    top_n: int = field(default=5, metadata={"help": "Neurons: the scan's ranks 1..top_n"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Training seeds of every neuron"})
    neurons: list[str] | None = field(default=None, metadata={"help": "Sweep these neurons (layer.index) instead of scanning"})
    split: str = field(default="test", metadata={"help": "The split whose figures are summarised"})
    output_dir: str = field(default="outputs/sweep", metadata={"help": "Where scan/, the runs, sweep.json and sweep.md go"})
    datasets_from: str | None = field(default=None, metadata={
        "help": "Another sweep's output_dir: sweep its neurons (or --neurons) on its datasets, the same rows"})

    def __post_init__(self):
        if self.top_n < 1:
            raise ValueError(f"top_n must be at least 1, got {self.top_n}.")
        self.seeds = [int(s) for s in self.seeds]
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one, e.g. --seeds 0 1.")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}.")
        if self.neurons is not None:
            self.neurons = [str(Neuron.parse(n)) for n in self.neurons]
            if not self.neurons:
                raise ValueError("neurons is empty: name neurons as layer.index, or leave it out to scan.")


# ----------------------------------------------------------------------------------------------------------
# The runs


def sweep_parser(prog: str = "nsr sweep") -> RecipeParser:
    """The sweep's parser: its own flags, then every ``TrainConfig`` key and an any-neuron recipe's own keys
    (``AnyNeuronConfig``; the sweep's ``output_dir`` and ``neurons`` are its own)."""
    return RecipeParser((SweepConfig, AnyNeuronConfig), prog=prog,
                        usage=f"{prog} [RECIPE.yaml] [--top_n N] [--seeds S ...] [--neurons L.N ...] [--output_dir DIR] [--key value ...]",
                        description=(SweepConfig.__doc__ or "").strip() + " Any TrainConfig key replaces the recipe's value, "
                        f"except those the sweep sets itself ({', '.join(RESERVED_KEYS)}).")


def recipe_and_overrides(config: SweepConfig, overrides: dict | None, config_class) -> tuple[dict, dict]:
    """The recipe's values (none without a recipe) and the overrides, each read and checked as ``config_class`` keys."""
    parser = RecipeParser(config_class)
    values = parser.read_mapping(load_recipe(config.recipe), config.recipe)[0] if config.recipe else {}
    return values, parser.read_mapping(dict(overrides or {}), "the sweep's overrides")[0]


def recipe_values(config: SweepConfig, overrides: dict | None = None) -> dict:
    """The recipe (if any) and the overrides as ``TrainConfig`` values, checked against ``TrainConfig`` and the keys
    the sweep sets itself."""
    values, overrides = recipe_and_overrides(config, overrides, TrainConfig)
    for key, how in RESERVED_KEYS.items():
        if key in overrides:
            raise ValueError(f"{key} is set by the sweep itself: use {how}.")
        if key in values:
            if key == "dataset" and values[key]:
                raise ValueError(f"The recipe {config.recipe} names a dataset: a sweep scans for neurons and builds each one's "
                                 "dataset. Remove 'dataset' from the recipe, or take another sweep's datasets with --datasets_from.")
            logger.info("The recipe's %s is replaced by the sweep's (%s).", key, how)
            values.pop(key)
    values.update(overrides)
    TrainConfig(**values)  # validates, with the field named in any error
    return values


def scan_top_neurons(values: dict, top_n: int, scan_dir: Path) -> list[str]:
    """The recipe's top ``top_n`` neurons on the training documents, chosen the way ``nsr train`` chooses one: by
    the scan's ranking, or with ``select: readable`` by the readability of the scan's top ``select_candidates``
    (``scan/selection.json``). A scan (and selection) already in ``scan_dir`` is read back."""
    config = TrainConfig(**values)
    selection = scan_dir / "selection.json"
    readable = config.select == "readable"
    if readable and top_n > config.select_candidates:
        raise ValueError(f"top_n = {top_n} is more than select_candidates = {config.select_candidates}: raise select_candidates.")
    if (scan_dir / TOP_FILE).exists() and (not readable or selection.exists()):
        scan = load_scan(scan_dir)
        print(f"using the scan in {scan_dir} (delete it to scan again)", flush=True)
    else:
        model, tokenizer = load_model_and_tokenizer(config.model, device=process_device())
        scan, train_docs = scan_train_documents(config, model, tokenizer, scan_dir, top_n=max(top_n, config.select_candidates))
        if readable:
            select_readable(config, model, tokenizer, scan, train_docs, scan_dir.parent)
        del model
    if readable:
        table = sorted(json.loads(selection.read_text())["candidates"], key=lambda row: -row["cv_r2"])
        return [row["neuron"] for row in table[:top_n]]
    if len(scan.table) < top_n:
        raise ValueError(f"The scan ranked {len(scan.table)} neurons, fewer than top_n = {top_n}.")
    return [str(scan.neuron_at_rank(rank)) for rank in range(1, top_n + 1)]


def run_dir(output_dir, neuron: str, seed: int) -> Path:
    return Path(output_dir) / neuron / f"seed-{seed}"


def _finished_dataset(output_dir, neuron: str, seeds=None) -> Path | None:
    """The dataset of a finished run of ``neuron`` (any of ``seeds``; every seed when None), to be loaded by its other runs."""
    if seeds is None:
        folders = sorted(Path(output_dir, neuron).glob("seed-*"))
    else:
        folders = [run_dir(output_dir, neuron, seed) for seed in seeds]
    for folder in folders:
        if finished(folder) and (folder / "dataset").is_dir():
            return folder / "dataset"
    return None


def source_datasets(source, neurons: list[str] | None = None) -> dict[str, Path]:
    """``--datasets_from``: each neuron's dataset in the sweep at ``source`` (its ``sweep.json`` neurons unless
    ``neurons`` are named). Every error names what is missing, before any run starts."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"datasets_from: {source} is not a folder. Name the output_dir of a finished sweep.")
    if neurons is None:
        summary = source / "sweep.json"
        if not summary.exists():
            raise FileNotFoundError(f"datasets_from: {source} has no sweep.json. Let that sweep finish, or name the neurons "
                                    "to take from it with --neurons.")
        neurons = list(json.loads(summary.read_text())["neurons"])
    found = {neuron: _finished_dataset(source, neuron) for neuron in neurons}
    missing = [neuron for neuron, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(f"datasets_from: {source} holds no finished run with a dataset for neuron(s) {missing} "
                                f"(looked for {source}/<neuron>/seed-*/dataset next to a metrics.json).")
    return found


# ----------------------------------------------------------------------------------------------------------
# Figures and their summary


def _numbers(d: dict) -> dict:
    return {k: float(v) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "rows" and math.isfinite(v)}


def run_figures(summary: dict, split: str = "test") -> dict[str, dict[str, float]]:
    """``{method: {figure: value}}`` of one run's ``metrics.json`` (module docstring, step 3)."""
    figures: dict[str, dict[str, float]] = {}
    evaluation = summary.get("evaluation")
    if evaluation:
        for method, m in ((evaluation.get("metrics") or {}).get(split) or {}).items():
            figures[method] = _numbers(m)
        for name, c in ((evaluation.get("comparisons") or {}).get(split) or {}).items():
            figures[name] = {"delta_r2": float(c["difference"])}
            if "low" in c:
                figures[name]["beats"] = float(c["low"] > 0)
        for real, s in ((evaluation.get("selectivity") or {}).get(split) or {}).items():
            figures[f"selectivity:{real}"] = {"selectivity": float(s["selectivity"])}
        ratio = ((evaluation.get("spread") or {}).get(split) or {}).get("ratio")
        if ratio is not None:
            figures.setdefault("self", {})["spread_ratio"] = float(ratio)
        _faithfulness_figures(figures, evaluation, split)
    else:
        m = (summary.get("metrics") or {}).get(split) or {}
        figures["self"] = {k.removeprefix(f"{split}_"): v for k, v in _numbers(m).items()}
    runtime = (summary.get("train") or {}).get("train_runtime")
    if isinstance(runtime, (int, float)):
        figures.setdefault("self", {})["train_seconds"] = float(runtime)
    drift = summary.get("neuron_drift") or {}
    if isinstance(drift.get("max_abs"), (int, float)):
        figures.setdefault("self", {})["drift_max_abs"] = float(drift["max_abs"])
    return figures


def _faithfulness_figures(figures: dict, evaluation: dict, split: str) -> None:
    """Add the faithfulness section's figures (``nsr_hf.evaluation.faithfulness``): ``slope_ratio`` and ``counterfactual_r2``
    to ``self``, and ``counterfactual_r2`` of every other reader as method ``faithfulness:<reader>``."""
    section = (evaluation.get("faithfulness") or {}).get(split)
    if not isinstance(section, dict) or "methods" not in section:
        return
    for reader, m in section["methods"].items():
        if isinstance(m.get("r2"), (int, float)) and math.isfinite(m["r2"]):
            figures.setdefault("self" if reader == "self" else f"faithfulness:{reader}", {})["counterfactual_r2"] = float(m["r2"])
    ratio = (section.get("slope_ratio") or {}).get("ratio")
    if isinstance(ratio, (int, float)) and math.isfinite(ratio):
        figures.setdefault("self", {})["slope_ratio"] = float(ratio)
    for reader, c in (section.get("comparisons") or {}).items():
        if isinstance(c.get("difference"), (int, float)) and math.isfinite(c["difference"]):
            figures[f"faithfulness:self_vs_{reader}"] = {"delta_counterfactual_r2": float(c["difference"])}
            if c.get("low") is not None:
                figures[f"faithfulness:self_vs_{reader}"]["beats"] = float(c["low"] > 0)


def spread(values) -> dict:
    """Median and spread of a figure over runs: n, median, q1, q3, iqr (q3 - q1), min, max, mean (linear
    interpolation between order statistics, numpy's default)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("No values to summarise.")
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    return {"n": int(v.size), "median": float(median), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1),
            "min": float(v.min()), "max": float(v.max()), "mean": float(v.mean())}


def summarise_runs(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """``{method: {figure: spread}}`` over the runs that finished (each with ``figures``)."""
    collected: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for method, figures in (run.get("figures") or {}).items():
            for figure, value in figures.items():
                collected.setdefault(method, {}).setdefault(figure, []).append(value)
    return {method: {figure: spread(values) for figure, values in figures.items()} for method, figures in collected.items()}


def _cell(stats: dict | None, digits: int = 3) -> str:
    if not stats:
        return "n/a"
    return (f"{stats['median']:.{digits}f} [{stats['q1']:.{digits}f}, {stats['q3']:.{digits}f}] "
            f"({stats['min']:.{digits}f} to {stats['max']:.{digits}f})")


def _faithfulness_summary(summary: dict) -> list[str]:
    """The faithfulness table of ``sweep.md``: the report's slope ratio and counterfactual R², and each reader's."""
    readers = [("self", summary.get("self") or {})] + [(m.split(":", 1)[1], summary[m]) for m in summary if m.startswith("faithfulness:")]
    readers = [(name, stats) for name, stats in readers if "counterfactual_r2" in stats or "slope_ratio" in stats]
    if not readers:
        return []
    lines = ["", "| faithfulness: reader | counterfactual R² | slope ratio |", "| --- | --- | --- |"]
    lines += [f"| {name} | {_cell(stats.get('counterfactual_r2'))} | {_cell(stats.get('slope_ratio'))} |" for name, stats in readers]
    comparisons = [(m.split(":", 1)[1], summary[m]) for m in summary if m.startswith("faithfulness:self_vs_")]
    if comparisons:
        lines += ["", "| faithfulness: comparison | Δ counterfactual R² | runs where the report is better (CI above 0) |",
                  "| --- | --- | --- |"]
        for name, s in comparisons:
            beats = f"{s['beats']['mean']:.0%} of {s['beats']['n']}" if "beats" in s else "n/a"
            lines.append(f"| {name} | {_cell(s.get('delta_counterfactual_r2'))} | {beats} |")
    return lines


def sweep_markdown(result: dict) -> str:
    """``sweep.md``: the summary per method, the comparisons, and one row per run."""
    summary, runs, split = result["summary"], result["runs"], result["split"]
    done = [r for r in runs if r.get("figures")]
    lines = [f"# Sweep: {len(result['neurons'])} neuron(s) × {len(result['seeds'])} seed(s)", "",
             (f"Neurons {', '.join(result['neurons'])}; seeds {', '.join(map(str, result['seeds']))}; split {split}; "
              f"{len(done)} of {len(runs)} runs finished."
              + (f" Datasets (the same rows) from the sweep in {result['config']['datasets_from']}."
                 if (result.get("config") or {}).get("datasets_from") else "")), "",
             "Each cell: median [q1, q3] (min to max) over the runs.", ""]
    methods = display_order(m for m in summary if not m.startswith(("self_vs_", "selectivity:", "faithfulness:")))
    lines += ["| method | runs | " + " | ".join(label for _, label in TABLE_FIGURES) + " |",
              "| --- | --- |" + " --- |" * len(TABLE_FIGURES)]
    for method in methods:
        stats = summary[method]
        n = max((s["n"] for s in stats.values()), default=0)
        lines.append(f"| {method} | {n} | "
                     + " | ".join(_cell(stats.get(key), 4 if key == "mse" else 3) for key, _ in TABLE_FIGURES) + " |")
    comparisons = [m for m in summary if m.startswith("self_vs_")]
    if comparisons:
        lines += ["", "| comparison | ΔR² | runs where self-report is better (CI above 0) |", "| --- | --- | --- |"]
        for name in comparisons:
            s = summary[name]
            beats = f"{s['beats']['mean']:.0%} of {s['beats']['n']}" if "beats" in s else "n/a"
            lines.append(f"| {name} | {_cell(s.get('delta_r2'))} | {beats} |")
    lines += _faithfulness_summary(summary)
    selectivity = [m for m in summary if m.startswith("selectivity:")]
    if selectivity:
        lines += ["", "| selectivity | R²(real) − R²(shuffled control) |", "| --- | --- |"]
        lines += [f"| {name.split(':', 1)[1]} | {_cell(summary[name].get('selectivity'))} |" for name in selectivity]
    low = [f"{r['neuron']} (seed {r['seed']})" for r in done
           if (r["figures"].get("self") or {}).get("spread_ratio", 1.0) < LOW_SPREAD_RATIO]
    if low:
        lines += ["", (f"⚠ {len(low)} run(s) on a {split} split where the neuron's std is below {LOW_SPREAD_RATIO} of its training std: "
                       f"{', '.join(low)}. R² divides by that small variance and can be strongly negative for small errors; "
                       "read MSE there.")]
    lines += ["", "## Runs", "",
              f"| neuron | seed | status | self R² | self r | self MSE | ridge probe R² | slope ratio | counterfactual R² | "
              f"{split} std / train std | drift max |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        f = run.get("figures") or {}
        s, probe = f.get("self", {}), f.get("ridge_probe", {})

        def num(d, key, digits=3):
            return f"{d[key]:.{digits}f}" if key in d else "n/a"

        status = "error: " + run["error"].splitlines()[-1][:80] if run.get("error") else run["status"]
        lines.append(f"| {run['neuron']} | {run['seed']} | {status} | {num(s, 'r2')} | {num(s, 'pearson')} | {num(s, 'mse', 4)} | "
                     f"{num(probe, 'r2')} | {num(s, 'slope_ratio')} | {num(s, 'counterfactual_r2')} | {num(s, 'spread_ratio', 2)} | "
                     f"{num(s, 'drift_max_abs', 4)} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The sweep


def run_sweep(config: SweepConfig, overrides: dict | None = None, debug: bool = False) -> dict:
    """``nsr sweep``: scan once, train every (neuron, seed) not yet finished, summarise (module docstring).
    ``overrides``: ``TrainConfig`` values that replace the recipe's. Returns the content of ``sweep.json``.
    An any-neuron recipe is swept over its seeds (``run_any_neuron_sweep``)."""
    if is_any_neuron_recipe({**(load_recipe(config.recipe) if config.recipe else {}), **(overrides or {})}):
        return run_any_neuron_sweep(config, overrides, debug=debug)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    values = recipe_values(config, overrides)
    sources = source_datasets(config.datasets_from, config.neurons) if config.datasets_from else {}
    check_sweep(values, config.neurons, sources)  # a mistake every run would hit is one line, before the scan and the first run
    neurons = list(sources) or config.neurons or scan_top_neurons(values, config.top_n, out / "scan")
    shared = SharedPasses()  # the model, loaded once, and what its passes gave on the dataset the current neuron's seeds share
    runs = [train_one(config, values, out, neuron, seed, sources.get(neuron), debug=debug, shared=shared)
            for neuron in neurons for seed in config.seeds]
    result = {"config": asdict(config), "recipe": values, "neurons": neurons, "seeds": config.seeds, "split": config.split,
              "runs": runs, "failed": sum(1 for r in runs if r.get("error")), "summary": summarise_runs(runs)}
    write_json(out / "sweep.json", result, indent=2)
    (out / "sweep.md").write_text(sweep_markdown(result))
    print(f"\nsweep: {len(runs) - result['failed']} of {len(runs)} runs finished; summary in {out / 'sweep.md'}", flush=True)
    dashboard = build_dashboard_after(out, what="sweep")  # sweep.json is saved: a failure costs only the page
    if dashboard:
        print(f"sweep dashboard: {dashboard} (rebuild it with: nsr report {out})", flush=True)
    return result


def train_one(config: SweepConfig, values: dict, out: Path, neuron: str, seed: int, source: Path | None = None,
              debug: bool = False, shared: SharedPasses | None = None) -> dict:
    """One run of the sweep (``run_train`` into ``<neuron>/seed-<seed>``) unless it finished before; its record in
    ``sweep.json``, with its figures when it has a ``metrics.json``. A failed run is recorded, not raised."""

    folder = run_dir(out, neuron, seed)
    run = {"neuron": neuron, "seed": seed, "output_dir": str(folder)}
    if finished(folder):
        run["status"] = "skipped (finished before)"
    else:
        dataset = source or _finished_dataset(out, neuron, config.seeds)
        started = read_run_config(folder)
        if not source and started is not None and started.get("dataset") is None:
            dataset = None  # an interrupted run that built its own dataset resumes as it started (its run_config.json)
        print(f"\nsweep: neuron {neuron}, seed {seed}" + (f" (dataset {dataset})" if dataset else ""), flush=True)
        recorded_attempt(run, f"run {neuron} seed {seed}", debug, lambda: run_train(TrainConfig(**{
            **values, "neuron": neuron, "seed": seed, "output_dir": str(folder), **({"dataset": str(dataset)} if dataset else {})}),
            shared=shared))
    if finished(folder):
        run["figures"] = run_figures(json.loads((folder / "metrics.json").read_text()), config.split)
    return run


# ----------------------------------------------------------------------------------------------------------
# An any-neuron sweep

ANY_NEURON_RESERVED = {"seed": "--seeds", "neuron_split_seed": "--seeds (each seed splits the neurons into groups anew)",
                       "output_dir": "the sweep's --output_dir"}
PROBE = "ridge_probe"  # the per-neuron ridge probes' entry next to the reporters (figure: natural_r2)


def any_neuron_keys() -> set[str]:
    """The keys only an any-neuron recipe has (``AnyNeuronConfig``'s fields that ``TrainConfig`` lacks)."""
    from dataclasses import fields

    train = {f.name for f in fields(TrainConfig)}
    return {f.name for f in fields(AnyNeuronConfig) if f.init and f.name not in train}


def is_any_neuron_recipe(recipe: dict | None) -> bool:
    """Whether a recipe's mapping is an any-neuron recipe: it sets a key only ``nsr any-neuron`` has."""
    return isinstance(recipe, dict) and bool(set(recipe) & any_neuron_keys())


def any_neuron_values(config: SweepConfig, overrides: dict | None = None) -> dict:
    """The any-neuron recipe and the overrides as ``AnyNeuronConfig`` values (``--neurons``: its neurons), checked."""
    values, overrides = recipe_and_overrides(config, overrides, AnyNeuronConfig)
    for key, how in ANY_NEURON_RESERVED.items():
        if key in overrides:
            raise ValueError(f"{key} is set by the sweep itself: use {how}.")
        if values.pop(key, None) is not None:
            logger.info("The recipe's %s is replaced by the sweep's (%s).", key, how)
    values.update(overrides)
    if config.neurons:
        values["neurons"] = list(config.neurons)
    AnyNeuronConfig(**values)  # validates, with the field named in any error
    return values


def any_neuron_run_dir(output_dir, seed: int) -> Path:
    return Path(output_dir) / f"seed-{seed}"


def run_any_neuron_sweep(config: SweepConfig, overrides: dict | None = None, debug: bool = False) -> dict:
    """``nsr sweep`` of an any-neuron recipe (module docstring): one ``run_any_neuron`` per seed not yet finished, then
    ``sweep.json``, ``sweep.md`` and the sweep's page. Returns the content of ``sweep.json``."""
    if config.datasets_from:
        raise ValueError("--datasets_from takes another sweep's per-neuron datasets; an any-neuron sweep builds one dataset of all its "
                         "neurons (its first run) and its other seeds read it. To start from a dataset built before, name it in the "
                         "recipe (dataset: PATH).")
    values = any_neuron_values(config, overrides)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [any_neuron_one(values, out, seed, config.seeds, debug=debug) for seed in config.seeds]
    result = any_neuron_sweep_result(config, values, runs)
    write_json(out / "sweep.json", result, indent=2)
    (out / "sweep.md").write_text(any_neuron_sweep_markdown(result))
    print(f"\nsweep: {len(runs) - result['failed']} of {len(runs)} any-neuron runs finished; summary in {out / 'sweep.md'}", flush=True)
    dashboard = build_dashboard_after(out, what="sweep")
    if dashboard:
        print(f"sweep dashboard: {dashboard} (rebuild it with: nsr report {out})", flush=True)
    return result


def _built_dataset(out: Path, seeds) -> Path | None:
    """The dataset one of the sweep's runs built (complete: ``dataset_dict.json``), for the others to read."""
    for seed in seeds:
        folder = any_neuron_run_dir(out, seed) / "dataset"
        if (folder / "dataset_dict.json").is_file():
            return folder
    return None


def any_neuron_one(values: dict, out: Path, seed: int, seeds, debug: bool = False) -> dict:
    """One seed of an any-neuron sweep (``run_any_neuron`` into ``seed-<seed>``) unless it finished before; its record in
    ``sweep.json``, with its result's ``summary`` and ``per_neuron``. A failed run is recorded, not raised."""

    folder = any_neuron_run_dir(out, seed)
    run = {"seed": seed, "output_dir": str(folder)}
    if (folder / ANY_NEURON_RESULT).is_file():
        run["status"] = "skipped (finished before)"
    else:
        dataset = values.get("dataset") or _built_dataset(out, seeds)
        print(f"\nsweep: any-neuron run, seed {seed}" + (f" (dataset {dataset})" if dataset else ""), flush=True)
        given = {"seed": seed, "neuron_split_seed": seed, "output_dir": str(folder), **({"dataset": str(dataset)} if dataset else {})}
        recorded_attempt(run, f"any-neuron run seed {seed}", debug, lambda: run_any_neuron(AnyNeuronConfig(**{**values, **given})))
    if (folder / ANY_NEURON_RESULT).is_file():
        result = json.loads((folder / ANY_NEURON_RESULT).read_text())
        run.update(conditionings=result["conditionings"], summary=result["summary"], per_neuron=result["per_neuron"],
                   split=result["split"], seconds=result.get("seconds"))
    return run


def _reporters(runs: list[dict]) -> list[str]:
    """The conditionings of the finished runs, in their order, then the ridge probes."""
    seen: list[str] = []
    for run in runs:
        seen += [c for c in run.get("conditionings") or [] if c not in seen]
    return seen + [PROBE]


def _figure(entry: dict, reporter: str, figure: str):
    """A figure of one reporter in a run's group entry or a neuron's scores (the probe's R² is ``ridge_probe_r2``)."""
    if reporter == PROBE:
        return entry.get("ridge_probe_r2") if figure == "natural_r2" else None
    return (entry.get(reporter) or {}).get(figure)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def any_neuron_sweep_result(config: SweepConfig, values: dict, runs: list[dict]) -> dict:
    """``sweep.json`` of an any-neuron sweep: ``summary`` {group: {reporter: {figure: spread over the runs of its median}}},
    ``per_neuron`` {neuron: {"runs": [its scores in each run, with seed and group], "medians": {group: {"runs": n,
    reporter: {figure: median over those runs}}}}} and the runs (without their per-neuron scores)."""
    done = [r for r in runs if r.get("summary")]
    reporters = _reporters(done)
    summary: dict = {}
    for group in GROUPS:
        for reporter in reporters:
            for figure in ANY_NEURON_FIGURES:
                got = [_figure(r["summary"][group], reporter, figure) for r in done if group in r["summary"]]
                got = [v for v in got if _finite(v)]
                if got:
                    summary.setdefault(group, {}).setdefault(reporter, {})[figure] = spread(got)
    per_neuron: dict = {}
    for run in done:
        for neuron, scores in run["per_neuron"].items():
            per_neuron.setdefault(neuron, {"runs": []})["runs"].append({"seed": run["seed"], **scores})
    for entry in per_neuron.values():
        medians: dict = {}
        for group in GROUPS:
            rows = [s for s in entry["runs"] if s["group"] == group]
            if rows:
                medians[group] = {"runs": len(rows), **{r: {f: finite_median(_figure(s, r, f) for s in rows) for f in ANY_NEURON_FIGURES}
                                                        for r in reporters}}
        entry["medians"] = medians
    neurons = sorted(per_neuron, key=lambda n: (Neuron.parse(n).layer, Neuron.parse(n).index))
    return {"kind": "any_neuron", "config": asdict(config), "recipe": values, "seeds": config.seeds, "split": "test",
            "neurons": neurons, "reporters": reporters, "failed": sum(1 for r in runs if r.get("error")),
            "runs": [{k: v for k, v in r.items() if k != "per_neuron"} for r in runs], "summary": summary,
            "per_neuron": {n: per_neuron[n] for n in neurons}}


def any_neuron_sweep_markdown(result: dict) -> str:
    """``sweep.md`` of an any-neuron sweep: the spread over the seeds of each group's medians, one row per run."""
    reporters, runs = result["reporters"], result["runs"]
    done = [r for r in runs if r.get("summary")]
    lines = [f"# Any-neuron sweep: {len(result['seeds'])} seed(s), {len(result['neurons'])} neurons", "",
             f"Seeds {', '.join(map(str, result['seeds']))} (each: the training seed and the split of the neurons into groups); "
             f"{len(done)} of {len(runs)} runs finished; held-out documents (test split).", "",
             "Each cell: the median over the runs of the group's median [q1, q3] (min to max). The ridge probe of each neuron sees "
             "that neuron's own train labels (the reference); the reporters see only the train neurons' labels.", "",
             "| neurons | reporter | runs | natural R² | slope ratio |", "| --- | --- | --- | --- | --- |"]
    for group, entry in result["summary"].items():
        for reporter in reporters:
            stats = entry.get(reporter) or {}
            if stats:
                n = max(s["n"] for s in stats.values())
                lines.append(f"| {group.replace('_', '-')} | {reporter.replace('_', ' ')} | {n} | {_cell(stats.get('natural_r2'))} | "
                             f"{_cell(stats.get('slope_ratio'))} |")
    conditionings = [r for r in reporters if r != PROBE]
    lines += ["", "## Runs (held-out neurons' medians)", "",
              "| seed | status | held-out neurons | " + " | ".join(f"{c} R² | {c} slope ratio" for c in conditionings)
              + " | ridge probe R² |", "| --- | --- | --- |" + " --- | ---" * len(conditionings) + " --- |"]

    def num(x):
        return f"{x:.3f}" if _finite(x) else "n/a"

    for run in runs:
        held = (run.get("summary") or {}).get("held_out") or {}
        status = "error: " + run["error"].splitlines()[-1][:80] if run.get("error") else run["status"]
        cells = " | ".join(f"{num(_figure(held, c, 'natural_r2'))} | {num(_figure(held, c, 'slope_ratio'))}" for c in conditionings)
        lines.append(f"| {run['seed']} | {status} | {held.get('neurons', 'n/a')} | {cells} | {num(held.get('ridge_probe_r2'))} |")
    return "\n".join(lines) + "\n"


def recorded_attempt(run: dict, what: str, debug: bool, call) -> None:
    """``call()`` for one run of a sweep: ``run["status"]`` becomes ``"trained"``, or ``"failed"`` with its ``error``
    (``failure_record``) logged. One failed run must not lose the others: the error is recorded, not raised."""
    import gc

    try:
        call()
        run["status"] = "trained"
    except Exception as err:  # noqa: BLE001 (record it, go on)
        run["status"], run["error"] = "failed", failure_record(err)
        # a user's mistake is its one line (the error boundary's words); a bug, or --debug / NSR_DEBUG=1, keeps its traceback
        trace = "" if explain(err) is not None and not (debug or debug_requested([])[1]) else "\n" + traceback.format_exc()
        logger.error("sweep %s failed: %s%s", what, run["error"], trace)
    gc.collect()


def failure_record(err: BaseException) -> str:
    """A failed run's ``error`` in ``sweep.json``: the one line the error boundary prints for a user's mistake, else the
    exception's type and message."""
    message = explain(err)
    return " ".join(message.split()) if message is not None else f"{type(err).__name__}: {' '.join(str(err).split())}"


def main(argv: list[str] | None = None) -> int:
    """``nsr sweep [RECIPE.yaml] [--sweep flags] [--TrainConfig key value ...] [--debug]``."""
    argv, debug = debug_requested(list(sys.argv[1:] if argv is None else argv))
    parser = sweep_parser()
    if any(a in ("-h", "--help") for a in argv):
        print(parser.format_help())
        return 0

    def parse_and_run() -> int:
        words = ["--recipe", argv[0], *argv[1:]] if argv and not argv[0].startswith("-") else argv
        sweep_values, overrides = parser.given_values(words)
        result = run_sweep(SweepConfig(**sweep_values), overrides, debug=debug)
        return 1 if result["failed"] else 0

    return error_boundary("nsr sweep", parse_and_run, debug=debug)
