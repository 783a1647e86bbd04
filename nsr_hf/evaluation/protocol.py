"""The evaluation protocol: how well a trained predictor reports its neuron, next to baselines and controls.

    from nsr_hf.evaluation.protocol import EvaluateConfig, run_evaluate
    evaluation = run_evaluate(EvaluateConfig(predictor="outputs/train/predictor", output_dir="outputs/eval"))
    evaluation["metrics"]["test"]["self"]["r2"], evaluation["metrics"]["test"]["self"]["r2_ci"]

``nsr evaluate --predictor DIR --dataset DIR_OR_HUB_ID --output_dir DIR`` does the same from the command line.

What is measured, on every evaluated split (``test``, and ``test_ood`` when the dataset has it), for the
predictor (method ``"self"``) and for every baseline and control of ``nsr_hf.evaluation.baselines.run_baselines`` on exactly
the same rows:

* Regression figures in activation units (``nsr_hf.training.trainer.regression_metrics``): Pearson r, Spearman rho, R^2,
  MSE, MAE and calibration (slope and intercept of true on predicted). A high r with a negative R^2 is a failure
  (PITFALLS 9). Percentile-bootstrap 95% confidence intervals for R^2 and r (``r2_ci``, ``pearson_ci``).
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

Outputs in ``output_dir``: ``metrics.json`` (everything above), ``predictions.json`` (per split and neuron: the
true values and every method's predictions, in row order, with the ``doc_id`` of each row), and the report of
``nsr_hf.evaluation.report.write_report`` (``report.md`` and its PNGs).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from nsr_hf.data.generator import load_activation_dataset
from nsr_hf.evaluation.baselines import run_baselines
from nsr_hf.evaluation.causal import causal_test
from nsr_hf.evaluation.report import drift_history, write_report
from nsr_hf.metrics import bin_metrics, bins_of, regression_metrics
from nsr_hf.modeling.predictor import load_predictor
from nsr_hf.models import load_model_and_tokenizer
from nsr_hf.shared_config import EvaluationFields
from nsr_hf.training.collator import PredictorDataCollator
from nsr_hf.utils import to_jsonable, unwrap

logger = logging.getLogger(__name__)

EVALUATION_KIND = "nsr_hf.evaluation.protocol"
DEFAULT_METHODS = ("mean", "token_lookup", "ridge_probe", "probe_by_layer", "random_init", "shuffled_labels", "cross")
DEFAULT_SPLITS = ("test", "test_ood")
SUBSETS = ("top_decile", "random_sample")

Metric = Union[str, Callable[[np.ndarray, np.ndarray], float]]


# ----------------------------------------------------------------------------------------------------------
# The bootstrap


def _rank_rows(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=1)


def _pearson_rows(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair; 0 where either side is constant (the rule of ``regression_metrics``)."""
    pc, tc = p - p.mean(1, keepdims=True), t - t.mean(1, keepdims=True)
    vp, vt = (pc**2).sum(1), (tc**2).sum(1)
    constant = (np.ptp(p, axis=1) == 0) | (np.ptp(t, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pc * tc).sum(1) / np.sqrt(vp * vt)
    return np.where(constant, 0.0, np.clip(r, -1.0, 1.0))


def _r2_rows(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """R^2 of each row pair; for constant targets 1.0 when every prediction is exact, else 0.0."""
    sse = ((p - t) ** 2).sum(1)
    sst = ((t - t.mean(1, keepdims=True)) ** 2).sum(1)
    constant = np.ptp(t, axis=1) == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1.0 - sse / sst
    return np.where(constant, np.where(sse == 0, 1.0, 0.0), r2)


VECTORISED_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "r2": _r2_rows,
    "pearson": _pearson_rows,
    "spearman": lambda p, t: _pearson_rows(_rank_rows(p), _rank_rows(t)),
    "mse": lambda p, t: ((p - t) ** 2).mean(1),
    "mae": lambda p, t: np.abs(p - t).mean(1),
}


def _metric_rows(metric: Metric) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A function of (resamples, rows) arrays -> (resamples,) values, for a metric name or a callable."""
    if isinstance(metric, str):
        if metric not in VECTORISED_METRICS:
            raise ValueError(f"Unknown metric {metric!r}: use one of {', '.join(VECTORISED_METRICS)} or pass a function (pred, true) -> float.")
        return VECTORISED_METRICS[metric]
    if not callable(metric):
        raise ValueError(f"metric must be a name ({', '.join(VECTORISED_METRICS)}) or a function (pred, true) -> float, got {metric!r}.")

    def rows(p, t):
        with warnings.catch_warnings():  # constant resamples would warn once per resample
            warnings.simplefilter("ignore")
            return np.array([float(metric(p[i], t[i])) for i in range(p.shape[0])])

    return rows


def _as_rows(*arrays) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays]
    n = out[0].size
    if n == 0:
        raise ValueError("No rows: a bootstrap needs at least one row.")
    if any(a.size != n for a in out):
        raise ValueError(f"Predictions and targets differ in length ({[a.size for a in out]}): they must be the same rows.")
    if not all(np.all(np.isfinite(a)) for a in out):
        raise ValueError("Predictions or targets hold NaN or infinite values: remove or fix those rows before evaluating.")
    return out


def _resampled(n_rows: int, n: int, seed: int):
    """Yield (resamples, n_rows) index blocks: ``n`` resamples in all, from one seeded generator, in chunks
    that keep memory bounded. The same (n_rows, n, seed) always gives the same rows."""
    if n < 1:
        raise ValueError(f"n (bootstrap resamples) must be at least 1, got {n}.")
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n_rows)
    done = 0
    while done < n:
        size = min(chunk, n - done)
        yield rng.integers(0, n_rows, size=(size, n_rows))
        done += size


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1 (e.g. 0.95), got {level}.")
    low, high = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high)


def bootstrap_ci(pred, true, metric: Metric = "r2", n: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile-bootstrap confidence interval of ``metric(pred, true)``, resampling rows with replacement.

    ``metric`` is a name (``r2``, ``pearson``, ``spearman``, ``mse``, ``mae``: computed for all resamples at once,
    with the constant-input rules of ``regression_metrics``) or a function ``(pred, true) -> float``.

    >>> bootstrap_ci(pred, true, "r2")   # {'estimate': 0.81, 'low': 0.74, 'high': 0.86, 'level': 0.95, ...}

    Returns ``estimate`` (on all rows), ``low``, ``high``, ``std`` (of the resampled values), ``level``, ``n_bootstrap``.
    """
    pred, true = _as_rows(pred, true)
    rows = _metric_rows(metric)
    estimate = float(rows(pred[None], true[None])[0])
    values = np.concatenate([rows(pred[idx], true[idx]) for idx in _resampled(pred.size, n, seed)])
    low, high = _interval(values, level)
    return {"estimate": estimate, "low": low, "high": high, "std": float(values.std()), "level": level, "n_bootstrap": n}


def paired_bootstrap_difference(pred_a, pred_b, true, metric: Metric = "r2", n: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Confidence interval of ``metric(pred_a, true) - metric(pred_b, true)``, both methods scored on the *same*
    resampled rows (a paired bootstrap: the row-to-row variation common to both cancels).

    Returns ``difference`` (on all rows), ``low``, ``high``, ``std``, ``fraction_le_zero`` (the share of resamples
    where the difference is <= 0: a one-sided bootstrap p-value for "a is better than b" when higher is better),
    ``level`` and ``n_bootstrap``. For error metrics (``mse``, ``mae``) lower is better: a negative difference
    favours ``a``.
    """
    pred_a, pred_b, true = _as_rows(pred_a, pred_b, true)
    rows = _metric_rows(metric)
    difference = float(rows(pred_a[None], true[None])[0] - rows(pred_b[None], true[None])[0])
    values = np.concatenate([rows(pred_a[idx], true[idx]) - rows(pred_b[idx], true[idx]) for idx in _resampled(true.size, n, seed)])
    low, high = _interval(values, level)
    return {"difference": difference, "low": low, "high": high, "std": float(values.std()),
            "fraction_le_zero": float(np.mean(values <= 0)), "level": level, "n_bootstrap": n}


# ----------------------------------------------------------------------------------------------------------
# The figures of one method


def subset_indices(true, seed: int = 0, random_sample_size: Optional[int] = None) -> dict[str, np.ndarray]:
    """Row indices of the two subsets: ``top_decile`` (the ceil(n/10) rows with the largest true values, ties
    broken by row order) and ``random_sample`` (a seeded sample without replacement of ``random_sample_size``
    rows, by default as many as the top decile)."""
    true = np.asarray(true, dtype=np.float64).reshape(-1)
    k = max(1, math.ceil(true.size / 10))
    top = np.sort(np.argsort(-true, kind="stable")[:k])
    size = k if random_sample_size is None else int(random_sample_size)
    if not 1 <= size <= true.size:
        raise ValueError(f"random_sample_size must be between 1 and the number of rows ({true.size}), got {random_sample_size}.")
    sample = np.sort(np.random.default_rng(seed).choice(true.size, size=size, replace=False))
    return {"top_decile": top, "random_sample": sample}


def majority_class_rate(true_bins) -> float:
    """Share of rows whose bin is the most frequent bin among these rows (the best constant guess, in hindsight)."""
    true_bins = np.asarray(true_bins).reshape(-1)
    return float(np.bincount(true_bins).max() / true_bins.size)


def _figures(pred, true, greedy, bin_edges, n_bootstrap: int, seed: int, level: float) -> dict:
    out = {"rows": int(true.size)}
    readouts = [("", pred)] + ([("greedy_", greedy)] if greedy is not None else [])
    true_bins = None
    if bin_edges is not None:
        edges = np.asarray(bin_edges, dtype=np.float64).reshape(-1)
        true_bins = bins_of(true, edges)
        out["majority_class_rate"] = majority_class_rate(true_bins)
    for prefix, values in readouts:
        out.update({prefix + k: v for k, v in regression_metrics(values, true).items()})
        if n_bootstrap:
            for name in ("r2", "pearson"):
                ci = bootstrap_ci(values, true, name, n=n_bootstrap, seed=seed, level=level)
                out[f"{prefix}{name}_ci"] = [ci["low"], ci["high"]]
        if true_bins is not None:
            out.update({prefix + k: v for k, v in bin_metrics(bins_of(values, edges), true_bins, len(edges) - 1).items()})
    return out


def evaluate_predictions(pred, true, *, greedy=None, bin_edges=None, n_bootstrap: int = 1000, seed: int = 0,
                         random_sample_size: Optional[int] = None, level: float = 0.95) -> dict:
    """Every figure of one method for one neuron on one split (see the module docstring).

    Args:
        pred: expected-value predictions, (rows,), activation units.
        true: the neuron's values, (rows,).
        greedy: the greedy readout of a bin or token head, (rows,); its figures get a ``greedy_`` prefix.
        bin_edges: the neuron's train-fitted bin edges (num_bins + 1): adds accuracy, balanced accuracy, qwk
            and ``majority_class_rate``.
        n_bootstrap: resamples for the ``r2_ci`` and ``pearson_ci`` intervals (0: none).
        random_sample_size: size of the ``random_sample`` subset (default: the size of the top decile).

    >>> evaluate_predictions([0.1, 0.4, 0.9], [0.0, 0.5, 1.0])["r2"]

    Constant predictions or targets give defined values with a ``RuntimeWarning`` (never NaN).
    """
    arrays = [pred, true] + ([greedy] if greedy is not None else [])
    arrays = _as_rows(*arrays)
    pred, true = arrays[0], arrays[1]
    greedy = arrays[2] if greedy is not None else None
    out = _figures(pred, true, greedy, bin_edges, n_bootstrap, seed, level)
    out["subsets"] = {}
    for name, idx in subset_indices(true, seed, random_sample_size).items():
        if idx.size < 2:
            out["subsets"][name] = {"rows": int(idx.size), "note": f"too few rows ({idx.size}) for figures on a subset"}
            continue
        sub = _figures(pred[idx], true[idx], None if greedy is None else greedy[idx], bin_edges, n_bootstrap, seed, level)
        sub["true_min"], sub["true_max"] = float(true[idx].min()), float(true[idx].max())
        out["subsets"][name] = sub
    return out


# ----------------------------------------------------------------------------------------------------------
# Predictions of a trained predictor


LOW_SPREAD_RATIO = 0.5


def split_spread(true, train_std: Optional[float], split: str) -> dict:
    """How much the neuron varies on ``split`` next to the training split. R² divides by the split's own variance: on a
    split where a sparse neuron happens not to fire (std well below train's) small errors give a large negative R²,
    which says more about the split than about the reader. Below ``LOW_SPREAD_RATIO`` the entry carries a ``warning``."""
    true = np.asarray(true, dtype=np.float64).reshape(-1)
    std = float(true.std()) if true.size else float("nan")
    out = {"std": std, "train_std": None if train_std is None else float(train_std), "ratio": None, "warning": None}
    if train_std and math.isfinite(std):
        out["ratio"] = std / float(train_std)
        if out["ratio"] < LOW_SPREAD_RATIO:
            out["warning"] = (f"On {split} the neuron's std is {std:.3g}, {out['ratio']:.2f} of its training std ({float(train_std):.3g}): "
                              f"R² divides by this split's small variance, so read MSE and MAE (in activation units) next to it.")
    return out


def predict_split(predictor, rows, batch_size: int = 32) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``(expected, greedy)`` of ``predictor`` on the rows of an activation dataset split, each (rows, K) float64 in
    activation units, read at each row's ``label_position`` (the labelled token); ``greedy`` is None for the
    regression head. The predictor is run in eval mode without gradients (its mode is restored after)."""
    import torch

    if len(rows) == 0:
        raise ValueError("predict_split got no rows.")
    inner = unwrap(predictor)
    collate = PredictorDataCollator(inner.tokenizer, pad_token_id=None if inner.tokenizer is not None else getattr(inner.base.config, "pad_token_id", None))
    device = next(predictor.parameters()).device
    was_training = predictor.training
    predictor.eval()
    expected, greedy = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
                out = predictor(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                                label_positions=batch["label_positions"].to(device))
                expected.append(out.predictions.float().cpu().numpy())
                if out.greedy_predictions is not None:
                    greedy.append(out.greedy_predictions.float().cpu().numpy())
    finally:
        predictor.train(was_training)
    expected = np.concatenate(expected).astype(np.float64)
    return expected, (np.concatenate(greedy).astype(np.float64) if greedy else None)


def targets_of(rows) -> np.ndarray:
    """(rows, K) float64: the ``activations`` column of a split (the labels from the frozen original model)."""
    values = rows["activations"]
    return np.asarray([np.asarray(v, dtype=np.float64).reshape(-1) for v in values]).reshape(len(rows), -1)


# ----------------------------------------------------------------------------------------------------------
# The whole protocol


@dataclass
class EvaluateConfig(EvaluationFields):
    """Evaluate a trained predictor on a dataset's test splits, next to baselines and controls; write a report."""

    predictor: Optional[str] = field(default=None, metadata={"help": "The predictor: a folder written by nsr train (…/predictor) or a Hub id"})
    dataset: Optional[str] = field(default=None, metadata={"help": "The activation dataset (folder or Hub id); default: the one named in the predictor's config"})
    output_dir: str = field(default="outputs/evaluate", metadata={"help": "Where metrics.json, predictions.json, report.md and the PNGs go"})
    splits: list[str] = field(default_factory=lambda: list(DEFAULT_SPLITS), metadata={"help": "Splits to evaluate; those the dataset lacks are skipped"})
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS),
                               metadata={"help": "Baselines and controls of nsr_hf.evaluation.baselines ('none': the predictor alone)"})
    base_model: Optional[str] = field(default=None, metadata={"help": "The original base model for the baselines (default: the predictor's base_model_name_or_path)"})
    base_unchanged: bool = field(default=False, metadata={
        "help": "The predictor's base weights are the original ones (head_only training): use them for the baselines instead of loading the original again"})
    confidence_level: float = field(default=0.95, metadata={"help": "Level of the confidence intervals"})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstrap, the random subset, the baselines and the causal test"})
    causal: bool = field(default=True, metadata={"help": "Run the causal test (set the neuron, watch the report)"})
    causal_num_values: int = field(default=9, metadata={"help": "Causal test: values the neuron is set to"})
    causal_max_rows: int = field(default=64, metadata={"help": "Causal test: rows of the test split used"})
    batch_size: int = field(default=16, metadata={"help": "Rows per forward pass"})
    shuffled_predictor: Optional[str] = field(default=None, metadata={
        "help": "A predictor trained the same way on shuffled labels: the predictor's own selectivity control"})
    training_log: Optional[str] = field(default=None, metadata={
        "help": "JSON with the Trainer's log_history (trainer_state.json or a list) for training_curves.png; default: next to the predictor"})
    drift_log: Optional[str] = field(default=None, metadata={
        "help": "drift.json of the drift monitor (nsr_hf.training.monitoring) for drift.png; default: next to the predictor, else the drift/ entries of the training log"})
    device: Optional[str] = field(default=None, metadata={"help": "Device of a predictor loaded here (default: cuda when available)"})

    def __post_init__(self):
        self.splits = [str(s) for s in self.splits]
        if not self.splits:
            raise ValueError("splits is empty: name at least one split to evaluate, e.g. --splits test.")
        methods = [str(m) for m in self.methods]
        self.methods = [] if [m.lower() for m in methods] in ([], ["none"]) else methods
        unknown = [m for m in self.methods if m not in DEFAULT_METHODS]
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}: choose from {', '.join(DEFAULT_METHODS)} (or 'none').")
        if self.probe_layers not in ("all", "up_to_read"):
            raise ValueError(f"probe_layers must be 'all' or 'up_to_read', got {self.probe_layers!r}.")
        if self.n_bootstrap < 0:
            raise ValueError(f"n_bootstrap must be 0 (no intervals) or more, got {self.n_bootstrap}.")
        if not 0 < self.confidence_level < 1:
            raise ValueError(f"confidence_level must be between 0 and 1 (e.g. 0.95), got {self.confidence_level}.")
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
        raise ValueError(f"{path}: expected the Trainer's log_history (a list, or trainer_state.json with 'log_history').")
    return history


def _beside_predictor(config: EvaluateConfig, names: Sequence[str]) -> Optional[Path]:
    """A file next to a local predictor folder (the train output directory holds it) or inside it."""
    if not config.predictor or not Path(config.predictor).is_dir():
        return None
    folder = Path(config.predictor)
    for where in (folder.parent, folder):
        for name in names:
            if (where / name).is_file():
                return where / name
    return None


def _verdict(name: str, what: str, comparison: dict, level: float) -> str:
    d, low, high = comparison["difference"], comparison["low"], comparison["high"]
    figure = f"ΔR² = {d:.2f} [{low:.2f}, {high:.2f}] ({level:.0%} CI)"
    if low > 0:
        return f"self-report beats {what} ({name}): {figure}"
    if high < 0:
        return f"self-report is worse than {what} ({name}): {figure}"
    return f"self-report does not detectably differ from {what} ({name}): {figure}, the interval includes 0"


def compare_methods(predictions: dict, true, *, n_bootstrap: int, seed: int, level: float = 0.95) -> dict:
    """Paired-bootstrap R^2 differences of ``self`` against each ``cross:<model>`` and the ``ridge_probe``
    present in ``predictions`` ({method: (rows,)}), each with a plain-English verdict."""
    out = {}
    others = [m for m in predictions if m.startswith("cross:")] + (["ridge_probe"] if "ridge_probe" in predictions else [])
    if "self" not in predictions or not n_bootstrap:
        return out
    for other in others:
        comparison = paired_bootstrap_difference(predictions["self"], predictions[other], true, "r2", n=n_bootstrap, seed=seed, level=level)
        what = "cross-report" if other.startswith("cross:") else "a ridge probe of the same representation"
        name = other.split(":", 1)[1] if other.startswith("cross:") else "closed form, frozen base"
        comparison.update(metric="r2", a="self", b=other, verdict=_verdict(name, what, comparison, level))
        out[f"self_vs_{other}"] = comparison
    return out


def selectivity(predictions: dict, true, *, n_bootstrap: int, seed: int, level: float = 0.95) -> dict:
    """R^2(real) - R^2(shuffled-label control) on the same rows, with a paired-bootstrap interval:
    ``ridge_probe`` against ``shuffled_labels``; ``self`` against ``self_shuffled`` when present, else against
    ``shuffled_labels`` (``control`` names the one used)."""
    out = {}
    pairs = [("ridge_probe", "shuffled_labels"), ("self", "self_shuffled" if "self_shuffled" in predictions else "shuffled_labels")]
    for real, control in pairs:
        if real not in predictions or control not in predictions:
            continue
        if n_bootstrap:
            diff = paired_bootstrap_difference(predictions[real], predictions[control], true, "r2", n=n_bootstrap, seed=seed, level=level)
        else:
            r2 = VECTORISED_METRICS["r2"]
            t = np.asarray(true, dtype=np.float64)[None]
            diff = {"difference": float(r2(np.asarray(predictions[real])[None], t)[0] - r2(np.asarray(predictions[control])[None], t)[0])}
        out[real] = {"selectivity": diff.pop("difference"), "control": control, **diff}
    return out


@contextlib.contextmanager
def _quiet_if(quiet: bool):
    """Silence the constant-input warnings of ``regression_metrics`` (warning and log line) inside the block."""
    if not quiet:
        yield
        return
    trainer_logger = logging.getLogger("nsr_hf.training.trainer")
    level = trainer_logger.level
    trainer_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        trainer_logger.setLevel(level)


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
                         "folder or Hub id of it, --base_unchanged true when the predictor's base was never trained, or --methods none.") from err


def _dataset_columns(neurons: Sequence[str], metadata: Optional[dict], width: int) -> list[int]:
    """Column of each predictor neuron in the dataset's ``activations``."""
    names = list((metadata or {}).get("neurons") or [])
    if not names:
        if width != len(neurons):
            raise ValueError(f"The dataset has {width} activation column(s) and no neuron names; the predictor reports {len(neurons)}: "
                             "pass the dataset's metadata (load_activation_dataset returns it).")
        return list(range(len(neurons)))
    missing = [n for n in neurons if n not in names]
    if missing:
        raise ValueError(f"The dataset labels neuron(s) {names}, not the predictor's {missing}: evaluate on the dataset the predictor was trained for.")
    return [names.index(n) for n in neurons]


def run_evaluate(config: EvaluateConfig, *, predictor=None, dataset=None, metadata=None, base_model=None, tokenizer=None,
                 log_history=None, drift=None) -> dict:
    """``nsr evaluate``: every figure of the module docstring for the predictor, the baselines and the controls;
    writes ``metrics.json``, ``predictions.json`` and the report into ``config.output_dir`` and returns the
    evaluation (the content of ``metrics.json``).

    Anything already in memory can be passed instead of being loaded: ``predictor`` (an ``ActivationPredictor``,
    or a PEFT-wrapped one), ``dataset`` and ``metadata`` (as ``load_activation_dataset`` returns them),
    ``base_model`` / ``tokenizer`` (the *original* base model for the baselines), ``log_history`` (the Trainer's)
    and ``drift`` (the drift monitor's history, or its ``drift.json`` content).

    The baselines must read the original model. By default it is loaded again from the predictor's
    ``base_model_name_or_path`` (or ``config.base_model``): a trained base (last_k, after_target, full, lora,
    gradual) is not the original. With ``config.base_unchanged`` (head_only training, which never changes the
    base: the train stage measures that drift is zero) the predictor's own base is used and nothing is reloaded.
    """
    import torch

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if predictor is None:
        if not config.predictor:
            raise ValueError("No predictor: pass --predictor (a folder written by nsr train, e.g. outputs/train/predictor, or a Hub id).")
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        predictor = load_predictor(config.predictor, device=device)
    inner = unwrap(predictor)
    neurons = list(inner.config.neurons)
    if dataset is None:
        source = config.dataset or inner.config.dataset_name
        if not source:
            raise ValueError("No dataset: pass --dataset (the activation dataset folder or Hub id the predictor was trained for).")
        dataset, metadata = load_activation_dataset(source)
    splits = [s for s in config.splits if s in dataset and len(dataset[s])]
    skipped = [s for s in config.splits if s not in splits]
    if skipped:
        logger.info("Splits not in the dataset (or empty), skipped: %s", skipped)
    if not splits:
        raise ValueError(f"None of the splits {config.splits} has rows in the dataset (it has {list(dataset)}): choose with --splits.")
    first = targets_of(dataset[splits[0]].select(range(1)))
    columns = _dataset_columns(neurons, metadata, first.shape[1])
    level, seed, n_boot = config.confidence_level, config.seed, config.n_bootstrap
    edges_all = (inner.config.label_transform or {}).get("bin_edges")

    # -- predictions of every method, on the same rows --
    preds = {s: predict_split(predictor, dataset[s], config.batch_size) for s in splits}
    shuffled = None
    if config.shuffled_predictor:
        shuffled_model = load_predictor(config.shuffled_predictor, device=next(predictor.parameters()).device)
        if list(unwrap(shuffled_model).config.neurons) != neurons:
            raise ValueError(f"The shuffled-label predictor reports {unwrap(shuffled_model).config.neurons}, not {neurons}.")
        shuffled = {s: predict_split(shuffled_model, dataset[s], config.batch_size)[0] for s in splits}
        del shuffled_model
    baselines = {}
    if config.methods:
        original, original_tokenizer = _original_base(config, inner, base_model, tokenizer, wrapped=inner is not predictor)
        read_layer = inner.config.effective_read_layer
        probe_layers = range(read_layer + 1) if config.probe_layers == "up_to_read" else None
        cache: dict = {}  # one feature pass for every neuron column
        for j, neuron in enumerate(neurons):
            baselines[neuron] = run_baselines(original, original_tokenizer, {name: dataset[name] for name in dataset}, read_layer=read_layer,
                                              neuron_column=columns[j], eval_splits=tuple(splits), methods=tuple(config.methods),
                                              cross_models=tuple(config.cross_models), seed=seed, batch_size=config.batch_size,
                                              feature_cache=cache, probe_layers=probe_layers)

    per_neuron, all_predictions = {}, {}
    for j, neuron in enumerate(neurons):
        edges = edges_all[j] if edges_all else None
        result = {"metrics": {}, "comparisons": {}, "selectivity": {}, "spread": {}}
        train_std = ((inner.config.label_transform or {}).get("std") or [None] * len(neurons))[j]
        all_predictions[neuron] = {}
        for s in splits:
            rows = dataset[s]
            true = targets_of(rows)[:, columns[j]]
            expected, greedy = preds[s]
            methods = {"self": expected[:, j]}
            if shuffled is not None:
                methods["self_shuffled"] = shuffled[s][:, j]
            for method, by_split in (baselines.get(neuron) or {}).get("predictions", {}).items():
                if s in by_split:
                    values = np.asarray(by_split[s], dtype=np.float64).reshape(-1)
                    if values.size != true.size:
                        raise ValueError(f"Baseline {method!r} returned {values.size} predictions for the {true.size} rows of {s!r}: "
                                         "every method must be scored on the same rows.")
                    methods[method] = values
            metrics = {}
            for method, values in methods.items():
                with _quiet_if(method == "mean"):  # constant by construction: its r = 0 needs no warning
                    metrics[method] = evaluate_predictions(values, true, greedy=greedy[:, j] if (method == "self" and greedy is not None) else None,
                                                           bin_edges=edges, n_bootstrap=n_boot, seed=seed, level=level)
            result["metrics"][s] = metrics
            result["spread"][s] = split_spread(true, train_std, s)
            if result["spread"][s]["warning"]:
                logger.warning("%s: %s", neuron, result["spread"][s]["warning"])
            result["comparisons"][s] = compare_methods(methods, true, n_bootstrap=n_boot, seed=seed, level=level)
            result["selectivity"][s] = selectivity(methods, true, n_bootstrap=n_boot, seed=seed, level=level)
            all_predictions[neuron][s] = {"true": true, **methods, **({"self_greedy": greedy[:, j]} if greedy is not None else {})}
        info = baselines.get(neuron) or {}
        result["probe_by_layer"] = info.get("probe_by_layer") or {}
        result["baselines_info"] = info.get("info") or {}
        result["causal"] = None
        if config.causal:
            causal_split = splits[0]
            try:
                result["causal"] = causal_test(predictor, dataset[causal_split], neuron=neuron, num_values=config.causal_num_values,
                                               max_rows=config.causal_max_rows, seed=seed, batch_size=config.batch_size)
            except ValueError as err:  # e.g. the neuron does not vary over these rows: say so, keep every other figure
                logger.warning("Causal test of %s skipped: %s", neuron, err)
                result["causal"] = {"neuron": neuron, "skipped": str(err)}
            result["causal"]["split"] = causal_split
        per_neuron[neuron] = result

    if log_history is None:
        path = config.training_log or _beside_predictor(config, ("log_history.json", "trainer_state.json"))
        log_history = read_training_log(path) if path else None
    if drift is None:
        path = config.drift_log or _beside_predictor(config, ("drift.json",))
        drift = json.loads(Path(path).read_text()) if path else None
    history, drift_summary = drift_history(drift, log_history)

    headline = neurons[0]
    evaluation = {
        "kind": EVALUATION_KIND,
        "neurons": neurons,
        "neuron": headline,
        "splits": splits,
        "rows": {s: len(dataset[s]) for s in splits},
        "predictor": {"path": config.predictor, "head_type": inner.config.head_type, "read_layer": inner.config.effective_read_layer,
                      "base_model": inner.config.base_model_name_or_path, "dataset": config.dataset or inner.config.dataset_name,
                      **({"num_bins": inner.config.num_bins, "bin_strategy": (inner.config.label_transform or {}).get("bin_strategy")}
                         if inner.config.head_type != "regression" else {})},
        "bootstrap": {"n": n_boot, "level": level, "seed": seed, "method": "percentile, rows resampled with replacement; comparisons paired"},
        "subsets": {"top_decile": "the ceil(n/10) rows with the largest true values",
                    "random_sample": "a seeded uniform sample of as many rows as the top decile"},
        **per_neuron[headline],
        "by_neuron": per_neuron,
        "drift": drift_summary,
        "config": asdict(config),
    }
    if len(neurons) > 1:
        evaluation["note"] = f"The top-level figures are those of the first neuron ({headline}); by_neuron holds every neuron's."
    (out / "metrics.json").write_text(json.dumps(to_jsonable(evaluation), indent=2, allow_nan=False))
    doc_ids = {s: list(dataset[s]["doc_id"]) if "doc_id" in dataset[s].column_names else None for s in splits}
    (out / "predictions.json").write_text(json.dumps(to_jsonable({"doc_id": doc_ids, "by_neuron": all_predictions}), allow_nan=False))
    write_report(evaluation, out, predictions=all_predictions[headline], log_history=log_history, drift=history or drift_summary)
    print(f"evaluation of {', '.join(neurons)} written to {out}/ (metrics.json, report.md)", flush=True)
    return evaluation
