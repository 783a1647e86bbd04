"""Every command's mistakes: one line on stderr that says what was wrong and what to do, exit code 2, no traceback;
Ctrl-C exits 130 with "rerun to resume"; ``--debug`` / ``NSR_DEBUG=1`` show the traceback; a bug keeps its traceback;
and nothing written before a failure is changed by it (``nsr train`` keeps its trained predictor when the evaluation fails)."""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_word_corpus

from nsr_hf.cli import main
from nsr_hf.errors import UserError, error_boundary, explain

pytestmark = pytest.mark.usefixtures("one_thread")

TRACEBACK = "Traceback (most recent call last)"
REPO = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"(it|doc|batch|examples)/s\]")


def run_cli(capsys, *argv) -> tuple[int, str]:
    """``nsr <argv>`` in this process: (exit code, stderr)."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert TRACEBACK not in err
    return code, err


def error_lines(err: str) -> list[str]:
    """stderr without progress bars: the lines the user reads."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not PROGRESS.search(line)]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def failed_evaluation_run(tiny_model_dirs, tmp_path_factory):
    """A tiny ``nsr train`` whose evaluation fails (a cross model that is not there, offline): (exit code, stderr, out)."""
    root = tmp_path_factory.mktemp("failed_eval")
    corpus = write_word_corpus(root / "corpus.jsonl", n=60)
    out = root / "run"
    code = main(["train", "--model", tiny_model_dirs["gpt2"], "--corpus", str(corpus), "--neuron", "1.3", "--dataset_documents", "60",
                 "--max_length", "32", "--num_train_epochs", "1", "--n_bootstrap", "20", "--eval_methods", "cross",
                 "--cross_models", "nobody/no-such-model", "--output_dir", str(out)])
    return code, out


# -- nsr train never loses a trained model to its evaluation


def test_a_failed_evaluation_keeps_the_trained_predictor_and_says_how_to_rerun_it(failed_evaluation_run, capsys):
    code, out = failed_evaluation_run
    assert code == 2
    for name in ("predictor/model.safetensors", "predictor/config.json", "predictor/README.md", "metrics.json", "log_history.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "metrics.json").read_text())
    assert "evaluation" not in summary and summary["metrics"]["validation"] and summary["neurons"] == ["1.3"]


def test_the_rerun_command_of_a_failed_evaluation_works(failed_evaluation_run, capsys):
    _, out = failed_evaluation_run
    predictor = snapshot(out / "predictor")
    code, err = run_cli(capsys, "evaluate", "--predictor", out / "predictor", "--dataset", out / "dataset", "--output_dir",
                        out / "evaluation", "--methods", "mean", "--n_bootstrap", "20")
    assert code == 0, err
    assert (out / "evaluation" / "metrics.json").is_file() and (out / "evaluation" / "report.md").is_file()
    assert snapshot(out / "predictor") == predictor  # evaluating reads the predictor, never rewrites it


def test_a_successful_run_writes_the_evaluation_into_metrics_and_the_card_as_before(tiny_model_dirs, tmp_path, capsys):
    corpus = write_word_corpus(tmp_path / "corpus.jsonl", n=60)
    out = tmp_path / "run"
    code, err = run_cli(capsys, "train", "--model", tiny_model_dirs["gpt2"], "--corpus", corpus, "--neuron", "1.3", "--dataset_documents",
                        "60", "--max_length", "32", "--num_train_epochs", "1", "--eval_methods", "mean", "--n_bootstrap", "20",
                        "--output_dir", out)
    assert code == 0, err
    summary = json.loads((out / "metrics.json").read_text())
    assert list(summary)[-2:] == ["evaluation", "seconds"]  # the order metrics.json has always had
    assert summary["evaluation"]["kind"] == "nsr_hf.evaluation.protocol"
    card = (out / "predictor" / "README.md").read_text()
    assert "## Evaluation" in card and "| **self** |" in card and "## Metrics at the end of training" in card
    # faithfulness is a headline figure of the card, next to accuracy, with its verdict
    section = summary["evaluation"]["faithfulness"]["test"]
    assert "Faithfulness: " in card and "| counterfactual R² [95% CI] |" in card and "slope ratio [95% CI]" in card
    assert section["verdict"] in card


def test_nsr_train_prints_faithfulness_next_to_accuracy_in_its_last_lines(tiny_model_dirs, tmp_path, capsys):
    corpus = write_word_corpus(tmp_path / "corpus.jsonl", n=60)
    out = tmp_path / "run"
    code = main([str(a) for a in ("train", "--model", tiny_model_dirs["gpt2"], "--corpus", corpus, "--neuron", "1.3",
                                  "--dataset_documents", "60", "--max_length", "32", "--num_train_epochs", "1", "--eval_methods",
                                  "mean", "--n_bootstrap", "20", "--output_dir", out)])
    printed = capsys.readouterr()
    assert code == 0 and TRACEBACK not in printed.err, printed.err
    evaluation = json.loads((out / "metrics.json").read_text())["evaluation"]
    last = printed.out[printed.out.rindex("train finished in"):]
    accuracy, faithfulness = last.index("| **self** |"), last.index("| reader | counterfactual R² [95% CI]")
    assert accuracy < faithfulness < last.index("evaluation report:")  # the two tables side by side, then the verdicts
    assert f"- {evaluation['faithfulness']['test']['verdict']}" in last


def test_the_failed_evaluation_message_names_the_cross_model_and_the_rerun(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    # the message of the fixture's run, read here where capsys sees it: a cheap evaluation failure after a real training
    import nsr_hf.pipeline as pipeline

    def failing_evaluation(*args, **kwargs):
        raise UserError("cross model 'nobody/no-such-model' is not a folder here and not in the Hugging Face cache")

    monkeypatch.setattr(pipeline, "evaluate_trained", failing_evaluation)
    corpus = write_word_corpus(tmp_path / "corpus.jsonl", n=60)
    out = tmp_path / "run"
    code, err = run_cli(capsys, "train", "--model", tiny_model_dirs["gpt2"], "--corpus", corpus, "--neuron", "1.3", "--dataset_documents",
                        "60", "--max_length", "32", "--num_train_epochs", "1", "--output_dir", out)
    assert code == 2
    lines = error_lines(err)
    assert lines[-2] == "nsr train: error: cross model 'nobody/no-such-model' is not a folder here and not in the Hugging Face cache"
    assert lines[-1].startswith("nsr train: The training is kept: the predictor is in")
    assert f"nsr evaluate --predictor {out / 'predictor'} --dataset {out / 'dataset'} --output_dir {out / 'evaluation'}" in lines[-1]
    assert (out / "predictor" / "model.safetensors").is_file() and (out / "metrics.json").is_file()


def test_an_unexpected_evaluation_failure_keeps_its_traceback_and_the_predictor(tiny_model_dirs, tmp_path, monkeypatch):
    import nsr_hf.pipeline as pipeline

    def broken_evaluation(*args, **kwargs):
        raise RuntimeError("a bug in the evaluation")

    monkeypatch.setattr(pipeline, "evaluate_trained", broken_evaluation)
    corpus = write_word_corpus(tmp_path / "corpus.jsonl", n=60)
    with pytest.raises(RuntimeError, match="a bug in the evaluation") as caught:
        main(["train", "--model", tiny_model_dirs["gpt2"], "--corpus", str(corpus), "--neuron", "1.3", "--dataset_documents", "60",
              "--max_length", "32", "--num_train_epochs", "1", "--output_dir", str(tmp_path / "run")])
    assert any("nsr evaluate --predictor" in note for note in caught.value.__notes__)  # shown under the traceback
    assert (tmp_path / "run" / "predictor" / "model.safetensors").is_file()


# -- models


def test_a_near_miss_of_the_embedded_name_gets_did_you_mean(capsys):
    code, err = run_cli(capsys, "capture", "--model", "smollm2-135", "--neurons", "1.3")
    assert code == 2
    assert error_lines(err) == ["nsr capture: error: model 'smollm2-135' is neither a folder nor the embedded model: did you mean "
                                "'smollm2-135m'?"]


def test_hub_ids_and_folders_are_never_taken_for_a_near_miss(tmp_path, monkeypatch):
    from nsr_hf.models import check_model_name

    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135").mkdir()
    for name in ("HuggingFaceTB/SmolLM2-135M", "gpt2", "smollm2-135", "EleutherAI/pythia-70m"):
        check_model_name(name)  # no error: a Hub id, or a folder here
    with pytest.raises(UserError, match="did you mean 'smollm2-135m'"):
        check_model_name("SmolLM2-135M")


def test_a_model_that_is_not_cached_while_offline_names_offline_mode_and_the_embedded_model(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_cli(capsys, "capture", "--model", "nobody/no-such-model", "--neurons", "1.3")
    assert code == 2
    (line,) = error_lines(err)
    assert line.startswith("nsr capture: error: model 'nobody/no-such-model' is not a folder here and not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in line and "'smollm2-135m' needs no download" in line


def test_a_local_model_path_that_is_not_there_is_not_tried_on_the_hub(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for name in ("./nothere", "out/nothere"):
        code, err = run_cli(capsys, "scan", "--model", name, "--output_dir", "scan")
        assert code == 2
        (line,) = error_lines(err)
        assert line.startswith(f"nsr scan: error: model '{name}' is not a folder (no such path:") and "Hugging Face" not in line
    assert not (tmp_path / "scan").exists()


def test_a_model_folder_without_weights_says_what_it_needs(tiny_model_dirs, tmp_path, capsys):
    folder = tmp_path / "config_only"
    folder.mkdir()
    (folder / "config.json").write_bytes((Path(tiny_model_dirs["gpt2"]) / "config.json").read_bytes())
    code, err = run_cli(capsys, "capture", "--model", folder, "--neurons", "1.3")
    assert code == 2
    (line,) = error_lines(err)
    assert f"model '{folder}' is a folder but not a loadable model" in line and "model.safetensors" in line


# -- predictors


def test_a_predictor_path_that_is_not_there_is_not_tried_on_the_hub(failed_evaluation_run, tmp_path, capsys, monkeypatch):
    _, out = failed_evaluation_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    code, err = run_cli(capsys, "evaluate", "--predictor", "out/nothere", "--dataset", out / "dataset", "--output_dir", "ev")
    assert code == 2
    (line,) = error_lines(err)
    assert line.startswith("nsr evaluate: error: No predictor in 'out/nothere'") and "Hugging Face" not in line


def test_a_predictor_hub_id_while_offline_says_offline(failed_evaluation_run, capsys):
    _, out = failed_evaluation_run
    code, err = run_cli(capsys, "evaluate", "--predictor", "nobody/no-such-predictor", "--dataset", out / "dataset")
    assert code == 2
    (line,) = error_lines(err)
    assert "predictor 'nobody/no-such-predictor' is not a folder here and not in the Hugging Face cache" in line
    assert "HF_HUB_OFFLINE=1" in line


def _copy_predictor(src: Path, dst: Path, skip=()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_predictor_with_a_config_but_no_weights_is_named(failed_evaluation_run, tmp_path, capsys):
    _, out = failed_evaluation_run
    folder = _copy_predictor(out / "predictor", tmp_path / "no_weights", skip=("model.safetensors",))
    code, err = run_cli(capsys, "evaluate", "--predictor", folder, "--dataset", out / "dataset", "--output_dir", tmp_path / "ev")
    assert code == 2
    (line,) = error_lines(err)
    assert f"predictor '{folder}' is a folder but not a loadable model" in line and "model.safetensors" in line


def test_a_truncated_predictor_weights_file_is_called_damaged(failed_evaluation_run, tmp_path, capsys):
    _, out = failed_evaluation_run
    folder = _copy_predictor(out / "predictor", tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, err = run_cli(capsys, "evaluate", "--predictor", folder, "--dataset", out / "dataset")
    assert code == 2
    (line,) = error_lines(err)
    assert f"predictor '{folder}': its weights file is damaged" in line and "save or download it again" in line


def test_the_base_model_folder_given_as_the_predictor_is_named(failed_evaluation_run, tiny_model_dirs, capsys):
    _, out = failed_evaluation_run
    code, err = run_cli(capsys, "evaluate", "--predictor", tiny_model_dirs["gpt2"], "--dataset", out / "dataset")
    assert code == 2
    (line,) = error_lines(err)
    assert f"'{tiny_model_dirs['gpt2']}' holds a 'gpt2' model, not an nsr_hf predictor" in line and "not the base model's" in line


# -- datasets


def test_a_dataset_path_that_is_not_there_is_not_tried_on_the_hub(failed_evaluation_run, tmp_path, capsys, monkeypatch):
    _, out = failed_evaluation_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for name in ("./x", "out/nothere"):
        code, err = run_cli(capsys, "evaluate", "--predictor", out / "predictor", "--dataset", name, "--output_dir", "ev")
        assert code == 2
        (line,) = error_lines(err)
        assert line == (f"nsr evaluate: error: '{name}' is not a dataset folder (save_to_disk or Hub layout): check the path; "
                        "nsr dataset writes one (and nsr train, as <output_dir>/dataset).")


def test_a_dataset_hub_id_while_offline_says_offline(failed_evaluation_run, capsys):
    _, out = failed_evaluation_run
    code, err = run_cli(capsys, "evaluate", "--predictor", out / "predictor", "--dataset", "nobody/no-such-dataset")
    assert code == 2
    (line,) = error_lines(err)
    assert "dataset 'nobody/no-such-dataset' is not a folder here and not in the Hugging Face cache" in line and "HF_HUB_OFFLINE=1" in line


def test_a_folder_of_text_files_given_as_the_dataset_is_named(failed_evaluation_run, tmp_path, capsys):
    _, out = failed_evaluation_run
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("some text\n")
    code, err = run_cli(capsys, "evaluate", "--predictor", out / "predictor", "--dataset", tmp_path / "texts")
    assert code == 2
    assert "not an nsr_hf activation dataset" in error_lines(err)[-1] and "make one with `nsr dataset`" in error_lines(err)[-1]


def test_a_train_run_folder_given_as_the_dataset_points_at_its_dataset(failed_evaluation_run, capsys):
    _, out = failed_evaluation_run
    code, err = run_cli(capsys, "evaluate", "--predictor", out / "predictor", "--dataset", out)
    assert code == 2
    line = error_lines(err)[-1]
    assert line == f"nsr evaluate: error: '{out}' is a folder but not a dataset: did you mean '{out / 'dataset'}', the dataset inside it?"


def test_a_failed_evaluate_leaves_earlier_results_byte_identical(failed_evaluation_run, tmp_path, capsys):
    _, out = failed_evaluation_run
    results = tmp_path / "ev"
    results.mkdir()
    (results / "metrics.json").write_text('{"earlier": true}\n')
    before = snapshot(results)
    code, _ = run_cli(capsys, "evaluate", "--predictor", out / "predictor", "--dataset", tmp_path / "nothere", "--output_dir", results)
    assert code == 2 and snapshot(results) == before


# -- recipes, corpora, outputs


def test_broken_yaml_names_the_file_and_the_line(tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("learning_rate: 1e-4\nlayers: [1, 2\nneuron: 3.4\n")
    for command in ("train", "scan", "sweep"):
        code, err = run_cli(capsys, command, recipe)
        assert code == 2
        (line,) = error_lines(err)
        assert line.startswith(f"nsr {command}: error: recipe '{recipe}' is not valid YAML (") and "at line 3, column" in line


def test_a_folder_given_as_the_recipe_is_named(tmp_path, capsys):
    code, err = run_cli(capsys, "train", tmp_path)
    assert code == 2
    assert error_lines(err) == [f"nsr train: error: recipe '{tmp_path}' is a folder: give a YAML file of config keys "
                                "(e.g. recipes/quickstart.yaml)."]


def test_a_recipe_that_is_not_there_is_named(tmp_path, capsys):
    code, err = run_cli(capsys, "dataset", tmp_path / "nothere.yaml")
    assert code == 2
    (line,) = error_lines(err)
    assert line.startswith(f"nsr dataset: error: recipe '{tmp_path / 'nothere.yaml'}' not found")


def test_a_corpus_whose_text_field_holds_numbers_says_which_field(tiny_model_dirs, tmp_path, capsys):
    corpus = tmp_path / "numbers.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": i}) + "\n" for i in range(5)))
    for command in (["capture", "--neurons", "1.3"], ["dataset", "--neurons", "1.3", "--output_dir", tmp_path / "ds"]):
        code, err = run_cli(capsys, *command, "--model", tiny_model_dirs["gpt2"], "--corpus", corpus)
        assert code == 2
        line = error_lines(err)[-1]
        assert "numbers.jsonl row 0: field 'text' holds a int, not a string" in line and "--text_field" in line


def test_capture_output_that_is_a_folder_is_refused_before_the_model_runs(tmp_path, capsys):
    code, err = run_cli(capsys, "capture", "--model", "nobody/not-loaded", "--neurons", "1.3", "--output", tmp_path)
    assert code == 2  # refused before the model name is even looked at
    assert error_lines(err) == [f"nsr capture: error: --output '{tmp_path}' is a folder: give the path of a JSON file to write "
                                f"(e.g. {tmp_path}/values.json)."]


# -- the boundary itself


def test_an_output_dir_that_is_a_file_is_named(failed_evaluation_run, tiny_model_dirs, tmp_path, capsys):
    _, out = failed_evaluation_run
    taken = tmp_path / "notes.txt"
    taken.write_text("my notes\n")
    commands = [["scan", "--model", tiny_model_dirs["gpt2"], "--corpus", "synthetic", "--layers", "1", "--max_documents", "4"],
                ["evaluate", "--predictor", out / "predictor", "--dataset", out / "dataset", "--methods", "none"],
                ["train", "--model", tiny_model_dirs["gpt2"], "--neuron", "1.3"]]
    for command in commands:
        code, err = run_cli(capsys, *command, "--output_dir", taken)
        assert code == 2
        assert error_lines(err)[-1] == (f"nsr {command[0]}: error: '{taken}' is a file, where a folder belongs: give a folder's path "
                                        "(or move the file away).")
    assert taken.read_text() == "my notes\n"


def test_ctrl_c_prints_one_line_and_exits_130(monkeypatch, capsys):
    def interrupted(config):
        raise KeyboardInterrupt

    import nsr_hf.scanner as scanner

    monkeypatch.setattr(scanner, "run_scan", interrupted)  # nsr scan looks it up when it runs
    code, err = run_cli(capsys, "scan", "--output_dir", "unused")
    assert code == 130
    assert error_lines(err) == ["nsr scan: interrupted: rerun the same command to resume."]


def test_a_real_ctrl_c_exits_130_with_one_line():
    # a shell starts background jobs with SIGINT ignored (so would CI): give the child Python's own Ctrl-C handler back
    script = ("import os, signal, sys, time; from nsr_hf.errors import error_boundary; "
              "signal.signal(signal.SIGINT, signal.default_int_handler); "
              "sys.exit(error_boundary('nsr train', lambda: os.kill(os.getpid(), signal.SIGINT) or time.sleep(30)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 130 and done.stderr == "nsr train: interrupted: rerun the same command to resume.\n"


def test_debug_flag_or_env_shows_the_traceback(tmp_path, monkeypatch, capsys):
    with pytest.raises(UserError, match="did you mean 'smollm2-135m'"):
        main(["capture", "--model", "smollm2-135", "--neurons", "1.3", "--debug"])
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("layers: [1, 2\n")
    for command in ("sweep", "train"):  # the commands with their own parsers strip --debug too, wherever it stands
        with pytest.raises(UserError, match="not valid YAML"):
            main([command, "--debug", str(recipe)])
    with pytest.raises(ValueError, match="a scan rank counts from 1"):
        main(["quickstart", "--neuron", "0", "--debug"])
    monkeypatch.setenv("NSR_DEBUG", "0")
    assert main(["capture", "--model", "smollm2-135", "--neurons", "1.3"]) == 2
    monkeypatch.setenv("NSR_DEBUG", "1")
    with pytest.raises(UserError, match="did you mean 'smollm2-135m'"):
        main(["capture", "--model", "smollm2-135", "--neurons", "1.3"])


def test_an_unexpected_failure_keeps_its_traceback(monkeypatch):
    def buggy(config):
        raise RuntimeError("a bug")

    import nsr_hf.scanner as scanner

    monkeypatch.setattr(scanner, "run_scan", buggy)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["scan", "--output_dir", "unused"])


def test_train_ctrl_c_and_debug_go_through_the_same_boundary(monkeypatch, capsys):
    import nsr_hf.pipeline as pipeline

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_train", interrupted)
    code, err = run_cli(capsys, "train")
    assert code == 130 and error_lines(err) == ["nsr train: interrupted: rerun the same command to resume."]
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--debug"])


def test_library_errors_that_are_always_the_users_are_explained(monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE=1" in explain(OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode"))
    assert explain(IsADirectoryError(21, "Is a directory", "out")) == "'out' is a folder, where a file belongs: give a file's path."
    assert explain(PermissionError(13, "Permission denied", "/x")).startswith("no permission to use '/x'")
    assert explain(RuntimeError("a bug")) is None and explain(KeyError("k")) is None


def test_push_to_hub_while_offline_is_one_line(tmp_path, monkeypatch, capsys):
    from nsr_hf.pipeline import _push_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    code = error_boundary("nsr train", lambda: _push_folder(tmp_path, "me/predictor"))
    err = capsys.readouterr().err
    assert code == 2 and TRACEBACK not in err
    assert err.startswith("nsr train: error: the Hugging Face Hub could not be used (") and "HF_HUB_OFFLINE=1" in err


def test_the_usage_mentions_debug(capsys):
    assert main(["--help"]) == 0
    assert "`--debug` on any command (or NSR_DEBUG=1)" in capsys.readouterr().out


def test_a_push_while_offline_keeps_the_finished_run_and_says_how_to_push_it(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    corpus = write_word_corpus(tmp_path / "corpus.jsonl", n=60)
    out = tmp_path / "run"
    code, err = run_cli(capsys, "train", "--model", tiny_model_dirs["gpt2"], "--corpus", corpus, "--neuron", "1.3", "--dataset_documents",
                        "60", "--max_length", "32", "--num_train_epochs", "1", "--evaluate", "false", "--push_to_hub", "me/predictor",
                        "--output_dir", out)
    assert code == 2
    error, note = error_lines(err)[-2:]
    assert error.startswith("nsr train: error: the Hugging Face Hub could not be used (") and "HF_HUB_OFFLINE=1" in error
    assert note == (f"nsr train: The run is complete and saved in {out}; push the predictor later with: "
                    f"hf upload me/predictor {out / 'predictor'}")
    assert (out / "predictor" / "model.safetensors").is_file() and (out / "metrics.json").is_file()


def test_the_train_script_reports_a_mistake_in_one_line_in_a_real_process(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("layers: [1, 2\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("NSR_DEBUG", None)
    done = subprocess.run([sys.executable, str(REPO / "nsr_hf" / "train.py"), str(recipe)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 2
    assert TRACEBACK not in done.stderr
    assert error_lines(done.stderr) == [f"python nsr_hf/train.py: error: recipe '{recipe}' is not valid YAML (expected ',' or ']', "
                                        "but got '<stream end>' at line 2, column 1): a recipe is one 'key: value' per line; quote values "
                                        "that hold ':' or '#'."]
