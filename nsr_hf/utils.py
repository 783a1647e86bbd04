"""Small rules every layer shares: how to take a model out of its wrappers, and how results become JSON. It imports no
torch (a model or a tensor here means torch is loaded already), so that a reader of a run's files starts fast."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """``model`` out of every training wrapper: PEFT (``get_base_model``; its LoRA layers stay injected in the modules),
    DDP / ``DataParallel`` and Accelerate's ``.module``. An ``ActivationPredictor`` stays an ``ActivationPredictor``."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif _is_data_parallel(model) or (
                type(model).__name__ == "DistributedDataParallel" and hasattr(model, "module")):
            model = model.module
        else:
            return model


def _is_data_parallel(model) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel))


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
    torch = sys.modules.get("torch")  # a tensor exists only once torch is loaded
    if torch is not None and isinstance(value, torch.Tensor):
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


# The command line this process is running, as its user typed it (``nsr train recipe.yaml --seed 1``): set by the entry
# points (``nsr``, ``nsr_hf/train.py``) for the work they do, read where a run records how it was produced.
_COMMAND: list[list[str]] = []


@contextlib.contextmanager
def command_recorded(words):
    """While the block runs, ``recorded_command()`` is ``words`` (the program's name and its arguments); the outermost
    entry point wins (``nsr train`` calls the train script's ``main``, which keeps ``nsr train``)."""
    _COMMAND.append([str(w) for w in words])
    try:
        yield
    finally:
        _COMMAND.pop()


def recorded_command() -> str | None:
    """The command line of the entry point this process runs, quoted for a shell; None when called from Python."""
    import shlex

    return shlex.join(_COMMAND[0]) if _COMMAND else None
