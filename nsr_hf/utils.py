"""Small rules every layer shares: how to take a model out of its wrappers, and how results become JSON."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """``model`` out of every training wrapper: PEFT (``get_base_model``; its LoRA layers stay injected in the modules),
    DDP / ``DataParallel`` and Accelerate's ``.module``. An ``ActivationPredictor`` stays an ``ActivationPredictor``."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
                type(model).__name__ == "DistributedDataParallel" and hasattr(model, "module")):
            model = model.module
        else:
            return model


def causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM under every wrapper (``unwrap``) and inside an ``ActivationPredictor`` (its ``base``)."""
    model = unwrap(model)
    if getattr(getattr(model, "config", None), "model_type", None) == "nsr_activation_predictor":
        return unwrap(model.base)
    return model


def to_jsonable(value: Any) -> Any:
    """Plain JSON values: numpy and torch scalars and arrays as numbers and lists, NaN and infinities as None, paths
    and other objects as their text."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    if hasattr(value, "tolist"):
        return to_jsonable(value.tolist())
    return str(value)


def file_sha256(path: "str | os.PathLike") -> str:
    """The SHA-256 of a file's bytes (hex), read in blocks: model weights need not fit in memory twice."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: "str | os.PathLike", value: Any, indent: "int | None" = 2) -> Path:
    """Write ``value`` as strict JSON (``to_jsonable``: no NaN, no numpy types); parent folders are created. The file is
    replaced whole (``write_text_atomically``): an interruption never leaves half a ``metrics.json``."""
    from nsr_hf.run_folder import write_text_atomically

    return write_text_atomically(path, json.dumps(to_jsonable(value), indent=indent, allow_nan=False))
