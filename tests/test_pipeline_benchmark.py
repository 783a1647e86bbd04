"""benchmarks/pipeline.py: the FLOP floors it puts next to a run's stage times count what they say."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "benchmarks" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_blocks_flops_are_two_per_weight_of_its_linear_maps_plus_the_attention(bench, tiny_model_dirs, arch):
    from nsr_hf.architectures import get_layers
    from nsr_hf.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(tiny_model_dirs[arch])
    config = model.config
    hidden = config.hidden_size
    expected = []
    for block in get_layers(model):
        weights = sum(m.weight.numel() for m in block.modules() if type(m).__name__ in ("Linear", "Conv1D"))
        assert weights > 0
        expected.append(2.0 * weights + 4.0 * 10 * hidden)
    assert bench.block_flops(config, context=10) == expected
    assert bench.span(expected, 1, 2) == expected[1] + expected[2] and bench.span(expected, 2, 1) == 0


def test_the_first_block_a_cached_training_step_runs_follows_the_strategy_and_the_interventions(bench):
    assert bench.first_trainable_block("after_target", target=7, read=9, k=1, intervened=False) == 8
    assert bench.first_trainable_block("after_target", target=7, read=9, k=1, intervened=True) == 7  # set inside block 7
    assert bench.first_trainable_block("last_k", target=3, read=9, k=2, intervened=False) == 8
    assert bench.first_trainable_block("head_only", target=3, read=9, k=1, intervened=False) == 10  # no block: the features
    assert bench.first_trainable_block("full", target=3, read=9, k=1, intervened=False) is None


def test_the_machines_matmul_rate_is_positive_and_finite(bench):
    rate = bench.matmul_rate([(32, 64)], tokens=64, repeats=2)
    assert 0 < rate < 1e15


def test_the_sweep_cost_is_each_runs_seconds_against_a_runs_own_cost_less_what_a_sweep_does_once(tmp_path):
    import json

    spec = importlib.util.spec_from_file_location("bench_sweep_cost", ROOT / "benchmarks" / "sweep_cost.py")
    cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cost)
    runs = []
    for neuron, seed, seconds in (("7.268", 0, 200.0), ("7.268", 1, 100.0), ("0.333", 0, 180.0), ("0.333", 1, 120.0)):
        folder = tmp_path / "sweep" / neuron / f"seed-{seed}"
        folder.mkdir(parents=True)
        stages = {"train": seconds / 2, "train/prefix cache": 1}
        (folder / "metrics.json").write_text(json.dumps({"seconds": seconds, "stage_seconds": stages}))
        runs.append({"neuron": neuron, "seed": seed, "output_dir": str(folder), "status": "trained"})
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps({"seeds": [0, 1], "runs": runs}))
    reference = tmp_path / "alone"
    reference.mkdir()
    (reference / "metrics.json").write_text(json.dumps({"seconds": 450.0, "stage_seconds": {"scan": 30, "readability selection": 20}}))
    out = cost.main(["--sweep", str(tmp_path / "sweep"), "--reference", str(reference), "--json", str(tmp_path / "cost.json")])
    assert out["mean_seconds"] == 150 and out["first_seed_mean_seconds"] == 190 and out["later_seeds_mean_seconds"] == 110
    assert out["reference_seconds_per_run"] == 400 and out["cheaper_than_reference"] == pytest.approx(400 / 150)
    assert json.loads((tmp_path / "cost.json").read_text())["runs"][1]["seconds"] == 100
