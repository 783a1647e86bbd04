"""benchmarks/faithfulness.py: the runs it asks for (plain against faithful, the datasets' size), the folder rule that keeps
their shared datasets consistent, and the table it reads back from finished runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("faithfulness")


def _run(folder: Path, documents: int, metrics: dict | None = None) -> None:
    """A finished run of the benchmark in ``folder``: its run_config.json and metrics.json."""
    folder.mkdir(parents=True)
    (folder / "run_config.json").write_text(json.dumps({"dataset_documents": documents}))
    (folder / "metrics.json").write_text(json.dumps(metrics or {"evaluation": {}}))


def test_plain_runs_have_no_interventions_and_faithful_runs_take_the_faithful_recipes_keys(bench):
    from nsr_hf.parsing import load_recipe

    plain = bench.overrides_for("regression", "plain")
    faithful = bench.overrides_for("regression", "faithful")
    recipe = load_recipe(str(ROOT / "recipes/quickstart_faithful.yaml"))
    assert plain["intervention_rate"] == 0.0
    assert faithful["intervention_rate"] == recipe["intervention_rate"] > 0
    assert faithful["learning_rate"] == recipe["learning_rate"] and faithful["num_train_epochs"] == recipe["num_train_epochs"]
    # both are scored on the same kind of counterfactual rows, and the datasets' size is the recipe's unless asked
    assert plain["counterfactual_source"] == faithful["counterfactual_source"] == recipe["intervention_source"]
    assert "dataset_documents" not in plain and "dataset_documents" not in faithful
    # the own-next-token head's faithful recipe also moves the report to the labelled token: both of its runs take that
    # head, so plain and faithful differ in their training only
    token_recipe = load_recipe(str(ROOT / "recipes/quickstart_token_faithful.yaml"))
    token_plain, token = bench.overrides_for("token", "plain"), bench.overrides_for("token", "faithful")
    assert token["intervention_rate"] == token_recipe["intervention_rate"] > 0 and token_plain["intervention_rate"] == 0.0
    assert token["num_train_epochs"] == token_recipe["num_train_epochs"] and "num_train_epochs" not in token_plain
    for run in (token_plain, token):
        assert run["prompt_suffix"] == token_recipe["prompt_suffix"] == "" and run["bin_strategy"] == "kmeans"
    # the regression head's plain and faithful recipes read the same head: nothing of the head is overridden
    assert "prompt_suffix" not in plain and "bin_strategy" not in faithful


def test_dataset_documents_reaches_every_run(bench):
    for head in ("regression", "token_exit", "token"):
        for training in ("plain", "faithful"):
            assert bench.overrides_for(head, training, 4800)["dataset_documents"] == 4800


def test_a_new_folder_takes_the_asked_documents_or_the_recipes(bench, tmp_path):
    assert bench.dataset_documents_of(tmp_path, 4800) == 4800
    assert bench.dataset_documents_of(tmp_path, None) == 1200  # recipes/quickstart.yaml's


def test_a_folder_goes_on_with_its_runs_documents(bench, tmp_path):
    _run(tmp_path / "regression-faithful" / "7.268" / "seed-0", 4800)
    assert bench.dataset_documents_of(tmp_path, None) == 4800
    assert bench.dataset_documents_of(tmp_path, 4800) == 4800


def test_mixing_documents_in_one_folder_is_refused_before_anything_runs(bench, tmp_path):
    _run(tmp_path / "regression-faithful" / "7.268" / "seed-0", 4800)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=r"4800 documents.*asks for 1200.*another --output_dir.*--dataset_documents 4800"):
        bench.main(["--output_dir", str(tmp_path), "--dataset_documents", "1200", "--neurons", "7.268", "--seeds", "0"])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written, nothing run


def test_the_table_reads_back_a_finished_run(bench, tmp_path):
    metrics = {
        "train": {"train_runtime": 368.0},
        "evaluation": {
            "metrics": {"test": {"self": {"r2": 0.963, "r2_ci": [0.948, 0.974]}, "ridge_probe": {"r2": 0.937}}},
            "faithfulness": {"test": {
                "meaningful": True,
                "methods": {"self": {"r2": 0.960, "r2_ci": [0.931, 0.976]}, "ridge_probe": {"r2": 0.835},
                            "ridge_probe_intervened": {"r2": 0.944}, "ridge_probe_intervened_original": {"r2": 0.51},
                            "compare": {"r2": -0.38}},
                "slope_ratio": {"ratio": 1.101, "low": 0.914, "high": 1.247},
                "comparisons": {"ridge_probe_intervened": {"difference": 0.016, "low": 0.0004, "high": 0.045},
                                "ridge_probe_intervened_original": {"difference": 0.45, "low": 0.38, "high": 0.52},
                                "compare": {"difference": 1.34, "low": 0.97, "high": 1.81}}}}},
    }
    _run(tmp_path / "regression-faithful" / "0.1524" / "seed-0", 4800, metrics)
    result = bench.main(["--output_dir", str(tmp_path), "--table_only", "--heads", "regression", "--trainings", "faithful",
                         "--neurons", "0.1524", "--seeds", "0"])
    (row,) = result["rows"]
    assert (row["natural_r2"], row["counterfactual_r2"], row["slope_ratio"]) == (0.963, 0.960, 1.101)
    assert row["intervened_probe_counterfactual_r2"] == 0.944 and row["self_minus_intervened_probe_ci"] == [0.0004, 0.045]
    assert row["original_reader_counterfactual_r2"] == 0.51 and row["self_minus_original_reader_ci"] == [0.38, 0.52]
    assert row["train_seconds"] == 368.0
    written = json.loads((tmp_path / "faithfulness.json").read_text())
    assert written["dataset_documents"] == 4800 and len(written["rows"]) == 1
    text = (tmp_path / "faithfulness.md").read_text()
    assert "datasets of 4800 documents" in text
    assert "| 0.1524 | regression | 0 | faithful | 0.963 [0.95, 0.97] | 0.960 [0.93, 0.98] | 1.101 [0.91, 1.25] |" in text
    assert row["plain_counterfactual_r2"] == -0.38 and row["self_minus_plain"] == 1.34 and row["self_minus_plain_ci"] == [0.97, 1.81]
    assert "| 0.510 | 0.450 [0.38, 0.52] | -0.380 | 1.340 [0.97, 1.81] | 368 |" in text


def test_an_unfinished_run_is_not_in_the_table(bench, tmp_path):
    folder = tmp_path / "regression-faithful" / "0.1524" / "seed-0"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"train": {"train_runtime": 1.0}}))  # training done, evaluation not
    assert bench.run_row(folder) is None


def test_every_run_is_asked_for_with_the_benchmarks_documents_and_shares_the_first_runs_dataset(bench, tmp_path, monkeypatch):
    calls = []

    def fake_sweep(config, overrides):  # "runs" the sweep: a finished run with a dataset, as run_sweep leaves it
        calls.append((config, overrides))
        folder = Path(config.output_dir) / config.neurons[0] / f"seed-{config.seeds[0]}"
        if not folder.exists():
            _run(folder, overrides["dataset_documents"])
            (folder / "dataset").mkdir()
            (folder / "predictor").mkdir()

    monkeypatch.setattr(bench, "run_sweep", fake_sweep)
    bench.main(["--output_dir", str(tmp_path), "--dataset_documents", "4800", "--heads", "regression", "token_exit",
                "--neurons", "0.333", "--seeds", "0", "1"])
    runs = [(c, o) for c, o in calls if len(c.neurons) == 1 and len(c.seeds) == 1]
    assert len(runs) == 2 * 2 * 2  # heads x trainings x seeds
    assert all(o["dataset_documents"] == 4800 for _, o in calls)
    assert runs[0][0].datasets_from is None  # the first run builds the dataset; every later one takes it
    later = [c for c, _ in runs[1:]]
    assert all(c.datasets_from is not None and Path(c.datasets_from).parent == tmp_path and c.datasets_from != c.output_dir
               for c in later)
    assert sorted(o["intervention_rate"] > 0 for _, o in runs) == [False] * 4 + [True] * 4
    # each faithful run scores its plain twin (same head, neuron, seed: run just before it) on the same counterfactual rows
    for config, overrides in runs:
        twin = tmp_path / f"{Path(config.output_dir).name.rsplit('-', 1)[0]}-plain" / "0.333" / f"seed-{config.seeds[0]}" / "predictor"
        assert overrides.get("compare_predictor") == (str(twin) if overrides["intervention_rate"] > 0 else None)
