"""The examples run end to end with the small budget, on the embedded default, as a user would run them.

Each script runs as a subprocess (``python examples/<script> --budget small --output_dir <tmp>``, offline). The
analyses analyse the run that ``quickstart_api.py`` trained (``--from_run``) instead of training their own with
``run_train``, which keeps the two under about four minutes on two CPU cores; ``run_train`` itself is tested in
``test_trainer.py``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ANALYSES = ("weight_alignment", "projection_analysis", "activation_patching", "direction_ablation", "causal_test",
            "drift_anatomy", "drift_anatomy_trained_run")


def run_example(script: str, output_dir: Path, *extra: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(EXAMPLES / script), "--budget", "small", "--output_dir", str(output_dir), *extra],
                            check=False, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{script} exited with {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_json(path: Path):
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart_api")
    return out, run_example("quickstart_api.py", out)


def test_quickstart_api_writes_every_stage_under_output_dir(quickstart_run):
    out, _ = quickstart_run
    for path in ("scan/top_neurons.json", "scan/score_heatmap.png", "scan/selection.json", "dataset/dataset_dict.json",
                 "predictor/config.json", "predictor/model.safetensors", "predictor/README.md", "drift.json", "drift.png",
                 "evaluation/metrics.json", "evaluation/report.md", "summary.json"):
        assert (out / path).is_file(), f"{path} missing from {out}"
    assert any((out / "evaluation").glob("*.png")), "the evaluation report has no figure"


def test_quickstart_api_reports_finite_test_metrics_and_reloads_the_same_predictor(quickstart_run):
    out, stdout = quickstart_run
    summary = read_json(out / "summary.json")
    assert all(finite(summary["test"][key]) for key in ("r2", "pearson", "mse")), summary["test"]
    assert summary["reload_max_difference"] < 1e-4
    assert summary["neuron_max_abs_change"] < 1e-4, "after_target must leave the neuron unchanged"
    assert all(finite(t["report"]) and finite(t["true"]) for t in summary["new_texts"])
    evaluation = read_json(out / "evaluation" / "metrics.json")
    assert {"self", "mean", "ridge_probe", "shuffled_labels"} <= set(evaluation["metrics"]["test"])
    assert finite(evaluation["metrics"]["test"]["self"]["r2"]) and finite(evaluation["causal"]["slope"])
    assert "saved to" in stdout


def test_analyses_save_every_figure_and_its_numbers_and_print_a_reading_of_each(quickstart_run, tmp_path):
    run, _ = quickstart_run
    stdout = run_example("analyses.py", tmp_path, "--from_run", str(run))
    numbers = {}
    for name in ANALYSES:
        numbers[name] = read_json(tmp_path / f"{name}.json")
        png = tmp_path / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 1000, f"{name}.png missing or empty"
        assert f">>> {name}: " in stdout, f"no reading of {name} printed"
    assert set(read_json(tmp_path / "summary.json")["readings"]) == set(ANALYSES)

    alignment = numbers["weight_alignment"]
    assert all(finite(alignment[key]["out"]) for key in ("cosine", "z_score", "p_value"))
    assert finite(alignment["probe"]["cosine_with_head"])
    projection = numbers["projection_analysis"]
    read = projection["layers"].index(projection["read_layer"])
    assert finite(projection["head_output_r"]) and finite(projection["correlation"]["out"][read])
    patching = numbers["activation_patching"]
    assert finite(patching["target"]["all"]["slope"]) and len(patching["controls"]) >= 1
    assert all(finite(c["all"]["slope"]) for c in patching["controls"])
    ablation = numbers["direction_ablation"]
    assert finite(ablation["before"]["r"]) and finite(ablation["after"]["r"]) and finite(ablation["mean_abs_report_change"])
    causal = numbers["causal_test"]
    assert finite(causal["slope"]) and finite(causal["natural_slope"]) and causal["meaningful"]
    assert numbers["drift_anatomy_trained_run"]["changed"] is False, "after_target must not move the neuron's weights"
    moved = numbers["drift_anatomy"]
    assert moved["changed"] is True and all(finite(v["change_norm"]) for v in moved["vectors"].values())
