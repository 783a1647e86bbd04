"""Text sources: the embedded Python docs, local files, datasets folders, the model's own samples;
deduplication and id-hashed splits. All offline."""
from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from nsr_hf.data.corpus import (
    SPLITS,
    Document,
    EmbeddedCorpus,
    FileCorpus,
    HubCorpus,
    SyntheticCorpus,
    deduplicate,
    load_corpus,
    split_documents,
    split_of,
)

ROWS = [
    {"id": "a", "text": "First document about neurons."},
    {"id": "b", "text": "Second document, about tokens."},
    {"id": "c", "text": "  "},  # blank: skipped, but its row index still counts
    {"id": "d", "text": "Fourth document."},
]
EXPECTED_TEXTS = ["First document about neurons.", "Second document, about tokens.", "Fourth document."]


def write_jsonl(path, rows=ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows=ROWS):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path, rows=ROWS):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def embedded():
    return list(EmbeddedCorpus())


# ---------------------------------------------------------------------------------------------- embedded


def test_embedded_is_deterministic_with_unique_ids(embedded):
    again = list(EmbeddedCorpus())
    assert again == embedded
    ids = [d.doc_id for d in embedded]
    assert len(set(ids)) == len(ids)


def test_embedded_yields_many_documents_from_topics_and_docstrings(embedded):
    assert len(embedded) > 1000
    kinds = Counter(d.doc_id.split(":")[0] for d in embedded)
    assert kinds["pydoc"] > 100 and kinds["stdlib"] > 1000
    assert any(d.doc_id.startswith("pydoc:topic:assert:") for d in embedded)
    assert any(d.doc_id.startswith("stdlib:json.dumps:") for d in embedded)


def test_embedded_passages_respect_max_chars_min_words_and_have_no_doctests(embedded):
    assert all(len(d.text) <= 1000 for d in embedded)
    assert all(len(d.text.split()) >= 8 for d in embedded)
    assert not any(line.lstrip().startswith((">>>", "... ")) for d in embedded for line in d.text.splitlines())
    assert len({d.text for d in embedded}) == len(embedded)  # no exact duplicates inside the corpus


def test_embedded_parameters_and_limit():
    small = list(EmbeddedCorpus(max_chars=300, min_words=20, include=("topics",), limit=50))
    assert len(small) == 50
    assert all(d.doc_id.startswith("pydoc:") and len(d.text) <= 300 and len(d.text.split()) >= 20 for d in small)


def test_embedded_skips_test_and_gui_packages(embedded):
    modules = {d.doc_id.split(":")[1].split(".")[0] for d in embedded if d.doc_id.startswith("stdlib:")}
    assert not modules & {"test", "idlelib", "tkinter", "lib2to3", "turtledemo", "ensurepip", "encodings"}


def test_embedded_describe_is_json_serialisable():
    info = EmbeddedCorpus(include="topics").describe()
    assert json.loads(json.dumps(info)) == info
    assert info["kind"] == "embedded" and info["include"] == ["topics"] and "python_version" in info


def test_embedded_rejects_unknown_parts():
    with pytest.raises(ValueError, match="docstrings"):
        EmbeddedCorpus(include=("manpages",))


# ---------------------------------------------------------------------------------------------- files


def test_txt_paragraph_mode_splits_on_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph\nstill first.\n\n\nSecond one.\n  \nThird.\n", encoding="utf-8")
    docs = list(FileCorpus(path))
    assert docs == [Document("notes.txt:0", "First paragraph\nstill first."), Document("notes.txt:1", "Second one."),
                    Document("notes.txt:2", "Third.")]


def test_txt_line_mode_uses_line_numbers_as_ids(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("alpha\n\nbeta\ngamma\n", encoding="utf-8")
    docs = list(FileCorpus(path, txt_mode="line"))
    assert [(d.doc_id, d.text) for d in docs] == [("lines.txt:0", "alpha"), ("lines.txt:2", "beta"), ("lines.txt:3", "gamma")]


def test_txt_file_mode_gives_one_document(tmp_path):
    path = tmp_path / "whole.txt"
    path.write_text("alpha\n\nbeta\n", encoding="utf-8")
    assert list(FileCorpus(path, txt_mode="file")) == [Document("whole.txt:0", "alpha\n\nbeta")]


@pytest.mark.parametrize("writer,name", [(write_jsonl, "data.jsonl"), (write_csv, "data.csv"), (write_parquet, "data.parquet")])
def test_row_files_yield_texts_with_row_index_ids(tmp_path, writer, name):
    docs = list(FileCorpus(writer(tmp_path / name)))
    assert [d.text for d in docs] == EXPECTED_TEXTS
    assert [d.doc_id for d in docs] == [f"{name}:0", f"{name}:1", f"{name}:3"]


@pytest.mark.parametrize("writer,name", [(write_jsonl, "data.jsonl"), (write_csv, "data.csv"), (write_parquet, "data.parquet")])
def test_row_files_use_id_field_and_custom_text_field(tmp_path, writer, name):
    rows = [{"id": r["id"], "body": r["text"]} for r in ROWS]
    if name.endswith(".csv"):
        path = tmp_path / name
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["id", "body"])
            w.writeheader()
            w.writerows(rows)
    else:
        path = writer(tmp_path / name, rows)
    docs = list(FileCorpus(path, text_field="body", id_field="id"))
    assert [(d.doc_id, d.text) for d in docs] == list(zip(["a", "b", "d"], EXPECTED_TEXTS))


def test_json_array_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    assert [d.text for d in FileCorpus(path)] == EXPECTED_TEXTS


@pytest.mark.parametrize("writer,name", [(write_jsonl, "data.jsonl"), (write_csv, "data.csv"), (write_parquet, "data.parquet")])
def test_missing_text_field_error_names_the_columns(tmp_path, writer, name):
    corpus = FileCorpus(writer(tmp_path / name), text_field="content")
    with pytest.raises(ValueError, match=r"'content'.*\['id', 'text'\]"):
        list(corpus)


def test_non_string_text_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": 42}])
    with pytest.raises(TypeError, match="row 1.*int"):
        list(FileCorpus(path))


def test_csv_keeps_numeric_looking_text_as_text(tmp_path):
    path = write_csv(tmp_path / "numbers.csv", [{"id": "1", "text": "123"}, {"id": "2", "text": "007"}])
    assert [d.text for d in FileCorpus(path)] == ["123", "007"]


def test_unknown_extension_lists_supported_ones(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<a/>")
    with pytest.raises(ValueError, match=r"\.jsonl.*\.parquet"):
        FileCorpus(path)


def test_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        FileCorpus(tmp_path / "nope.jsonl")


def test_file_corpus_iterates_again_and_respects_limit(tmp_path):
    corpus = FileCorpus(write_jsonl(tmp_path / "data.jsonl"), limit=2)
    assert list(corpus) == list(corpus)
    assert len(list(corpus)) == 2


# ---------------------------------------------------------------------------------------------- hub


def test_hub_corpus_loads_a_local_dataset_folder(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl")
    corpus = HubCorpus(str(folder), split="train")
    docs = list(corpus)
    assert [d.text for d in docs] == EXPECTED_TEXTS
    assert docs[0].doc_id == f"{folder}/default/train:0"
    assert list(corpus) == docs  # a streamed dataset can be iterated again
    assert [d.doc_id for d in HubCorpus(str(folder), id_field="id")] == ["a", "b", "d"]
    with pytest.raises(ValueError, match=r"'content'.*\['id', 'text'\]"):
        list(HubCorpus(str(folder), text_field="content"))


# ---------------------------------------------------------------------------------------------- synthetic


def synthetic(tiny, seed):
    model, tokenizer = tiny
    return SyntheticCorpus(model, tokenizer, prompts=["The quick brown", "def function("], samples_per_prompt=2,
                           max_new_tokens=8, seed=seed)


def test_synthetic_same_seed_gives_same_texts(tiny):
    import torch

    torch.manual_seed(123)
    before = torch.rand(1)
    first, second = list(synthetic(tiny, 0)), list(synthetic(tiny, 0))
    assert first == second
    assert [d.doc_id for d in first] == ["synthetic:0:0:0", "synthetic:0:0:1", "synthetic:0:1:0", "synthetic:0:1:1"]
    assert first[0].text.startswith("The quick brown") and first[2].text.startswith("def function(")
    assert first[0].text != first[1].text  # samples of one prompt differ
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is untouched


def test_synthetic_different_seed_gives_different_texts(tiny):
    assert [d.text for d in synthetic(tiny, 0)] != [d.text for d in synthetic(tiny, 1)]


# ---------------------------------------------------------------------------------------------- dedup and splits


def test_deduplicate_drops_exact_duplicates_and_empties_keeping_first():
    docs = [Document("1", "alpha"), Document("2", "  "), Document("3", "beta"), Document("4", "alpha \n"), Document("5", "Alpha")]
    assert [d.doc_id for d in deduplicate(docs)] == ["1", "3", "5"]


def test_iter_documents_deduplicates_then_limits(tmp_path):
    path = tmp_path / "dups.txt"
    path.write_text("a b\na b\nc d\ne f\n", encoding="utf-8")
    corpus = FileCorpus(path, txt_mode="line")
    assert [d.text for d in corpus.iter_documents(limit=2)] == ["a b", "c d"]
    assert len(list(corpus.iter_documents(dedup=False))) == 4


def test_split_of_is_deterministic_and_order_independent():
    ids = [f"doc:{i}" for i in range(200)]
    forward = {i: split_of(i) for i in ids}
    backward = {i: split_of(i) for i in reversed(ids)}
    assert forward == backward
    assert set(forward.values()) == set(SPLITS)


def test_split_of_respects_fractions_approximately():
    counts = Counter(split_of(f"doc:{i}", fractions=(0.7, 0.2, 0.1)) for i in range(10_000))
    for name, fraction in zip(SPLITS, (0.7, 0.2, 0.1)):
        assert abs(counts[name] / 10_000 - fraction) < 0.02


def test_split_of_depends_on_seed():
    ids = [f"doc:{i}" for i in range(200)]
    assert [split_of(i, seed=0) for i in ids] != [split_of(i, seed=1) for i in ids]


def test_split_of_with_zero_fractions_never_picks_them():
    assert {split_of(f"doc:{i}", fractions=(1, 0, 0)) for i in range(500)} == {"train"}
    assert {split_of(f"doc:{i}", fractions=(0, 0, 1)) for i in range(500)} == {"test"}


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.9, 0.2, -0.1), (0.5, 0.3, 0.1), (0.8, 0.1, 0.1, 0.0)])
def test_bad_fractions_error(fractions):
    with pytest.raises(ValueError, match="sum"):
        split_of("x", fractions=fractions)


def test_split_documents_puts_each_document_in_exactly_one_split():
    docs = [Document(f"d{i}", f"text {i % 150}") for i in range(300)]  # every text twice
    splits = split_documents(docs, seed=3)
    assert list(splits) == list(SPLITS)
    ids = [d.doc_id for part in splits.values() for d in part]
    assert len(ids) == len(set(ids)) == 150  # duplicates dropped, each kept doc once
    texts = [d.text for part in splits.values() for d in part]
    assert len(texts) == len(set(texts))
    assert all(split_of(d.doc_id, seed=3) == name for name, part in splits.items() for d in part)


# ---------------------------------------------------------------------------------------------- load_corpus


def test_load_corpus_embedded_and_alias():
    for spec in ("embedded", "pydoc"):
        corpus = load_corpus(spec, max_chars=500, include=("topics",))
        assert isinstance(corpus, EmbeddedCorpus) and corpus.max_chars == 500


def test_load_corpus_local_file(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"k": "x", "body": "hello there"}])
    corpus = load_corpus(str(path), text_field="body", id_field="k")
    assert isinstance(corpus, FileCorpus) and list(corpus) == [Document("x", "hello there")]
    assert isinstance(load_corpus(path), FileCorpus)  # a Path works too


def test_load_corpus_missing_path_is_not_a_hub_lookup(tmp_path):
    for spec in (str(tmp_path / "missing.jsonl"), "missing.csv", "./data/dir/file"):
        with pytest.raises(FileNotFoundError, match="not found"):
            load_corpus(spec)


def test_load_corpus_hub_specs(tmp_path):
    corpus = load_corpus("hub:wikitext:wikitext-2-raw-v1:validation", text_field="page")
    assert isinstance(corpus, HubCorpus)
    assert (corpus.name, corpus.config, corpus.split, corpus.text_field) == ("wikitext", "wikitext-2-raw-v1", "validation", "page")
    assert load_corpus("hub:owner/name").split == "train"
    plain = load_corpus("owner/name")  # a Hub id, not a path; nothing is loaded until iteration
    assert isinstance(plain, HubCorpus) and plain.config is None
    folder = tmp_path / "ds"
    folder.mkdir()
    assert isinstance(load_corpus(str(folder)), HubCorpus)


def test_load_corpus_synthetic_needs_model(tiny):
    with pytest.raises(ValueError, match="model"):
        load_corpus("synthetic")
    model, tokenizer = tiny
    corpus = load_corpus("synthetic", model=model, tokenizer=tokenizer, seed=5, samples_per_prompt=1)
    assert isinstance(corpus, SyntheticCorpus) and corpus.seed == 5
    info = corpus.describe()
    assert json.loads(json.dumps(info)) == info


def test_load_corpus_returns_sources_unchanged(tmp_path):
    source = FileCorpus(write_jsonl(tmp_path / "data.jsonl"))
    assert load_corpus(source) is source
