"""The evaluation protocol: how well a trained predictor reports its neuron, next to baselines and controls.

    from nsr_hf.evaluation.protocol import EvaluateConfig, run_evaluate
    evaluation = run_evaluate(EvaluateConfig(predictor="outputs/train/predictor", output_dir="outputs/eval"))
    evaluation["metrics"]["test"]["self"]["r2"], evaluation["metrics"]["test"]["self"]["r2_ci"]

``nsr evaluate --predictor DIR --dataset DIR_OR_HUB_ID --output_dir DIR`` does the same from the command line.

What is measured, on every evaluated split (``test``, and ``test_ood`` when the dataset has it), for the
predictor (method ``"self"``) and for every baseline and control of ``nsr_hf.evaluation.baselines.run_baselines`` on exactly
the same rows:

* Regression figures in activation units (``nsr_hf.metrics.regression_metrics``, with its one rule for constant
  targets or predictions): Pearson r, Spearman rho, R^2, MSE, MAE and calibration (slope and intercept of true on predicted).
  A high r with a negative R^2 is a failure (PITFALLS 9). Percentile-bootstrap 95% confidence intervals for R^2 and r
  (``r2_ci``, ``pearson_ci``).
* Bin figures, from the predictor's train-fitted bin edges (when it has them): accuracy, balanced accuracy,
  quadratic-weighted kappa, and ``majority_class_rate``: the share of these rows whose true bin is the most
  frequent true bin *among these rows*, i.e. the accuracy of the best constant bin chosen with hindsight. It is
  an optimistic bar that any bin accuracy has to clear to mean something.
* Both readouts of the bin and token heads: the expected value (the plain keys) and the greedy bin's value
  (the same keys with a ``greedy_`` prefix), PITFALLS 13.
* The same figures on two subsets of equal size (``subsets``): ``top_decile``, the ceil(n/10) rows whose *true*
  activation is largest (ties broken by row order), where a neuron's behaviour matters most and a reporter
  that predicts the mean fails; and ``random_sample``, a seeded uniform sample of as many rows, so that the
  two subsets differ in which rows they hold and not in how many (a small subset has wider intervals).
* Comparisons (paired bootstrap: the same resampled rows for both methods): R^2(self) - R^2(cross:<model>)
  for every cross model (self-report must beat a model that reads this model's labels from outside to claim
  privileged access), and R^2(self) - R^2(ridge_probe) (does fine-tuning beat a closed-form probe of the
  representation the head reads?).
* Selectivity: R^2 of the real task minus R^2 of its shuffled-label control, for the ridge probe (against
  ``shuffled_labels``) and for the predictor (against ``self_shuffled``, the predictions of a predictor trained
  on shuffled labels when one is given, else the probe's shuffled control, which is then named in the output).
* The causal test of ``nsr_hf.evaluation.causal.causal_test`` (set the neuron, watch the report move).
* Faithfulness (``nsr_hf.evaluation.faithfulness``, ``faithfulness`` by split): on ``counterfactual_rows`` held-out rows
  whose neuron is set to counterfactual values, the counterfactual R² of the report and of two ridge probes of the same
  representation, the causal test's slope ratio, each with an interval, and a verdict in words. The natural figures
  above do not depend on it.

Outputs in ``output_dir``: ``metrics.json`` (everything above), ``predictions.json`` (per split and neuron: the
true values and every method's predictions, in row order, with the ``doc_id`` of each row), and the report of
``nsr_hf.evaluation.report.write_report`` (``report.md`` and its PNGs).

Write order (``nsr_hf.run_folder``): a finished evaluation in ``output_dir`` is refused before the predictor is loaded,
unless ``overwrite``; the outputs are written into a folder beside it that replaces it only once complete. Resuming: the
stages of a run that loads its own predictor folder and dataset (the predictor's predictions, the shuffled predictor's,
each neuron's baselines, each neuron's figures) are kept beside ``output_dir`` (``.tmp-<name>-stages``) as they finish, so
an interrupted ``nsr evaluate`` rerun with the same command continues from them and writes the same ``metrics.json``.

The pieces: ``nsr_hf.methods`` (which methods there are), ``predictions`` (what the predictor reports), ``baselines``
(the baselines' predictions), ``scoring`` (the figures of one method), ``statistics`` (bootstrap and comparisons),
``causal`` and ``report``; this module holds the configuration and the run that ties them together.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from nsr_hf.data.counterfactuals import check_source
from nsr_hf.data.neuron_split import NeuronSplit, column_indices
from nsr_hf.data.storage import load_activation_dataset
from nsr_hf.evaluation.baselines import run_baselines
from nsr_hf.evaluation.causal import causal_test
from nsr_hf.evaluation.faithfulness import faithfulness_section
from nsr_hf.evaluation.figures import drift_history
from nsr_hf.evaluation.predictions import predict_split, targets_of
from nsr_hf.evaluation.report import write_report
from nsr_hf.evaluation.scoring import evaluate_predictions, quiet_if, split_spread
from nsr_hf.evaluation.statistics import compare_methods, selectivity
from nsr_hf.evaluation.token_examples import EXAMPLES_FILE, token_examples
from nsr_hf.methods import BASELINE_METHODS, DEFAULT_BASELINES, EVALUATION_KIND, is_evaluation
from nsr_hf.metrics import finite_median
from nsr_hf.modeling.predictor import check_compare_neurons, load_predictor, saved_neurons
from nsr_hf.models import load_model_and_tokenizer
from nsr_hf.run_folder import FinishedStages, refuse_finished, restore_interrupted_swap, written_atomically
from nsr_hf.shared_config import EvaluationFields, check_evaluation_fields
from nsr_hf.stage_clock import timed
from nsr_hf.utils import file_sha256, recorded_command, unwrap, write_json

logger = logging.getLogger(__name__)

DEFAULT_METHODS = DEFAULT_BASELINES
DEFAULT_SPLITS = ("test", "test_ood")


# ----------------------------------------------------------------------------------------------------------
# The configuration


@dataclass
class EvaluateConfig(EvaluationFields):
    """Evaluate a trained predictor on a dataset's test splits, next to baselines and controls; write a report."""

    predictor: Optional[str] = field(default=None, metadata={
        "help": "The predictor: a folder written by nsr train (…/predictor) or a Hub id"})
    dataset: Optional[str] = field(default=None, metadata={
        "help": "The activation dataset (folder or Hub id); default: the one named in the predictor's config"})
    neurons: Optional[list[str]] = field(default=None, metadata={
        "help": "Evaluate the report of these neurons (layer.index) instead of the predictor's own: a reporter of any neuron "
                "(head_type conditioned) is pointed at them, e.g. neurons it never trained on; the dataset must hold them"})
    neuron_split: Optional[str] = field(default=None, metadata={
        "help": "A neuron_split.json (nsr any-neuron): the medians of each group of neurons (train, validation, held-out) are "
                "added; without --neurons, every neuron of the split is evaluated"})
    output_dir: str = field(default="outputs/evaluate", metadata={
        "help": "Where metrics.json, predictions.json, report.md and the PNGs go"})
    splits: list[str] = field(default_factory=lambda: list(DEFAULT_SPLITS), metadata={
        "help": "Splits to evaluate; those the dataset lacks are skipped"})
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS), metadata={
        "help": f"Baselines and controls ({', '.join(BASELINE_METHODS)}; registry nsr_hf.methods.METHODS; 'none': the predictor alone)"})
    base_model: Optional[str] = field(default=None, metadata={
        "help": "The original base model for the baselines (default: the predictor's base_model_name_or_path)"})
    base_unchanged: bool = field(default=False, metadata={
        "help": "The predictor's base weights are the original ones (head_only training): "
                "use them for the baselines instead of loading the original again"})
    confidence_level: float = field(default=0.95, metadata={"help": "Level of the confidence intervals"})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap, the random subset, the baselines and the causal test"})
    causal: bool = field(default=True, metadata={"help": "Run the causal test (set the neuron, watch the report)"})
    causal_num_values: int = field(default=9, metadata={"help": "Causal test: values the neuron is set to"})
    causal_max_rows: int = field(default=64, metadata={"help": "Causal test: rows of the test split used"})
    batch_size: int = field(default=16, metadata={"help": "Rows per forward pass"})
    shuffled_predictor: Optional[str] = field(default=None, metadata={
        "help": "A predictor trained the same way on shuffled labels: the predictor's own selectivity control"})
    training_log: Optional[str] = field(default=None, metadata={
        "help": "JSON with the Trainer's log_history (trainer_state.json or a list) for training_curves.png; "
                "default: next to the predictor"})
    drift_log: Optional[str] = field(default=None, metadata={
        "help": "drift.json of the drift monitor (nsr_hf.training.monitoring) for drift.png; "
                "default: next to the predictor, else the drift/ entries of the training log"})
    device: Optional[str] = field(default=None, metadata={"help": "Device of a predictor loaded here (default: cuda when available)"})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace a finished evaluation in output_dir (it is replaced only once the new one is written; without this it "
                "is refused)"})

    def __post_init__(self):
        self.splits = [str(s) for s in self.splits]
        if not self.splits:
            raise ValueError("splits is empty: name at least one split to evaluate, e.g. --splits test.")
        methods = [str(m) for m in self.methods]
        self.methods = [] if [m.lower() for m in methods] in ([], ["none"]) else methods
        unknown = [m for m in self.methods if m not in BASELINE_METHODS]
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}: choose from {', '.join(BASELINE_METHODS)} (or 'none').")
        check_evaluation_fields(self)
        if not 0 < self.confidence_level < 1:
            raise ValueError(f"confidence_level must be between 0 and 1 (e.g. 0.95), got {self.confidence_level}.")
        if self.counterfactual_source is not None:
            check_source(self.counterfactual_source)
        for name in ("batch_size", "causal_num_values", "causal_max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")


def _read_json(path) -> object:
    return json.loads(Path(path).read_text())


def read_training_log(path) -> list[dict]:
    """The Trainer's ``log_history`` from ``trainer_state.json``, a ``{"log_history": [...]}`` file or a plain list."""
    data = _read_json(path)
    history = data.get("log_history") if isinstance(data, dict) else data
    if not isinstance(history, list):
        raise ValueError(f"{path}: expected the Trainer's log_history (a list, or trainer_state.json with 'log_history').")  # noqa: TRY004
    return history


def _beside_predictor(config: EvaluateConfig, names: Sequence[str]) -> Path | None:
    """A file next to a local predictor folder (the train output directory holds it) or inside it."""
    if not config.predictor or not Path(config.predictor).is_dir():
        return None
    folder = Path(config.predictor)
    for where in (folder.parent, folder):
        for name in names:
            if (where / name).is_file():
                return where / name
    return None


def _original_base(config: EvaluateConfig, inner, base_model, tokenizer, wrapped: bool):
    """The frozen original base model the baselines read (see ``EvaluateConfig.base_model`` / ``base_unchanged``)."""

    if base_model is not None:
        return base_model, tokenizer or inner.tokenizer
    if config.base_unchanged:
        if wrapped:
            raise ValueError("base_unchanged is set but the predictor is a PEFT (LoRA) model: its base is changed by the adapter.")
        return inner.base, inner.tokenizer
    name = config.base_model or inner.config.base_model_name_or_path
    if not name:
        raise ValueError("The predictor does not record its base model (base_model_name_or_path): pass --base_model NAME_OR_FOLDER "
                         "(the original model the baselines must read), or --base_unchanged true if its base was never trained.")
    device = next(inner.parameters()).device
    try:
        return load_model_and_tokenizer(name, device=device)
    except (OSError, ValueError) as err:
        raise ValueError(f"Could not load the original base model {name!r} for the baselines ({err}). Pass --base_model with a "
                         "folder or Hub id of it, --base_unchanged true when the predictor's base was never trained, "
                         "or --methods none.") from err


def _dataset_columns(neurons: Sequence[str], metadata: dict | None, width: int) -> list[int]:
    """Column of each predictor neuron in the dataset's ``activations``."""
    names = list((metadata or {}).get("neurons") or [])
    if not names:
        if width != len(neurons):
            raise ValueError(f"The dataset has {width} activation column(s) and no neuron names; the predictor reports {len(neurons)}: "
                             "pass the dataset's metadata (load_activation_dataset returns it).")
        return list(range(len(neurons)))
    missing = [n for n in neurons if n not in names]
    if missing:
        raise ValueError(f"The dataset labels neuron(s) {names}, not the predictor's {missing}: "
                         "evaluate on the dataset the predictor was trained for.")
    return [names.index(n) for n in neurons]


# ----------------------------------------------------------------------------------------------------------
# The run


def _load_predictor(config: EvaluateConfig, predictor):
    import torch

    if predictor is not None:
        return predictor
    if not config.predictor:
        raise ValueError("No predictor: pass --predictor (a folder written by nsr train, e.g. outputs/train/predictor, or a Hub id).")
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_predictor(config.predictor, device=device)


def _retargeted(predictor, inner, neurons: Sequence[str], metadata: dict | None):
    """``inner`` pointed at ``neurons`` (``ActivationPredictor.retarget``), their train statistics from the dataset's metadata
    (for the loss only: the report of a conditioned head never reads them)."""
    if predictor is not inner:
        raise ValueError("neurons: a PEFT-wrapped predictor cannot be pointed at other neurons here; merge it first "
                         "(save_predictor with merge=True).")
    transform = (metadata or {}).get("transform") or {}
    columns = column_indices(metadata or {"neurons": []}, neurons)
    stats = {k: [transform[k][i] for i in columns] for k in ("mean", "std")} if all(k in transform for k in ("mean", "std")) else None
    return inner.retarget(neurons, stats)


def _load_dataset(config: EvaluateConfig, inner, dataset, metadata):
    if dataset is not None:
        return dataset, metadata
    source = config.dataset or inner.config.dataset_name
    if not source:
        raise ValueError("No dataset: pass --dataset (the activation dataset folder or Hub id the predictor was trained for).")
    return load_activation_dataset(source)


def _evaluated_splits(config: EvaluateConfig, dataset) -> list[str]:
    splits = [s for s in config.splits if s in dataset and len(dataset[s])]
    skipped = [s for s in config.splits if s not in splits]
    if skipped:
        logger.info("Splits not in the dataset (or empty), skipped: %s", skipped)
    if not splits:
        raise ValueError(f"None of the splits {config.splits} has rows in the dataset (it has {list(dataset)}): choose with --splits.")
    return splits


def _shuffled_predictions(config: EvaluateConfig, predictor, dataset, splits, neurons) -> dict | None:
    """The expected values of the shuffled-label predictor (``config.shuffled_predictor``) by split, or None."""
    if not config.shuffled_predictor:
        return None
    shuffled_model = load_predictor(config.shuffled_predictor, device=next(predictor.parameters()).device)
    if list(unwrap(shuffled_model).config.neurons) != neurons:
        raise ValueError(f"The shuffled-label predictor reports {unwrap(shuffled_model).config.neurons}, not {neurons}.")
    return {s: predict_split(shuffled_model, dataset[s], config.batch_size)[0] for s in splits}


class OriginalModel:
    """The original base model and its tokenizer (``_original_base``), loaded on the first ``get`` and shared by the
    baselines and the faithfulness section's reader of the original model."""

    def __init__(self, config: EvaluateConfig, predictor, inner, base_model, tokenizer):
        self.config, self.inner, self.given, self.tokenizer = config, inner, base_model, tokenizer
        self.wrapped = inner is not predictor
        self.pair: tuple | None = None

    def get(self) -> tuple:
        if self.pair is None:
            self.pair = _original_base(self.config, self.inner, self.given, self.tokenizer, wrapped=self.wrapped)
        return self.pair

    def for_faithfulness(self):
        """The original model for the honest reader of its representation, or None: when the predictor's base is the
        original (``base_unchanged``), or when it cannot be loaded (a warning says why; every other figure is kept)."""
        if self.config.base_unchanged and self.given is None:
            return None
        try:
            return self.get()[0]
        except ValueError as err:
            logger.warning("The faithfulness section has no reader of the original model: %s", err)
            return None


def _baselines_by_neuron(config: EvaluateConfig, inner, dataset, splits, columns, original: OriginalModel,
                         stages: FinishedStages, feature_cache: dict | None = None) -> dict:
    """``run_baselines`` for every neuron column, on the original base model, with one feature pass for all; each neuron's
    baselines are a stage that a resumed evaluation reads back (the original model is then loaded only if one is missing)."""
    if not config.methods:
        return {}
    read_layer = inner.config.effective_read_layer
    cache: dict = {} if feature_cache is None else feature_cache

    def baselines_of(column: int) -> dict:
        model, tokenizer = original.get()
        return run_baselines(model, tokenizer, {name: dataset[name] for name in dataset}, read_layer=read_layer,
                             neuron_column=column, eval_splits=tuple(splits), methods=tuple(config.methods),
                             cross_models=tuple(config.cross_models), seed=config.seed, batch_size=config.batch_size,
                             feature_cache=cache, probe_layers=config.probe_layers,
                             dtype=config.baseline_dtype)

    return {neuron: stages.get(f"baselines-{j}", lambda column=columns[j]: baselines_of(column))
            for j, neuron in enumerate(inner.config.neurons)}


def _methods_on_split(split: str, j: int, true: np.ndarray, expected, shuffled, baselines: dict) -> dict[str, np.ndarray]:
    """Every method's predictions of neuron ``j`` on ``split``: self, self_shuffled and the baselines, on the same rows."""
    methods = {"self": expected[:, j]}
    if shuffled is not None:
        methods["self_shuffled"] = shuffled[split][:, j]
    for method, by_split in (baselines or {}).get("predictions", {}).items():
        if split in by_split:
            values = np.asarray(by_split[split], dtype=np.float64).reshape(-1)
            if values.size != true.size:
                raise ValueError(f"Baseline {method!r} returned {values.size} predictions for the {true.size} rows of {split!r}: "
                                 "every method must be scored on the same rows.")
            methods[method] = values
    return methods


def _causal_result(config: EvaluateConfig, predictor, rows, neuron: str, split: str, prefix=None) -> dict:
    try:
        result = causal_test(predictor, rows, neuron=neuron, num_values=config.causal_num_values, max_rows=config.causal_max_rows,
                             seed=config.seed, batch_size=config.batch_size, per_row=config.counterfactual_rows > 0, prefix=prefix)
    except ValueError as err:  # e.g. the neuron does not vary over these rows: say so, keep every other figure
        logger.warning("Causal test of %s skipped: %s", neuron, err)
        result = {"neuron": neuron, "skipped": str(err)}
    result["split"] = split
    return result


def _neuron_result(config: EvaluateConfig, predictor, inner, dataset, splits, j: int, column: int, preds, shuffled,
                   baselines, compare=None, train_prefix=None, natural_prefix=None,
                   original: OriginalModel | None = None) -> tuple[dict, dict]:
    """``(result, predictions)`` of neuron ``j``: its figures, comparisons, selectivity, spread and causal test by split,
    and every method's predictions by split (``predictions.json``)."""
    neuron = inner.config.neurons[j]
    level, seed, n_boot = config.confidence_level, config.seed, config.n_bootstrap
    transform = inner.config.label_transform or {}
    edges = transform["bin_edges"][j] if transform.get("bin_edges") else None
    train_std = (transform.get("std") or [None] * len(inner.config.neurons))[j]
    result = {"metrics": {}, "comparisons": {}, "selectivity": {}, "spread": {}}
    predictions = {}
    for s in splits:
        true = targets_of(dataset[s])[:, column]
        expected, greedy = preds[s]
        methods = _methods_on_split(s, j, true, expected, shuffled, baselines)
        metrics = {}
        for method, values in methods.items():
            with quiet_if(method == "mean"):  # constant by construction: its r = 0 needs no warning
                metrics[method] = evaluate_predictions(values, true,
                                                       greedy=greedy[:, j] if (method == "self" and greedy is not None) else None,
                                                       bin_edges=edges, n_bootstrap=n_boot, seed=seed, level=level)
        result["metrics"][s] = metrics
        result["spread"][s] = split_spread(true, train_std, s)
        if result["spread"][s]["warning"]:
            logger.warning("%s: %s", neuron, result["spread"][s]["warning"])
        result["comparisons"][s] = compare_methods(methods, true, n_bootstrap=n_boot, seed=seed, level=level)
        result["selectivity"][s] = selectivity(methods, true, n_bootstrap=n_boot, seed=seed, level=level)
        predictions[s] = {"true": true, **methods, **({"self_greedy": greedy[:, j]} if greedy is not None else {})}
    info = baselines or {}
    result["probe_by_layer"] = info.get("probe_by_layer") or {}
    result["baselines_info"] = info.get("info") or {}
    with timed("causal test"):
        result["causal"] = (_causal_result(config, predictor, dataset[splits[0]], neuron, splits[0], train_prefix)
                            if config.causal else None)
    per_row = (result["causal"] or {}).pop("per_row", None)
    if config.counterfactual_rows:
        causal = {splits[0]: {"per_row": per_row}} if per_row else None
        with timed("faithfulness"):
            result["faithfulness"] = _faithfulness_result(config, predictor, dataset, splits, neuron, column, causal, compare,
                                                          train_prefix, natural_prefix,
                                                          original.for_faithfulness() if original is not None else None)
        # the counterfactual rows' values go to predictions.json (under "counterfactual"), not into metrics.json
        predictions["counterfactual"] = {s: section.pop("predictions") for s, section in result["faithfulness"].items()
                                         if isinstance(section, dict) and "predictions" in section}
    return result, predictions


def _faithfulness_result(config: EvaluateConfig, predictor, dataset, splits, neuron: str, column: int, causal, compare,
                         train_prefix=None, natural_prefix=None, original=None) -> dict:
    """The faithfulness section by split, or ``{"skipped": why}`` when it cannot run (no train split, a neuron that never varies)."""
    if "train" not in dataset or len(dataset["train"]) < 2:
        return {"skipped": "the dataset has no train split to fit the counterfactual values and the probes on"}
    compare = compare() if compare is not None else None  # the compare_predictor's loader: loaded here, its errors raised
    try:
        return faithfulness_section(predictor, {s: dataset[s] for s in splits}, dataset["train"], neuron=neuron, column=column,
                                    max_rows=config.counterfactual_rows, source=config.counterfactual_source, seed=config.seed,
                                    batch_size=config.batch_size, n_bootstrap=config.n_bootstrap, level=config.confidence_level,
                                    causal=causal, compare=compare, train_prefix=train_prefix, natural_prefix=natural_prefix,
                                    original=original)
    except ValueError as err:  # e.g. the neuron does not vary on train: say so, keep every other figure
        logger.warning("Faithfulness of %s skipped: %s", neuron, err)
        return {"skipped": str(err)}


def _training_logs(config: EvaluateConfig, log_history, drift) -> tuple[list | None, object]:
    """The Trainer's log history and the drift record: as given, else read from next to the predictor."""
    if log_history is None:
        path = config.training_log or _beside_predictor(config, ("log_history.json", "trainer_state.json"))
        log_history = read_training_log(path) if path else None
    if drift is None:
        path = config.drift_log or _beside_predictor(config, ("drift.json",))
        drift = _read_json(path) if path else None
    return log_history, drift


def group_medians(per_neuron: dict, split: NeuronSplit, evaluated: str = "test") -> dict:
    """Per group of neurons (``NeuronSplit``) evaluated here: how many, and the medians of the report's natural R², its slope
    ratio and the ridge probe's R² on split ``evaluated``."""
    out = {}
    for group, members in split.groups().items():
        rows = [per_neuron[n] for n in members if n in per_neuron]
        if not rows:
            continue

        def figure(row, *path):
            for key in path:
                row = row.get(key) if isinstance(row, dict) else None
            return row

        out[group] = {"neurons": len(rows),
                      "natural_r2": finite_median(figure(r, "metrics", evaluated, "self", "r2") for r in rows),
                      "slope_ratio": finite_median(figure(r, "faithfulness", evaluated, "slope_ratio", "ratio") for r in rows),
                      "ridge_probe_r2": finite_median(figure(r, "metrics", evaluated, "ridge_probe", "r2") for r in rows)}
    return out


def _evaluation(config: EvaluateConfig, inner, dataset, splits, per_neuron: dict, drift_summary) -> dict:
    """The content of ``metrics.json``: what was evaluated, how, the headline neuron's figures and every neuron's."""
    neurons = list(inner.config.neurons)
    headline = neurons[0]
    predictor = {"path": config.predictor, "head_type": inner.config.head_type, "read_layer": inner.config.effective_read_layer,
                 "base_model": inner.config.base_model_name_or_path, "dataset": config.dataset or inner.config.dataset_name}
    if inner.head.has_bins:
        predictor.update(num_bins=inner.config.num_bins, bin_strategy=(inner.config.label_transform or {}).get("bin_strategy"))
    evaluation = {
        "kind": EVALUATION_KIND,
        "neurons": neurons,
        "neuron": headline,
        "splits": splits,
        "rows": {s: len(dataset[s]) for s in splits},
        "predictor": predictor,
        "bootstrap": {"n": config.n_bootstrap, "level": config.confidence_level, "seed": config.seed,
                      "method": "percentile, rows resampled with replacement; comparisons paired"},
        "subsets": {"top_decile": "the ceil(n/10) rows with the largest true values",
                    "random_sample": "a seeded uniform sample of as many rows as the top decile"},
        **per_neuron[headline],
        "by_neuron": per_neuron,
        "drift": drift_summary,
        # where the evaluation is written is not part of what it measured: overwrite stays out of metrics.json
        "config": {k: v for k, v in asdict(config).items() if k != "overwrite"},
        "command": recorded_command(),
    }
    if len(neurons) > 1:
        evaluation["note"] = f"The top-level figures are those of the first neuron ({headline}); by_neuron holds every neuron's."
    if config.neuron_split:
        evaluation["groups"] = group_medians(per_neuron, NeuronSplit.read(config.neuron_split), "test" if "test" in splits else splits[0])
    return evaluation


def run_evaluate(config: EvaluateConfig, *, predictor=None, dataset=None, metadata=None, base_model=None, tokenizer=None,
                 log_history=None, drift=None, resumable: bool | None = None, feature_cache: dict | None = None,
                 train_prefix=None, predictions: dict | None = None, natural_prefix=None) -> dict:
    """``nsr evaluate``: every figure of the module docstring for the predictor, the baselines and the controls;
    writes ``metrics.json``, ``predictions.json`` and the report into ``config.output_dir`` and returns the
    evaluation (the content of ``metrics.json``).

    Anything already in memory can be passed instead of being loaded: ``predictor`` (an ``ActivationPredictor``,
    or a PEFT-wrapped one), ``dataset`` and ``metadata`` (as ``load_activation_dataset`` returns them),
    ``base_model`` / ``tokenizer`` (the *original* base model for the baselines), ``log_history`` (the Trainer's)
    and ``drift`` (the drift monitor's history, or its ``drift.json`` content). ``feature_cache``: the baselines'
    features already computed for ``base_model`` (``nsr_hf.evaluation.baselines.self_features``; ``nsr train`` passes
    those of the head's probe initialisation). ``train_prefix``: a ``PrefixCache`` of the train rows (and any others) at the
    target's block, computed by blocks that the predictor still has unchanged (``nsr train`` passes the one of its dataset's
    or head's probe pass when training kept those blocks frozen): the honest reader's features, the causal test and the
    counterfactual rows run from it where it holds their rows. ``predictions``: ``{split:
    (expected, greedy)}`` as ``predict_split`` gives them for ``predictor``, already computed (``nsr train``'s validation and
    test loss passes); a split not in it is predicted here. ``natural_prefix``: the train rows' natural states at a block
    above the target's, from blocks the predictor has unchanged (training's own frozen-prefix cache): the honest reader's
    natural features run from there.

    The baselines must read the original model. By default it is loaded again from the predictor's
    ``base_model_name_or_path`` (or ``config.base_model``): a trained base (last_k, after_target, full, lora,
    gradual) is not the original. With ``config.base_unchanged`` (head_only training, which never changes the
    base: the train stage measures that drift is zero) the predictor's own base is used and nothing is reloaded.

    ``resumable``: whether finished stages are kept for a rerun. By default only when nothing is passed in memory (what this
    run loads itself has an identity a rerun can check; a predictor in memory may have been trained again). ``True``: the
    caller vouches that what it passes is what ``config.predictor`` and ``config.dataset`` hold on disk (``nsr train``
    evaluates the predictor it has just saved there).
    """
    refuse_to_replace_evaluation(config)
    if resumable is None:
        resumable = all(given is None for given in (predictor, dataset, metadata, base_model, tokenizer))
    predictor = _load_predictor(config, predictor)
    inner = unwrap(predictor)
    dataset, metadata = _load_dataset(config, inner, dataset, metadata)
    groups = NeuronSplit.read(config.neuron_split) if config.neuron_split else None
    wanted = config.neurons or ([n for members in groups.groups().values() for n in members] if groups else None)
    if wanted:
        predictor = inner = _retargeted(predictor, inner, wanted, metadata)
    neurons = list(inner.config.neurons)
    splits = _evaluated_splits(config, dataset)
    columns = _dataset_columns(neurons, metadata, targets_of(dataset[splits[0]].select(range(1))).shape[1])
    compare = _compare_predictor(config, predictor, neurons)  # checked before any stage: a wrong one fails before the work

    # every method predicts the same rows
    # each stage is kept beside output_dir once done: an interrupted `nsr evaluate`, rerun, continues from them
    stages = FinishedStages(config.output_dir, _resume_key(config, dataset) if resumable else None)
    with timed("predictions"):
        given = predictions or {}
        preds = stages.get("predictions", lambda: {s: given[s] if s in given else predict_split(predictor, dataset[s], config.batch_size)
                                                   for s in splits})
    with timed("shuffled-label predictor"):
        shuffled = stages.get("shuffled", lambda: _shuffled_predictions(config, predictor, dataset, splits, neurons))
    with timed("baselines"):
        original = OriginalModel(config, predictor, inner, base_model, tokenizer)
        baselines = _baselines_by_neuron(config, inner, dataset, splits, columns, original, stages, feature_cache)
    per_neuron, all_predictions = {}, {}
    for j, neuron in enumerate(neurons):
        per_neuron[neuron], all_predictions[neuron] = stages.get(
            f"neuron-{j}", lambda j=j, neuron=neuron: _neuron_result(config, predictor, inner, dataset, splits, j, columns[j], preds,
                                                                     shuffled, baselines.get(neuron), compare, train_prefix,
                                                                     natural_prefix, original))
    if stages.resumed:
        logger.warning("Resumed the interrupted evaluation: read back its finished stages %s from %s", stages.resumed, stages.folder)

    log_history, drift = _training_logs(config, log_history, drift)
    history, drift_summary = drift_history(drift, log_history)
    evaluation = _evaluation(config, inner, dataset, splits, per_neuron, drift_summary)
    doc_ids = {s: list(dataset[s]["doc_id"]) if "doc_id" in dataset[s].column_names else None for s in splits}
    counterfactual = {n: p.pop("counterfactual") for n, p in all_predictions.items() if "counterfactual" in p}
    with timed("token examples"):
        examples = _token_examples(inner, dataset[splits[0]], neurons, columns, splits[0], base_model, tokenizer)
    with written_atomically(config.output_dir) as out:  # the folder appears whole, and replaces an old one only then
        write_json(out / "metrics.json", evaluation)
        write_json(out / EXAMPLES_FILE, examples, indent=None)
        write_json(out / "predictions.json", {"doc_id": doc_ids, "by_neuron": all_predictions,
                                              **({"counterfactual": counterfactual} if counterfactual else {})}, indent=None)
        with timed("report"):
            write_report(evaluation, out, predictions=all_predictions[neurons[0]], log_history=log_history,
                         drift=history or drift_summary, counterfactual=counterfactual.get(neurons[0]))
    stages.clear()
    print(f"evaluation of {', '.join(neurons)} written to {Path(config.output_dir)}/ (metrics.json, report.md)", flush=True)
    return evaluation


def _token_examples(inner, rows, neurons: list[str], columns: list[int], split: str, base_model, tokenizer) -> dict:
    """``examples.json`` (``nsr_hf.evaluation.token_examples``): each neuron at every token of a few rows, read in the original
    model when it is in memory, else in the predictor's base. A failure here costs only the dashboard's highlighting."""
    model = base_model if base_model is not None else inner.base
    source = ("the original model" if base_model is not None else
              "the predictor's base model: the original one unless its training moved the neuron (the drift panel says by how much)")
    try:
        return token_examples(model, tokenizer or inner.tokenizer, rows, neurons, columns, split=split, source=source)
    except Exception as err:  # noqa: BLE001 (the examples are a view of the run: the evaluation itself must not fail for them)
        logger.warning("Per-token examples not written (%s: %s); the dashboard shows none.", type(err).__name__, err)
        return {"split": split, "neurons": list(neurons), "by_neuron": {},
                "skipped": f"reading them failed: {type(err).__name__}: {err}"}


def _resume_key(config: EvaluateConfig, dataset) -> str | None:
    """What decides every stage of an evaluation: its options (where it is written aside), the files (names and contents'
    hashes; cards aside) of every model folder it reads and the dataset's fingerprints; ``None`` (no resuming) for a
    predictor that is not a local folder. Contents, not modification times: a resumed ``nsr train`` saves the same
    predictor again before it evaluates."""
    if not config.predictor or not Path(config.predictor).is_dir():
        return None
    folders = [Path(name) for name in (config.predictor, config.shuffled_predictor, config.compare_predictor, config.base_model)
               if name and Path(name).is_dir()]
    files = [sorted((str(p.relative_to(folder)), file_sha256(p)) for p in folder.rglob("*") if p.is_file() and p.name != "README.md")
             for folder in folders]
    fingerprints = {name: getattr(dataset[name], "_fingerprint", None) for name in dataset}
    options = {k: v for k, v in asdict(config).items() if k != "overwrite"}
    return hashlib.sha256(json.dumps([options, files, fingerprints], sort_keys=True, default=str).encode()).hexdigest()


def _compare_predictor(config: EvaluateConfig, predictor, neurons):
    """``config.compare_predictor`` as a loader, when the faithfulness section runs: its neurons are checked now where its
    folder says them (a wrong one fails before the evaluation works), and the model is loaded on the predictor's device
    when the section first needs it (not while the other stages hold the original model, nor when it is read back)."""
    if not config.compare_predictor or not config.counterfactual_rows:
        return None
    check_compare_neurons(config.compare_predictor, saved_neurons(config.compare_predictor), neurons)

    @functools.cache
    def load():
        compare = load_predictor(config.compare_predictor, device=next(predictor.parameters()).device)
        check_compare_neurons(config.compare_predictor, unwrap(compare).config.neurons, neurons)
        return compare

    return load


def holds_evaluation(folder) -> bool:
    """Whether ``folder`` holds a finished evaluation: a ``metrics.json`` of this protocol (``kind``), which ``run_evaluate``
    writes into a folder that appears whole. A train run's own ``metrics.json`` is not one."""
    path = Path(folder) / "metrics.json"
    try:
        return is_evaluation(json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError):  # missing, unreadable or not a JSON object: not an evaluation
        return False


def refuse_to_replace_evaluation(config: EvaluateConfig) -> None:
    """Refuse an ``output_dir`` that holds a finished evaluation (unless ``overwrite``) or files that are not an evaluation
    (always): checked before the predictor is loaded."""
    out = Path(config.output_dir)
    restore_interrupted_swap(out)
    refuse_finished(out, "an evaluation", finished=holds_evaluation(out), overwrite=config.overwrite, fix="pass --overwrite")
