"""Linear read-outs of a model's representation: the closed-form ridge probe and the features it reads.

``layer_features`` gives the residual stream after a block, through the final norm, at each row's labelled token:
exactly the representation ``ActivationPredictor.representation`` reads. ``RidgeProbe`` solves ridge regression on it
in closed form (activations are ill-conditioned; PITFALLS 10). The predictor's ``head_init: probe``, the readability
selection and the evaluation's probe baselines all use these.

>>> features = layer_features(model, dataset["train"], layers=[12])
>>> probe = RidgeProbe().fit(features[12], labels_of(dataset["train"]))
"""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from nsr_hf.architectures import arch_spec, get_final_norm, get_layers, get_submodule, labelled_token_block, num_layers, truncated
from nsr_hf.capture import label_positions, pad_right, position_ids_from_mask
from nsr_hf.metrics import r2_score
from nsr_hf.utils import causal_lm

DEFAULT_ALPHAS = np.logspace(-3, 5, 17)
FEATURE_COLUMNS = ("input_ids", "attention_mask", "label_position")


# ----------------------------------------------------------------------------------------------------------
# Input checks


def columns_of(rows) -> list[str]:
    return list(rows.column_names) if hasattr(rows, "column_names") else list(rows.keys())


def require_columns(rows, names: Sequence[str], what: str) -> None:
    present = columns_of(rows)
    missing = [c for c in names if c not in present]
    if missing:
        raise ValueError(f"{what} lacks the column(s) {missing} (it has {present}). Baselines read the columns of an "
                         f"nsr_hf activation dataset ({', '.join(names)}); make one with `nsr dataset`.")


def column_values(rows, name: str) -> list:
    return list(rows[name])


def num_rows(rows) -> int:
    return len(rows) if hasattr(rows, "column_names") else len(next(iter(rows.values()), []))


_CONTENTS: dict[str, str] = {}  # a Dataset's fingerprint -> rows_content (a fingerprint fixes the content it was made from)


def rows_content(rows) -> str:
    """A hash of what a row's features depend on: its tokens, attention mask and labelled token (``FEATURE_COLUMNS``).
    The datasets of several neurons built from the same documents share it (their labels differ, their fingerprints
    too), so a feature cache keyed by it (``nsr_hf.evaluation.baselines.feature_key``) computes each model's features of
    those rows once for all of them (``nsr sweep``: ``nsr_hf.pipeline.SharedPasses``)."""
    fingerprint = getattr(rows, "_fingerprint", None)
    if fingerprint is not None and fingerprint in _CONTENTS:
        return _CONTENTS[fingerprint]
    digest = hashlib.blake2b(str(num_rows(rows)).encode(), digest_size=16)
    for name in FEATURE_COLUMNS:
        if name not in columns_of(rows):
            continue
        values = [np.asarray(v, dtype=np.int64).ravel() for v in column_values(rows, name)]
        digest.update(name.encode())
        digest.update(np.array([len(v) for v in values], dtype=np.int64).tobytes())
        digest.update(np.concatenate(values).tobytes() if values else b"")
    content = digest.hexdigest()
    if fingerprint is not None:
        if len(_CONTENTS) > 256:
            _CONTENTS.clear()
        _CONTENTS[fingerprint] = content
    return content


def as_matrix(X, name: str = "X") -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows, features), got shape {X.shape}.")
    if not np.isfinite(X).all():
        raise ValueError(f"{name} holds NaN or infinite values; features must be finite.")
    return X


def as_vector(y, rows: int, name: str = "y") -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array (one value per row), got shape {y.shape}.")
    if len(y) != rows:
        raise ValueError(f"{name} has {len(y)} values for {rows} rows: give one value per row.")
    if not np.isfinite(y).all():
        raise ValueError(f"{name} holds NaN or infinite values; targets must be finite.")
    return y


def labels_of(rows, neuron_column: int = 0) -> np.ndarray:
    """``(rows,)`` float64: value ``neuron_column`` of each row's ``activations``."""
    require_columns(rows, ["activations"], "the split")
    values = column_values(rows, "activations")
    if not values:
        return np.zeros(0)
    try:
        array = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError) as error:
        raise ValueError("the 'activations' column must hold K numbers per row (one row per labelled token); "
                         "a per-token layout ('column') is not supported by the baselines: use every_token_layout='rows'.") from error
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"the 'activations' column must hold K numbers per row, got shape {array.shape}.")
    if not 0 <= neuron_column < array.shape[1]:
        raise ValueError(f"neuron_column {neuron_column} is out of range: the rows hold {array.shape[1]} neuron value(s) "
                         f"(0..{array.shape[1] - 1}).")
    y = array[:, neuron_column]
    if not np.isfinite(y).all():
        raise ValueError("the 'activations' column holds NaN or infinite values.")
    return y


# ----------------------------------------------------------------------------------------------------------
# Features of the self model


def padded_batch(ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (``nsr_hf.capture.pad_right``) on ``device``."""
    input_ids, mask = pad_right(ids, pad_id)
    return input_ids.to(device), mask.to(device)


def checked_rows(rows) -> tuple[list[list[int]], np.ndarray]:
    """Token ids cut to their real tokens, and label positions, with clear errors for malformed rows."""
    require_columns(rows, FEATURE_COLUMNS, "the split")
    ids, masks, positions = (column_values(rows, c) for c in FEATURE_COLUMNS)
    out = []
    for i, (row, mask, position) in enumerate(zip(ids, masks, positions)):
        if isinstance(position, (list, tuple)) or position is None:
            raise ValueError(f"row {i}: label_position must be one integer per row, got {position!r} (per-token layouts "
                             "are not supported by the baselines; use every_token_layout='rows').")
        if len(mask) != len(row):
            raise ValueError(f"row {i}: attention_mask has {len(mask)} entries for {len(row)} input_ids; they must have the same length.")
        if not 0 <= int(position) < len(row) or not mask[int(position)]:
            raise ValueError(f"row {i}: label_position {position} is not a real token of its {len(row)} input_ids.")
        if not all(mask):
            raise ValueError(f"row {i}: stored rows are unpadded (attention_mask all ones); this one has padding.")
        out.append(list(row))
    return out, np.asarray(positions, dtype=np.int64)


@torch.no_grad()
def layer_features(model, rows, layers: Sequence[int] | None = None, batch_size: int = 16,
                   progress: bool = True, prefix=None) -> dict[int, np.ndarray]:
    """``{layer: (rows, hidden) float64}``: the residual stream after each block in ``layers`` (default all),
    through the model's final norm, at each row's ``label_position`` (what ``ActivationPredictor.representation``
    reads for ``read_layer=layer``).

    One forward per batch (``output_hidden_states``), right padding, position ids from the mask; rows are
    batched by length and returned in their order. Blocks after the deepest requested layer are not run.
    ``prefix``: a ``PrefixCache`` (``nsr_hf.training.prefix_cache``) of these rows at the input of block ``prefix.layer``,
    computed by this model's blocks below it: only the blocks from there run (then ``layers`` start at ``prefix.layer``).
    """
    model = causal_lm(model)
    n_layers = num_layers(model)
    layers = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    if not layers:
        raise ValueError("layers is empty: name at least one layer (or None for all).")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range: this model has layers 0..{n_layers - 1}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if prefix is not None and min(layers) < prefix.layer:
        raise ValueError(f"layer_features from states at the input of block {prefix.layer} gives that block and later ones, "
                         f"not block {min(layers)}.")
    ids, positions = checked_rows(rows)
    hidden = model.config.hidden_size
    out = {layer: np.zeros((len(ids), hidden)) for layer in layers}
    if not ids:
        return out
    deepest = max(layers)
    norm = get_final_norm(model)
    blocks = get_layers(model)
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id if getattr(model.config, "pad_token_id", None) is not None else 0
    order = np.argsort([len(r) for r in ids], kind="stable")
    starts = range(0, len(ids), batch_size)
    was_training = model.training
    model.eval()
    try:
        with truncated(model, deepest):
            for start in tqdm(starts, desc="layer features", disable=not progress or len(starts) < 10):
                index = order[start : start + batch_size]
                input_ids, mask = padded_batch([ids[i] for i in index], pad_id, device)
                rows_t = torch.arange(len(index), device=device)
                pos = torch.as_tensor(positions[index], device=device)
                outputs = {}
                with contextlib.ExitStack() as stack:
                    if prefix is not None:  # the blocks below are passthroughs: the block outputs are taken by hooks
                        stack.enter_context(prefix.feeding(model, {"input_ids": input_ids, "attention_mask": mask, "label_positions": pos}))
                        for layer in layers:
                            stack.enter_context(block_output(blocks[layer], layer, outputs))
                    # the deepest block is read at the labelled tokens only: its MLP runs there alone
                    stack.enter_context(labelled_token_block(model, deepest, pos))
                    result = model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                              output_hidden_states=prefix is None, use_cache=False)
                for layer in layers:
                    if layer == deepest:  # the model's own forward already applied the final norm
                        value = result.last_hidden_state[rows_t, pos]
                    else:  # hidden_states[0] is the embedding output, [layer + 1] the output of block `layer`
                        value = norm((outputs[layer] if prefix is not None else result.hidden_states[layer + 1])[rows_t, pos])
                    out[layer][index] = value.double().cpu().numpy()
    finally:
        model.train(was_training)
    return out


@contextlib.contextmanager
def block_output(block, layer: int, outputs: dict):
    """Inside the ``with`` block, ``outputs[layer]`` is the residual stream ``block`` last returned."""
    def keep(module, args, output):
        outputs[layer] = output[0] if isinstance(output, tuple) else output

    handle = block.register_forward_hook(keep)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class RecordedFeatures:
    """What ``recording_layer_features`` kept: for each sequence (its real tokens, int64 bytes), its labelled token (counted
    from its first real token) and ``{layer: (hidden,) float64}``, with ``{("neurons", layer): (neurons,) float64}``: the
    MLP neurons of ``neuron_layers`` at that token."""

    layers: tuple
    position: object
    neuron_layers: tuple = ()
    rows: dict = field(default_factory=dict)

    def _entries(self, rows, keys: list) -> list[dict] | None:
        ids, positions = checked_rows(rows)
        found = []
        for row, position in zip(ids, positions):
            entry = self.rows.get(np.asarray(row, dtype=np.int64).tobytes())
            if entry is None or entry[0] != int(position) or not all(k in entry[1] for k in keys):
                return None
            found.append(entry[1])
        return found

    def features(self, rows, layers: Sequence[int]) -> dict[int, np.ndarray] | None:
        """``layer_features`` of ``rows`` (unpadded, with ``label_position``) at ``layers``, from what was recorded; ``None``
        when a row or a layer was not recorded (a block the pass did not complete), or a row's labelled token is not the
        one recorded for its tokens."""
        found = self._entries(rows, list(layers))
        if found is None:
            return None
        return {layer: np.stack([f[layer] for f in found]) if found else np.zeros((0, 0)) for layer in layers}

    def neuron_values(self, rows, neurons: Sequence) -> np.ndarray | None:
        """(rows, neurons) the values of ``neurons`` (``Neuron``) at each row's labelled token, or ``None`` as ``features``."""
        found = self._entries(rows, [("neurons", n.layer) for n in neurons])
        if found is None:
            return None
        values = [[f[("neurons", n.layer)][n.index] for n in neurons] for f in found]
        return np.array(values, dtype=np.float64).reshape(len(found), len(neurons))


@contextlib.contextmanager
def recording_layer_features(model, layers: Sequence[int], position, neuron_layers: Sequence[int] = ()):
    """Inside the ``with`` block, every forward pass of ``model`` (a causal LM) keeps what ``layer_features`` would give at
    ``layers`` for each sequence, at its labelled token by the rule ``position`` (``"last"`` or an integer, from the
    attention mask): the residual stream after each of those blocks that the pass completes, through the final norm; and
    the MLP neurons of ``neuron_layers`` there, when the pass reaches their output projection. For a pass that runs anyway
    (the dataset's, the scan's) to give the probes their features too (``RecordedFeatures``). Enter it before another
    reader's hooks (a ``NeuronRecorder`` that ends the pass) so that its hooks run first."""
    model = causal_lm(model)
    spec = arch_spec(model)
    blocks = get_layers(model)
    norm = get_final_norm(model)
    parent = model.get_submodule(spec.layers.rpartition(".")[0])  # the model whose forward takes the token ids
    recorded = RecordedFeatures(tuple(int(layer) for layer in layers), position, tuple(int(layer) for layer in neuron_layers))
    seen: dict = {}

    def inputs(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        seen.clear()
        if ids is None:
            return
        mask = torch.ones_like(ids) if mask is None or mask.dim() != 2 else mask
        seen["ids"], seen["mask"], seen["at"] = ids, mask, label_positions(mask, position)

    def keep(key, hidden, transform=lambda x: x):
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        values = transform(hidden[rows, seen["at"].to(hidden.device)]).double().cpu().numpy()
        ids, mask = seen["ids"].cpu().numpy().astype(np.int64), seen["mask"].cpu().numpy().astype(bool)
        first = mask.argmax(-1)
        for i in range(len(ids)):
            entry = recorded.rows.setdefault(ids[i][mask[i]].tobytes(), (int(seen["at"][i]) - int(first[i]), {}))
            entry[1][key] = values[i]

    def block_hook(layer):
        def record(module, args, output):
            if "ids" in seen:
                keep(layer, output[0] if isinstance(output, tuple) else output, norm)
        return record

    def neuron_hook(layer):
        def record(module, args):
            if "ids" in seen:
                keep(("neurons", layer), args[0])
        return record

    handles = [parent.register_forward_pre_hook(inputs, with_kwargs=True)]
    handles += [blocks[layer].register_forward_hook(block_hook(layer)) for layer in recorded.layers]
    handles += [get_submodule(blocks[layer], spec.neuron_module).register_forward_pre_hook(neuron_hook(layer))
                for layer in recorded.neuron_layers]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------------------
# Ridge probe and lookup table


class RidgeProbe:
    """Closed-form ridge regression with an unpenalised intercept, the penalty chosen on validation data.

    X and y are centred on the training rows; one SVD of the centred X makes every alpha cheap. ``alpha`` is
    in the units of the Gram matrix ``XcᵀXc`` (a sum over training rows). Without validation data the alpha
    with the lowest generalized cross-validation error (GCV, the closed form of leave-one-out for ridge) is taken.

    >>> probe = RidgeProbe().fit(X_train, y_train, X_val, y_val)
    >>> probe.predict(X_test), probe.alpha, probe.val_r2, probe.direction

    Attributes after ``fit``: ``alpha``, ``coef_`` (features,), ``intercept_``, ``val_r2`` (validation R² at
    ``alpha``; NaN without validation data), ``alphas_`` and ``scores_`` (validation R² or GCV error per alpha),
    ``selection`` (``"validation"`` or ``"gcv"``), ``direction`` (unit vector of ``coef_``; zeros if ``coef_`` is 0).
    """

    def __init__(self):
        self.alpha: float | None = None
        self.coef_: np.ndarray | None = None
        self.intercept_: float | None = None
        self.val_r2: float = float("nan")
        self.alphas_: np.ndarray | None = None
        self.scores_: np.ndarray | None = None
        self.selection: str | None = None

    def fit(self, X, y, X_val=None, y_val=None, alphas=DEFAULT_ALPHAS) -> RidgeProbe:
        X = as_matrix(X)
        y = as_vector(y, X.shape[0])
        if X.shape[0] < 2:
            raise ValueError(f"a ridge probe needs at least 2 training rows, got {X.shape[0]}.")
        alphas = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
        if alphas.ndim != 1 or not len(alphas) or not (np.isfinite(alphas).all() and (alphas > 0).all()):
            raise ValueError(f"alphas must be one or more positive finite numbers, got {alphas}.")
        if (X_val is None) != (y_val is None):
            raise ValueError("give both X_val and y_val, or neither (then alpha is chosen by generalized cross-validation).")
        x_mean, y_mean = X.mean(0), float(y.mean())
        Xc, yc = X - x_mean, y - y_mean
        U, s, Vt = np.linalg.svd(Xc, full_matrices=False)
        Uty = U.T @ yc
        shrink = s[None, :] / (s[None, :] ** 2 + alphas[:, None])  # (alphas, k)
        coefs = (shrink * Uty[None, :]) @ Vt  # (alphas, features)

        use_validation = X_val is not None and len(np.atleast_1d(y_val)) > 0
        if use_validation:
            X_val = as_matrix(X_val, "X_val")
            if X_val.shape[1] != X.shape[1]:
                raise ValueError(f"X_val has {X_val.shape[1]} features, X has {X.shape[1]}: use the same features.")
            y_val = as_vector(y_val, X_val.shape[0], "y_val")
            use_validation = np.ptp(y_val) > 0
        if use_validation:
            predictions = (X_val - x_mean) @ coefs.T + y_mean  # (rows, alphas)
            scores = np.array([r2_score(y_val, predictions[:, i]) for i in range(len(alphas))])
            best = int(np.argmax(scores))
            self.selection, self.val_r2 = "validation", float(scores[best])
        else:
            # GCV(alpha) = n * RSS / (n - 1 - df)^2; the intercept costs one degree of freedom.
            n = X.shape[0]
            filt = s[None, :] ** 2 / (s[None, :] ** 2 + alphas[:, None])
            outside = float(yc @ yc - Uty @ Uty)  # the part of y no direction of X can fit
            rss = (((1 - filt) * Uty[None, :]) ** 2).sum(1) + max(outside, 0.0)
            dof = np.maximum(n - 1 - filt.sum(1), 1e-12)
            scores = n * rss / dof**2
            best = int(np.argmin(scores))
            self.selection, self.val_r2 = "gcv", float("nan")
        self.alphas_, self.scores_ = alphas, scores
        self.alpha = float(alphas[best])
        self.coef_ = coefs[best]
        self.intercept_ = float(y_mean - x_mean @ self.coef_)
        return self

    def predict(self, X) -> np.ndarray:
        if self.coef_ is None:
            raise ValueError("this RidgeProbe is not fitted yet: call fit() first.")
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.coef_):
            raise ValueError(f"X must have shape (rows, {len(self.coef_)}) like the training features, got {X.shape}.")
        return X @ self.coef_ + self.intercept_

    @property
    def direction(self) -> np.ndarray:
        if self.coef_ is None:
            raise ValueError("this RidgeProbe is not fitted yet: call fit() first.")
        norm = np.linalg.norm(self.coef_)
        return self.coef_ / norm if norm > 0 else np.zeros_like(self.coef_)
