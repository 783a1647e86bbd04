"""Where a run's time goes: ``nsr_hf.stage_clock`` and the ``stage_seconds`` of a train run's ``metrics.json``."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nsr_hf.stage_clock import stage_clock, timed

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def test_nested_stages_are_named_outer_slash_inner_and_a_stage_run_twice_adds_up():
    with stage_clock() as seconds:
        with timed("outer"):
            with timed("inner"):
                time.sleep(0.02)
            with timed("inner"):
                time.sleep(0.02)
        with timed("after"):
            pass
    assert list(seconds) == ["outer", "outer/inner", "after"]
    assert seconds["outer/inner"] >= 0.04 and seconds["outer"] >= seconds["outer/inner"]
    assert 0 <= seconds["after"] < 0.02


def test_outside_a_clock_timed_measures_nothing_and_a_failing_stage_is_still_timed():
    with timed("nobody listens"):
        pass
    with stage_clock() as seconds:
        with pytest.raises(RuntimeError):
            with timed("fails"):
                raise RuntimeError("boom")
        with timed("next"):
            pass
    assert set(seconds) == {"fails", "next"}  # the failed stage closed: the next one is not nested in it


def test_a_train_run_records_the_seconds_of_its_stages_in_metrics_json(tiny_model_dirs, tmp_path):
    from conftest import write_word_corpus

    from nsr_hf.pipeline import run_train
    from nsr_hf.training.config import TrainConfig

    corpus = write_word_corpus(tmp_path / "docs.jsonl")
    config = TrainConfig(model=tiny_model_dirs["llama"], corpus=str(corpus), scan_documents=30, dataset_documents=60, max_length=32,
                         max_steps=2, per_device_train_batch_size=8, read_layer=2, unfreeze="last_k", unfreeze_k=1, logging_steps=1,
                         eval_methods=["mean", "ridge_probe"], n_bootstrap=20, cross_models=[], output_dir=str(tmp_path / "run"))
    run_train(config)
    summary = json.loads((Path(config.output_dir) / "metrics.json").read_text())
    seconds = summary["stage_seconds"]
    for stage in ("load model", "scan", "dataset", "predictor and head init", "train", "train/prefix cache", "neuron drift", "save",
                  "evaluation",
                  "evaluation/predictions", "evaluation/baselines", "evaluation/baselines/probes of the original model",
                  "evaluation/causal test", "evaluation/report"):
        assert stage in seconds and seconds[stage] >= 0, stage
    top = sum(v for k, v in seconds.items() if "/" not in k)
    assert top <= summary["seconds"] + 0.1  # the stages are parts of the run's time
    assert list(summary)[-3:] == ["stage_seconds", "evaluation", "seconds"]  # the evaluation and the time last, as always
