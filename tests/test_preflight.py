"""Every check that can run before the model is loaded runs first, and a split with no rows is one line, never a saved dataset
that cannot be loaded: each mistake prints ``nsr <command>: error: <what and how to fix it>``, exits 2, shows no traceback,
fires before the weights are loaded (``load_model_and_tokenizer`` raises in these tests) and leaves what was written before
byte-identical."""
import hashlib
import json
import re
from pathlib import Path

import pytest
from conftest import write_word_corpus

from nsr_hf.cli import main
from nsr_hf.data.corpus import documents_per_split, load_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

TRACEBACK = "Traceback (most recent call last)"
LOADERS = ("nsr_hf.pipeline", "nsr_hf.data.generator", "nsr_hf.scanner.scan", "nsr_hf.sweep", "nsr_hf.capture_command")


def run_cli(capsys, *argv) -> tuple[int, str]:
    """``nsr <argv>`` in this process: (exit code, the error line(s) on stderr); never a traceback."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert TRACEBACK not in err
    return code, "\n".join(line for line in err.replace("\r", "\n").splitlines() if ": error: " in line)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model's weights fails the test: a check that fires must fire before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    for module in LOADERS:
        monkeypatch.setattr(f"{module}.load_model_and_tokenizer", refuse)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", n=60)


@pytest.fixture(scope="module")
def gpt2(tiny_model_dirs):
    return tiny_model_dirs["gpt2"]


@pytest.fixture(scope="module")
def dataset_of_2_7(gpt2, corpus, tmp_path_factory):
    """A finished dataset of neuron 2.7 (nsr dataset)."""
    out = tmp_path_factory.mktemp("ds") / "ds"
    code = main(["dataset", "--model", gpt2, "--corpus", str(corpus), "--neurons", "2.7", "--max_length", "32", "--output_dir", str(out)])
    assert code == 0
    return out


def train(capsys, gpt2, corpus, out, *extra):
    return run_cli(capsys, "train", "--model", gpt2, "--corpus", corpus, "--dataset_documents", 60, "--max_length", 32,
                   "--num_train_epochs", 1, "--output_dir", out, *extra)


# -- empty splits


def test_train_with_too_few_documents_for_three_splits_says_how_many_each_split_got(gpt2, corpus, tmp_path, capsys, no_model):
    code, err = run_cli(capsys, "train", "--model", gpt2, "--corpus", corpus, "--neuron", "1.3", "--dataset_documents", 10,
                        "--output_dir", tmp_path / "run")
    assert code == 2
    assert re.search(r"gives (validation, )?test no documents: of the first 10 documents \(dataset_documents 10\), "
                     r"train \d+, validation \d+, test 0", err)
    assert "Raise dataset_documents (e.g. to 50" in err
    assert not (tmp_path / "run" / "dataset").exists()


def test_dataset_with_too_few_documents_names_max_documents_and_writes_nothing(gpt2, corpus, tmp_path, capsys, no_model):
    code, err = run_cli(capsys, "dataset", "--model", gpt2, "--corpus", corpus, "--neurons", "1.3", "--max_documents", 5,
                        "--output_dir", tmp_path / "ds")
    assert code == 2
    assert "of the first 5 documents (max_documents 5)" in err and "Raise max_documents" in err
    assert not (tmp_path / "ds").exists()


def test_a_corpus_that_runs_out_asks_for_a_larger_corpus(gpt2, tmp_path, capsys, no_model):
    small = write_word_corpus(tmp_path / "small.jsonl", n=3)
    code, err = run_cli(capsys, "dataset", "--model", gpt2, "--corpus", small, "--neurons", "1.3", "--output_dir", tmp_path / "ds")
    assert code == 2 and "(all it has" in err and "Use a larger corpus" in err


def test_documents_per_split_counts_by_id_and_stops_once_every_split_has_enough(corpus):
    docs = list(load_corpus(str(corpus)).iter_documents())
    counts = documents_per_split(docs)
    assert sum(counts.values()) == 60 and all(counts.values())
    assert min(documents_per_split(docs, enough=1).values()) == 1 and sum(documents_per_split(docs, enough=1).values()) < 60


def test_a_position_past_every_text_fails_before_saving_and_the_corrected_command_runs(gpt2, corpus, tmp_path, capsys):
    out = tmp_path / "ds"
    code, err = run_cli(capsys, "dataset", "--model", gpt2, "--corpus", corpus, "--neurons", "1.3", "--position", 100,
                        "--max_length", 32, "--output_dir", out)
    assert code == 2
    assert "no rows in train" in err and "all too short for position 100" in err and "Nothing was saved" in err
    assert not out.exists()  # nothing that looks finished, no shards that would refuse the corrected command
    code, err = run_cli(capsys, "dataset", "--model", gpt2, "--corpus", corpus, "--neurons", "1.3", "--position", 2,
                        "--max_length", 32, "--output_dir", out)
    assert code == 0, err
    assert (out / "dataset_dict.json").is_file() and not (out / "shards").exists()


def test_a_saved_dataset_with_an_empty_split_is_named_not_an_index_error(gpt2, tmp_path, capsys, no_model):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "broken"
    rows = Dataset.from_dict({"text": ["a"], "input_ids": [[1]]})
    DatasetDict({"train": rows, "validation": rows.select([]), "test": rows.select([])}).save_to_disk(str(folder))
    before = snapshot(folder)
    code, err = run_cli(capsys, "train", "--model", gpt2, "--dataset", folder, "--output_dir", tmp_path / "run")
    assert code == 2
    assert "has no rows in split(s) validation, test" in err and "--overwrite" in err
    assert snapshot(folder) == before


# -- mistakes that were silent


def test_a_dataset_of_another_neuron_is_refused_naming_both(gpt2, dataset_of_2_7, tmp_path, capsys, no_model):
    before = snapshot(dataset_of_2_7)
    code, err = run_cli(capsys, "train", "--model", gpt2, "--dataset", dataset_of_2_7, "--neuron", "1.3", "--output_dir", tmp_path / "r")
    assert code == 2
    assert "--neuron 1.3 but the dataset" in err and "built for neuron(s) 2.7" in err
    assert snapshot(dataset_of_2_7) == before


def test_a_scan_rank_with_a_dataset_is_refused(gpt2, dataset_of_2_7, tmp_path, capsys, no_model):
    code, err = run_cli(capsys, "train", "--model", gpt2, "--dataset", dataset_of_2_7, "--neuron", "3", "--output_dir", tmp_path / "r")
    assert code == 2 and "neuron 3 is a scan rank" in err


def test_read_layer_before_the_named_neuron_is_refused(gpt2, corpus, tmp_path, capsys, no_model):
    code, err = train(capsys, gpt2, corpus, tmp_path / "run", "--neuron", "2.3", "--read_layer", 1)
    assert code == 2
    assert "read_layer 1 is before the layer of the target neuron 2.3 (layer 2)" in err and "Read block 2 or later" in err


def test_read_layer_before_a_given_datasets_neuron_is_refused(gpt2, dataset_of_2_7, tmp_path, capsys, no_model):
    code, err = run_cli(capsys, "train", "--model", gpt2, "--dataset", dataset_of_2_7, "--read_layer", 1, "--output_dir", tmp_path / "r")
    assert code == 2 and "before the layer of the target neuron 2.7" in err


def test_read_layer_before_every_scanned_layer_is_refused(gpt2, corpus, tmp_path, capsys, no_model):
    code, err = train(capsys, gpt2, corpus, tmp_path / "run", "--layers", 1, 2, "--read_layer", 0)
    assert code == 2 and "read_layer 0 is before every scanned layer (1, 2)" in err


@pytest.mark.parametrize("text", ["", "# only a comment\n\n# and another\n"])
def test_an_empty_recipe_is_refused_instead_of_running_the_defaults(text, tmp_path, capsys, no_model):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    code, err = run_cli(capsys, "train", recipe, "--output_dir", tmp_path / "run")
    assert code == 2 and f"the recipe {str(recipe)!r} is empty" in err
    assert not (tmp_path / "run").exists()


# -- mistakes that failed late


def test_read_layer_past_the_models_blocks_fails_before_the_model_is_loaded(gpt2, corpus, tmp_path, capsys, no_model):
    code, err = train(capsys, gpt2, corpus, tmp_path / "run", "--neuron", "1.3", "--read_layer", 99)
    assert code == 2 and "read_layer 99 is not a block of the model" in err and "blocks 0..2" in err
    assert not (tmp_path / "run" / "dataset").exists()


def test_token_head_bins_without_single_report_tokens_fail_before_the_model_is_loaded(gpt2, corpus, tmp_path, capsys, no_model):
    code, err = train(capsys, gpt2, corpus, tmp_path / "run", "--neuron", "1.3", "--head_type", "token", "--num_bins", 1000)
    assert code == 2 and "head_type token with 1000 bins" in err and "Report token '10' is 2 tokens" in err
    assert not (tmp_path / "run" / "dataset").exists()


@pytest.mark.parametrize(("neuron", "words"), [("7.3", "Layer 7 is out of range"), ("1.9999", "Neuron index 9999 is out of range")])
def test_a_neuron_outside_the_model_is_found_from_its_config(neuron, words, gpt2, corpus, tmp_path, capsys, no_model):
    code, err = train(capsys, gpt2, corpus, tmp_path / "run", "--neuron", neuron)
    assert code == 2 and f"neuron {neuron} is not in the model" in err and words in err


def test_dataset_neurons_outside_the_model_fail_before_the_model_is_loaded(gpt2, corpus, tmp_path, capsys, no_model):
    code, err = run_cli(capsys, "dataset", "--model", gpt2, "--corpus", corpus, "--neurons", "7.3", "--output_dir", tmp_path / "ds")
    assert code == 2 and "neuron 7.3 is not in the model" in err and not (tmp_path / "ds").exists()


def test_scan_layers_outside_the_model_fail_before_the_model_is_loaded(gpt2, corpus, tmp_path, capsys, no_model):
    code, err = run_cli(capsys, "scan", "--model", gpt2, "--corpus", corpus, "--layers", 7, "--output_dir", tmp_path / "scan")
    assert code == 2 and "layers: layer(s) 7 are not in the model" in err and "layers 0..2" in err


def test_report_tokens_that_are_not_single_tokens_fail_before_the_model_is_loaded(gpt2, corpus, tmp_path, capsys, no_model):
    code, err = run_cli(capsys, "dataset", "--model", gpt2, "--corpus", corpus, "--neurons", "1.3", "--num_bins", 2,
                        "--report_tokens", "zebra-crossing", "on", "--output_dir", tmp_path / "ds")
    assert code == 2 and "Report token 'zebra-crossing' is" in err


# -- a model folder without a tokenizer


def test_a_model_folder_without_a_tokenizer_is_one_line(tiny_model_dirs, corpus, tmp_path, capsys, no_model):
    import shutil

    folder = tmp_path / "weights_only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model_dirs["gpt2"]) / name, folder / name)
    before = snapshot(folder)
    for command in (["scan", "--layers", 1], ["dataset", "--neurons", "1.3"], ["train", "--neuron", "1.3"]):
        code, err = run_cli(capsys, command[0], "--model", folder, "--corpus", corpus, *command[1:], "--output_dir", tmp_path / command[0])
        assert code == 2 and "has no usable tokenizer" in err and "tokenizer.save_pretrained" in err, command
    assert snapshot(folder) == before


# -- nsr sweep


def test_a_sweep_with_a_bad_model_fails_once_before_any_run(corpus, tmp_path, capsys, no_model):
    out = tmp_path / "sweep"
    code, err = run_cli(capsys, "sweep", "--model", tmp_path / "nothere", "--corpus", corpus, "--top_n", 2, "--output_dir", out)
    assert code == 2 and err.count("error:") == 1 and "model" in err and "nothere" in err
    assert not (out / "scan").exists() and not (out / "sweep.json").exists()


def test_a_sweep_with_a_mistake_of_every_run_fails_once(gpt2, corpus, tmp_path, capsys, no_model):
    code, err = run_cli(capsys, "sweep", "--model", gpt2, "--corpus", corpus, "--neurons", "1.3", "2.900", "--output_dir", tmp_path / "s")
    assert code == 2 and "neuron 2.900 is not in the model" in err


def test_a_failed_sweep_run_records_its_one_line_message_without_a_traceback(gpt2, corpus, tmp_path, capsys, caplog):
    out = tmp_path / "sweep"
    code = main(["sweep", "--model", gpt2, "--corpus", str(corpus), "--neurons", "1.3", "--dataset_documents", "60", "--max_length", "32",
                 "--position", "100", "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and TRACEBACK not in err
    (run,) = json.loads((out / "sweep.json").read_text())["runs"]
    assert run["status"] == "failed" and run["error"].startswith("the dataset would have no rows in train")
    assert "\n" not in run["error"]
    (logged,) = [r.getMessage() for r in caplog.records if "sweep run 1.3 seed 0 failed" in r.getMessage()]
    assert "failed: the dataset would have no rows" in logged and TRACEBACK not in logged


# -- read_layer before a neuron the scan chose, and nsr capture


def test_a_read_layer_before_the_neuron_the_scan_chose_is_refused_when_the_choice_is_known():
    """A scanned neuron's layer is known only after the scan: ``read_layer_for`` refuses there, before the dataset is built."""
    from nsr_hf.errors import UserError
    from nsr_hf.training.config import TrainConfig

    config = TrainConfig(output_dir="unused", read_layer="1")
    assert config.read_layer_for(1, 3) == 1
    with pytest.raises(UserError, match=r"read_layer 1 is before the layer of the target neuron \(layer 2\).*target\+2"):
        config.read_layer_for(2, 3)


def test_capture_checks_its_neurons_before_the_model_loads(capsys, no_model, gpt2, corpus):
    code, err = run_cli(capsys, "capture", "--model", gpt2, "--corpus", corpus, "--neurons", "7.3")
    assert code == 2
    assert "neuron 7.3 is not in the model" in err and "layers 0..2" in err
