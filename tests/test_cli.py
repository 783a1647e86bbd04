"""The `nsr` command: sub-commands, flags from the config dataclasses, clear errors."""
import json

from nsr_hf.cli import main


def test_help_lists_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("capture", "scan", "dataset", "quickstart"):
        assert command in out


def test_unknown_command_is_an_error(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_bad_config_value_is_a_clear_error_not_a_traceback(capsys):
    assert main(["scan", "--score", "loudness"]) == 2
    assert "Unknown score 'loudness'" in capsys.readouterr().err
    assert main(["quickstart", "--neuron", "0"]) == 2
    assert "a scan rank counts from 1" in capsys.readouterr().err


def test_capture_prints_and_saves_values(tiny_model_dirs, tmp_path, capsys):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in ["The first text.", "Another, longer text here."]))
    out = tmp_path / "values.json"
    code = main(["capture", "--model", tiny_model_dirs["gpt2"], "--neurons", "1.3", "2.5", "--corpus", str(corpus), "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "1.3" in printed and "docs.jsonl:0" in printed
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and set(rows[0]["neurons"]) == {"1.3", "2.5"}


def test_capture_with_an_out_of_range_layer_says_so(tiny_model_dirs, capsys):
    assert main(["capture", "--model", tiny_model_dirs["gpt2"], "--neurons", "9.1"]) == 2
    assert "Layer 9 is out of range" in capsys.readouterr().err


def test_quickstart_runs_the_recipe_end_to_end_on_a_tiny_model(tiny_model_dirs, tmp_path, capsys):
    # the quickstart recipe with a tiny model (3 layers: the recipe's layers and read_layer are overridden to fit)
    code = main(["quickstart", "--model", tiny_model_dirs["llama"], "--corpus", "synthetic", "--layers", "0", "1", "--scan_documents", "40",
                 "--dataset_documents", "120", "--max_length", "32", "--num_train_epochs", "1", "--cross_models", tiny_model_dirs["gpt2"],
                 "--n_bootstrap", "50", "--output_dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["neurons"] and sum(summary["rows"].values()) > 0 and summary["select"] == "readable"
    assert summary["read_layer"] == int(summary["neurons"][0].split(".")[0]) + 2 or summary["read_layer"] == 2
    assert json.loads((tmp_path / "scan" / "selection.json").read_text())["chosen"]["neuron"] == summary["neurons"][0]
    for path in ("scan/neurons.parquet", "dataset/README.md", "predictor/README.md", "evaluation/report.md", "drift.png"):
        assert (tmp_path / path).exists(), path
    printed = capsys.readouterr().out
    assert "readability of the top candidates" in printed
    assert "| **self** |" in printed and "evaluation report:" in printed  # the headline table is printed at the end

    # the same command again (make quickstart twice) trains nothing: it shows the finished run's figures and how to rerun it
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    args = ["quickstart", "--model", tiny_model_dirs["llama"], "--corpus", "synthetic", "--layers", "0", "1", "--scan_documents", "40",
            "--dataset_documents", "120", "--max_length", "32", "--cross_models", tiny_model_dirs["gpt2"], "--n_bootstrap", "50",
            "--output_dir", str(tmp_path)]
    assert main([*args, "--num_train_epochs", "1"]) == 0
    again = capsys.readouterr().out
    assert "already holds this quickstart, finished: nothing was run again" in again and "| **self** |" in again
    assert "nsr quickstart --overwrite" in again
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    # other settings into the finished run: refused, as nsr train refuses
    assert main([*args, "--num_train_epochs", "2"]) == 2
    assert "already holds a train run that finished" in capsys.readouterr().err


def test_quickstart_rejects_an_unknown_key(capsys):
    assert main(["quickstart", "--epochs", "3"]) == 2
    assert "Unknown key(s) ['epochs']" in capsys.readouterr().err


def test_train_takes_a_recipe_and_overrides(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 2e-5\nunfreeze: nonsense\n")
    assert main(["train", str(recipe)]) == 2
    assert "unfreeze must be one of" in capsys.readouterr().err


def test_train_help_lists_our_keys_and_the_trainers(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--head_type" in out and "--lr_scheduler_type" in out and "--gradient_checkpointing" in out


def test_quickstart_help_lists_the_recipes_values_and_every_key(capsys):
    assert main(["quickstart", "--help"]) == 0
    out = capsys.readouterr().out
    assert "select: 'readable'" in out and "output_dir: 'outputs/quickstart'" in out  # the recipe's values
    assert "(default: readable)" in out  # shown as the defaults of the keys
    assert "--max_grad_norm" in out and "--unfreeze" in out


def test_sweep_help_lists_its_flags_and_the_recipe_keys(capsys):
    assert main(["sweep", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--top_n" in out and "--seeds" in out and "--learning_rate" in out and "--lr_scheduler_type" in out


def test_a_stage_reads_a_recipe_too(tmp_path, capsys):
    recipe = tmp_path / "scan.yaml"
    recipe.write_text("score: loudness\n")
    assert main(["scan", str(recipe)]) == 2
    assert "Unknown score 'loudness'" in capsys.readouterr().err


def test_the_outermost_entry_point_is_the_recorded_command_and_python_calls_record_none():
    from nsr_hf.utils import command_recorded, recorded_command

    assert recorded_command() is None
    with command_recorded(["nsr", "train", "my recipe.yaml", "--seed", "1"]):
        with command_recorded(["nsr", "train", "my recipe.yaml"]):  # nsr train calls the train script's main
            assert recorded_command() == "nsr train 'my recipe.yaml' --seed 1"
    assert recorded_command() is None
