"""``nsr train`` never loses a finished run and resumes an interrupted one (nsr_hf/pipeline.py, "The run's folder").

- A finished run's folder is refused (exit 2, before the model is loaded) unless ``--overwrite``; with it, the new run is
  written beside (``.tmp-<name>-overwrite``) and replaces the old one only once it succeeded, and no file it leaves names
  that sibling. A folder of other files is refused even with ``--overwrite``.
- An unfinished run is resumed by the same command: ``run_config.json`` must match (the keys that differ are named), the
  dataset and the neuron are kept, the training continues from the newest complete checkpoint, and the result is the one an
  uninterrupted run gives (kill -9 test).
"""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_word_corpus
from safetensors.torch import load_file

from nsr_hf import pipeline
from nsr_hf.cli import main
from nsr_hf.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TRACEBACK = "Traceback (most recent call last)"
REPO = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"(it|doc|batch|examples)/s\]")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``nsr <argv>`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert TRACEBACK not in err
    return code, out, err


def error_lines(err: str) -> list[str]:
    """stderr without progress bars: the lines the user reads."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not PROGRESS.search(line)]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_args(model, corpus, out, *extra) -> list[str]:
    """A tiny ``nsr train``: neuron 1.3, 60 documents, a cheap evaluation."""
    return ["train", "--model", model, "--corpus", corpus, "--neuron", "1.3", "--dataset_documents", "60", "--max_length", "32",
            "--num_train_epochs", "2", "--eval_methods", "mean", "--n_bootstrap", "20", "--counterfactual_rows", "0",
            "--output_dir", out, *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", n=60)


@pytest.fixture
def finished_run(tiny_model_dirs, corpus, tmp_path, capsys):
    """A finished run in ``tmp_path/run``: (its folder, the arguments that made it)."""
    out = tmp_path / "run"
    args = train_args(tiny_model_dirs["gpt2"], corpus, out)
    assert main([str(a) for a in args]) == 0
    capsys.readouterr()
    return out, args


def no_model_loading(monkeypatch):
    """Make loading a model fail the test: a refusal must come before it."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", load)


# -- a finished run is never lost


def test_a_finished_run_is_refused_before_the_model_is_loaded(finished_run, capsys, monkeypatch):
    out, args = finished_run
    before = snapshot(out)
    no_model_loading(monkeypatch)
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert error_lines(err) == [f"nsr train: error: {out} already holds a train run that finished. Nothing was changed: choose another "
                                "output_dir, or pass --overwrite to replace it once the new run succeeds."]
    assert snapshot(out) == before


def test_a_finished_run_keeps_no_checkpoints_but_records_its_configuration(finished_run):
    out, _ = finished_run
    assert not (out / "checkpoints").exists()  # they only serve to resume
    assert json.loads((out / "run_config.json").read_text())["neuron"] == "1.3"


def test_keep_checkpoints_keeps_the_latest_checkpoint(tiny_model_dirs, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = run_cli(capsys, *train_args(tiny_model_dirs["gpt2"], corpus, out, "--keep_checkpoints", "--evaluate", "false"))
    assert code == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-8"]  # save_total_limit 1: the last epoch's


def test_overwrite_replaces_a_finished_run_and_no_file_names_the_folder_it_was_written_in(finished_run, capsys):
    out, args = finished_run
    old_config = json.loads((out / "metrics.json").read_text())["config"]
    code, stdout, _ = run_cli(capsys, *args, "--overwrite", "--learning_rate", "0.01")
    assert code == 0
    assert f"--overwrite: the new run replaced the old one in {out}" in stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]  # no sibling left
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["config"]["learning_rate"] == 0.01 != old_config["learning_rate"] and "evaluation" in summary
    sibling = f".tmp-{out.name}-overwrite".encode()
    assert [str(p) for p in out.rglob("*") if p.is_file() and sibling in p.read_bytes()] == []
    assert json.loads((out / "predictor" / "config.json").read_text())["dataset_name"] == str(out / "dataset")
    assert json.loads((out / "evaluation" / "metrics.json").read_text())["predictor"]["path"] == str(out / "predictor")


def test_a_failing_overwrite_leaves_the_old_run_byte_identical(finished_run, tmp_path, capsys):
    out, args = finished_run
    before = snapshot(out)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({"body": f"text {i}"}) + "\n" for i in range(60)))
    args = [a if a != args[args.index("--corpus") + 1] else wrong for a in args]
    code, _, err = run_cli(capsys, *args, "--overwrite")
    assert code == 2
    assert "text_field" in error_lines(err)[-1] or "'text'" in error_lines(err)[-1]
    assert snapshot(out) == before


def test_a_folder_of_other_files_is_refused_even_with_overwrite(tiny_model_dirs, corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    no_model_loading(monkeypatch)
    for extra in ((), ("--overwrite",)):
        code, _, err = run_cli(capsys, *train_args(tiny_model_dirs["gpt2"], corpus, out, *extra))
        assert code == 2
        assert error_lines(err)[-1].startswith(f"nsr train: error: {out} holds files that are not a train run (notes.txt): choose a new "
                                               "or empty output_dir")
    assert snapshot(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_an_overwrite_whose_evaluation_fails_keeps_the_old_run_and_its_rerun_replaces_it(finished_run, capsys):
    out, args = finished_run
    before = snapshot(out)
    sibling = out.parent / f".tmp-{out.name}-overwrite"
    code, _, err = run_cli(capsys, *args, "--overwrite", "--learning_rate", "0.01", "--eval_methods", "cross", "--cross_models",
                           "nobody/no-such-model")
    assert code == 2
    assert error_lines(err)[-1] == (f"nsr train: Nothing was replaced: the old run in {out} is as it was. The new run's training is kept "
                                    f"in {sibling}: fix the evaluation option and rerun the same command (with --overwrite): it "
                                    "evaluates the new run and then replaces the old one.")
    assert snapshot(out) == before
    # the same command with the evaluation option fixed continues the new run from its last checkpoint, then replaces the old one
    code, stdout, _ = run_cli(capsys, *args, "--overwrite", "--learning_rate", "0.01")
    assert code == 0
    assert f"resuming the interrupted run in {out}: training continues from checkpoint-8" in stdout
    assert json.loads((out / "metrics.json").read_text())["config"]["learning_rate"] == 0.01
    assert not sibling.exists()


def test_the_same_command_after_a_failed_evaluation_evaluates_without_training_again(tiny_model_dirs, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = train_args(tiny_model_dirs["gpt2"], corpus, out)
    code, _, _ = run_cli(capsys, *args, "--eval_methods", "cross", "--cross_models", "nobody/no-such-model")
    assert code == 2
    predictor = (out / "predictor" / "model.safetensors").read_bytes()
    code, stdout, _ = run_cli(capsys, *args)  # the evaluation option fixed: the evaluation keys may change when resuming
    assert code == 0
    assert f"resuming the interrupted run in {out}: training continues from checkpoint-8" in stdout  # the last step: nothing to train
    assert (out / "predictor" / "model.safetensors").read_bytes() == predictor
    assert "evaluation" in json.loads((out / "metrics.json").read_text())


# -- an unfinished run is resumed by the same command, and only by it


def unfinished(out: Path, args: list, **changes) -> None:
    """Make ``out`` look like a run of ``args`` (with ``changes``) that was interrupted while it built its dataset."""
    (config,) = pipeline.RecipeParser(TrainConfig).parse([str(a) for a in args[1:]])
    recorded = {**pipeline.run_config(config), **changes}
    (out / "dataset" / "shards" / "train-00000").mkdir(parents=True)  # a shard computed
    (out / "run_config.json").write_text(json.dumps(recorded))


def test_an_unfinished_run_with_other_settings_is_refused_and_names_the_keys(tiny_model_dirs, corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = train_args(tiny_model_dirs["gpt2"], corpus, out)
    unfinished(out, args, learning_rate=0.5)
    before = snapshot(out)
    no_model_loading(monkeypatch)
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert error_lines(err) == [f"nsr train: error: {out} holds an unfinished train run with other settings (learning_rate: 0.5 -> 0.001). "
                                "Nothing was changed: rerun the command that started it to resume it, choose another output_dir, or pass "
                                "--overwrite to start again (the new run replaces it once it succeeded)."]
    assert snapshot(out) == before


def test_a_wrong_corpus_field_is_refused_before_anything_is_written(tiny_model_dirs, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(tiny_model_dirs["gpt2"], corpus, out, "--text_field", "body"))
    assert code == 2 and "body" in error_lines(err)[-1]
    assert not out.exists()  # the pre-load checks run before the run's folder is claimed


def test_a_start_that_failed_before_computing_anything_is_started_again_with_other_settings(tiny_model_dirs, corpus, tmp_path,
                                                                                          capsys, monkeypatch):
    out = tmp_path / "run"

    def broken(*args, **kwargs):  # a failure the pre-load checks cannot see: the weights themselves
        raise pipeline.UserError("model: its weights could not be read")

    real = pipeline.load_model_and_tokenizer
    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", broken)
    code, _, err = run_cli(capsys, *train_args(tiny_model_dirs["gpt2"], corpus, out, "--learning_rate", "0.5"))
    assert code == 2 and "could not be read" in error_lines(err)[-1]
    assert sorted(p.name for p in out.iterdir()) == ["run_config.json"]  # nothing computed
    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", real)
    code, _, _ = run_cli(capsys, *train_args(tiny_model_dirs["gpt2"], corpus, out, "--evaluate", "false"))  # other settings: no refusal
    assert code == 0 and json.loads((out / "run_config.json").read_text())["learning_rate"] != 0.5


def test_the_evaluation_logging_and_checkpoint_keys_may_change_when_resuming():
    base = pipeline.run_config(TrainConfig(neuron="1.3"))
    free = TrainConfig(neuron="1.3", n_bootstrap=7, eval_methods=["mean"], evaluate=False, logging_steps=3, save_strategy="steps",
                       keep_checkpoints=True, report_to="none", overwrite=True, output_dir="elsewhere", drift_every_n_steps=9)
    assert pipeline.run_config(free) == base
    assert pipeline.run_config(TrainConfig(neuron="1.3", seed=1)) != base


def test_an_unfinished_run_from_before_run_config_is_refused_unless_resumed_explicitly(tiny_model_dirs, corpus, tmp_path, capsys,
                                                                                        monkeypatch):
    out = tmp_path / "run"
    (out / "dataset").mkdir(parents=True)
    no_model_loading(monkeypatch)
    code, _, err = run_cli(capsys, *train_args(tiny_model_dirs["gpt2"], corpus, out))
    assert code == 2
    assert error_lines(err)[-1].startswith(f"nsr train: error: {out} holds an unfinished train run without run_config.json (from an "
                                           "older nsr_hf), so its settings cannot be checked.")
    assert not (out / "run_config.json").exists()


def test_the_newest_complete_checkpoint_is_resumed_and_one_cut_short_is_dropped(tmp_path):
    for step, complete in ((4, True), (8, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert pipeline.latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    pipeline.drop_incomplete_checkpoints(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]


def test_an_interrupted_gradual_run_says_that_its_training_starts_again(tiny_model_dirs, corpus, tmp_path, capsys, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline.PredictorTrainer, "train", interrupted)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(tiny_model_dirs["gpt2"], corpus, out, "--unfreeze", "gradual"))
    assert code == 130
    assert error_lines(err)[-2:] == [pipeline.GRADUAL_CANNOT_RESUME, "nsr train: interrupted: rerun the same command to resume."]
    assert (out / "dataset" / "dataset_dict.json").is_file() and (out / "run_config.json").is_file()
    monkeypatch.undo()
    code, stdout, _ = run_cli(capsys, *train_args(tiny_model_dirs["gpt2"], corpus, out, "--unfreeze", "gradual", "--evaluate", "false"))
    assert code == 0
    assert stdout.count(f"resuming {out}: {pipeline.GRADUAL_CANNOT_RESUME}") == 1
    assert f"resuming: using the dataset in {out / 'dataset'}" in stdout


# -- kill -9, then the same command: the result of an uninterrupted run


def script_run(args: list, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``python nsr_hf/train.py <args>`` in a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    env.pop("NSR_DEBUG", None)
    env.pop(pipeline.KILL_AFTER_CHECKPOINT, None) if not env_extra else None
    # a background job starts with SIGINT ignored, and a Python started so never turns SIGINT into KeyboardInterrupt: give
    # the child the default disposition, as a terminal would
    return subprocess.run([sys.executable, str(REPO / "nsr_hf" / "train.py"), *[str(a) for a in args[1:]]], capture_output=True,
                          text=True, env=env, timeout=600, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
@pytest.mark.parametrize("save, step", [(["--save_strategy", "epoch"], 4), (["--save_strategy", "steps", "--save_steps", "2"], 6)],
                         ids=["after-the-first-epoch", "in-the-middle-of-the-second-epoch"])
def test_a_run_killed_after_a_checkpoint_resumes_to_the_weights_and_metrics_of_an_uninterrupted_run(tiny_model_dirs, corpus, tmp_path,
                                                                                                    save, step):
    # intervention training: its draws must depend on the seed, the epoch and the row, not on the draws since the process began
    extra = ["--num_train_epochs", "3", "--evaluate", "false", "--intervention_rate", "0.5", "--unfreeze", "last_k", "--unfreeze_k", "1"]
    whole = tmp_path / "whole"
    assert script_run(train_args(tiny_model_dirs["gpt2"], corpus, whole, *extra)).returncode == 0

    out = tmp_path / "killed"
    args = train_args(tiny_model_dirs["gpt2"], corpus, out, *extra, *save)  # 4 steps an epoch
    killed = script_run(args, {pipeline.KILL_AFTER_CHECKPOINT: str(step)})
    assert killed.returncode == -9
    assert (out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file() and not (out / "metrics.json").exists()
    dataset_before = snapshot(out / "dataset")
    neuron_before = (out / "neuron.json").read_bytes()
    state = json.loads((out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    seconds_before = state["stateful_callbacks"]["TrainingClock"]["attributes"]["saved_seconds"]
    assert seconds_before > 0  # the checkpoint keeps the training seconds spent up to it

    resumed = script_run(args)
    assert resumed.returncode == 0 and TRACEBACK not in resumed.stderr
    assert f"resuming: using the dataset in {out / 'dataset'}" in resumed.stdout
    assert f"resuming the interrupted run in {out}: training continues from checkpoint-{step}" in resumed.stdout
    assert snapshot(out / "dataset") == dataset_before and (out / "neuron.json").read_bytes() == neuron_before  # reused, not rebuilt
    weights, expected = load_file(out / "predictor" / "model.safetensors"), load_file(whole / "predictor" / "model.safetensors")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    summary, whole_summary = json.loads((out / "metrics.json").read_text()), json.loads((whole / "metrics.json").read_text())
    assert summary["metrics"]["test"] == pytest.approx(
        {k: v for k, v in whole_summary["metrics"]["test"].items() if not k.endswith(("runtime", "per_second"))} | {
            k: summary["metrics"]["test"][k] for k in summary["metrics"]["test"] if k.endswith(("runtime", "per_second"))})
    assert summary["global_step"] == whole_summary["global_step"] == 12
    # the training time counts the killed attempt's seconds up to its checkpoint, not only the resumed attempt's
    train = summary["train"]
    assert "train_runtime_this_attempt" not in whole_summary["train"]
    assert train["train_runtime"] >= seconds_before + 0.9 * train["train_runtime_this_attempt"]
    assert train["train_runtime"] > train["train_runtime_this_attempt"]
    assert summary["intervention"] == whole_summary["intervention"]
    assert not (out / "checkpoints").exists()
    # the drift monitor's history continues from the checkpoint's (not measured again as if the run began at the resume)
    drift, whole_drift = (json.loads((d / "drift.json").read_text())["history"] for d in (out, whole))
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in drift] == [
        {k: v for k, v in e.items() if k != "seconds"} for e in whole_drift]
    assert summary["drift_monitor"]["lm_loss_delta"] == whole_summary["drift_monitor"]["lm_loss_delta"]


def test_a_sweep_rerun_resumes_an_interrupted_run_with_the_dataset_it_started_with(tmp_path, monkeypatch):
    from nsr_hf import sweep

    calls = []
    monkeypatch.setattr(sweep, "run_train", lambda config, shared=None: calls.append(config.dataset))
    finished_seed, interrupted_seed = sweep.run_dir(tmp_path, "1.3", 0), sweep.run_dir(tmp_path, "1.3", 1)
    (finished_seed / "dataset").mkdir(parents=True)
    (finished_seed / "metrics.json").write_text(json.dumps({"evaluation": {}}))
    interrupted_seed.mkdir(parents=True)  # it started while seed 0 had not finished, so it built its own dataset
    (interrupted_seed / "run_config.json").write_text(json.dumps({"dataset": None}))
    sweep.train_one(sweep.SweepConfig(seeds=[0, 1], output_dir=str(tmp_path)), {}, tmp_path, "1.3", 1)
    assert calls == [None]  # not seed 0's dataset: the same command resumes the same run


@pytest.mark.slow
def test_ctrl_c_after_a_checkpoint_says_rerun_and_the_rerun_continues_from_it(tiny_model_dirs, corpus, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_model_dirs["gpt2"], corpus, out, "--evaluate", "false")
    interrupted = script_run(args, {pipeline.KILL_AFTER_CHECKPOINT: "4:SIGINT"})  # Ctrl-C after the first epoch's checkpoint
    assert interrupted.returncode == 130 and TRACEBACK not in interrupted.stderr
    assert error_lines(interrupted.stderr)[-1] == "python nsr_hf/train.py: interrupted: rerun the same command to resume."
    resumed = script_run(args)
    assert resumed.returncode == 0
    assert f"resuming the interrupted run in {out}: training continues from checkpoint-4" in resumed.stdout
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 8


def test_rename_recorded_paths_rewrites_text_files_and_leaves_binary_ones(tmp_path):
    from nsr_hf.run_folder import rename_recorded_paths

    work, final = tmp_path / ".tmp-run-overwrite", tmp_path / "run"
    (work / "predictor").mkdir(parents=True)
    (work / "predictor" / "config.json").write_text(json.dumps({"dataset_name": str(work / "dataset")}))
    binary = b"\0" + str(work).encode()
    (work / "weights.bin").write_bytes(binary)
    assert rename_recorded_paths(work, final) == [work / "predictor" / "config.json"]
    assert json.loads((work / "predictor" / "config.json").read_text()) == {"dataset_name": str(final / "dataset")}
    assert (work / "weights.bin").read_bytes() == binary


@pytest.mark.slow
def test_two_processes_resume_a_killed_run_and_both_refuse_it_once_finished(finished_run, tiny_model_dirs, tmp_path):
    """Only the main process claims the folder; the other waits, then decides the same: it resumes, and it refuses (no hang)."""
    out = tmp_path / "two"
    args = ["--model", tiny_model_dirs["gpt2"], "--dataset", finished_run[0] / "dataset", "--num_train_epochs", "2",
            "--per_device_train_batch_size", "8", "--evaluate", "false", "--output_dir", out]  # 4 steps an epoch

    def launch(env_extra=None) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": str(REPO), **(env_extra or {})}
        env.pop("NSR_DEBUG", None)
        return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                               str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"), str(REPO / "nsr_hf" / "train.py"),
                               *[str(a) for a in args]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    assert launch({pipeline.KILL_AFTER_CHECKPOINT: "4"}).returncode != 0
    assert (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file() and not (out / "metrics.json").exists()
    resumed = launch()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming the interrupted run in {out}: training continues from checkpoint-4" in resumed.stdout
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 8
    before = snapshot(out)
    refused = launch()
    # a process exits 2 with the one line (the launcher stops the other, and prints its own report and traceback, as for any
    # failed worker); none waits for the other forever
    assert refused.returncode != 0 and "exitcode  : 2" in refused.stderr
    assert f"python nsr_hf/train.py: error: {out} already holds a train run that finished." in refused.stderr
    assert f'File "{REPO / "nsr_hf"}' not in refused.stderr  # no traceback from nsr_hf's own code
    assert snapshot(out) == before


def test_a_run_interrupted_before_its_first_checkpoint_says_its_training_starts_again(tiny_model_dirs, corpus, tmp_path, capsys,
                                                                                      monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline.PredictorTrainer, "train", interrupted)
    out = tmp_path / "run"
    args = train_args(tiny_model_dirs["gpt2"], corpus, out, "--evaluate", "false")
    code, _, err = run_cli(capsys, *args)
    assert code == 130 and error_lines(err)[-1] == "nsr train: interrupted: rerun the same command to resume."
    monkeypatch.undo()
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0
    assert (f"resuming the interrupted run in {out}: it stopped before its first checkpoint (save_strategy 'epoch'), so the training "
            "starts from step 0; what it computed before is reused.") in stdout


def test_an_evaluation_interrupted_inside_nsr_train_resumes_its_finished_stages_to_the_same_figures(tiny_model_dirs, corpus, tmp_path,
                                                                                                     capsys, caplog, monkeypatch):
    from nsr_hf.evaluation import protocol

    whole = tmp_path / "whole"
    assert run_cli(capsys, *train_args(tiny_model_dirs["gpt2"], corpus, whole))[0] == 0
    out = tmp_path / "run"
    args = train_args(tiny_model_dirs["gpt2"], corpus, out)
    real = protocol._shuffled_predictions

    def interrupted(*a, **k):  # Ctrl-C once the predictor's predictions (the first stage) are kept
        raise KeyboardInterrupt

    monkeypatch.setattr(protocol, "_shuffled_predictions", interrupted)
    code, _, err = run_cli(capsys, *args)
    assert code == 130 and "interrupted: rerun the same command to resume." in err
    assert (out / ".tmp-evaluation-stages" / "predictions.pkl").is_file()

    monkeypatch.setattr(protocol, "_shuffled_predictions", real)
    with caplog.at_level("WARNING", logger="nsr_hf.evaluation.protocol"):
        assert run_cli(capsys, *args)[0] == 0
    assert "Resumed the interrupted evaluation: read back its finished stages ['predictions']" in caplog.text
    assert not (out / ".tmp-evaluation-stages").exists()
    evaluation, expected = (json.loads((d / "evaluation" / "metrics.json").read_text())["metrics"] for d in (out, whole))
    assert evaluation == expected
