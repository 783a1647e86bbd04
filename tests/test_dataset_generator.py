"""Activation datasets: stored values equal a fresh capture, splits by document without duplicates, transforms fitted
on train only (the transform itself: tests/test_labels.py), balanced train (the rule: tests/test_balance.py), save/load
round trips (disk and the Hub's layout), the card merged on push, resumable generation, and clear errors. Tiny
models, offline."""
from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import nsr_hf.data.generator as dg
from nsr_hf.capture import capture_activations, encode_texts
from nsr_hf.data.card import dataset_card, merge_card_metadata
from nsr_hf.data.corpus import FileCorpus, split_of
from nsr_hf.data.generator import ActivationDatasetGenerator, DatasetConfig, run_dataset
from nsr_hf.data.labels import LabelTransform
from nsr_hf.data.storage import load_activation_dataset, push_to_hub, save_hub_layout
from nsr_hf.models import load_model_and_tokenizer
from nsr_hf.report_tokens import default_report_tokens

NEURONS = ["1.3", "0.5"]  # two layers, given out of layer order: the activations column keeps this order
WORDS = ("the quick brown fox jumps over lazy dog neurons in MLP layer respond to particular tokens and contexts "
         "Python is a programming language its documentation explains modules classes functions 0 1 2 3 4 5 6 7 8 9").split()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def corpus_rows(n: int = 60, seed: int = 0, prefix: str = "doc") -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"{prefix}{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))} for i in range(n)]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    """60 documents plus 6 exact duplicates of some of them under new ids (and one with extra spaces)."""
    rows = corpus_rows()
    duplicates = [{"id": f"dup{i}", "text": rows[i]["text"]} for i in range(5)] + [
        {"id": "dup-space", "text": "  " + rows[7]["text"] + " "}]
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", rows + duplicates)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture(scope="module")
def gpt2(tiny_model_dirs):
    return load_model_and_tokenizer(tiny_model_dirs["gpt2"])


def generate(model_and_tokenizer, corpus_file, tmp_path, **overrides):
    model, tokenizer = model_and_tokenizer
    options = {"neurons": NEURONS, "corpus": str(corpus_file), "id_field": "id", "max_length": 16, "batch_size": 8,
               "shard_size": 8, "output_dir": str(tmp_path / "ds")}
    generator = ActivationDatasetGenerator(DatasetConfig(**{**options, **overrides}), model=model, tokenizer=tokenizer)
    return generator.generate(), generator


def fresh(model, tokenizer, text, position, max_length=16):
    """Values (K,) and token positions (K,) of NEURONS for one text, captured alone."""
    values, positions = [], []
    for name in NEURONS:
        layer = int(name.split(".")[0])
        cap = capture_activations(model, [text], name, position=position, tokenizer=tokenizer, max_length=max_length)
        values.append(float(cap[layer][0, 0]))
        positions.append(int(cap.positions[layer][0, 0]))
    return np.array(values, dtype=np.float32), positions


def all_rows(dataset_dict):
    return [(split, row) for split, ds in dataset_dict.items() for row in ds]


# ------------------------------------------------------------------------------------------------ values


@pytest.mark.parametrize("position", ["last", "0", "-2", "max"])
def test_every_stored_activation_equals_a_fresh_capture_for_its_text(tiny, corpus_file, tmp_path, position):
    model, tokenizer = tiny
    dd, _ = generate(tiny, corpus_file, tmp_path, position=position)
    rule = int(position) if position.lstrip("-").isdigit() else position
    assert sum(len(ds) for ds in dd.values()) > 50
    for _, row in all_rows(dd):
        ids = encode_texts(tokenizer, [row["text"]], max_length=16)["input_ids"][0].tolist()
        assert row["input_ids"] == ids
        assert row["label_token_id"] == ids[row["label_position"]]
        if rule == "max":  # the first neuron's argmax labels the row; every neuron is read at that token
            _, positions = fresh(model, tokenizer, row["text"], "max")
            assert row["label_position"] == positions[0]
            expected, _ = fresh(model, tokenizer, row["text"], row["label_position"])
        else:
            expected, positions = fresh(model, tokenizer, row["text"], rule)
            assert positions == [row["label_position"]] * len(NEURONS)
        np.testing.assert_allclose(row["activations"], expected, rtol=1e-5, atol=1e-6)


def test_every_token_rows_layout_has_one_row_per_real_token_equal_to_a_fresh_capture(gpt2, corpus_file, tmp_path):
    model, tokenizer = gpt2
    dd, _ = generate(gpt2, corpus_file, tmp_path, position="all", every_token_layout="rows")
    by_doc: dict[str, list[dict]] = {}
    for _, row in all_rows(dd):
        by_doc.setdefault(row["doc_id"], []).append(row)
    for rows in by_doc.values():
        text = rows[0]["text"]
        assert [r["label_position"] for r in rows] == list(range(len(rows[0]["input_ids"])))
        layers = [capture_activations(model, [text], n, position="all", tokenizer=tokenizer, max_length=16) for n in NEURONS]
        expected = np.stack([cap[int(n.split(".")[0])][0, :, 0].numpy() for cap, n in zip(layers, NEURONS)], -1)
        np.testing.assert_allclose([r["activations"] for r in rows], expected, rtol=1e-5, atol=1e-6)


def test_every_token_column_layout_stores_per_token_lists_equal_to_a_fresh_capture(gpt2, corpus_file, tmp_path):
    model, tokenizer = gpt2
    dd, gen = generate(gpt2, corpus_file, tmp_path, position="all", every_token_layout="column")
    assert "label_position" not in dd["train"].column_names
    row = dd["train"][0]
    layers = [capture_activations(model, [row["text"]], n, position="all", tokenizer=tokenizer, max_length=16) for n in NEURONS]
    expected = np.stack([cap[int(n.split(".")[0])][0, :, 0].numpy() for cap, n in zip(layers, NEURONS)], -1)
    np.testing.assert_allclose(row["activations"], expected, rtol=1e-5, atol=1e-6)
    assert np.array(row["bin"]).shape == (len(row["input_ids"]), len(NEURONS))
    np.testing.assert_array_equal(row["bin"], gen.transform.bin_of(np.array(row["activations"])))


def test_activations_are_a_float32_fixed_length_list_of_the_requested_neurons(gpt2, corpus_file, tmp_path):
    dd, _ = generate(gpt2, corpus_file, tmp_path)
    features = dd["train"].features
    for name, dtype in (("activations", "float32"), ("activations_z", "float32"), ("bin", "int32")):
        assert features[name].length == len(NEURONS) and features[name].feature.dtype == dtype
    assert features["input_ids"].feature.dtype == "int32"


def test_texts_are_cut_at_max_length_tokens_and_never_padded(gpt2, corpus_file, tmp_path):
    _, tokenizer = gpt2
    dd, _ = generate(gpt2, corpus_file, tmp_path, max_length=12)
    lengths = [len(row["input_ids"]) for _, row in all_rows(dd)]
    assert max(lengths) == 12 and min(lengths) < 12  # long texts cut, short ones not padded up
    for _, row in all_rows(dd):
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        full = tokenizer(row["text"])["input_ids"]
        assert row["input_ids"] == full[: len(row["input_ids"])] and len(row["input_ids"]) == min(len(full), 12)


def test_a_document_too_short_for_an_integer_position_is_skipped_and_counted(gpt2, corpus_file, tmp_path):
    _, tokenizer = gpt2
    dd, gen = generate(gpt2, corpus_file, tmp_path, position="5")
    rows = [row for _, row in all_rows(dd)]
    assert all(row["label_position"] == 5 for row in rows)
    too_short = sum(len(tokenizer(r["text"])["input_ids"]) <= 5 for r in corpus_rows())
    assert too_short > 0 and sum(gen.metadata["skipped_documents"].values()) == too_short


# ------------------------------------------------------------------------------------------------ splits


def test_no_document_appears_in_two_splits(gpt2, corpus_file, tmp_path):
    dd, gen = generate(gpt2, corpus_file, tmp_path)
    ids = {split: set(ds["doc_id"]) for split, ds in dd.items()}
    texts = {split: set(ds["text"]) for split, ds in dd.items()}
    splits = list(dd)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not ids[a] & ids[b] and not texts[a] & texts[b]
    for split, ds in dd.items():
        assert all(split_of(doc_id, 0, gen.config.split_fractions) == split for doc_id in ds["doc_id"])


def test_duplicate_documents_are_dropped_before_splitting(gpt2, corpus_file, tmp_path):
    dd, gen = generate(gpt2, corpus_file, tmp_path)
    texts = [row["text"].strip() for _, row in all_rows(dd)]
    assert len(texts) == len(set(texts)) == 60
    assert not any(row["doc_id"].startswith("dup") for _, row in all_rows(dd))
    assert sum(gen.metadata["num_documents"].values()) == 60


def test_an_out_of_domain_corpus_becomes_a_test_ood_split_without_repeating_in_domain_texts(gpt2, corpus_file, tmp_path):
    ood_rows = corpus_rows(10, seed=1, prefix="ood") + [{"id": "ood-copy", "text": corpus_rows()[3]["text"]}]
    ood = FileCorpus(write_jsonl(tmp_path / "ood.jsonl", ood_rows), id_field="id")
    model, tokenizer = gpt2
    config = DatasetConfig(neurons=NEURONS, max_length=16, shard_size=8, output_dir=str(tmp_path / "ds"))
    dd = ActivationDatasetGenerator(config, model=model, tokenizer=tokenizer, corpus=FileCorpus(corpus_file, id_field="id"),
                                    ood_corpus=ood).generate()
    assert sorted(dd["test_ood"]["doc_id"]) == sorted(r["id"] for r in ood_rows[:10])
    in_domain = {t for split in ("train", "validation", "test") for t in dd[split]["text"]}
    assert not in_domain & set(dd["test_ood"]["text"])


# ------------------------------------------------------------------------------------------------ transforms


def test_label_transform_is_fitted_on_train_only(gpt2, corpus_file, tmp_path):
    dd, gen = generate(gpt2, corpus_file, tmp_path)
    train = np.array(dd["train"]["activations"], dtype=np.float64)
    everything = np.concatenate([np.array(ds["activations"], dtype=np.float64) for ds in dd.values()])
    t = LabelTransform.from_dict(gen.metadata["transform"])
    np.testing.assert_allclose(t.mean, train.mean(0), rtol=1e-6)
    np.testing.assert_allclose(t.std, train.std(0), rtol=1e-6)
    assert not np.allclose(t.mean, everything.mean(0))
    np.testing.assert_allclose([e[0] for e in t.bin_edges], train.min(0))
    np.testing.assert_allclose([e[-1] for e in t.bin_edges], train.max(0))
    assert t.num_values == len(train) and t.fitted_on == "train"
    validation = np.array(dd["validation"]["activations"])
    np.testing.assert_allclose(dd["validation"]["activations_z"], (validation - train.mean(0)) / train.std(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(dd["validation"]["bin"], t.bin_of(validation))

def test_report_tokens_are_the_digits_with_their_single_token_ids(gpt2, corpus_file, tmp_path):
    _, tokenizer = gpt2
    _, gen = generate(gpt2, corpus_file, tmp_path)
    t = gen.metadata["transform"]
    assert t["report_tokens"] == default_report_tokens(tokenizer, 10)
    assert [s.strip() for s in t["report_tokens"]] == [str(i) for i in range(10)]
    assert [[i] for i in t["report_token_ids"]] == [tokenizer.encode(s, add_special_tokens=False) for s in t["report_tokens"]]



# ------------------------------------------------------------------------------------------------ balancing


def test_balanced_generation_prints_counts_per_bin_and_records_them(gpt2, corpus_file, tmp_path, capsys):
    dd, gen = generate(gpt2, corpus_file, tmp_path, position="all", bin_strategy="equal_width", balance=True, balance_min_keep=0.4)
    balance = gen.metadata["balance"]
    assert len(dd["train"]) == balance["rows_after"] >= np.ceil(0.4 * balance["rows_before"])
    assert np.bincount(np.array(dd["train"]["bin"])[:, 0], minlength=10).tolist() == balance["after"]
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and f"{balance['rows_before']} -> {balance['rows_after']}" in printed


# ------------------------------------------------------------------------------------------------ save, load, push


def test_a_saved_dataset_round_trips_through_load_from_disk_with_its_card_and_metadata(gpt2, corpus_file, tmp_path):
    from datasets import load_from_disk

    dd, gen = generate(gpt2, corpus_file, tmp_path)
    folder = tmp_path / "ds"
    assert not (folder / "shards").exists()  # joined and removed after saving
    plain = load_from_disk(str(folder))
    assert json.loads(plain["train"].info.description)["nsr_hf"] == gen.metadata
    loaded, metadata = load_activation_dataset(folder)
    assert metadata == gen.metadata
    for split in dd:
        assert loaded[split].to_dict() == dd[split].to_dict()
    card = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    provenance = card["nsr_hf"]
    assert provenance["neurons"] == NEURONS and provenance["layers"] == [0, 1] and provenance["position"] == "last"
    assert provenance["model"]["name"] and "quantization" in provenance["model"]
    assert provenance["corpus"]["kind"] == "file" and provenance["split_seed"] == 0 and provenance["nsr_hf_version"]


def test_a_folder_in_the_hub_layout_loads_with_load_dataset_with_card_and_metadata_intact(gpt2, corpus_file, tmp_path):
    from datasets import load_dataset

    dd, gen = generate(gpt2, corpus_file, tmp_path)
    hub = save_hub_layout(dd, tmp_path / "hub")
    assert sorted(p.name for p in (hub / "data").iterdir()) == [f"{s}-00000-of-00001.parquet" for s in ("test", "train", "validation")]
    card = yaml.safe_load((hub / "README.md").read_text().split("---")[1])
    assert {"configs", "dataset_info", "nsr_hf", "tags"} <= set(card)
    assert card["nsr_hf"] == gen.metadata
    plain = load_dataset(str(hub), cache_dir=str(tmp_path / "cache"))
    assert plain["train"].features == dd["train"].features
    loaded, metadata = load_activation_dataset(hub, cache_dir=str(tmp_path / "cache"))
    assert metadata == gen.metadata
    for split in dd:
        assert loaded[split].to_dict() == dd[split].to_dict()


def test_card_metadata_merge_keeps_the_auto_written_configs_and_dataset_info():
    auto = {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
            "dataset_info": {"features": [{"name": "text", "dtype": "string"}], "splits": [{"name": "train", "num_examples": 3}]},
            "tags": ["auto"], "license": "mit"}
    ours = {"configs": "ours must not win", "tags": ["nsr_hf", "auto"], "pretty_name": "ours", "nsr_hf": {"neurons": ["1.2"]}}
    merged = merge_card_metadata(auto, ours)
    assert merged["configs"] == auto["configs"] and merged["dataset_info"] == auto["dataset_info"]
    assert merged["tags"] == ["auto", "nsr_hf"] and merged["license"] == "mit"
    assert merged["pretty_name"] == "ours" and merged["nsr_hf"] == {"neurons": ["1.2"]}
    assert auto["tags"] == ["auto"]  # inputs untouched


def test_push_to_hub_pushes_the_data_then_our_card_merged_into_the_auto_written_one(gpt2, corpus_file, tmp_path, monkeypatch):
    from datasets import DatasetDict
    from huggingface_hub import DatasetCard

    dd, gen = generate(gpt2, corpus_file, tmp_path)
    calls = []
    auto_text = ("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
                 "dataset_info:\n  dataset_size: 10\n---\n")
    monkeypatch.setattr(DatasetDict, "push_to_hub", lambda self, repo_id, **kw: calls.append(("data", repo_id, kw["private"])))
    monkeypatch.setattr(DatasetCard, "load", classmethod(lambda cls, repo_id, **kw: calls.append(("load", repo_id)) or cls(auto_text)))
    monkeypatch.setattr(DatasetCard, "push_to_hub", lambda self, repo_id, **kw: calls.append(("card", repo_id, str(self))))
    push_to_hub(dd, "me/acts", dataset_card(gen.metadata), private=True)
    assert [c[:2] for c in calls] == [("data", "me/acts"), ("load", "me/acts"), ("card", "me/acts")] and calls[0][2] is True
    pushed = calls[2][2]
    card = yaml.safe_load(pushed.split("---")[1])
    assert card["configs"][0]["data_files"][0]["path"] == "data/train-*" and card["dataset_info"] == {"dataset_size": 10}
    assert card["nsr_hf"] == gen.metadata and "## Provenance" in pushed


def test_a_dataset_without_the_expected_columns_gets_an_error_naming_them(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"text": ["a"], "value": [1.0]})}).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"lacks \['doc_id', 'input_ids', 'attention_mask', 'activations'.*it has \['text', 'value'\]"):
        load_activation_dataset(tmp_path / "other")


# ------------------------------------------------------------------------------------------------ resume and processes


def test_an_interrupted_generation_resumes_without_recomputing_finished_shards(gpt2, corpus_file, tmp_path, monkeypatch, same_rows):
    real = dg.capture_activations
    calls = []

    def counting(*args, **kwargs):  # batch_size == shard_size: one call per shard
        calls.append(1)
        if interrupt and len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(dg, "capture_activations", counting)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        generate(gpt2, corpus_file, tmp_path / "resumed")
    finished = [p for p in (tmp_path / "resumed" / "ds" / "shards").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(finished) == 2
    interrupt, calls[:] = False, []
    resumed, gen = generate(gpt2, corpus_file, tmp_path / "resumed")
    assert gen.shard_counts == {"computed": len(calls), "resumed": 2}
    calls[:] = []
    uninterrupted, _ = generate(gpt2, corpus_file, tmp_path / "whole")
    assert len(calls) == gen.shard_counts["computed"] + 2
    for split in uninterrupted:
        same_rows(resumed[split].to_dict(), uninterrupted[split].to_dict())


def test_resuming_with_a_changed_configuration_is_refused(gpt2, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setattr(dg, "capture_activations", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        generate(gpt2, corpus_file, tmp_path, max_length=16)
    with pytest.raises(ValueError, match=r"different configuration \(max_length: 16 -> 12\).*--overwrite"):
        generate(gpt2, corpus_file, tmp_path, max_length=12)


def test_a_finished_dataset_is_replaced_only_with_overwrite(gpt2, corpus_file, tmp_path):
    generate(gpt2, corpus_file, tmp_path)
    with pytest.raises(ValueError, match="already holds a finished dataset"):
        generate(gpt2, corpus_file, tmp_path)
    dd, _ = generate(gpt2, corpus_file, tmp_path, overwrite=True, max_length=8)
    assert max(len(ids) for ids in dd["train"]["input_ids"]) == 8


@pytest.mark.slow  # three Python processes importing torch: about 20 s on two cores
def test_two_processes_under_accelerate_launch_split_the_shards(tiny_model_dirs, corpus_file, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).parent / "scripts" / "dataset_two_process.py"
    out = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               str(script), tiny_model_dirs["gpt2"], str(corpus_file), str(out)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((out / f"process-{i}.json").read_text()) for i in range(2)]
    assert [r["num_processes"] for r in reports] == [2, 2] and [r["process_index"] for r in reports] == [0, 1]
    manifests = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*/manifest.json"))]
    assert {m["process_index"] for m in manifests} == {0, 1}
    assert all(m["number"] % 2 == m["process_index"] for m in manifests)
    assert reports[0]["rows"] == reports[1]["rows"] and sum(r["computed"] for r in reports) == len(manifests)
    alone, _ = generate(load_model_and_tokenizer(tiny_model_dirs["gpt2"]), corpus_file, tmp_path)
    together, _ = load_activation_dataset(out)
    for split in alone:
        np.testing.assert_allclose(together[split]["activations"], alone[split]["activations"], rtol=1e-5, atol=1e-6)
        assert together[split]["doc_id"] == alone[split]["doc_id"]


# ------------------------------------------------------------------------------------------------ config and CLI


@pytest.mark.parametrize("overrides, message", [
    ({"position": "middle"}, "Unknown position rule 'middle'"),
    ({"num_bins": 1}, "num_bins must be an integer >= 2"),
    ({"bin_strategy": "lloyd"}, "bin_strategy must be one of"),
    ({"split_fractions": [0.5, 0.2]}, "split_fractions must be 3 numbers"),
    ({"every_token_layout": "wide"}, "every_token_layout must be one of"),
    ({"balance_min_keep": 0}, "balance_min_keep"),
    ({"neurons": ["12-3"]}, "write it as 'layer.index'"),
    ({"neurons": ["1.2", "1.2"]}, "more than once"),
    ({"report_tokens": ["a", "b"]}, "report_tokens must be 10 distinct strings"),
    ({"push_to_hub": "not a repo id"}, "push_to_hub must be a Hub repo id"),
])
def test_the_config_rejects_bad_input_with_a_message_that_says_how_to_fix_it(overrides, message):
    with pytest.raises(ValueError, match=message):
        DatasetConfig(**{"neurons": ["1.2"], **overrides})


def test_a_neuron_outside_the_model_is_refused_with_its_range(gpt2, corpus_file, tmp_path):
    with pytest.raises(ValueError, match=r"out of range.*neurons 0\.\.127"):
        generate(gpt2, corpus_file, tmp_path, neurons=["1.5000"])
    with pytest.raises(ValueError, match=r"layers 0\.\.2"):
        generate(gpt2, corpus_file, tmp_path, neurons=["7.1"])


def test_the_command_line_flags_build_the_config_and_run_dataset_prints_a_summary(tiny_model_dirs, corpus_file, tmp_path, capsys):
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(DatasetConfig).parse_args_into_dataclasses(args=[
        "--model", tiny_model_dirs["llama"], "--neurons", "2.7", "1.1", "--corpus", str(corpus_file), "--position", "-1",
        "--max_length", "16", "--num_bins", "5", "--bin_strategy", "equal_width", "--split_fractions", "0.6", "0.2", "0.2",
        "--output_dir", str(tmp_path / "cli")])
    assert config.neurons == ["2.7", "1.1"] and config.parsed_position == -1 and config.split_fractions == [0.6, 0.2, 0.2]
    dd = run_dataset(config)
    out = capsys.readouterr().out
    assert "train" in out and "2.7" in out and "equal_width" in out and "edges" in out
    assert dd["train"].features["bin"].length == 2 and (tmp_path / "cli" / "README.md").exists()


def test_the_bin_ceiling_benchmark_scores_a_perfect_classifier_per_strategy(gpt2, corpus_file, tmp_path, capsys):
    """benchmarks/bin_ceiling.py: the R² of reporting each row's own bin mean. On the split the bins were fitted on,
    kmeans (the least squared error) is at least as good as the other two, for every neuron; the figures match a
    direct computation and reach the JSON file."""
    from conftest import load_benchmark

    generate(gpt2, corpus_file, tmp_path)
    bench = load_benchmark("bin_ceiling")
    results = bench.main([str(tmp_path / "ds"), "--split", "train", "--num_bins", "4", "--json", str(tmp_path / "c.json")])
    by_neuron = results[str(tmp_path / "ds")]
    assert sorted(by_neuron) == sorted(NEURONS) and json.loads((tmp_path / "c.json").read_text()) == results
    dataset, _ = load_activation_dataset(tmp_path / "ds")
    train = np.asarray(dataset["train"]["activations"], dtype=np.float64).reshape(len(dataset["train"]), -1)
    for j, neuron in enumerate(NEURONS):
        r2 = by_neuron[neuron]["r2"]
        assert r2["kmeans"] >= max(r2["quantile"], r2["equal_width"]) - 1e-12
        t = LabelTransform.fit(train[:, j], [neuron], 4, "quantile")
        direct = 1 - (((t.centers()[0, t.bin_of(train[:, j])[:, 0]] - train[:, j]) ** 2).sum()
                      / ((train[:, j] - train[:, j].mean()) ** 2).sum())
        assert r2["quantile"] == pytest.approx(direct)
    assert "| quantile | equal_width | kmeans |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="has no 'test_ood' split"):
        bench.main([str(tmp_path / "ds"), "--split", "test_ood"])
