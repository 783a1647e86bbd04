"""benchmarks/pipeline.py: the FLOP floors it puts next to a run's stage times count what they say."""
from __future__ import annotations

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("pipeline")


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


def test_stages_that_ran_in_bfloat16_count_at_bfloat16s_rate_and_their_parents_add_up(bench, tmp_path):
    import json

    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "metrics.json").write_text(json.dumps({"baselines_info": {
        "random_init": {"dtype": "bfloat16"}, "cross:minilm": {"dtype": "bfloat16"}, "ridge_probe": {}, "mean": {"dtype": None}}}))
    precision = bench.stage_precision(tmp_path)
    assert precision == {"evaluation/baselines/random-init probe": "bfloat16", "evaluation/baselines/cross-model probes": "bfloat16"}
    floor = {"dataset": (100.0, "d"), "evaluation/baselines/random-init probe": (300.0, "r"),
             "evaluation/baselines/cross-model probes": (60.0, "c"), "evaluation/baselines/probes of the original model": (10.0, "o"),
             "evaluation/causal test": (20.0, "k")}
    floor["evaluation/baselines"] = (370.0, "the three above")
    floor["evaluation"] = (390.0, "the parts below")
    rates = {"float32": 10.0, "bfloat16": 30.0}
    seconds = bench.floor_seconds(floor, rates, precision)
    assert seconds["dataset"] == 10.0 and seconds["evaluation/baselines/probes of the original model"] == 1.0
    assert seconds["evaluation/baselines/random-init probe"] == 10.0 and seconds["evaluation/baselines/cross-model probes"] == 2.0
    assert seconds["evaluation/baselines"] == 13.0 and seconds["evaluation"] == 15.0  # the parts' seconds, not 390 / 10
    facts = {"precision": precision, "summary": {"stage_seconds": {"dataset": 20.0, "evaluation/baselines/random-init probe": 15.0}}}
    rows = {r["stage"]: r for r in bench.table(facts, floor, rates)}
    assert rows["evaluation/baselines/random-init probe"]["ratio"] == 1.5
    assert rows["evaluation/baselines/random-init probe"]["passes"] == "r (in bfloat16)"
    assert "30.0 GFLOP/s in bfloat16" in bench.markdown(list(rows.values()), {"float32": 10e9, "bfloat16": 30e9}, 100.0)
    assert bench.floor_seconds(floor, rates, {})["evaluation"] == 39.0  # all in float32: the FLOPs at one rate


def test_the_sweep_cost_is_each_runs_seconds_against_a_runs_own_cost_less_what_a_sweep_does_once(tmp_path):
    import json

    cost = load_benchmark("sweep_cost")
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
