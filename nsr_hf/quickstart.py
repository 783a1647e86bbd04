"""The main job on the embedded default: the shipped ``recipes/quickstart.yaml`` run by ``nsr_hf.pipeline.run_train``.

    nsr quickstart                                   # SmolLM2-135M (embedded) on Python's own docs, offline
    nsr quickstart --output_dir outputs/qs2 --num_train_epochs 1    # any TrainConfig key overrides the recipe

It scans the lower third of the model on training documents, picks the most linearly readable of the top
candidates, builds its activation dataset, fine-tunes the two blocks after the target with a regression head,
and runs the evaluation protocol; everything is written under ``output_dir`` (default ``outputs/quickstart``):
``scan/``, ``dataset/``, ``predictor/``, ``evaluation/`` (report.md and PNGs), ``drift.json``/``drift.png``
and ``metrics.json``. The recipe is the file itself (``nsr_hf.parsing.shipped_recipe``: beside the package in a
checkout, package data in an installed one), so the two cannot disagree.
"""
from __future__ import annotations

import json
from pathlib import Path

from nsr_hf.parsing import RecipeParser, load_recipe, shipped_recipe
from nsr_hf.pipeline import finished_run, print_result, read_run_config, run_config, run_train
from nsr_hf.training.config import TrainConfig

RECIPE = "quickstart.yaml"


def quickstart_parser() -> RecipeParser:
    """The parser of ``nsr quickstart``: ``TrainConfig`` keys over the quickstart recipe."""
    return RecipeParser(TrainConfig, prog="nsr quickstart", usage="nsr quickstart [--key value ...]",
                        description="The quickstart recipe (recipes/quickstart.yaml: its values are the defaults below); "
                                    "any TrainConfig key overrides it.")


def quickstart_config(argv=(), **overrides) -> TrainConfig:
    """The quickstart's ``TrainConfig``: the shipped recipe, then ``argv`` (``--key value`` words), then ``overrides``."""
    parser = quickstart_parser()
    words = parser.mapping_to_args(overrides, "the quickstart overrides") if overrides else []
    (config,) = parser.parse([str(shipped_recipe(RECIPE)), *argv, *words])
    return config


def quickstart_help() -> str:
    """``nsr quickstart --help``: every key, with the recipe's values as the defaults."""
    parser = quickstart_parser()
    (values,) = parser.given_values([str(shipped_recipe(RECIPE))])
    return parser.help_with(values) + f"\nThe recipe: {shipped_recipe(RECIPE)}\n" + "\n".join(
        f"  {k}: {v!r}" for k, v in load_recipe(shipped_recipe(RECIPE)).items())


def run_quickstart(argv=None) -> dict:
    """``nsr quickstart [--key value ...]``: the quickstart recipe with command-line overrides.

    Run again (``make quickstart`` twice) into its finished run with the same settings, it trains nothing: it prints that run's
    figures and how to run it again (``--overwrite``). With other settings, ``nsr train``'s rule holds (refused)."""
    config = quickstart_config(list(argv or []))
    out = Path(config.output_dir)
    if not config.overwrite and finished_run(out) and read_run_config(out) == run_config(config):
        summary = json.loads((out / "metrics.json").read_text())
        print(f"{out} already holds this quickstart, finished: nothing was run again. Its figures:", flush=True)
        print_result(config, out, summary, summary.get("evaluation"))
        print("\nTo run it again: nsr quickstart --overwrite (make quickstart ARGS=--overwrite), or another --output_dir.", flush=True)
        return summary
    return run_train(config)
