"""What did the self-reporter learn? Mechanistic analyses of a trained ``ActivationPredictor``.

    from nsr_hf.analysis import weight_alignment, projection_analysis, activation_patching, direction_ablation, drift_anatomy
    result = weight_alignment(predictor, probe_direction=ridge.direction)
    result.numbers["cosine"]["out"], result.numbers["z_score"]["out"]
    result.save("outputs/analysis", "weight_alignment")      # weight_alignment.json + weight_alignment.png

Every analysis returns an ``AnalysisResult``: ``numbers`` (a JSON-able dict of plain numbers; None marks a value
that is undefined, e.g. a correlation with a constant) and ``figure`` (a matplotlib Figure on the Agg canvas).

* ``weight_alignment``: is the head's weight vector the neuron's output (or input) weight vector?
* ``projection_analysis``: where in the residual stream is the neuron's value linearly present?
* ``activation_patching``: does the report move with the neuron, and not with a random neuron of its layer?
* ``direction_ablation``: does the report survive removing the neuron's output direction from what the head reads
  (it recomputes the value) or collapse (it reads the neuron's write directly)?
* ``drift_anatomy``: how did training move the neuron's weights, against the other neurons of its layer?

Directions in the residual basis. A head on the final-normed residual ``norm(x) = g * x_hat (+ b)`` computes
``w . (g * x_hat)``: the direction it reads in the residual basis is ``g * w`` (``fold_through_norm``). LayerNorm
also removes the mean of ``x``, so for it every direction is compared after centring (the mean direction is
invisible to whatever reads through it); RMSNorm keeps all directions. A neuron's input direction in the residual
basis is likewise its input weight vector folded through its block's pre-MLP norm.

``rows`` is an activation-dataset split or a list of its rows (see ``nsr_hf.evaluation.causal``).
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nsr_hf.architectures import (
    arch_spec,
    get_final_norm,
    get_layers,
    get_mlp,
    get_neuron_module,
    get_pre_mlp_norm,
    num_layers,
    num_neurons,
)
from nsr_hf.capture import Intervention, Neuron, model_inputs, validate_neuron
from nsr_hf.evaluation.causal import (
    activation_column,
    as_rows,
    batches,
    labelled_sample,
    linear_fit,
    live_activations,
    path_to_report,
    predictor_reports,
    report_under_intervention,
    subsample,
    target_column,
    unwrap_predictor,
)
from nsr_hf.metrics import pearson_r, r2_score
from nsr_hf.plotting import new_figure, save_figure
from nsr_hf.utils import causal_lm, to_jsonable, write_json

PATCHING_MODES = ("set", "zero", "scale")


# ----------------------------------------------------------------------------------------------------------
# Results


@dataclass
class AnalysisResult:
    """``numbers``: JSON-able dict of plain numbers; ``figure``: a matplotlib Figure."""

    numbers: dict
    figure: Any = field(repr=False)

    def save(self, directory, name: str) -> dict[str, Path]:
        """Write ``<directory>/<name>.json`` and ``<directory>/<name>.png``; returns both paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        json_path = directory / f"{name}.json"
        write_json(json_path, self.numbers, indent=2)
        return {"json": json_path, "png": save_figure(self.figure, directory / f"{name}.png")}


def _result(numbers: dict, figure) -> AnalysisResult:
    numbers = to_jsonable(numbers)
    json.dumps(numbers, allow_nan=False)  # fail here, not when saving, if something is not plain
    return AnalysisResult(numbers, figure)


# ----------------------------------------------------------------------------------------------------------
# Weights as directions in the residual basis


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """A projection's weight including an unmerged, active LoRA delta (peft keeps the base weight in ``.weight``)."""
    weight = module.weight.detach()
    if hasattr(module, "lora_A") and not getattr(module, "merged", False) and not getattr(module, "disable_adapters", False):
        for name in getattr(module, "active_adapters", []):
            if name in module.lora_A:
                weight = weight + module.get_delta_weight(name).detach().to(weight.dtype)
    return weight


def layer_vectors(model: nn.Module, layer: int) -> dict[str, torch.Tensor]:
    """Every neuron's weight vectors of ``layer`` as ``(neurons, hidden)`` float64 matrices: ``"in:<proj>"`` per
    input projection (rows of gate/up, columns of GPT-2's c_fc) and ``"out"`` (columns of down_proj, rows of
    GPT-2's c_proj). Row ``i`` is neuron ``i``; ``nsr_hf.architectures.neuron_weights`` gives one row."""
    spec = arch_spec(model)
    conv1d = spec.mlp_kind == "conv1d"
    mlp = get_mlp(model, layer)
    out = {}
    for name in spec.mlp_in:
        w = _effective_weight(getattr(mlp, name)).double()
        out[f"in:{name}"] = w.T if conv1d else w
    w = _effective_weight(get_neuron_module(model, layer)).double()
    out["out"] = w if conv1d else w.T
    return {k: v.cpu().contiguous() for k, v in out.items()}


def _is_layer_norm(norm: nn.Module) -> bool:
    return isinstance(norm, nn.LayerNorm) or (type(norm).__name__.endswith("LayerNorm") and getattr(norm, "bias", None) is not None)


def fold_through_norm(norm: nn.Module, vector) -> np.ndarray:
    """The residual-basis direction that a weight vector (or each row of a matrix) reads through ``norm``: ``g * w``
    (``g`` the norm's elementwise weight), centred for a LayerNorm; ``w`` itself through an identity."""
    v = np.array(vector.detach().double().cpu() if isinstance(vector, torch.Tensor) else vector, dtype=np.float64)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.shape == v.shape[-1:]:
        v = v * weight.detach().double().cpu().numpy()
    return _visible(norm, v)


def _visible(norm: nn.Module, v: np.ndarray) -> np.ndarray:
    """``v`` restricted to what can pass ``norm``: centred (last axis) for a LayerNorm, unchanged otherwise."""
    return v - v.mean(-1, keepdims=True) if _is_layer_norm(norm) else v


def _cos(a: np.ndarray, b: np.ndarray) -> float | None:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else None


def _head_module(model) -> nn.Module | None:
    head = model.neuron_head
    if hasattr(head, "modules_to_save"):  # peft ModulesToSaveWrapper: the trained copy
        names = getattr(head, "active_adapters", None) or [getattr(head, "active_adapter", "default")]
        name = names[0] if isinstance(names, (list, tuple)) else names
        head = head.modules_to_save[name] if name in head.modules_to_save else head.original_module  # noqa: SIM401 (a ModuleDict)
    return head


def head_direction(predictor, neuron=None) -> tuple[np.ndarray, dict]:
    """The head's weight vector for ``neuron`` in the representation basis (before folding), and how it was taken.

    Regression (linear): the neuron's row of the head. Classification (linear): the first principal direction of the
    neuron's per-bin rows (centred over bins), signed so that higher bins project higher; ``explained`` is its share
    of the rows' variance. The token head and MLP heads have no single weight vector: ValueError."""
    model = unwrap_predictor(predictor)
    _, column = target_column(model, neuron)
    # the head's own answer (Head.direction); the token head has none and says why before a module is looked at
    return model.head.direction(_head_module(model), column)


def _probe_vector(probe_direction, size: int) -> np.ndarray:
    v = getattr(probe_direction, "direction", probe_direction)
    v = np.asarray(torch.as_tensor(v).detach().double().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64).reshape(-1)
    if v.shape != (size,):
        raise ValueError(f"probe_direction has {v.size} values; the representation has {size}.")
    if not np.all(np.isfinite(v)) or not np.any(v):
        raise ValueError("probe_direction must be finite and non-zero.")
    return v


def weight_alignment(predictor, neuron=None, probe_direction=None, num_random: int = 1000, seed: int = 0) -> AnalysisResult:
    """Cosine of the head's residual-basis direction with the neuron's weight vectors, against chance.

    Vectors compared: ``in:<proj>`` (raw input weight vectors, as the spec of each architecture stores them),
    ``in:<proj>@residual`` (folded through the block's pre-MLP norm: the direction the neuron reads) and ``out``
    (the output weight vector it writes), all restricted to what the final norm lets through. Per vector:
    ``cosine``, ``z_score`` and ``p_value`` of ``|cosine|`` against ``num_random`` random directions (empirical,
    ``(1 + #{random >= observed}) / (1 + num_random)``), and ``layer_rank`` (1 = the head aligns with this neuron's
    vector more than with that vector of any other neuron of the layer) with ``layer_percentile``. With
    ``probe_direction`` (a ridge probe's unit direction on the same representation, or an object with
    ``.direction``): its cosine with the head's weight vector and its folded cosines with the neuron's vectors.
    """
    if int(num_random) < 2:
        raise ValueError(f"num_random must be at least 2, got {num_random}.")
    model = unwrap_predictor(predictor)
    neuron, _ = target_column(model, neuron)
    raw, how = head_direction(model, neuron)
    base = model.base
    final = get_final_norm(base)
    head = fold_through_norm(final, raw)
    if not np.any(head):
        raise ValueError("The head's weight vector is zero (or invisible through the final norm): nothing to align.")
    pre = get_pre_mlp_norm(base, neuron.layer)
    vectors = layer_vectors(base, neuron.layer)
    layer = {}
    for name, matrix in vectors.items():
        m = matrix.numpy()
        layer[name] = _visible(final, m)
        if name.startswith("in:"):
            layer[f"{name}@residual"] = _visible(final, fold_through_norm(pre, m))
    unit = head / np.linalg.norm(head)
    cos_layer = {name: (m @ unit) / np.maximum(np.linalg.norm(m, axis=1), 1e-300) for name, m in layer.items()}
    cosine = {name: float(c[neuron.index]) for name, c in cos_layer.items()}

    rng = np.random.default_rng(seed)
    random = _visible(final, rng.standard_normal((int(num_random), head.size)))
    random_abs = np.abs(random @ unit / np.linalg.norm(random, axis=1))
    mean, std = float(random_abs.mean()), float(random_abs.std(ddof=1))
    z = {k: (abs(c) - mean) / std if std > 0 else None for k, c in cosine.items()}
    p = {k: float((1 + np.sum(random_abs >= abs(c))) / (1 + random_abs.size)) for k, c in cosine.items()}
    rank = {k: int(1 + np.sum(np.abs(c) > abs(c[neuron.index]))) for k, c in cos_layer.items()}
    percentile = {k: float(100 * np.mean(np.abs(np.delete(c, neuron.index)) < abs(c[neuron.index]))) for k, c in cos_layer.items()}

    numbers = {"neuron": str(neuron), "head": how, "final_norm": type(final).__name__, "hidden_size": int(head.size),
               "cosine": cosine, "z_score": z, "p_value": p, "layer_rank": rank, "layer_percentile": percentile,
               "layer_neurons": int(next(iter(cos_layer.values())).size),
               "random": {"count": int(num_random), "mean_abs_cosine": mean, "std_abs_cosine": std,
                          "p99_abs_cosine": float(np.percentile(random_abs, 99))}}
    if probe_direction is not None:
        probe_raw = _probe_vector(probe_direction, raw.size)
        probe = fold_through_norm(final, probe_raw)
        numbers["probe"] = {"cosine_with_head": _cos(raw, probe_raw),
                            "cosine": {name: _cos(probe, m[neuron.index]) for name, m in layer.items()}}

    fig, (ax, ax2) = new_figure(11, 4, 2)
    ax.hist(random_abs, bins=40, color="lightgrey", label=f"{num_random} random directions")
    for i, (name, c) in enumerate(cosine.items()):
        ax.axvline(abs(c), color=f"C{i}", label=f"{name}: |cos| {abs(c):.2f}")
    ax.set_xlabel("|cosine| with the head's direction (residual basis)")
    ax.set_title(f"Head vs neuron {neuron} weight vectors", fontsize=9)
    ax.legend(fontsize=7)
    ax2.hist(np.abs(cos_layer["out"]), bins=40, color="lightgrey", label=f"out vectors of layer {neuron.layer}")
    ax2.axvline(abs(cosine["out"]), color="C3", label=f"{neuron}: rank {rank['out']}")
    ax2.set_xlabel("|cosine| of the head's direction with each neuron's output vector")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return _result(numbers, fig)


# ----------------------------------------------------------------------------------------------------------
# Projections of the residual stream


def residual_stream(predictor, rows, batch_size: int = 16) -> np.ndarray:
    """(rows, layers + 1, hidden): the residual stream at each row's labelled token, before block 0 (the
    embeddings) and after every block (before the final norm), from one full forward pass of ``predictor.base``."""
    model = unwrap_predictor(predictor)
    rows = as_rows(rows)
    layers = get_layers(model.base)
    stash: dict[int, torch.Tensor] = {}

    def before_first(module, args, kwargs):
        stash[0] = args[0] if args else kwargs["hidden_states"]

    def after(i):
        def hook(module, args, output):
            stash[i + 1] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [layers[0].register_forward_pre_hook(before_first, with_kwargs=True)]
    handles += [block.register_forward_hook(after(i)) for i, block in enumerate(layers)]
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _, _, batch in batches(model, rows, batch_size):
                stash.clear()
                model.base.base_model(**model_inputs(batch), use_cache=False)
                index = torch.arange(batch["input_ids"].shape[0])
                pos = batch["label_positions"].cpu()
                out.append(torch.stack([stash[i].detach().float().cpu()[index, pos] for i in range(len(layers) + 1)], 1).numpy())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return np.concatenate(out).astype(np.float64)


def neuron_directions(predictor, neuron: Neuron) -> dict[str, np.ndarray]:
    """Unit residual-basis directions of ``neuron``: ``in:<proj>`` (folded through its pre-MLP norm), ``out``, and
    ``head`` (the head's direction folded through the final norm) when the head has one."""
    model = unwrap_predictor(predictor)
    base = model.base
    vectors = layer_vectors(base, neuron.layer)
    pre = get_pre_mlp_norm(base, neuron.layer)
    directions = {name: fold_through_norm(pre, v[neuron.index]) for name, v in vectors.items() if name.startswith("in:")}
    directions["out"] = vectors["out"][neuron.index].numpy()
    try:
        raw, _ = head_direction(model, neuron)
        directions["head"] = fold_through_norm(get_final_norm(base), raw)
    except ValueError:
        pass  # token and MLP heads have no single direction
    return {k: v / np.linalg.norm(v) for k, v in directions.items() if np.linalg.norm(v) > 0}


def projection_analysis(predictor, rows, neuron=None, batch_size: int = 16, max_rows: int = 256, seed: int = 0) -> AnalysisResult:
    """Pearson r of the true activation (``activations`` column) with the residual stream projected on the
    neuron's directions (``neuron_directions``) at the embeddings and after every block, and with the head's output.

    ``numbers["correlation"][direction]`` is a list over ``numbers["layers"]`` (``"embeddings"``, then block
    indices); None where a projection is constant. ``head_output_r`` / ``head_output_r2``: the report itself."""
    model, neuron, column, rows, true = labelled_sample(predictor, rows, neuron, max_rows, seed, 3, "projection_analysis (a correlation)")
    stream = residual_stream(model, rows, batch_size)
    directions = neuron_directions(model, neuron)
    correlation = {name: [linear_fit(stream[:, i] @ d, true)["r"] for i in range(stream.shape[1])] for name, d in directions.items()}
    report = predictor_reports(model, rows, neuron, batch_size)
    head_fit = linear_fit(report, true)
    labels = ["embeddings"] + list(range(stream.shape[1] - 1))
    numbers = {"neuron": str(neuron), "rows": len(rows), "read_layer": model.config.effective_read_layer, "layers": labels,
               "correlation": correlation, "head_output_r": head_fit["r"], "head_output_r2": r2_score(true, report)}

    fig, ax = new_figure(7, 4.5)
    x = np.arange(len(labels)) - 1  # embeddings at -1, block i at i
    for i, (name, values) in enumerate(correlation.items()):
        ax.plot(x, [np.nan if v is None else v for v in values], "o-", color=f"C{i}", label=f"projection on {name}")
    if head_fit["r"] is not None:
        ax.axhline(head_fit["r"], color="black", ls="--", label=f"head output: r = {head_fit['r']:.2f}")
    ax.axvline(neuron.layer, color="grey", ls=":", label=f"target layer {neuron.layer}")
    ax.axvline(model.config.effective_read_layer, color="grey", ls="-.", label=f"read layer {model.config.effective_read_layer}")
    ax.set_xlabel("residual stream after block (-1 = embeddings)")
    ax.set_ylabel(f"Pearson r with neuron {neuron}")
    ax.set_ylim(-1.05, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _result(numbers, fig)


# ----------------------------------------------------------------------------------------------------------
# Activation patching


def activation_patching(predictor, rows, neuron=None, modes: Sequence[str] = PATCHING_MODES, control_neurons: int = 1, seed: int = 0,
                        num_values: int = 5, max_rows: int = 64, batch_size: int = 16) -> AnalysisResult:
    """Patch the target neuron and ``control_neurons`` random neurons of its layer at the labelled token, and regress
    the change in the target's report on the change in the patched neuron's value.

    Modes: ``"set"`` (``num_values`` values over the target's 1st..99th percentile in ``rows``; the controls get the
    same values), ``"zero"`` (set to 0), ``"scale"`` (factors ``linspace(0, 2, num_values)`` without 1). The
    change in value is against each neuron's live value in ``predictor.base``. Per neuron: ``slope``, ``r``,
    ``slope_se``, ``n`` for each mode and pooled (``"all"``). A reporter reading its neuron has target slope near 1
    and control slope near 0. ``meaningful``/``note``: as for ``causal_test``."""
    modes = tuple(modes)
    bad = [m for m in modes if m not in PATCHING_MODES]
    if not modes or bad:
        raise ValueError(f"Unknown patching mode(s) {bad or modes}: use some of {', '.join(PATCHING_MODES)}.")
    if int(num_values) < 2:
        raise ValueError(f"num_values must be at least 2, got {num_values}.")
    model = unwrap_predictor(predictor)
    neuron, column = target_column(model, neuron)
    size = num_neurons(model.base)
    if not 0 <= int(control_neurons) <= size - 1:
        raise ValueError(f"control_neurons must be between 0 and {size - 1} (the other neurons of layer {neuron.layer}), "
                         f"got {control_neurons}.")
    rows = subsample(rows, max_rows, seed)
    true = activation_column(rows, column)
    rng = np.random.default_rng(seed)
    others = np.array([i for i in range(size) if i != neuron.index])
    controls = [Neuron(neuron.layer, int(i)) for i in rng.choice(others, size=int(control_neurons), replace=False)]
    patched = [neuron] + controls
    live = live_activations(model, rows, patched, batch_size)
    natural = report_under_intervention(model, rows, [], batch_size, neuron)
    factors = [f for f in np.linspace(0.0, 2.0, int(num_values)) if not np.isclose(f, 1.0)]
    operations = {"set": [("set", float(v)) for v in np.linspace(*np.percentile(true, [1, 99]), int(num_values))],
                  "zero": [("set", 0.0)], "scale": [("scale", float(f)) for f in factors]}

    per_neuron, points = [], []
    for j, n in enumerate(patched):
        d_act, d_report, fits = {}, {}, {}
        for mode in modes:
            xs, ys = [], []
            for op, value in operations[mode]:
                report = report_under_intervention(model, rows, Intervention(n.layer, [n.index], op, value), batch_size, neuron)
                new = np.full(len(rows), value) if op == "set" else value * live[:, j]
                xs.append(new - live[:, j])
                ys.append(report - natural)
            d_act[mode], d_report[mode] = np.concatenate(xs), np.concatenate(ys)
            fits[mode] = _slope_summary(linear_fit(d_act[mode], d_report[mode]))
        fits["all"] = _slope_summary(linear_fit(np.concatenate(list(d_act.values())), np.concatenate(list(d_report.values()))))
        per_neuron.append({"neuron": str(n), **fits})
        points.append((np.concatenate(list(d_act.values())), np.concatenate(list(d_report.values()))))
    meaningful, note = path_to_report(model, neuron)
    numbers = {"neuron": str(neuron), "rows": len(rows), "modes": list(modes), "target": per_neuron[0], "controls": per_neuron[1:],
               "meaningful": meaningful, "note": note}

    fig, ax = new_figure(6.5, 4.5)
    for j, ((x, y), summary) in enumerate(zip(points, per_neuron)):
        color = "C3" if j == 0 else "grey"
        slope = summary["all"]["slope"]
        ax.scatter(x, y, s=8, alpha=0.5, color=color,
                   label=f"{'target' if j == 0 else 'control'} {summary['neuron']}: slope " + ("n/a" if slope is None else f"{slope:.3f}"))
        if slope is not None and x.size:
            grid = np.linspace(x.min(), x.max(), 20)
            ax.plot(grid, summary["all"]["intercept"] + slope * grid, color=color)
    ax.set_xlabel("change in the patched neuron's value")
    ax.set_ylabel(f"change in the report of {neuron}")
    ax.set_title(f"Activation patching ({', '.join(modes)}), {len(rows)} rows", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _result(numbers, fig)


def _slope_summary(fit: dict) -> dict:
    return {k: fit[k] for k in ("slope", "slope_se", "intercept", "r", "n")}


# ----------------------------------------------------------------------------------------------------------
# Direction ablation


def _accuracy(report: np.ndarray, true: np.ndarray) -> dict:
    return {"r2": r2_score(true, report), "r": pearson_r(report, true), "mse": float(np.mean((report - true) ** 2))}


def _retained(after: float | None, before: float | None) -> float | None:
    return after / before if after is not None and before is not None and before > 0 else None


def _ablating(block: nn.Module, unit_direction: torch.Tensor):
    """A ``during`` context (see ``predictor_reports``) that removes ``unit_direction`` from ``block``'s output at
    every token."""
    @contextlib.contextmanager
    def context(*_):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            u = unit_direction.to(hidden.device, hidden.dtype)
            hidden = hidden - (hidden @ u)[..., None] * u
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        handle = block.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    return context


def direction_ablation(predictor, rows, neuron=None, control_directions: int = 3, seed: int = 0, max_rows: int = 256,
                       batch_size: int = 16) -> AnalysisResult:
    """Project the neuron's output direction out of the residual stream at the read layer (the read block's output,
    at every token, before the final norm; the last block for the token head), recompute the report, and compare
    its accuracy against the true activation (``r2``, ``r``, ``mse``) before and after, with ``r2_retained`` =
    after / before. Each of ``control_directions`` random unit directions is ablated the same way as a control.

    Accuracy that collapses means the head reads the neuron's write directly; accuracy that survives means the
    value is read from elsewhere (recomputed by later blocks, or from its inputs). When the read layer is before the
    target layer the neuron has written nothing yet, and the ablation removes a direction of whatever is there."""
    if int(control_directions) < 0:
        raise ValueError(f"control_directions must be >= 0, got {control_directions}.")
    model, neuron, column, rows, true = labelled_sample(predictor, rows, neuron, max_rows, seed, minimum=2,
                                                        what="direction_ablation (to measure accuracy)")
    read = model.config.effective_read_layer
    block = get_layers(model.base)[read]
    out = layer_vectors(model.base, neuron.layer)["out"][neuron.index]
    if not torch.any(out != 0):
        raise ValueError(f"Neuron {neuron} has a zero output vector: there is no direction to ablate.")
    before = predictor_reports(model, rows, neuron, batch_size)
    after = predictor_reports(model, rows, neuron, batch_size, during=_ablating(block, (out / out.norm()).float()))
    rng = np.random.default_rng(seed)
    controls = []
    for _ in range(int(control_directions)):
        r = torch.from_numpy(rng.standard_normal(out.numel()))
        report = predictor_reports(model, rows, neuron, batch_size, during=_ablating(block, (r / r.norm()).float()))
        controls.append({"accuracy": _accuracy(report, true), "report": report})
    acc_before, acc_after = _accuracy(before, true), _accuracy(after, true)
    for c in controls:
        c["r2_retained"] = _retained(c["accuracy"]["r2"], acc_before["r2"])
    retained = [c["r2_retained"] for c in controls if c["r2_retained"] is not None]
    numbers = {"neuron": str(neuron), "rows": len(rows), "read_layer": read, "before": acc_before, "after": acc_after,
               "r2_retained": _retained(acc_after["r2"], acc_before["r2"]), "r_retained": _retained(acc_after["r"], acc_before["r"]),
               "mean_abs_report_change": float(np.mean(np.abs(after - before))),
               "controls": [{"accuracy": c["accuracy"], "r2_retained": c["r2_retained"],
                             "mean_abs_report_change": float(np.mean(np.abs(c["report"] - before)))} for c in controls],
               "control_r2_retained_mean": float(np.mean(retained)) if retained else None}

    fig, (ax, ax2) = new_figure(11, 4, 2)
    ax.scatter(true, before, s=10, label="intact")
    ax.scatter(true, after, s=10, label="output direction ablated")
    if controls:
        ax.scatter(true, controls[0]["report"], s=10, label="random direction ablated")
    lo, hi = float(true.min()), float(true.max())
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set_xlabel(f"true activation of {neuron}")
    ax.set_ylabel("report")
    ax.legend(fontsize=7)
    names = ["intact", "out ablated"] + [f"random {i + 1}" for i in range(len(controls))]
    values = [acc_before["r2"], acc_after["r2"]] + [c["accuracy"]["r2"] for c in controls]
    ax2.bar(names, [np.nan if v is None else v for v in values], color=["C0", "C1"] + ["C2"] * len(controls))
    ax2.set_ylabel("R² of the report")
    ax2.set_title(f"Ablation at the output of block {read}", fontsize=9)
    fig.tight_layout()
    return _result(numbers, fig)


# ----------------------------------------------------------------------------------------------------------
# Drift


def drift_anatomy(original_model, trained_model, neuron) -> AnalysisResult:
    """How training moved ``neuron``'s weights (causal LMs or predictors, same architecture and shapes).

    Per weight vector (``in:<proj>`` and ``out``; unmerged LoRA deltas included): ``cosine`` (old vs new),
    ``old_norm``, ``new_norm``, ``relative_norm_change`` ((new - old norm) / old norm), ``change_norm`` (|new - old|),
    ``relative_change`` (|new - old| / |old|), and against the other neurons of the layer: ``layer_change_mean``,
    ``layer_change_std``, ``change_z`` (None when the others did not move at all) and ``change_percentile`` (share of
    the others that moved strictly less, in %). Input biases (GPT-2) get ``old``/``new``/``change``; the block's
    pre-MLP norm weight gets its ``relative_change``. ``changed``: any of the neuron's weights moved."""
    old_lm, new_lm = causal_lm(original_model), causal_lm(trained_model)
    if arch_spec(old_lm) is not arch_spec(new_lm) or num_layers(old_lm) != num_layers(new_lm):
        raise ValueError("The two models have different architectures: drift needs the original and the trained version of one model.")
    neuron = validate_neuron(old_lm, neuron)
    old, new = layer_vectors(old_lm, neuron.layer), layer_vectors(new_lm, neuron.layer)
    for name in old:
        if old[name].shape != new[name].shape:
            raise ValueError(f"{name} weights differ in shape ({tuple(old[name].shape)} vs {tuple(new[name].shape)}): not the same model.")
    vectors, changes = {}, {}
    for name in old:
        a, b = old[name].numpy(), new[name].numpy()
        delta = np.linalg.norm(b - a, axis=1)
        changes[name] = delta
        i = neuron.index
        rest = np.delete(delta, i)
        std = float(rest.std(ddof=1)) if rest.size > 1 else 0.0
        old_norm, new_norm = float(np.linalg.norm(a[i])), float(np.linalg.norm(b[i]))
        vectors[name] = {
            "cosine": _cos(a[i], b[i]), "old_norm": old_norm, "new_norm": new_norm,
            "relative_norm_change": (new_norm - old_norm) / old_norm if old_norm > 0 else None,
            "change_norm": float(delta[i]), "relative_change": float(delta[i]) / old_norm if old_norm > 0 else None,
            "layer_change_mean": float(rest.mean()) if rest.size else None, "layer_change_std": std,
            "change_z": (float(delta[i]) - float(rest.mean())) / std if std > 0 else None,
            "change_percentile": float(100 * np.mean(rest < delta[i])) if rest.size else None,
        }
    biases = {}
    spec = arch_spec(old_lm)
    for proj in spec.mlp_in:
        b_old, b_new = getattr(get_mlp(old_lm, neuron.layer), proj).bias, getattr(get_mlp(new_lm, neuron.layer), proj).bias
        if b_old is not None and b_new is not None:
            o, n = float(b_old.detach()[neuron.index]), float(b_new.detach()[neuron.index])
            biases[f"in:{proj}"] = {"old": o, "new": n, "change": n - o}
    g_old = getattr(get_pre_mlp_norm(old_lm, neuron.layer), "weight", None)
    g_new = getattr(get_pre_mlp_norm(new_lm, neuron.layer), "weight", None)
    norm_change = None
    if isinstance(g_old, torch.Tensor) and isinstance(g_new, torch.Tensor):
        norm_change = float((g_new.detach() - g_old.detach()).double().norm() / g_old.detach().double().norm())
    changed = any(v["change_norm"] > 0 for v in vectors.values()) or any(b["change"] != 0 for b in biases.values())
    numbers = {"neuron": str(neuron), "changed": changed, "vectors": vectors, "biases": biases,
               "pre_mlp_norm_relative_change": norm_change, "layer_neurons": int(next(iter(changes.values())).size)}

    fig, axes = new_figure(4 * len(changes), 3.6, len(changes))
    axes = np.atleast_1d(axes)
    for ax, (name, delta) in zip(axes, changes.items()):
        ax.hist(np.delete(delta, neuron.index), bins=40, color="lightgrey", label="other neurons of the layer")
        ax.axvline(delta[neuron.index], color="C3", label=f"{neuron}: {delta[neuron.index]:.3g}")
        ax.set_xlabel(f"|new - old| of {name} vector")
        ax.legend(fontsize=7)
    fig.suptitle(f"Weight drift of neuron {neuron}", fontsize=10)
    fig.tight_layout()
    return _result(numbers, fig)
