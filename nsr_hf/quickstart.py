"""The main job on the embedded default: ``recipes/quickstart.yaml`` run by ``nsr_hf.pipeline.run_train``.

    nsr quickstart                                   # SmolLM2-135M (embedded) on Python's own docs, offline
    nsr quickstart --output_dir outputs/qs2 --num_train_epochs 1    # any TrainConfig key overrides the recipe

It scans the lower third of the model on training documents, picks the most linearly readable of the top
candidates, builds its activation dataset, fine-tunes the two blocks after the target with a regression head,
and runs the evaluation protocol; everything is written under ``output_dir`` (default ``outputs/quickstart``):
``scan/``, ``dataset/``, ``predictor/``, ``evaluation/`` (report.md and PNGs), ``drift.json``/``drift.png``
and ``metrics.json``. The recipe's values are kept here too, so that an installed package (without the
``recipes/`` folder) runs the same job; ``tests/test_recipes.py`` checks that the two agree.
"""
from __future__ import annotations

from nsr_hf.models import EMBEDDED_NAME
from nsr_hf.pipeline import run_train
from nsr_hf.training.config import TrainConfig, check_keys, parse_overrides

QUICKSTART = {
    "model": EMBEDDED_NAME,
    "corpus": "embedded",
    "neuron": "auto",
    "layers": list(range(10)),
    "select": "readable",
    "select_candidates": 20,
    "scan_documents": 300,
    "dataset_documents": 1200,
    "max_length": 64,
    "position": "last",
    "head_type": "regression",
    "head_init": "probe",
    "read_layer": "target+2",
    "unfreeze": "after_target",
    "learning_rate": 3.0e-4,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "eval_strategy": "no",
    "logging_steps": 10,
    "drift_every_n_steps": 60,
    "seed": 0,
    "report_to": "none",
    "probe_layers": "up_to_read",
    "cross_models": ["minilm"],
    "output_dir": "outputs/quickstart",
}


def quickstart_config(**overrides):
    """The quickstart's ``TrainConfig`` (``QUICKSTART`` with ``overrides``)."""

    check_keys(overrides, "the quickstart overrides")
    return TrainConfig(**{**QUICKSTART, **overrides})


def run_quickstart(argv=None) -> dict:
    """``nsr quickstart [--key value ...]``: the quickstart recipe with command-line overrides."""

    return run_train(quickstart_config(**parse_overrides(list(argv or []))))
