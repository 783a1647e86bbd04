"""The causal test: does the predictor's report follow the neuron when the neuron is forced to a value?

    from nsr_hf.evaluation.causal import causal_test
    from nsr_hf.evaluation.figures import plot_causal
    result = causal_test(predictor, dd["test"])          # clamp the first target neuron to 9 values
    result["slope"], result["slope_se"], result["natural_slope"], result["meaningful"]
    plot_causal(result).savefig("causal.png")

The neuron is set (``mode="set"``: 9 values from the 1st to the 99th percentile of the ``activations`` column) or
scaled (``mode="scale"``: factors 0..2) at each row's labelled token only, in ``predictor.base``; the report is the
predictor's expected value in activation units. The causal slope is the OLS slope of the report on the value the
neuron was given, over every (row, value) pair; the natural slope is the report regressed on the true activation
of the same rows without intervention. A self-reporter that reads its neuron has a causal slope near its natural
slope; one that reads correlated context (the tokens that usually make the neuron fire) has a causal slope near 0.

The test means something only when the clamped value must pass through the model to reach the report: the head
reads a block strictly after the target layer (a token head with a prompt reads it at the prompt's last token, which
sees the labelled token only through attention in later blocks; without one, at the labelled token itself). The head's
``report_path`` says which, and ``causal_test`` passes it on in ``meaningful`` and ``note``.

``rows`` everywhere is an activation-dataset split (``datasets.Dataset``) or a list of its rows: ``input_ids``,
``label_position`` and ``activations`` (``attention_mask`` optional).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import numpy as np
import torch

from nsr_hf.capture import Intervention, Neuron, intervene, read_live_neurons
from nsr_hf.metrics import pearson_r, r2_score
from nsr_hf.modeling.predictor import ActivationPredictor
from nsr_hf.training.collator import PredictorDataCollator
from nsr_hf.training.prefix_cache import PrefixCache, row_keys
from nsr_hf.utils import unwrap

MODES = ("set", "scale")
SCALE_RANGE = (0.0, 2.0)
PERCENTILE_RANGE = (1.0, 99.0)


# ----------------------------------------------------------------------------------------------------------
# Inputs


def unwrap_predictor(predictor):
    """The ``ActivationPredictor`` under a PEFT wrapper (LoRA layers stay injected in its modules)."""

    model = unwrap(predictor)
    if not isinstance(model, ActivationPredictor):
        raise TypeError(f"Expected an ActivationPredictor (or a PEFT model around one), got {type(predictor).__name__}.")
    return model


def target_column(predictor, neuron=None) -> tuple[Neuron, int]:
    """``(neuron, k)``: the neuron (default: the predictor's first target) and its column in the report."""
    model = unwrap_predictor(predictor)
    targets = model.config.target_neurons
    if not targets:
        raise ValueError("The predictor has no target neurons.")
    if neuron is None:
        return targets[0], 0
    neuron = Neuron.parse(neuron)
    if neuron not in targets:
        raise ValueError(f"Neuron {neuron} is not reported by this predictor: its targets are {', '.join(map(str, targets))}.")
    return neuron, targets.index(neuron)


def as_rows(rows) -> list[dict]:
    """A list of row dicts from a ``datasets.Dataset`` or a sequence of dicts; a clear error if empty or malformed."""
    if rows is None:
        raise ValueError("No rows given: pass an activation-dataset split or a list of its rows.")
    if hasattr(rows, "column_names") and hasattr(rows, "to_list"):
        rows = rows.to_list()
    elif isinstance(rows, dict):
        raise ValueError("rows must be a split (datasets.Dataset) or a list of row dicts, not a single dict.")
    rows = list(rows)
    if not rows:
        raise ValueError("No rows: the causal test and the analyses need at least one labelled row.")
    missing = [c for c in ("input_ids", "label_position", "activations") if c not in rows[0]]
    if missing:
        raise ValueError(f"Rows lack column(s) {missing}: use an activation-dataset split (input_ids, label_position, activations).")
    return rows


def activation_column(rows: Sequence[dict], column: int) -> np.ndarray:
    """The true activation of report column ``column`` in each row (the ``activations`` column)."""
    values = np.asarray([np.asarray(r["activations"], dtype=np.float64).reshape(-1)[column] for r in rows])
    if not np.all(np.isfinite(values)):
        raise ValueError("The activations column holds non-finite values.")
    return values


def subsample(rows, max_rows: int, seed: int = 0) -> list[dict]:
    """At most ``max_rows`` rows (a seeded random subset, in the original order) as a list of row dicts; a
    ``datasets.Dataset`` is subset before its rows are read."""
    if int(max_rows) < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}.")
    if rows is not None and not isinstance(rows, dict) and hasattr(rows, "__len__") and len(rows) > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=int(max_rows), replace=False))
        rows = rows.select(keep) if hasattr(rows, "select") and hasattr(rows, "column_names") else [rows[int(i)] for i in keep]
    return as_rows(rows)


def labelled_sample(predictor, rows, neuron=None, max_rows: int = 64, seed: int = 0, minimum: int = 1, what: str = "this test"):
    """``(model, neuron, column, rows, true)``: the ``ActivationPredictor`` under any wrapper, the neuron (default: its first
    target) and its report column, at most ``max_rows`` of ``rows`` (``subsample``) and their true activations of it.
    ``what`` needs at least ``minimum`` rows: a ValueError naming it otherwise."""
    model = unwrap_predictor(predictor)
    neuron, column = target_column(model, neuron)
    rows = subsample(rows, max_rows, seed)
    if len(rows) < minimum:
        raise ValueError(f"{what} needs at least {minimum} rows, got {len(rows)}.")
    return model, neuron, column, rows, activation_column(rows, column)


def _collator(model) -> PredictorDataCollator:
    return PredictorDataCollator(model.tokenizer) if model.tokenizer is not None else PredictorDataCollator(pad_token_id=0)


def batches(model, rows: list[dict], batch_size: int):
    """``(start, stop, batch)`` over ``rows``, collated like training (right padding, label positions kept)."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    collate = _collator(model)
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        stop = min(start + batch_size, len(rows))
        batch = collate(rows[start:stop])
        yield start, stop, {k: v.to(device) for k, v in batch.items()}


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------
# Reports


def predictor_reports(predictor, rows, neuron=None, batch_size: int = 16,
                      during: Callable[[int, int, dict], contextlib.AbstractContextManager] | None = None) -> np.ndarray:
    """(rows,) the predictor's report of ``neuron`` (expected value, activation units) for each row.

    ``during(start, stop, batch)``, when given, returns a context manager entered around the forward pass of
    rows ``start:stop`` (e.g. interventions or hooks that must know the batch's label positions)."""
    model = unwrap_predictor(predictor)
    _, column = target_column(model, neuron)
    rows = as_rows(rows)
    out = []
    with _eval_mode(model):
        for start, stop, batch in batches(model, rows, batch_size):
            context = during(start, stop, batch) if during is not None else contextlib.nullcontext()
            with context:
                predictions = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    label_positions=batch["label_positions"]).predictions
            out.append(predictions[:, column].float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def _batch_value(value, start: int, stop: int, n_rows: int, n_indices: int):
    """The part of an intervention value that belongs to rows ``start:stop``, shaped for ``Intervention.apply``."""
    if isinstance(value, (int, float)):
        return float(value)
    array = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float32))
    if array.dim() == 0:
        return float(array)
    if array.shape[0] == n_rows:
        part = array[start:stop]
        return part[:, None] if part.dim() == 1 else part  # (batch, 1) or (batch, k): one value per row
    if array.dim() == 1 and array.shape[0] == n_indices:
        return array
    raise ValueError(f"An intervention value of shape {tuple(array.shape)} fits neither the {n_rows} rows nor the {n_indices} neuron(s): "
                     "give a number, one value per row, one per neuron, or (rows, neurons).")


def report_under_intervention(predictor, rows, interventions: Intervention | Iterable[Intervention], batch_size: int = 16,
                              neuron=None) -> np.ndarray:
    """(rows,) the predictor's report (expected value, activation units) of ``neuron`` (default: its first target)
    with ``interventions`` active in ``predictor.base``, applied at each row's labelled token only.

    An intervention's ``value`` is a number, one value per row (``(rows,)`` or ``(rows, len(indices))``) or one per
    neuron; its ``positions`` are replaced by the rows' label positions. No interventions = the natural report.
    """
    model = unwrap_predictor(predictor)
    rows = as_rows(rows)
    ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions or [])
    for iv in ivs:
        if not isinstance(iv, Intervention):
            raise TypeError(f"Expected nsr_hf.capture.Intervention objects, got {type(iv).__name__}.")
        _batch_value(iv.value, 0, len(rows), len(rows), len(iv.indices))  # shape check before any forward

    def during(start, stop, batch):
        return intervene(model.base, [replace(iv, value=_batch_value(iv.value, start, stop, len(rows), len(iv.indices)),
                                              positions=batch["label_positions"]) for iv in ivs])

    return predictor_reports(model, rows, neuron, batch_size, during if ivs else None)


def reports_under_value_sets(predictor, rows, neuron, value_sets: Sequence, mode: str = "set", batch_size: int = 16,
                             readers: Sequence = (), prefix: PrefixCache | None = None) -> np.ndarray:
    """(len(value_sets), rows) the predictor's report of ``neuron`` with the neuron set (``mode`` ``"set"``) or scaled
    (``"scale"``) at each row's labelled token to each value set in turn: ``None`` (no intervention: the natural report),
    a number, or one value per row. The same reports as ``report_under_intervention`` once per set, for less: per batch of
    rows, the blocks below the neuron's block run once (a ``PrefixCache`` at its input), and only the blocks from there run
    for each set (the neuron is set inside its block).

    ``readers``: more predictors on the same base model object, read layer and neurons, whose heads read the representation
    alone (``Head.reads_representation``): one forward per set serves them all, and the result is (1 + len(readers),
    len(value_sets), rows), the predictor's reports first (``check_readers``). ``prefix``: a ``PrefixCache`` of the rows'
    own states at the neuron's block that may hold them already, computed by blocks below it that the predictor has
    unchanged (the dataset's pass): a batch it holds does not run them at all (not for a head that runs a prompt)."""
    model = unwrap_predictor(predictor)
    readers = check_readers(model, readers)
    neuron, column = target_column(model, neuron)
    rows = as_rows(rows)
    value_sets = list(value_sets)
    for value in value_sets:  # shape checks before any forward
        if value is not None:
            _batch_value(value, 0, len(rows), len(rows), 1)
    out = np.zeros((1 + len(readers), len(value_sets), len(rows)))
    with _eval_mode(model):
        for start, stop, batch in batches(model, rows, batch_size):
            # a head whose prompt holds trained embeddings (conditioned_token) runs its own prompts: no cache of them
            cached = neuron.layer > 0 and not model.head.trains_prompt_input
            # given states are the rows' own: a head that runs a prompt (the token head) builds the prompts' states
            given = (cached and prefix is not None and not model.head.takes_prompt and prefix.layer == neuron.layer
                     and prefix.holds(row_keys(batch)))
            below = (prefix if given else PrefixCache(neuron.layer).build(model, [batch])) if cached else None
            for k, value in enumerate(value_sets):
                with contextlib.ExitStack() as stack:
                    if below is not None:
                        stack.enter_context(below.feeding(model, batch))
                    if value is not None:
                        stack.enter_context(intervene(model.base, Intervention(
                            neuron.layer, [neuron.index], mode, _batch_value(value, start, stop, len(rows), 1),
                            positions=batch["label_positions"])))
                    if readers:  # one representation, every head on it
                        h = model.representation(batch["input_ids"], batch["attention_mask"], batch["label_positions"])
                        for r, reader in enumerate([model, *readers]):
                            predictions = reader.head.readouts(reader, reader.head.logits_from(reader, h))[0]
                            out[r, k, start:stop] = predictions[:, column].float().cpu().numpy()
                        continue
                    predictions = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        label_positions=batch["label_positions"]).predictions
                out[0, k, start:stop] = predictions[:, column].float().cpu().numpy()
    return out if readers else out[0]


def check_readers(model, readers: Sequence) -> list:
    """``readers`` unwrapped, after checking that each can share ``model``'s forward passes: the same base model object, read
    layer, position rule and neurons, and heads (its own too) that read the representation alone. A ValueError that says
    which does not otherwise."""
    readers = [unwrap_predictor(r) for r in readers]
    if not readers:
        return readers
    for r in [model, *readers]:
        if not r.head.reads_representation:
            raise ValueError(f"The {r.config.head_type} head does not read the representation alone: its reports cannot share a "
                             "forward pass with other predictors' (test each on its own).")
    for r in readers:
        if r.base is not model.base:
            raise ValueError("Predictors share forward passes only on the same base model object (e.g. views of one predictor, or "
                             "head_only reporters given one base): this reader has its own base.")
        if (r.config.effective_read_layer, r.config.position, list(r.config.neurons)) != (
                model.config.effective_read_layer, model.config.position, list(model.config.neurons)):
            raise ValueError("Predictors share forward passes only with the same read layer, position rule and neurons.")
    return readers


def live_activations(predictor, rows, neurons: Sequence, batch_size: int = 16) -> np.ndarray:
    """(rows, len(neurons)) the neurons' values in ``predictor.base`` now (not the dataset's labels, which came
    from the original model) at each row's labelled token."""
    model = unwrap_predictor(predictor)
    rows = as_rows(rows)
    out = []
    with _eval_mode(model):
        for _, _, batch in batches(model, rows, batch_size):
            out.append(read_live_neurons(model.base, neurons, batch, batch["label_positions"])[1].cpu().numpy())
    return np.concatenate(out).astype(np.float64)


# ----------------------------------------------------------------------------------------------------------
# Statistics


def _varies(x: np.ndarray) -> bool:
    return x.size > 1 and float(np.ptp(x)) > 1e-9 * max(1.0, float(np.max(np.abs(x))))


def linear_fit(x, y) -> dict:
    """OLS of ``y`` on ``x``: slope, intercept, slope_se, r, r2, n. ``slope``/``slope_se``/``intercept`` are None when
    ``x`` does not vary (and so are ``r``/``r2``: there is no fit); when ``y`` does not vary, ``r`` and ``r2`` follow
    ``nsr_hf.metrics``' rule for constant targets (r 0; R² 1, since the flat line fits them exactly)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.size != y.size or x.size == 0:
        raise ValueError(f"linear_fit needs equal, non-empty x and y (got {x.size} and {y.size}).")
    n = int(x.size)
    out = {"slope": None, "intercept": None, "slope_se": None, "r": None, "r2": None, "n": n}
    if not _varies(x):
        return out
    dx = x - x.mean()
    sxx = float(dx @ dx)
    slope = float(dx @ (y - y.mean()) / sxx)
    intercept = float(y.mean() - slope * x.mean())
    residual = y - (intercept + slope * x)
    sse = float(residual @ residual)
    out.update(slope=slope, intercept=intercept, slope_se=float(np.sqrt(sse / (n - 2) / sxx)) if n > 2 else None)
    out["r"] = pearson_r(x, y)
    out["r2"] = r2_score(y, intercept + slope * x)
    return out


# ----------------------------------------------------------------------------------------------------------
# The causal test


def path_to_report(predictor, neuron: Neuron) -> tuple[bool, str]:
    """``(meaningful, note)``: whether a clamped value of ``neuron`` reaches the report only through computation."""
    model = unwrap_predictor(predictor)
    return model.head.report_path(neuron.layer, model.config.effective_read_layer)


def causal_test(predictor, rows, neuron=None, num_values: int = 9, max_rows: int = 64, mode: str = "set", seed: int = 0,
                batch_size: int = 16, per_row: bool = False, prefix: PrefixCache | None = None) -> dict:
    """``causal_tests`` of one predictor (below)."""
    return causal_tests([predictor], rows, neuron, num_values, max_rows, mode, seed, batch_size, per_row, prefix)[0]


def causal_tests(predictors: Sequence, rows, neuron=None, num_values: int = 9, max_rows: int = 64, mode: str = "set", seed: int = 0,
                 batch_size: int = 16, per_row: bool = False, prefix: PrefixCache | None = None) -> list[dict]:
    """The causal test of each of ``predictors`` on the same rows and values; more than one must share their forward passes
    (``check_readers``: e.g. head_only reporters on one base), which then run once for all. One result per predictor:

    Clamp (``"set"``) or scale (``"scale"``) ``neuron`` at the labelled token and regress the report on its value.

    Returns a JSON-able dict: ``values`` (clamped values, or scale factors), ``mean_activation`` (the mean value the
    neuron was given at each), ``mean_report`` and ``std_report`` per value, ``slope``, ``slope_se`` (OLS standard
    error over all row x value pairs, which treats them as independent), ``row_slope_se`` (standard error of the
    per-row slopes, which does not), ``intercept``, ``fit_r2``, ``natural_slope`` / ``natural_intercept`` /
    ``natural_r2`` (report on the true activation, no intervention), ``mode``, ``neuron``, ``rows``, ``meaningful``,
    ``note``. Scaling multiplies the neuron's live value in ``predictor.base``; the fit uses that product.
    With ``per_row``, ``per_row`` holds the rows' figures (lists): ``given`` and ``reports`` (values x rows), ``true`` and
    ``natural`` (rows), from which ``nsr_hf.evaluation.statistics.slope_ratio_ci`` bootstraps the slope ratio.
    ``prefix``: the rows' states entering the neuron's block, from blocks the predictors have unchanged (``reports_under_value_sets``).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}: use 'set' (clamp to values) or 'scale' (multiply by factors).")
    if int(num_values) < 2:
        raise ValueError(f"num_values must be at least 2 to fit a slope, got {num_values}.")
    predictor, *readers = predictors
    model, neuron, column, rows, true = labelled_sample(predictor, rows, neuron, max_rows, seed)
    if mode == "set":
        low, high = np.percentile(true, PERCENTILE_RANGE)
        if not high > low:
            raise ValueError(f"The activations of {neuron} do not vary over these {len(rows)} rows: there is no range to clamp over.")
        values = np.linspace(low, high, int(num_values))
        given = np.repeat(values[:, None], len(rows), 1)
    else:
        values = np.linspace(*SCALE_RANGE, int(num_values))
        live = live_activations(model, rows, [neuron], batch_size)[:, 0]
        given = values[:, None] * live[None, :]
    # the natural report and the report at every value, the blocks below the neuron's run once per batch of rows
    out = reports_under_value_sets(model, rows, neuron, [None, *(float(v) for v in values)], mode, batch_size, readers, prefix)
    if not readers:
        out = out[None]
    return [_slope_result(p, neuron, rows, true, values, given, o[0], o[1:], mode, per_row) for p, o in zip([model, *readers], out)]


def _slope_result(model, neuron, rows, true, values, given, natural, reports, mode: str, per_row: bool) -> dict:
    """One predictor's causal test result from its natural reports and its reports at every value (``causal_tests``)."""
    fit = linear_fit(given.ravel(), reports.ravel())
    if fit["slope"] is None:
        raise ValueError(f"The values given to {neuron} do not vary (is the neuron 0 on every row?): no slope to fit.")
    row_slopes = [linear_fit(given[:, i], reports[:, i])["slope"] for i in range(len(rows))]
    row_slopes = np.asarray([s for s in row_slopes if s is not None])
    nat = linear_fit(true, natural)
    meaningful, note = path_to_report(model, neuron)
    rows_out = {"per_row": {"given": given.tolist(), "reports": reports.tolist(), "true": true.tolist(), "natural": natural.tolist()}}
    return {
        "neuron": str(neuron),
        "mode": mode,
        "rows": len(rows),
        "values": [float(v) for v in values],
        "mean_activation": [float(v) for v in given.mean(1)],
        "mean_report": [float(v) for v in reports.mean(1)],
        "std_report": [float(v) for v in reports.std(1)],
        "slope": fit["slope"],
        "slope_se": fit["slope_se"],
        "row_slope_se": float(row_slopes.std(ddof=1) / np.sqrt(row_slopes.size)) if row_slopes.size > 1 else None,
        "intercept": fit["intercept"],
        "fit_r2": fit["r2"],
        "natural_slope": nat["slope"],
        "natural_intercept": nat["intercept"],
        "natural_r2": nat["r2"],
        "meaningful": meaningful,
        "note": note,
        **(rows_out if per_row else {}),
    }


