"""NeuronScanner: streaming statistics equal numpy's, shards and processes merge exactly, the top-k examples are
the true top-k, dead neurons never lead a ranking, clear errors, and outputs that load back."""
import itertools
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import HfArgumentParser

from nsr_hf.architectures import get_mlp
from nsr_hf.capture import Neuron, capture_activations
from nsr_hf.data.corpus import Document
from nsr_hf.models import load_model_and_tokenizer
from nsr_hf.scanner import SCORES, MomentStats, NeuronScanner, ScanConfig, load_scan, run_scan

REPO = Path(__file__).resolve().parents[1]
VOCABULARY = ("the quick brown fox jumps over lazy dog neurons in the MLP layer respond to particular tokens and contexts "
              "Python is a programming language def function argument return 0 1 2 3 4 5 6 7 8 9 on off")
WORDS = VOCABULARY.split()
THRESHOLD = 0.05


def make_docs(n: int = 24, seed: int = 0) -> list[Document]:
    """Distinct documents of 3 to 30 words (so batches need padding)."""
    rng = random.Random(seed)
    return [Document(f"doc:{i}", f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))) for i in range(n)]


def per_document_values(model, tok, docs, layers, position):
    """Ground truth, independent of the scanner: each document captured alone (no padding at all).
    Returns ``{layer: [array (positions, neurons) per document]}``."""
    out = {layer: [] for layer in layers}
    for doc in docs:
        cap = capture_activations(model, [doc.text], layers, position=position, tokenizer=tok, max_length=256)
        for layer in layers:
            out[layer].append(cap[layer].reshape(-1, cap[layer].shape[-1]).double().numpy())
    return out


def numpy_moments(a: np.ndarray) -> dict:
    mean = a.mean(0)
    d = a - mean
    m2 = (d**2).mean(0)
    return {"count": np.full(a.shape[1], a.shape[0]), "mean": mean, "variance": a.var(0), "min": a.min(0), "max": a.max(0),
            "skewness": (d**3).mean(0) / m2**1.5, "kurtosis": (d**4).mean(0) / m2**2 - 3.0}


@pytest.fixture
def gpt2(tiny_model_dirs):
    return load_model_and_tokenizer(tiny_model_dirs["gpt2"])


# ----------------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize("position", ["all", "last"])
def test_streaming_statistics_equal_numpy_over_the_concatenated_activations(tiny, position):
    model, tok = tiny
    docs = make_docs()
    config = ScanConfig(position=position, threshold=THRESHOLD, batch_size=4, output_dir=None, top_n=3)
    result = NeuronScanner(model, tok, config).scan(docs, progress=False)
    truth = per_document_values(model, tok, docs, [0, 1, 2], position)
    for layer in (0, 1, 2):
        a = np.concatenate(truth[layer])
        rows = result.table[result.table.layer == layer].sort_values("neuron")
        # Tolerances: float32 activations differ by ~1e-7 between batch shapes (padding) and alone.
        for name, expected in numpy_moments(a).items():
            atol = 1e-5 if name in ("skewness", "kurtosis") else 1e-6
            np.testing.assert_allclose(rows[name].to_numpy(), expected, rtol=1e-5, atol=atol, err_msg=f"layer {layer} {name}")
        # Fractions: exact up to values within float noise (1e-5) of the threshold.
        frac = rows["frac_above"].to_numpy()
        assert np.all((a > THRESHOLD + 1e-5).mean(0) <= frac) and np.all(frac <= (a > THRESHOLD - 1e-5).mean(0))
    assert result.metadata["positions"] == (sum(len(v) for v in truth[0]) if position == "all" else len(docs))


def test_moment_stats_merge_pairwise_equals_numpy_at_float64_precision():
    # Mean 1000, std 0.01: the case where naive power sums lose every digit.
    rng = np.random.default_rng(0)
    data = 1000 + 0.01 * rng.standard_t(5, size=(3001, 4))
    cuts = [0, 1, 7, 500, 1800, 3001]
    shards = []
    for lo, hi in itertools.pairwise(cuts):
        stats = MomentStats(1, 4, threshold=1000.0)
        for start in range(lo, hi, 97):  # several batches per shard
            stats.update(0, torch.from_numpy(data[start : min(hi, start + 97)]))
        shards.append(stats)
    merged = shards[0]
    for other in shards[1:]:
        merged.merge(other)
    expected = numpy_moments(data)
    for name in ("mean", "variance", "skewness", "kurtosis"):
        # 1e-8: numpy's own two-pass skewness is off by 2e-9 here (against an 80-bit reference); ours by 2e-11.
        np.testing.assert_allclose(getattr(merged, name)[0].numpy(), expected[name], rtol=1e-8, err_msg=name)
    np.testing.assert_array_equal(merged.count[0].numpy(), expected["count"])
    np.testing.assert_array_equal(merged.min[0].numpy(), expected["min"])
    np.testing.assert_array_equal(merged.frac_above[0].numpy(), (data > 1000.0).mean(0))


def test_merging_two_shard_scans_equals_one_pass(gpt2):
    model, tok = gpt2
    # batch_size=1: every document is its own forward pass, so both ways see bit-identical activations.
    scanner = NeuronScanner(model, tok, threshold=THRESHOLD, batch_size=1, top_k_examples=4, output_dir=None)
    docs = list(enumerate(make_docs(15)))
    whole = scanner.accumulate(docs)
    merged = scanner.accumulate(docs[0::2]).merge(scanner.accumulate(docs[1::2]))
    assert (merged.documents, merged.tokens) == (whole.documents, whole.tokens)
    for name in MomentStats.FIELDS:
        torch.testing.assert_close(getattr(merged.stats, name), getattr(whole.stats, name), rtol=1e-12, atol=1e-12, msg=name)
    assert torch.equal(merged.examples.values, whole.examples.values)
    # Pointers may differ only between exactly equal values (identical contexts): check that each points at its value.
    truth = per_document_values(model, tok, [d for _, d in docs], [0, 1, 2], "all")
    for examples in (merged.examples, whole.examples):
        for row, layer in enumerate((0, 1, 2)):
            for slot in range(4):
                for neuron in range(examples.values.shape[-1]):
                    doc, token = examples.doc[row, slot, neuron], examples.token[row, slot, neuron]
                    assert truth[layer][doc][token, neuron] == examples.values[row, slot, neuron]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_accelerate_processes_give_the_single_process_scan(tiny_model_dirs, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    docs = make_docs(13)
    corpus.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    args = ["--model", tiny_model_dirs["gpt2"], "--corpus", str(corpus), "--threshold", str(THRESHOLD), "--batch_size", "1",
            "--top_n", "5", "--top_k_examples", "3", "--histogram_documents", "4"]
    records = tmp_path / "records"
    records.mkdir()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launch, str(REPO / "tests/scripts/scan_two_process.py"), str(records), *args,
                           "--output_dir", str(tmp_path / "two")], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    seen = [json.loads((records / f"process_{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["num_processes"] for r in seen] == [2, 2] and [r["process_index"] for r in seen] == [0, 1]
    assert seen[0]["documents_per_process"] == [7, 6]  # documents i % 2 == rank
    assert seen[0]["neuron_at_rank_1"] == seen[1]["neuron_at_rank_1"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes: the same float operations, bit for bit
    try:
        (config,) = HfArgumentParser(ScanConfig).parse_args_into_dataclasses(args=[*args, "--output_dir", str(tmp_path / "one")])
        single = run_scan(config)
    finally:
        torch.set_num_threads(threads)
    two = load_scan(tmp_path / "two")
    assert two.metadata["num_processes"] == 2 and single.metadata["num_processes"] == 1
    key = ["layer", "neuron"]
    a, b = two.table.sort_values(key).reset_index(drop=True), single.table.sort_values(key).reset_index(drop=True)
    for name in ("count", "mean", "variance", "min", "max", "skewness", "kurtosis", "frac_above", "rank"):
        np.testing.assert_allclose(a[name].to_numpy(), b[name].to_numpy(), rtol=1e-9, atol=1e-12, err_msg=name)
    # Examples: identical up to which of several identical contexts (same tokens so far) a tie keeps.
    def same_context(result):
        return [[(e["value"], e["token_index"], e["token"], e["before"]) for e in n["examples"]] for n in result.top_neurons]

    assert same_context(two) == same_context(single)


# ----------------------------------------------------------------------------------------------
# Top-k examples


def test_top_k_examples_are_the_true_top_k(gpt2):
    model, tok = gpt2
    docs, k = make_docs(), 5
    config = ScanConfig(layers=[1], batch_size=4, top_k_examples=k, top_n=128, threshold=THRESHOLD, output_dir=None)
    result = NeuronScanner(model, tok, config).scan(docs, progress=False)
    truth = per_document_values(model, tok, docs, [1], "all")[1]
    values = np.concatenate(truth)
    assert len(result.top_neurons) == values.shape[1]  # every neuron of the layer
    for entry in result.top_neurons:
        examples = entry["examples"]
        expected = np.sort(values[:, entry["index"]])[::-1][:k]
        np.testing.assert_allclose([e["value"] for e in examples], expected, atol=1e-5)
        for e in examples:  # each example points at the document and token that holds its value
            assert e["doc_id"] == docs[e["doc_index"]].doc_id
            assert truth[e["doc_index"]][e["token_index"], entry["index"]] == pytest.approx(e["value"], abs=1e-5)
            ids = tok(docs[e["doc_index"]].text)["input_ids"]
            assert e["token"] == tok.decode(ids[e["token_index"] : e["token_index"] + 1], clean_up_tokenization_spaces=False)
            # the window token by token, each with the neuron's value at that token of the document
            first = max(0, e["token_index"] - config.example_window)
            stop = e["token_index"] + 1 + config.example_window
            assert e["window_tokens"] == [tok.decode([i], clean_up_tokenization_spaces=False) for i in ids[first:stop]]
            np.testing.assert_allclose(e["window_values"], truth[e["doc_index"]][first:stop, entry["index"]], atol=1e-5)
            assert e["window_tokens"][e["window_label"]] == e["token"]
            assert e["window_values"][e["window_label"]] == pytest.approx(e["value"], abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Scores and ranking


def test_dead_neuron_never_ranks_first_under_any_score(tiny):
    model, tok = tiny
    layer, zero_neuron, constant_neuron = 1, 5, 9
    mlp = get_mlp(model, layer)
    with torch.no_grad():
        if model.config.model_type == "gpt2":
            mlp.c_fc.weight[:, [zero_neuron, constant_neuron]] = 0.0
            mlp.c_fc.bias[zero_neuron] = 0.0  # gelu(0) = 0 everywhere
            mlp.c_fc.bias[constant_neuron] = 3.0  # a large constant: float rounding gives it a tiny M2
        else:
            mlp.gate_proj.weight[[zero_neuron, constant_neuron]] = 0.0  # silu(0) * up = 0 everywhere
    dead = {(layer, zero_neuron), (layer, constant_neuron)}
    docs = make_docs()
    for score in SCORES:
        # threshold 1.0: the constant 3.0 is "always on", 0 is "never on"
        result = NeuronScanner(model, tok, score=score, threshold=1.0, batch_size=4, output_dir=None, top_n=3).scan(docs, progress=False)
        first = result.neuron_at_rank(1)
        assert (first.layer, first.index) not in dead, score
        rows = result.table.set_index(["layer", "neuron"]).loc[sorted(dead)]
        assert rows["dead"].all() and np.isneginf(rows[f"score_{score}"]).all(), score
        assert (rows["rank"] > (~result.table["dead"]).sum()).all(), score  # behind every live neuron


def test_ranking_follows_the_chosen_score(gpt2):
    model, tok = gpt2
    result = NeuronScanner(model, tok, score="variance", batch_size=4, output_dir=None).scan(make_docs(8), progress=False)
    assert result.table["rank"].tolist() == list(range(1, len(result.table) + 1))
    assert result.table["score_variance"].is_monotonic_decreasing
    np.testing.assert_allclose(result.table["score_variance"], result.table["variance"])


# ----------------------------------------------------------------------------------------------
# Errors


def test_unknown_score_is_a_clear_error_listing_the_scores():
    with pytest.raises(ValueError, match=r"Unknown score 'loudness'.*variance.*composite"):
        ScanConfig(score="loudness")


def test_empty_corpus_is_a_clear_error(gpt2, tmp_path):
    model, tok = gpt2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no documents"):
        NeuronScanner(model, tok, output_dir=None).scan(str(empty), progress=False)


def test_layer_out_of_range_is_a_clear_error(gpt2):
    model, tok = gpt2
    with pytest.raises(ValueError, match=r"Layer 3 is out of range.*0\.\.2"):
        NeuronScanner(model, tok, layers=[0, 3])


def test_unknown_position_rule_is_a_clear_error():
    with pytest.raises(ValueError, match="'all'.*'last'"):
        ScanConfig(position="first")


# ----------------------------------------------------------------------------------------------
# Outputs and the recipe hook


def test_outputs_are_written_and_load_back(gpt2, tmp_path):
    model, tok = gpt2
    out = tmp_path / "scan"
    config = ScanConfig(layers=[0, 2], top_n=4, top_k_examples=2, batch_size=4, histogram_documents=6, output_dir=str(out))
    result = run_scan(config, model=model, tokenizer=tok, source=make_docs(10))
    for name in ("neurons.parquet", "top_neurons.json", "score_heatmap.png", "top_histograms.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "score_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    table = pd.read_parquet(out / "neurons.parquet")
    assert len(table) == 2 * 128 and set(table["layer"]) == {0, 2}
    assert {"count", "mean", "std", "variance", "min", "max", "skewness", "kurtosis", "frac_above", "rank"} <= set(table.columns)
    assert {f"score_{s}" for s in SCORES} <= set(table.columns)
    top = json.loads((out / "top_neurons.json").read_text())
    assert [n["rank"] for n in top["top_neurons"]] == [1, 2, 3, 4]
    assert top["corpus"]["kind"] and top["model"] and top["config"]["score"] == "composite"
    assert all(len(n["examples"]) == 2 for n in top["top_neurons"])
    loaded = load_scan(out)
    pd.testing.assert_frame_equal(loaded.table, result.table)
    assert loaded.neuron_at_rank(1) == result.neuron_at_rank(1)


def test_neuron_at_rank_names_the_ranked_neuron(gpt2):
    model, tok = gpt2
    result = NeuronScanner(model, tok, batch_size=4, output_dir=None).scan(make_docs(8), progress=False)
    for rank in (1, 2, 7):
        row = result.table.iloc[rank - 1]
        assert row["rank"] == rank
        assert result.neuron_at_rank(rank) == Neuron(int(row["layer"]), int(row["neuron"]))
    with pytest.raises(ValueError, match="rank must be"):
        result.neuron_at_rank(0)


def test_format_table_shows_the_top_neurons(gpt2):
    model, tok = gpt2
    result = NeuronScanner(model, tok, batch_size=4, top_n=3, output_dir=None).scan(make_docs(8), progress=False)
    text = result.format_table()
    lines = text.splitlines()
    assert "composite" in lines[0] and len(lines) == 2 + 3 + 1
    assert f" {result.neuron_at_rank(1)} " in lines[2]


def test_scan_config_builds_a_command_line():
    args = ["--layers", "2", "0", "--score", "range", "--position", "last", "--max_documents", "0"]
    (config,) = HfArgumentParser(ScanConfig).parse_args_into_dataclasses(args=args)
    assert config.layers == [0, 2] and config.score == "range" and config.position == "last"
    assert config.max_documents is None  # 0 on the command line: the whole corpus


def test_recipe_values_given_as_strings_are_read_by_their_field_types_or_rejected_clearly():
    from nsr_hf.parsing import RecipeParser

    (config,) = RecipeParser(ScanConfig).parse(["--threshold", "2e-1", "--top_n", "5"])
    assert config.threshold == 0.2 and config.top_n == 5
    with pytest.raises(ValueError, match="top_n"):
        RecipeParser(ScanConfig).parse(["--top_n", "five"])


@pytest.mark.slow
def test_scan_of_the_embedded_smollm2_finds_live_neurons(smollm2):
    model, tok = smollm2
    config = ScanConfig(layers=[0, 29], max_documents=8, top_n=3, output_dir=None)
    result = NeuronScanner(model, tok, config).scan("embedded", progress=False)
    assert len(result.table) == 2 * 1536 and result.metadata["documents"] == 8
    assert not result.table.iloc[0]["dead"] and result.top_neurons[0]["examples"]


@pytest.mark.parametrize("position", ["all", "last"])
def test_the_top_neurons_histograms_are_the_values_of_the_histogram_documents_kept_or_read_again(tiny, position):
    """With one position per document the scan's own pass keeps the histogram documents' values (no second pass); with
    every position it reads them again. Either way the histogram of a top neuron holds its values over those documents."""
    model, tok = tiny
    docs = make_docs(30)
    config = ScanConfig(position=position, threshold=THRESHOLD, batch_size=4, output_dir=None, top_n=3, histogram_documents=20)
    scanner = NeuronScanner(model, tok, config)
    result = scanner.scan(docs, progress=False)
    assert bool(scanner.kept_samples) == (position == "last") and scanner.kept_documents == (20 if position == "last" else 0)
    top = [Neuron(int(r.layer), int(r.neuron)) for r in result.top(3).itertuples(index=False)]
    samples = scanner.activation_samples(docs, top)
    truth = per_document_values(model, tok, docs[:20], sorted({n.layer for n in top}), position)
    for n in top:
        expected = np.concatenate(truth[n.layer])[:, n.index]
        np.testing.assert_allclose(np.sort(samples[str(n)]), np.sort(expected), atol=1e-5)
