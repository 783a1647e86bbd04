"""Write order of the stage commands (``nsr scan``, ``nsr dataset``, ``nsr evaluate``): finished results in output_dir are
refused without ``--overwrite`` (before the model is loaded), a folder of other files is refused even with it, and with it
the new results are written beside the old ones and replace them only when complete: a failing or interrupted run leaves
the old folder byte-identical. ``nsr dataset`` resumes its shards after a kill -9 and gives the same rows; an interrupted
``nsr evaluate`` continues from its finished stages to the same metrics."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_word_corpus

import nsr_hf.data.generator as dg
import nsr_hf.evaluation.protocol as protocol
import nsr_hf.scanner.scan as scan_module
from nsr_hf.cli import main
from nsr_hf.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

TRACEBACK = "Traceback (most recent call last)"
REPO = Path(__file__).resolve().parents[1]
SLOW_SHARDS = REPO / "tests" / "scripts" / "slow_shards.py"


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv) -> tuple[int, str]:
    """``nsr <argv>`` in this process: (exit code, the last line of stderr); never a traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert TRACEBACK not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    return code, lines[-1] if lines else ""


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


def no_model_loading(monkeypatch, module):
    """Make ``module``'s model loader fail the test: a refusal must come before any model is loaded."""
    def loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(module, "load_model_and_tokenizer", loading)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", n=60)


# -- nsr scan


def scan_args(tiny_model_dirs, corpus, out, *extra):
    return ["scan", "--model", tiny_model_dirs["gpt2"], "--corpus", corpus, "--max_documents", "20", "--top_n", "3",
            "--histogram_documents", "5", "--output_dir", out, *extra]


@pytest.fixture
def finished_scan(tiny_model_dirs, corpus, tmp_path, capsys):
    out = tmp_path / "scan"
    assert run_cli(capsys, *scan_args(tiny_model_dirs, corpus, out))[0] == 0
    return out


def test_nsr_scan_refuses_a_finished_scan_before_loading_the_model(tiny_model_dirs, corpus, finished_scan, capsys, monkeypatch):
    before = snapshot(finished_scan)
    no_model_loading(monkeypatch, scan_module)
    code, line = run_cli(capsys, *scan_args(tiny_model_dirs, corpus, finished_scan))
    assert code == 2
    assert line == (f"nsr scan: error: {finished_scan} already holds a scan that finished. Nothing was changed: choose another "
                    "output_dir, or pass --overwrite to replace it once the new run succeeds.")
    assert snapshot(finished_scan) == before


def test_nsr_scan_overwrite_replaces_a_finished_scan_with_the_new_one(tiny_model_dirs, corpus, finished_scan, capsys):
    code, _ = run_cli(capsys, *scan_args(tiny_model_dirs, corpus, finished_scan, "--top_n", "5", "--overwrite", "true"))
    assert code == 0
    import json

    assert len(json.loads((finished_scan / "top_neurons.json").read_text())["top_neurons"]) == 5
    assert siblings(finished_scan) == ["scan"]  # no temporary or old folder left beside it


def test_an_interrupted_scan_with_overwrite_leaves_the_old_scan_byte_identical(tiny_model_dirs, corpus, finished_scan, capsys,
                                                                               monkeypatch):
    before = snapshot(finished_scan)

    def interrupted(*args, **kwargs):  # Ctrl-C while the new figures are written, after the table and top_neurons.json
        raise KeyboardInterrupt

    monkeypatch.setattr("nsr_hf.scanner.results.plot_score_heatmap", interrupted)
    code, line = run_cli(capsys, *scan_args(tiny_model_dirs, corpus, finished_scan, "--overwrite", "true"))
    assert code == 130 and line == "nsr scan: interrupted: rerun the same command to resume."
    assert snapshot(finished_scan) == before and siblings(finished_scan) == ["scan"]


def test_nsr_scan_never_replaces_a_folder_of_other_files_even_with_overwrite(tiny_model_dirs, corpus, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("my notes")
    no_model_loading(monkeypatch, scan_module)
    for extra in ((), ("--overwrite", "true")):
        code, line = run_cli(capsys, *scan_args(tiny_model_dirs, corpus, work, *extra))
        assert code == 2
        assert line == (f"nsr scan: error: {work} holds files that are not a scan: choose a new or empty output_dir "
                        "(--overwrite only replaces finished results of this command). Nothing was changed.")
    assert snapshot(work) == {"notes.txt": hashlib.sha256(b"my notes").hexdigest()}


# -- nsr evaluate


@pytest.fixture(scope="module")
def trained_run(tiny_model_dirs, corpus, tmp_path_factory):
    """A tiny trained run (no evaluation): its folder, with predictor/ and dataset/."""
    out = tmp_path_factory.mktemp("trained") / "run"
    code = main(["train", "--model", tiny_model_dirs["gpt2"], "--corpus", str(corpus), "--neuron", "1.3", "--dataset_documents", "60",
                 "--max_length", "32", "--num_train_epochs", "1", "--evaluate", "false", "--output_dir", str(out)])
    assert code == 0
    return out


def evaluate_args(run, out, *extra):
    return ["evaluate", "--predictor", run / "predictor", "--dataset", run / "dataset", "--methods", "mean", "--n_bootstrap", "20",
            "--causal", "false", "--output_dir", out, *extra]


@pytest.fixture
def finished_evaluation(trained_run, tmp_path, capsys):
    out = tmp_path / "evaluation"
    assert run_cli(capsys, *evaluate_args(trained_run, out))[0] == 0
    return out


def test_nsr_evaluate_refuses_a_finished_evaluation_before_loading_the_predictor(trained_run, finished_evaluation, capsys, monkeypatch):
    before = snapshot(finished_evaluation)

    def loading(*args, **kwargs):
        raise AssertionError("the predictor was loaded before the output folder was checked")

    monkeypatch.setattr(protocol, "load_predictor", loading)
    code, line = run_cli(capsys, *evaluate_args(trained_run, finished_evaluation))
    assert code == 2
    assert line == (f"nsr evaluate: error: {finished_evaluation} already holds an evaluation that finished. Nothing was changed: "
                    "choose another output_dir, or pass --overwrite to replace it once the new run succeeds.")
    assert snapshot(finished_evaluation) == before


def test_a_failing_evaluation_with_overwrite_leaves_the_old_one_byte_identical(trained_run, finished_evaluation, capsys, monkeypatch):
    before = snapshot(finished_evaluation)

    def failing_report(evaluation, output_dir, **kwargs):  # metrics.json and predictions.json are written by then
        raise UserError("the report could not be written")

    monkeypatch.setattr(protocol, "write_report", failing_report)
    overwrite = evaluate_args(trained_run, finished_evaluation, "--methods", "mean", "ridge_probe", "--overwrite", "true")
    code, line = run_cli(capsys, *overwrite)
    assert code == 2 and line == "nsr evaluate: error: the report could not be written"
    assert snapshot(finished_evaluation) == before
    assert siblings(finished_evaluation) == [".tmp-evaluation-stages", "evaluation"]  # the finished stages, for the rerun


def test_nsr_evaluate_overwrite_replaces_the_evaluation_once_complete(trained_run, finished_evaluation, capsys):
    import json

    code, _ = run_cli(capsys, *evaluate_args(trained_run, finished_evaluation, "--methods", "mean", "ridge_probe", "--overwrite", "true"))
    assert code == 0
    metrics = json.loads((finished_evaluation / "metrics.json").read_text())
    assert "ridge_probe" in metrics["metrics"]["test"] and (finished_evaluation / "report.md").is_file()
    assert "overwrite" not in metrics["config"]  # where it was written is not part of what was measured
    assert siblings(finished_evaluation) == ["evaluation"]


def test_nsr_evaluate_never_replaces_a_train_run_folder_even_with_overwrite(trained_run, capsys):
    before = snapshot(trained_run)
    code, line = run_cli(capsys, *evaluate_args(trained_run, trained_run, "--overwrite", "true"))
    assert code == 2
    assert line == (f"nsr evaluate: error: {trained_run} holds files that are not an evaluation: choose a new or empty output_dir "
                    "(--overwrite only replaces finished results of this command). Nothing was changed.")
    assert snapshot(trained_run) == before


def test_an_interrupted_evaluation_rerun_continues_from_its_finished_stages_to_the_same_metrics(trained_run, tmp_path, capsys,
                                                                                                monkeypatch):
    import json

    out, whole = tmp_path / "evaluation", tmp_path / "whole"
    command = evaluate_args(trained_run, out, "--methods", "mean", "ridge_probe", "--causal", "true")
    figures_of_a_neuron = protocol._neuron_result

    def interrupted(*args, **kwargs):  # Ctrl-C after the predictions and the baselines, during the figures
        raise KeyboardInterrupt

    monkeypatch.setattr(protocol, "_neuron_result", interrupted)
    code, line = run_cli(capsys, *command)
    assert code == 130 and line == "nsr evaluate: interrupted: rerun the same command to resume."
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / ".tmp-evaluation-stages").iterdir()) == [
        "baselines-0.pkl", "key.txt", "predictions.pkl", "shuffled.pkl"]

    def computed_again(*args, **kwargs):
        raise AssertionError("a finished stage was computed again")

    monkeypatch.setattr(protocol, "_neuron_result", figures_of_a_neuron)
    monkeypatch.setattr(protocol, "predict_split", computed_again)
    monkeypatch.setattr(protocol, "run_baselines", computed_again)
    assert run_cli(capsys, *command)[0] == 0
    assert siblings(out) == ["evaluation"]  # the kept stages are gone once the evaluation is written
    monkeypatch.undo()
    assert run_cli(capsys, *evaluate_args(trained_run, whole, "--methods", "mean", "ridge_probe", "--causal", "true"))[0] == 0
    resumed, uninterrupted = (json.loads((folder / "metrics.json").read_text()) for folder in (out, whole))
    resumed["config"].pop("output_dir"), uninterrupted["config"].pop("output_dir")
    commands = resumed.pop("command"), uninterrupted.pop("command")  # each records its own command: the same but for --output_dir
    assert commands[0].replace(str(out), str(whole)) == commands[1]
    assert resumed == uninterrupted
    assert (out / "predictions.json").read_bytes() == (whole / "predictions.json").read_bytes()


def test_the_pipeline_replaces_its_own_scan_and_evaluation_folders_and_resumes_its_dataset(tmp_path):
    from nsr_hf.pipeline import dataset_config, evaluate_config, scan_config
    from nsr_hf.training.config import TrainConfig

    config = TrainConfig(output_dir=str(tmp_path / "run"), neuron="1.3")
    assert scan_config(config, 10, 10, tmp_path / "run" / "scan").overwrite
    assert not dataset_config(config, "1.3", tmp_path / "run").overwrite  # an interrupted run's dataset resumes its shards
    assert evaluate_config(config, tmp_path / "run").overwrite


# -- nsr dataset


def dataset_args(tiny_model_dirs, corpus, out, *extra):
    return ["dataset", "--model", tiny_model_dirs["gpt2"], "--corpus", corpus, "--id_field", "id", "--neurons", "1.3", "0.5",
            "--max_length", "16", "--batch_size", "4", "--shard_size", "4", "--output_dir", out, *extra]


@pytest.fixture
def finished_dataset(tiny_model_dirs, corpus, tmp_path, capsys):
    out = tmp_path / "ds"
    assert run_cli(capsys, *dataset_args(tiny_model_dirs, corpus, out))[0] == 0
    return out


def rows(folder):
    from datasets import load_from_disk

    return {split: ds.to_dict() for split, ds in load_from_disk(str(folder)).items()}


def test_nsr_dataset_refuses_a_finished_dataset_before_loading_the_model(tiny_model_dirs, corpus, finished_dataset, capsys, monkeypatch):
    before = snapshot(finished_dataset)
    no_model_loading(monkeypatch, dg)
    code, line = run_cli(capsys, *dataset_args(tiny_model_dirs, corpus, finished_dataset))
    assert code == 2
    assert line == (f"nsr dataset: error: {finished_dataset} already holds a finished dataset. Nothing was changed: choose another "
                    "--output_dir, or pass --overwrite to replace it once the new dataset is saved.")
    assert snapshot(finished_dataset) == before


def test_nsr_dataset_never_writes_into_a_folder_of_other_files(tiny_model_dirs, corpus, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("my notes")
    no_model_loading(monkeypatch, dg)
    for extra in ((), ("--overwrite", "true")):
        code, line = run_cli(capsys, *dataset_args(tiny_model_dirs, corpus, work, *extra))
        assert code == 2
        assert line == (f"nsr dataset: error: {work} holds files that are not a dataset: choose a new or empty output_dir "
                        "(--overwrite only replaces finished results of this command). Nothing was changed.")
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]


def test_an_interrupted_overwrite_leaves_the_old_dataset_byte_identical_and_its_rerun_resumes(tiny_model_dirs, corpus, finished_dataset,
                                                                                            tmp_path, capsys, monkeypatch, same_rows):
    before = snapshot(finished_dataset)
    real, calls = dg.capture_activations, []

    def interrupted_after_two_shards(*args, **kwargs):  # batch_size == shard_size: one call per shard
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dg, "capture_activations", interrupted_after_two_shards)
    overwrite = dataset_args(tiny_model_dirs, corpus, finished_dataset, "--max_length", "8", "--overwrite", "true")
    code, line = run_cli(capsys, *overwrite)
    assert code == 130 and line == "nsr dataset: interrupted: rerun the same command to resume."
    assert snapshot(finished_dataset) == before
    work = finished_dataset.parent / ".tmp-ds-overwrite" / "shards"
    assert len([p for p in work.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 2  # the new shards, beside the old dataset

    monkeypatch.setattr(dg, "capture_activations", real)
    assert run_cli(capsys, *overwrite)[0] == 0
    assert siblings(finished_dataset) == ["ds"]
    assert run_cli(capsys, *dataset_args(tiny_model_dirs, corpus, tmp_path / "whole", "--max_length", "8"))[0] == 0
    same_rows(rows(finished_dataset), rows(tmp_path / "whole"))


def test_an_overwrite_interrupted_while_saving_leaves_the_old_dataset_byte_identical(tiny_model_dirs, corpus, finished_dataset, capsys,
                                                                                    monkeypatch):
    before = snapshot(finished_dataset)

    def interrupted_card(*args, **kwargs):  # the splits are saved, the card is not
        raise KeyboardInterrupt

    monkeypatch.setattr(dg, "dataset_card", interrupted_card)
    code, _ = run_cli(capsys, *dataset_args(tiny_model_dirs, corpus, finished_dataset, "--max_length", "8", "--overwrite", "true"))
    assert code == 130
    assert snapshot(finished_dataset) == before


def test_a_new_dataset_interrupted_while_saving_leaves_nothing_that_looks_finished(tiny_model_dirs, corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ds"

    def interrupted_card(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dg, "dataset_card", interrupted_card)
    assert run_cli(capsys, *dataset_args(tiny_model_dirs, corpus, out))[0] == 130
    assert not (out / "dataset_dict.json").exists() and (out / "shards" / "manifest.json").is_file()
    monkeypatch.undo()
    assert run_cli(capsys, *dataset_args(tiny_model_dirs, corpus, out))[0] == 0  # the same command resumes and saves
    assert (out / "dataset_dict.json").is_file() and not (out / "shards").exists()


def finished_shards(out: Path) -> int:
    shards = out / "shards"
    return len(list(shards.glob("*/manifest.json"))) if shards.is_dir() else 0


@pytest.mark.slow  # three Python processes that import torch
def test_nsr_dataset_killed_with_sigkill_resumes_to_the_same_rows_as_an_uninterrupted_run(tiny_model_dirs, corpus, tmp_path, same_rows):
    out, whole = tmp_path / "killed", tmp_path / "whole"
    env = {**os.environ, "PYTHONPATH": str(REPO), "NSR_TEST_SHARD_SLEEP": "2"}
    # tests/scripts/slow_shards.py is `nsr` with a pause after every finished shard: the kill lands between shards, by design
    killed = subprocess.Popen([sys.executable, str(SLOW_SHARDS), *map(str, dataset_args(tiny_model_dirs, corpus, out))], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while finished_shards(out) < 1 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, killed.stderr.read().decode()[-2000:]
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert not (out / "dataset_dict.json").exists() and finished_shards(out) >= 1
    plain = {k: v for k, v in env.items() if k != "NSR_TEST_SHARD_SLEEP"}  # the rerun and the uninterrupted run: the plain command

    def nsr(*argv):
        result = subprocess.run([sys.executable, "-m", "nsr_hf.cli", *map(str, argv)], env=plain, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0 and TRACEBACK not in result.stderr, result.stderr[-2000:]
        return result

    resumed = nsr(*dataset_args(tiny_model_dirs, corpus, out))
    assert "Resuming the unfinished dataset" in resumed.stderr
    nsr(*dataset_args(tiny_model_dirs, corpus, whole))
    same_rows(rows(out), rows(whole))
