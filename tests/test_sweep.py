"""The sweep: one recipe over the scan's top neurons and several seeds; the summary holds the median and spread of
each figure per method; a re-run skips finished runs; the figures come from the evaluation when a run has one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nsr_hf.sweep import SweepConfig, run_figures, run_sweep, spread, summarise_runs, sweep_markdown

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def test_spread_is_the_median_quartiles_and_range():
    s = spread([4.0, 1.0, 3.0, 2.0, 10.0])
    assert s == {"n": 5, "median": 3.0, "q1": 2.0, "q3": 4.0, "iqr": 2.0, "min": 1.0, "max": 10.0, "mean": 4.0}
    assert spread([0.5])["iqr"] == 0.0


def test_figures_come_from_the_evaluation_when_a_run_has_one():
    evaluation = {"metrics": {"test": {"self": {"r2": 0.8, "pearson": 0.9, "rows": 12, "r2_ci": [0.7, 0.9], "subsets": {}},
                                       "ridge_probe": {"r2": 0.5, "pearson": 0.7, "rows": 12}}},
                  "comparisons": {"test": {"self_vs_cross:minilm": {"difference": 0.3, "low": 0.1, "high": 0.5}}},
                  "selectivity": {"test": {"self": {"selectivity": 0.75, "control": "shuffled_labels"}}}}
    figures = run_figures({"evaluation": evaluation, "neuron_drift": {"max_abs": 0.0}})
    assert figures["self"] == {"r2": 0.8, "pearson": 0.9, "drift_max_abs": 0.0}  # numbers only; rows and intervals left out
    assert figures["ridge_probe"] == {"r2": 0.5, "pearson": 0.7}
    assert figures["self_vs_cross:minilm"] == {"delta_r2": 0.3, "beats": 1.0}
    assert figures["selectivity:self"] == {"selectivity": 0.75}
    legacy = run_figures({"metrics": {"test": {"test_r2": 0.4, "test_mse": 0.1, "epoch": 1.0}}})
    assert legacy == {"self": {"r2": 0.4, "mse": 0.1, "epoch": 1.0}}


def test_a_run_on_a_low_spread_test_split_is_flagged_in_the_sweep_table():
    def run(neuron, ratio):
        evaluation = {"metrics": {"test": {"self": {"r2": -2.5 if ratio < 0.5 else 0.9}}},
                      "spread": {"test": {"std": ratio, "train_std": 1.0, "ratio": ratio, "warning": None}}}
        return {"neuron": neuron, "seed": 0, "status": "finished", "figures": run_figures({"evaluation": evaluation})}

    runs = [run("0.1270", 0.16), run("7.268", 0.95)]
    assert runs[0]["figures"]["self"]["spread_ratio"] == 0.16
    result = {"summary": summarise_runs(runs), "runs": runs, "split": "test", "neurons": ["0.1270", "7.268"], "seeds": [0]}
    text = sweep_markdown(result)
    assert "⚠ 1 run(s) on a test split" in text and "0.1270 (seed 0)" in text and "7.268 (seed 0)" not in text.split("## Runs")[0]
    assert "| 0.1270 | 0 | finished | -2.500 | n/a | n/a | n/a | n/a | n/a | 0.16 | n/a |" in text  # no faithfulness: n/a


def test_summary_is_per_method_and_figure_over_the_finished_runs():
    runs = [{"figures": {"self": {"r2": r2}, "mean": {"r2": 0.0}}} for r2 in (0.2, 0.6, 0.4)] + [{"error": "failed"}]
    summary = summarise_runs(runs)
    assert summary["self"]["r2"]["median"] == pytest.approx(0.4) and summary["self"]["r2"]["n"] == 3
    assert summary["mean"]["r2"]["max"] == 0.0


def test_reserved_keys_and_a_recipe_dataset_are_clear_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset: outputs/some_dataset\n")
    with pytest.raises(ValueError, match="names a dataset"):
        run_sweep(SweepConfig(recipe=str(recipe), output_dir=str(tmp_path / "s")))
    with pytest.raises(ValueError, match="use --seeds"):
        run_sweep(SweepConfig(output_dir=str(tmp_path / "s")), {"seed": "3"})
    with pytest.raises(ValueError, match="Unknown key"):
        run_sweep(SweepConfig(output_dir=str(tmp_path / "s")), {"learning_rat": "3"})
    with pytest.raises(ValueError, match="seeds repeat"):
        SweepConfig(seeds=[1, 1])


@pytest.fixture(scope="module")
def swept(tiny_model_dirs, tmp_path_factory):
    """nsr sweep on a tiny Llama with the synthetic corpus: 2 neurons x 2 seeds, a few steps each."""
    from nsr_hf.cli import main

    tmp = tmp_path_factory.mktemp("sweep")
    recipe = tmp / "tiny.yaml"
    recipe.write_text(f"model: {tiny_model_dirs['llama']}\ncorpus: synthetic\nscan_documents: 8\ndataset_documents: 12\nmax_length: 24\n"
                      "max_steps: 2\nper_device_train_batch_size: 4\neval_strategy: 'no'\nneuron: auto\n"
                      "eval_methods: [mean, ridge_probe, shuffled_labels]\nn_bootstrap: 50\n")
    out = tmp / "out"
    argv = ["sweep", str(recipe), "--top_n", "2", "--seeds", "0", "1", "--output_dir", str(out), "--learning_rate", "1e-2"]
    code = main(argv)
    return argv, out, code


def test_sweep_trains_every_neuron_and_seed_and_summarises(swept):
    _, out, code = swept
    assert code == 0
    result = json.loads((out / "sweep.json").read_text())
    assert len(result["neurons"]) == 2 and result["seeds"] == [0, 1] and result["failed"] == 0
    assert (out / "scan" / "top_neurons.json").exists()
    assert [(r["neuron"], r["seed"]) for r in result["runs"]] == [(n, s) for n in result["neurons"] for s in (0, 1)]
    for run in result["runs"]:
        saved = json.loads((Path(run["output_dir"]) / "metrics.json").read_text())
        assert saved["neurons"] == [run["neuron"]] and saved["config"]["seed"] == run["seed"]
        assert saved["config"]["learning_rate"] == 1e-2  # the override reached every run
    # the second seed of a neuron loads the dataset its first seed built
    first, second = result["runs"][0], result["runs"][1]
    assert json.loads((Path(second["output_dir"]) / "metrics.json").read_text())["config"]["dataset"] == str(
        Path(first["output_dir"]) / "dataset")
    values = [r["figures"]["self"]["mse"] for r in result["runs"]]
    assert result["summary"]["self"]["mse"] == spread(values)
    table = (out / "sweep.md").read_text()
    assert "| self | 4 |" in table and "## Runs" in table and result["neurons"][0] in table


def test_a_second_sweep_skips_the_finished_runs(swept, capsys):
    from nsr_hf.cli import main

    argv, out, _ = swept
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/metrics.json")}
    assert main(argv) == 0
    assert "sweep: neuron" not in capsys.readouterr().out  # no run started
    result = json.loads((out / "sweep.json").read_text())
    assert {r["status"] for r in result["runs"]} == {"skipped (finished before)"} and len(result["runs"]) == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/metrics.json")} == before
    assert result["summary"]["self"]["mse"]["n"] == 4


def test_datasets_from_sweeps_another_sweeps_neurons_on_its_rows(swept, tmp_path):
    """A second sweep (here: other training settings) takes the first sweep's neurons and datasets: no scan, no
    new dataset, every run of both sweeps on the same rows."""
    from nsr_hf.cli import main

    argv, source, _ = swept
    recipe = argv[1]
    out = tmp_path / "second"
    assert main(["sweep", recipe, "--datasets_from", str(source), "--seeds", "3", "--output_dir", str(out), "--learning_rate", "5e-3"]) == 0
    first, second = json.loads((source / "sweep.json").read_text()), json.loads((out / "sweep.json").read_text())
    assert second["neurons"] == first["neurons"] and not (out / "scan").exists()
    for run in second["runs"]:
        folder = Path(run["output_dir"])
        config = json.loads((folder / "metrics.json").read_text())["config"]
        assert Path(config["dataset"]).parent.parent == source / run["neuron"] and not (folder / "dataset").exists()
    assert f"Datasets (the same rows) from the sweep in {source}" in (out / "sweep.md").read_text()


def test_datasets_from_errors_name_what_is_missing(swept, tmp_path):
    from nsr_hf.sweep import source_datasets

    _, source, _ = swept
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        source_datasets(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no sweep.json.*--neurons"):
        source_datasets(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"no finished run with a dataset for neuron\(s\) \['9.99999'\]"):
        source_datasets(source, ["9.99999"])
    neuron = json.loads((source / "sweep.json").read_text())["neurons"][1]
    assert source_datasets(source, [neuron]) == {neuron: source / neuron / "seed-0" / "dataset"}


def test_a_run_whose_evaluation_did_not_finish_is_not_a_finished_run(tmp_path):
    from nsr_hf.sweep import _finished_dataset, finished

    run = tmp_path / "7.268" / "seed-0"
    (run / "dataset").mkdir(parents=True)
    assert not finished(run)  # nothing written yet
    # nsr train writes metrics.json before it evaluates: a failed evaluation leaves it without the evaluation
    (run / "metrics.json").write_text(json.dumps({"neurons": ["7.268"], "config": {"evaluate": True}}))
    assert not finished(run) and _finished_dataset(tmp_path, "7.268") is None
    (run / "metrics.json").write_text(json.dumps({"neurons": ["7.268"], "config": {"evaluate": False}}))
    assert finished(run)  # the evaluation was off: training was the whole run
    (run / "metrics.json").write_text(json.dumps({"neurons": ["7.268"], "config": {"evaluate": True}, "evaluation": {}}))
    assert finished(run) and _finished_dataset(tmp_path, "7.268") == run / "dataset"
    (run / "metrics.json").write_text('{"neurons": ')  # cut short
    assert not finished(run)
