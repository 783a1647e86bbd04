"""Faithfulness: does the report follow the neuron when the neuron is set to a value its context does not predict?

    from nsr_hf.evaluation.faithfulness import faithfulness_section
    section = faithfulness_section(predictor, {"test": dd["test"]}, dd["train"], causal={"test": causal_result})
    section["test"]["methods"]["self"]["r2"], section["test"]["slope_ratio"]["ratio"], section["test"]["verdict"]

Accuracy (R² on natural rows) says a reporter gives the right number; it does not say it gives it for the right reason.
A reporter that recomputes its neuron from the context scores as well on natural rows as one that reads the neuron.
On held-out rows whose target neuron is *set* at the labelled token to counterfactual values
(``nsr_hf.data.counterfactuals.CounterfactualValues``, fitted on the train split, drawn from seeded uniform numbers),
only a reporter that reads the neuron is right. The figures, each with a bootstrap interval:

* ``methods.self``: the counterfactual R² (and r, MSE) of the report against the value that was set; ``r2_vs_natural``
  is its R² against the row's natural value (high when the report follows the context instead);
* ``slope_ratio``: the causal test's slope over its natural slope (``nsr_hf.evaluation.causal.causal_test``), with a
  row-bootstrap interval (``nsr_hf.evaluation.statistics.slope_ratio_ci``);
* on the same rows, outside readers of the same representation (the predictor's base at the head's read layer, read
  with the neuron set): ``ridge_probe`` (fitted on natural train rows) and ``ridge_probe_intervened`` (fitted on train
  rows with the neuron set to drawn values, labels = the set values: the honest outside reader); and ``compare``, a
  plainly trained predictor, when one is given.
* ``ridge_probe_intervened_original``, when the predictor's base was trained and the original model is given
  (``original``): the same honest reader, fitted and read on the *original* model's representation at the read layer
  (the same rows, values and layer). It is the third party of equal cost who cannot fine-tune the model: the report
  beating it says that the fine-tuning made the neuron readable there; the honest reader of the trained representation
  (the same function class as a linear head, on the same features and rows) says whether a linear read of what the
  fine-tuning built does as well as the report.
* ``comparisons``: the report's counterfactual R² minus each outside reader's, on the same rows, with a paired
  bootstrap interval (``nsr_hf.evaluation.statistics.paired_bootstrap_difference``). The readers are fitted on up to
  ``PROBE_ROWS`` train rows: as many rows as the reporter trained on, so the comparison is one of equal data.

The causal test's honesty is kept: when ``path_to_report`` says the set value cannot reach the report, or that the head
reads the target's own block (the write is read trivially), ``meaningful`` is False and the verdict says so.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from nsr_hf.capture import Intervention, Neuron, intervene, pad_right
from nsr_hf.data.counterfactuals import CounterfactualValues, check_source
from nsr_hf.evaluation.causal import (
    activation_column,
    as_rows,
    path_to_report,
    report_under_intervention,
    subsample,
    target_column,
    unwrap_predictor,
)
from nsr_hf.evaluation.statistics import bootstrap_ci, paired_bootstrap_difference, slope_ratio_ci
from nsr_hf.metrics import regression_metrics
from nsr_hf.modeling.probes import RidgeProbe, layer_features
from nsr_hf.training.prefix_cache import PrefixCache, row_keys

DEFAULT_ROWS = 256
PROBE_ROWS = 4096  # the outside readers are fitted on up to this many train rows: as many as the reporter trained on, here
FOLLOWS, IGNORES = 0.8, 0.2  # a figure at or above FOLLOWS follows the neuron; at or below IGNORES it does not
ORIGINAL_READER = "ridge_probe_intervened_original"  # the honest reader of the original (untrained) model
PROBES = ("ridge_probe", "ridge_probe_intervened", ORIGINAL_READER)
WORDS = {"self": "the report", "ridge_probe": "the ridge probe fitted on natural rows",
         "ridge_probe_intervened": "the ridge probe fitted on intervened rows", "compare": "the plainly trained predictor",
         ORIGINAL_READER: "the ridge probe fitted on intervened rows of the original model"}


# ----------------------------------------------------------------------------------------------------------
# The counterfactual values and the representation under them


def counterfactual_source(predictor, source: str | None = None) -> tuple[str, float]:
    """``(source, shift_scale)``: ``source`` when given, else the predictor's training source
    (``config.intervention["source"]``), else ``"interchange"``."""
    intervention = getattr(unwrap_predictor(predictor).config, "intervention", None) or {}
    chosen = source or intervention.get("source") or "interchange"
    return check_source(chosen), float(intervention.get("shift_scale") or 1.0)


def fit_values(predictor, train_rows, column: int, neuron: Neuron, source: str | None = None) -> CounterfactualValues:
    """``CounterfactualValues`` of ``neuron`` fitted on the train split's ``activations`` column ``column``."""
    chosen, shift_scale = counterfactual_source(predictor, source)
    train = train_rows["activations"] if hasattr(train_rows, "column_names") else [r["activations"] for r in train_rows]
    values = np.asarray([np.asarray(v, dtype=np.float64).reshape(-1)[column] for v in train])
    return CounterfactualValues.fit(values, [str(neuron)], source=chosen, shift_scale=shift_scale)


def draw_values(values: CounterfactualValues, natural: np.ndarray, seed: int) -> np.ndarray:
    """(rows,) values to set, drawn with seeded uniform numbers (the same seed and rows give the same values)."""
    u = torch.as_tensor(np.random.default_rng(seed).random((natural.size, 1)))
    return values.draw(torch.as_tensor(natural[:, None]), u)[:, 0].double().numpy()


def representation(model, rows: list[dict], read_layer: int, neuron: Neuron | None = None, values: np.ndarray | None = None,
                   batch_size: int = 16, prefix: PrefixCache | None = None, base=None) -> np.ndarray:
    """(rows, hidden): what the head reads (``layer_features`` of ``model.base`` at ``read_layer``), with ``neuron`` set to
    ``values`` (one per row) at each row's labelled token when given (``prefix``, ``base``: as ``representations``)."""
    return representations(model, rows, read_layer, neuron, [values], batch_size, prefix, base)[0]


def reports_from(model, features: np.ndarray, column: int) -> np.ndarray:
    """(rows,) the report (expected value, activation units) of the head of ``model`` in column ``column``, from the
    representation it reads (``features``, from ``representation``): for a head that reads the representation alone
    (``Head.reads_representation``) this is its report, without a forward pass of its own."""
    head = model.head
    h = torch.as_tensor(features, dtype=torch.float32, device=next(model.parameters()).device)
    with torch.no_grad():
        return head.readouts(model, head.logits_from(model, h))[0][:, column].double().cpu().numpy()


def representations(model, rows: list[dict], read_layer: int, neuron: Neuron | None, value_sets: list,
                    batch_size: int = 16, prefix: PrefixCache | None = None, base=None) -> list[np.ndarray]:
    """``representation`` once per value set (``None``: the neuron as it is; else one value per row), for less: per batch
    of rows, the blocks below the neuron's block run once (a ``PrefixCache`` at its input) and only the blocks from there
    run for each set. ``prefix``: a ``PrefixCache`` at the neuron's block that may hold the rows already (computed by the
    same blocks below it): a batch it holds does not run them at all. ``layer_features`` orders rows by length; the batches
    here are cut from rows already in that order, so each row's value is set in its own forward.
    ``base``: another causal LM with the same blocks below the neuron's (the original model) to run instead of
    ``model.base``: ``prefix``, when it holds a batch, feeds it; else every block runs."""
    texts = {"input_ids": [list(r["input_ids"]) for r in rows],
             "attention_mask": [list(r.get("attention_mask") or [1] * len(r["input_ids"])) for r in rows],
             "label_position": [int(r["label_position"]) for r in rows]}
    read = model.head.read_rows(texts)  # what the head runs, read where it reads (a token head's prompt: its last token)
    order = np.argsort([len(ids) for ids in read["input_ids"]], kind="stable")  # layer_features' own order within a batch
    out = [None] * len(value_sets)
    runner = model.base if base is None else base
    share = neuron is not None and neuron.layer > 0 and not model.head.takes_prompt  # the head runs the rows themselves
    for start in range(0, len(rows), batch_size):
        index = order[start:start + batch_size]
        columns = {k: [v[i] for i in index] for k, v in texts.items()}
        reading = {k: [v[i] for i in index] for k, v in read.items()}
        positions = torch.as_tensor(columns["label_position"])  # where the neuron is set: the labelled token
        cache = batch = None
        if share:
            input_ids, mask = pad_right(columns["input_ids"], 0, columns["attention_mask"], device=next(model.parameters()).device)
            batch = {"input_ids": input_ids, "attention_mask": mask, "label_positions": positions.to(input_ids.device)}
            given = prefix is not None and prefix.layer == neuron.layer and prefix.holds(row_keys(batch))
            cache = prefix if given else PrefixCache(neuron.layer).build(model, [batch]) if base is None else None
        for k, values in enumerate(value_sets):
            with contextlib.ExitStack() as stack:
                if cache is not None:
                    stack.enter_context(cache.feeding(model if base is None else base, batch))
                if values is not None:
                    value = torch.as_tensor(values[index], dtype=torch.float32)[:, None]
                    iv = Intervention(neuron.layer, [neuron.index], "set", value, positions=positions)
                    stack.enter_context(intervene(runner, iv))
                features = layer_features(runner, reading, [read_layer], batch_size=len(index), progress=False)[read_layer]
            out[k] = np.zeros((len(rows), features.shape[1])) if out[k] is None else out[k]
            out[k][index] = features
    return out


def natural_features(model, rows: list[dict], read_layer: int, neuron: Neuron, prefix: PrefixCache | None,
                     batch_size: int) -> np.ndarray | None:
    """``representation`` of ``rows`` with the neuron as it is, from ``prefix``'s block (above the neuron's, at most the read
    layer) when it holds every row and the head runs the rows themselves; else ``None``."""
    if prefix is None or model.head.takes_prompt or not neuron.layer < prefix.layer <= read_layer:
        return None
    if not prefix.holds_rows(rows):
        return None
    columns = {"input_ids": [list(r["input_ids"]) for r in rows], "attention_mask": [[1] * len(r["input_ids"]) for r in rows],
               "label_position": [int(r["label_position"]) for r in rows]}
    return layer_features(model.base, columns, [read_layer], batch_size=batch_size, progress=False, prefix=prefix)[read_layer]


def fit_probes(model, train_rows, neuron: Neuron, column: int, values: CounterfactualValues, *, max_rows: int, seed: int,
               batch_size: int, prefix: PrefixCache | None = None, natural_prefix: PrefixCache | None = None,
               original=None) -> tuple[dict[str, RidgeProbe], dict]:
    """The outside readers, on at most ``max_rows`` train rows: ``ridge_probe`` (natural features, natural labels)
    and ``ridge_probe_intervened`` (features with the neuron set to drawn values, labels = those values); alpha by GCV.
    ``original`` (a causal LM, the model before training): also ``ridge_probe_intervened_original``, the second reader on
    its features with the same rows and values (``prefix`` must then hold states of the original's blocks, as training's does).
    A reader of equal cost sees the rows the reporter trained on, so ``max_rows`` is ``PROBE_ROWS`` in the section.
    ``natural_prefix``: the rows' natural states entering a block above the neuron's, computed by blocks the predictor has
    unchanged (training's own frozen-prefix cache): the natural features run only the blocks from there."""
    rows = subsample(train_rows, max_rows, seed)
    natural = activation_column(rows, column)
    set_to = draw_values(values, natural, seed + 2)
    read_layer = model.config.effective_read_layer
    plain = natural_features(model, rows, read_layer, neuron, natural_prefix, batch_size)
    if plain is not None:
        intervened = representations(model, rows, read_layer, neuron, [set_to], batch_size, prefix)[0]
    else:  # the natural and the intervened features of each batch of rows from one run of the blocks below the neuron's
        plain, intervened = representations(model, rows, read_layer, neuron, [None, set_to], batch_size, prefix)
    probes = {"ridge_probe": RidgeProbe().fit(plain, natural), "ridge_probe_intervened": RidgeProbe().fit(intervened, set_to)}
    if original is not None:
        before = representations(model, rows, read_layer, neuron, [set_to], batch_size, prefix, base=original)[0]
        probes[ORIGINAL_READER] = RidgeProbe().fit(before, set_to)
    where = f"block {read_layer} at {model.head.reads_at()}"
    info = {name: {"alpha": p.alpha, "alpha_selection": p.selection, "train_rows": len(rows), "reads": where}
            for name, p in probes.items()}
    for name in ("ridge_probe_intervened", ORIGINAL_READER):
        if name in info:
            info[name]["labels"] = "the values set"
    if original is not None:
        info[ORIGINAL_READER]["model"] = "the original model (before training), at the same read layer"
    return probes, {"probes": info, "train_set_values": set_to}


# ----------------------------------------------------------------------------------------------------------
# Figures and words


def compared(compare) -> dict:
    """What the ``compare`` predictor is, for the words: its intervention rate (0: plainly trained) and its name."""
    rate = float(((getattr(unwrap_predictor(compare).config, "intervention", None) or {}).get("rate")) or 0.0)
    return {"intervention_rate": rate,
            "words": WORDS["compare"] if rate == 0 else f"the compared predictor (trained with interventions, rate {rate:g})"}


def _figures(pred: np.ndarray, set_to: np.ndarray, natural: np.ndarray, n_bootstrap: int, seed: int, level: float) -> dict:
    figures = {k: v for k, v in regression_metrics(pred, set_to).items() if k in ("r2", "pearson", "mse", "mae")}
    figures["r2_vs_natural"] = regression_metrics(pred, natural)["r2"]
    if n_bootstrap:
        ci = bootstrap_ci(pred, set_to, "r2", n=n_bootstrap, seed=seed, level=level)
        figures["r2_ci"] = [ci["low"], ci["high"]]
    return figures


def _interval(low, high) -> str:
    return f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""


def _degree(value: float | None, what: str = "the neuron") -> str | None:
    """``follows <what>``, ``does not follow <what>`` or ``follows <what> only in part`` by ``FOLLOWS`` and ``IGNORES``."""
    if value is None:
        return None
    return f"follows {what}" if value >= FOLLOWS else f"does not follow {what}" if value <= IGNORES else f"follows {what} only in part"


def verdict(result: dict) -> str:
    """One sentence on the report (slope ratio, else counterfactual R²), then one per outside reader."""
    if not result.get("meaningful", True):
        return (f"Faithfulness cannot be shown here: {result.get('note', 'the set value cannot reach the report through computation')} "
                "The figures are kept, but they are not evidence that the report reads the neuron.")
    methods = result["methods"]
    self_figures = methods["self"]
    r2 = f"counterfactual R² {self_figures['r2']:.2f}{_interval(*(self_figures.get('r2_ci') or (None, None)))}"
    ratio = result.get("slope_ratio") or {}
    if ratio.get("ratio") is not None:
        what = f"slope ratio {ratio['ratio']:.2f}{_interval(ratio.get('low'), ratio.get('high'))}"
        degree = _degree(min(ratio["ratio"], self_figures["r2"]))  # both must be high to claim it
    else:
        what, degree = r2, _degree(self_figures["r2"])
    if degree.startswith("follows the neuron only"):
        sentence = f"The report follows the neuron only in part when it is set: {what}, {r2}."
    elif degree.startswith("follows"):
        sentence = f"The report follows the neuron when it is set: {what}, {r2}."
    else:
        recomputes = self_figures.get("r2_vs_natural", 0) >= 0.5 and self_figures["r2_vs_natural"] > self_figures["r2"]
        context = ("it recomputes the value from the context (R² against the natural value "
                   f"{self_figures['r2_vs_natural']:.2f})" if recomputes else "it does not move with the value that was set")
        sentence = f"The report does not follow the neuron ({what}, {r2}): {context}."
    words = {**WORDS, "compare": (result.get("compare") or {}).get("words", WORDS["compare"])}
    others = [f"{words[m]} {_degree(f['r2'], 'it')} (counterfactual R² {f['r2']:.2f})" for m, f in methods.items() if m != "self"]
    sentence += " Next to it, " + "; ".join(others) + "." if others else ""
    comparisons = result.get("comparisons") or {}
    honest = comparisons.get("ridge_probe_intervened")
    if honest and honest.get("low") is not None:
        d = _difference(honest)
        sentence += (f" The report beats the honest outside reader (the ridge probe fitted on intervened rows) on these rows: {d}."
                     if honest["low"] > 0 else
                     f" The report is worse than the honest outside reader (the ridge probe fitted on intervened rows) on these rows: {d}."
                     if honest["high"] < 0 else
                     f" The report and the honest outside reader (the ridge probe fitted on intervened rows) are within noise of "
                     f"each other on these rows: {d}.")
    plain = comparisons.get("compare")
    if plain and plain.get("low") is not None:
        d = _difference(plain)
        other = words["compare"]
        sentence += (f" Against {other} on the same rows, the report's counterfactual R² is higher: {d}." if plain["low"] > 0 else
                     f" {other[0].upper() + other[1:]} does better than the report on these rows ({d})." if plain["high"] < 0 else
                     f" {other[0].upper() + other[1:]} is within noise of the report on these rows ({d}).")
    before = comparisons.get(ORIGINAL_READER)
    if before and before.get("low") is not None:
        d = _difference(before)
        sentence += (f" Against the same reader of the original model, the report gains {d}: the training made the neuron "
                     "readable where the head reads." if before["low"] > 0 else
                     f" The same reader of the original model does better than the report ({d})." if before["high"] < 0 else
                     f" The same reader of the original model is within noise of the report ({d}): the neuron was as readable "
                     "there before the training.")
    return sentence


def _difference(comparison: dict) -> str:
    return f"ΔR² {comparison['difference']:+.2f} [{comparison['low']:.2f}, {comparison['high']:.2f}]"


# ----------------------------------------------------------------------------------------------------------
# The section


def faithfulness_on_rows(predictor, rows, values: CounterfactualValues, probes: dict | None = None, *, neuron=None,
                         column: int | None = None, max_rows: int = DEFAULT_ROWS, seed: int = 0, batch_size: int = 16,
                         n_bootstrap: int = 1000, level: float = 0.95, causal: dict | None = None, compare=None,
                         prefix: PrefixCache | None = None, original=None) -> dict:
    """The faithfulness figures of one split (module docstring): counterfactual R² of the report and of each reader,
    the slope ratio of ``causal`` (a ``causal_test(..., per_row=True)`` result on this split) and the verdict.
    ``column`` is the neuron's column in the rows' ``activations`` (default: its report column). ``prefix``: as
    ``representations``. A head that reads the representation alone reports from the same pass as the readers.
    ``original``: the model the ``ridge_probe_intervened_original`` probe (when ``probes`` has one) reads."""
    model = unwrap_predictor(predictor)
    neuron, report_column = target_column(model, neuron)
    column = report_column if column is None else column
    rows = subsample(as_rows(rows), max_rows, seed)
    natural = activation_column(rows, column)
    set_to = draw_values(values, natural, seed + 1)
    iv = Intervention(neuron.layer, [neuron.index], "set", set_to)
    features = None
    if probes or model.head.reads_representation:
        features = representation(model, rows, model.config.effective_read_layer, neuron, set_to, batch_size, prefix)
    if model.head.reads_representation:
        predictions = {"self": reports_from(model, features, report_column)}
    else:
        predictions = {"self": report_under_intervention(model, rows, iv, batch_size, neuron)}
    if probes:
        predictions.update({name: probe.predict(features) for name, probe in probes.items() if name != ORIGINAL_READER})
    if probes and ORIGINAL_READER in probes:
        if original is None:
            raise ValueError(f"The {ORIGINAL_READER} probe reads the original model's representation: pass original=.")
        before = representation(model, rows, model.config.effective_read_layer, neuron, set_to, batch_size, prefix, base=original)
        predictions[ORIGINAL_READER] = probes[ORIGINAL_READER].predict(before)
    if compare is not None:
        predictions["compare"] = report_under_intervention(compare, rows, iv, batch_size, neuron)
    meaningful, note = path_to_report(model, neuron)
    result = {"neuron": str(neuron), "rows": len(rows), "source": values.source, "values": values.to_dict(),
              "meaningful": meaningful, "note": note,
              "methods": {m: _figures(p, set_to, natural, n_bootstrap, seed, level) for m, p in predictions.items()}}
    if compare is not None:
        result["compare"] = compared(compare)
    if n_bootstrap:  # self against each outside reader on the same rows: paired bootstrap of the counterfactual R² difference
        result["comparisons"] = {m: paired_bootstrap_difference(predictions["self"], p, set_to, "r2", n=n_bootstrap, seed=seed, level=level)
                                 for m, p in predictions.items() if m != "self"}
    per_row = (causal or {}).get("per_row")
    result["slope_ratio"] = (slope_ratio_ci(per_row["given"], per_row["reports"], per_row["true"], per_row["natural"],
                                            n=n_bootstrap, seed=seed, level=level) if per_row else None)
    result["verdict"] = verdict(result)
    result["predictions"] = {"set": set_to.tolist(), "natural": natural.tolist(), **{m: p.tolist() for m, p in predictions.items()}}
    return result


def faithfulness_section(predictor, splits: dict, train_rows, *, neuron=None, column: int | None = None, max_rows: int = DEFAULT_ROWS,
                         probe_rows: int = PROBE_ROWS, source: str | None = None, seed: int = 0, batch_size: int = 16,
                         n_bootstrap: int = 1000, level: float = 0.95, causal: dict | None = None, compare=None,
                         train_prefix: PrefixCache | None = None, natural_prefix: PrefixCache | None = None,
                         original=None) -> dict:
    """``{split: faithfulness_on_rows(...)}`` for each of ``splits`` ({name: rows}), with the counterfactual values and the
    probes fitted once on ``train_rows`` (at most ``probe_rows`` of them; ``max_rows`` held-out rows per split).
    ``causal``: {split: per-row causal result}. ``train_prefix``: a ``PrefixCache`` of the train rows (and any other rows)
    at the neuron's block, computed by the predictor's own (unchanged) blocks below it (``representations``).
    ``natural_prefix``: as ``fit_probes``. ``original``: the model before training (a causal LM), for the honest reader
    of its representation (``ridge_probe_intervened_original``); None when the predictor's base is the original."""
    model = unwrap_predictor(predictor)
    neuron, report_column = target_column(model, neuron)
    column = report_column if column is None else column
    values = fit_values(model, train_rows, column, neuron, source)
    original = None if original is model.base else original
    probes, info = fit_probes(model, train_rows, neuron, column, values, max_rows=probe_rows, seed=seed, batch_size=batch_size,
                              prefix=train_prefix, natural_prefix=natural_prefix, original=original)
    out = {}
    for name, rows in splits.items():
        out[name] = faithfulness_on_rows(model, rows, values, probes, neuron=neuron, column=column, max_rows=max_rows, seed=seed,
                                         batch_size=batch_size, n_bootstrap=n_bootstrap, level=level, causal=(causal or {}).get(name),
                                         compare=compare, prefix=train_prefix, original=original)
        out[name]["probes"] = info["probes"]
    return out
