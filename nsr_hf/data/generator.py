"""Activation datasets: a corpus turned into a ``datasets.DatasetDict`` of neuron values, with the label
transforms fitted on train and the provenance a reviewer needs, saved, pushed and loaded like any dataset.

    from nsr_hf.data.generator import DatasetConfig, ActivationDatasetGenerator
    from nsr_hf.data.storage import load_activation_dataset
    dd = ActivationDatasetGenerator(DatasetConfig(neurons=["15.100"], output_dir="out/ds")).generate()
    dd, meta = load_activation_dataset("out/ds")          # or a Hub id, or a folder in the Hub's layout

    nsr dataset --neurons 15.100 15.7 --max_documents 2000 --output_dir out/ds [--push_to_hub me/nsr-15-100]

Splits: ``train`` / ``validation`` / ``test`` by document (``corpus.split_of`` on the document id, after exact
duplicates are dropped), and ``test_ood`` holding every document of an optional second corpus (deduplicated
against the first, so an out-of-domain text never repeats an in-domain one).

Columns (one row per document, or per token for ``position="all"`` with ``every_token_layout="rows"``):

* ``text``: the document's original text, never cut. ``input_ids`` is what the model saw: ``encode_texts``
  (the one tokenisation rule) cut at ``max_length`` tokens, stored without padding (int32);
  ``encode_texts(tokenizer, text, max_length)`` gives these ids again.
* ``doc_id``; ``attention_mask`` (int8, all ones, kept for HF collators).
* ``label_position`` (int32): index in ``input_ids`` of the labelled token; ``label_token_id`` its id.
* ``activations``: float32, a fixed-length list of the K requested neurons in the order given.
* ``activations_z`` (float32, K) and ``bin`` (int32, K): the transforms fitted on train (below).

For ``every_token_layout="column"`` a row is a document and ``activations`` / ``activations_z`` / ``bin`` are
per-token lists of K-lists (one per id in ``input_ids``); there is no ``label_position``.

Position rules are those of ``nsr_hf.capture``. ``"max"`` with several neurons labels the token where the
*first* neuron is largest and stores every neuron's value at that same token, so a row is one token as for
every other rule. A document too short for an integer rule (``position=5`` on a 3-token text) is skipped and
counted in the metadata (``skipped_documents``).

Transforms (``nsr_hf.data.labels.LabelTransform``) are fitted on the train split only, before balancing: z-score
statistics and ``num_bins + 1`` bin edges per neuron (``nsr_hf.data.binning``), and the report tokens the bins map to.

Generation runs in shards of ``shard_size`` documents per split, each written atomically to
``output_dir/shards/<split>-<index>`` with a manifest: an interrupted run resumes without recomputing finished
shards, a resume with a different configuration is refused, and under ``accelerate launch`` shard ``g`` (in
corpus order over all splits) goes to process ``g % num_processes``. The main process then joins the shards
(memory-mapped), fits the transforms, adds their columns, balances train if asked, and saves the
``DatasetDict`` with its card (``README.md``) in ``output_dir``. Rows never accumulate in memory beyond one shard.

Write order (``nsr_hf.run_folder``): the dataset is saved into a folder beside ``output_dir`` that replaces it only once
the splits and the card are written, so a finished-looking ``output_dir`` always holds a whole dataset. A finished dataset
is refused before the model is loaded unless ``overwrite``; with ``overwrite`` the new shards are computed in a fixed
sibling (``.tmp-<name>-overwrite``, which a rerun of the same command resumes) and the old dataset stays untouched until
the new one replaces it. A folder that holds other files is never written into.

Provenance and transforms live in the card's YAML under ``nsr_hf:`` (``nsr_hf.data.card``) and, as JSON
``{"nsr_hf": ...}``, in each split's ``info.description`` (which survives ``save_to_disk``; the card is what survives
the Hub; ``nsr_hf.data.storage`` reads both). The columns are described in ``nsr_hf.data.columns``.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import torch

from nsr_hf.capture import (
    Neuron,
    capture_activations,
    encode_texts,
    label_positions,
    parse_position,
    select_positions,
    validate_neuron,
    validate_position,
)
from nsr_hf.data.balance import balance_indices, format_balance
from nsr_hf.data.binning import BIN_STRATEGIES
from nsr_hf.data.card import METADATA_KEY, dataset_card
from nsr_hf.data.columns import TransformColumns, column_descriptions, fixed_list_array, list_array, read_column, token_list_array
from nsr_hf.data.corpus import SPLITS, Document, TextSource, check_fractions, deduplicate, load_corpus, split_of
from nsr_hf.data.labels import LabelTransform
from nsr_hf.data.preflight import check_dataset
from nsr_hf.data.storage import push_to_hub, read_metadata
from nsr_hf.errors import UserError
from nsr_hf.models import distributed_state, load_model_and_tokenizer, model_provenance
from nsr_hf.report_tokens import default_report_tokens
from nsr_hf.run_folder import refuse_finished, restore_interrupted_swap, work_folder, written_atomically
from nsr_hf.shared_config import CorpusFields, SplitFields
from nsr_hf.utils import to_jsonable
from nsr_hf.version import __version__

logger = logging.getLogger(__name__)

OOD_SPLIT = "test_ood"
LAYOUTS = ("rows", "column")
# Fields that decide the rows of a shard: a resume must match them. Bins, balancing and output options are
# applied when the shards are joined, so they may change between an interrupted run and its resume.
_CONTENT_FIELDS = ("neurons", "text_field", "id_field", "position", "every_token_layout", "max_length", "max_documents",
                   "max_ood_documents", "split_seed", "split_fractions", "shard_size")


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DatasetConfig(CorpusFields, SplitFields):
    """Generate a dataset of neuron activations (train/validation/test by document) with train-fitted bins."""

    neurons: list[str] = field(kw_only=True, metadata={
        "help": "Neurons as layer.index, e.g. 15.100 15.7 (one or more; the activations column keeps this order)"})
    model_revision: Optional[str] = field(default=None, metadata={"help": "Model revision (branch, tag or commit) for Hub models"})
    id_field: Optional[str] = field(default=None, metadata={
        "help": "Column that holds a stable document id (splits hash it); default: the row index"})
    ood_corpus: Optional[str] = field(default=None, metadata={
        "help": "A second corpus whose documents all go to an out-of-domain 'test_ood' split"})
    position: str = field(default="last", metadata={
        "help": "Labelled token: 'last' (last real token), 'max' (argmax of the first neuron), 'all' (every token), "
                "or an integer index (0 first, -1 last)"})
    every_token_layout: str = field(default="rows", metadata={
        "help": "For position 'all': 'rows' (one row per token) or 'column' (one row per document, per-token lists)"})
    max_length: int = field(default=128, metadata={
        "help": "Texts are cut to this many tokens (at token boundaries; never padded in storage)"})
    max_documents: Optional[int] = field(default=None, metadata={
        "help": "At most this many documents from the corpus (after de-duplication); all when unset"})
    max_ood_documents: Optional[int] = field(default=None, metadata={"help": "At most this many documents from the out-of-domain corpus"})
    num_bins: int = field(default=10, metadata={"help": "Number of activation bins (at least 2); 10 maps to the report digits 0-9"})
    bin_strategy: str = field(default="quantile", metadata={
        "help": "'quantile' (equal counts on train), 'equal_width' (train min to max) or 'kmeans' (1-D k-means, Lloyd-Max: the bins whose "
                "means reproduce the train values with the least squared error; for a skewed neuron far closer than quantile bins)"})
    report_tokens: Optional[list[str]] = field(default=None, metadata={
        "help": "Token string of each bin (default: the tokenizer's single-token digits, e.g. ' 0'..' 9' or '0'..'9'; off/on for 2 bins)"})
    balance: bool = field(default=False, metadata={
        "help": "Equalise the train rows per bin (of the first neuron) by dropping rows from over-full bins"})
    balance_min_keep: float = field(default=0.5, metadata={"help": "Balancing keeps at least this fraction of the train rows"})
    balance_seed: int = field(default=0, metadata={"help": "Seed of the rows balancing drops"})
    batch_size: int = field(default=16, metadata={"help": "Texts per forward pass"})
    shard_size: int = field(default=256, metadata={"help": "Documents per shard (the unit of resuming and of work per process)"})
    output_dir: str = field(default="outputs/dataset", metadata={
        "help": "Folder of the saved dataset (save_to_disk layout, with README.md and shards/ while running)"})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace a finished dataset in output_dir, or start again instead of resuming its unfinished shards; the new "
                "dataset is built beside it and replaces it only once saved"})
    keep_shards: bool = field(default=False, metadata={
        "help": "Keep output_dir/shards after saving (a rerun then only re-fits bins and re-saves)"})
    push_to_hub: Optional[str] = field(default=None, metadata={"help": "Push the dataset and its card to this Hub repo id (owner/name)"})
    private: bool = field(default=False, metadata={"help": "Make the pushed repo private"})

    def __post_init__(self):
        if isinstance(self.neurons, (str, Neuron)):
            self.neurons = [self.neurons]
        names = [part for item in self.neurons for part in (str(item).replace(",", " ").split() or [""])]
        if not names:
            raise ValueError("neurons is empty: name at least one neuron as layer.index, e.g. --neurons 15.100")
        self.neurons = [str(Neuron.parse(name)) for name in names]
        repeated = sorted({n for n in self.neurons if self.neurons.count(n) > 1})
        if repeated:
            raise ValueError(f"neurons {repeated} are listed more than once; list each neuron once")
        self.position = str(validate_position(parse_position(self.position)))
        if self.every_token_layout not in LAYOUTS:
            raise ValueError(f"every_token_layout must be one of {LAYOUTS}, got {self.every_token_layout!r}")
        for name in ("max_length", "batch_size", "shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_documents", "max_ood_documents"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or unset (all documents), got {value!r}")
        fractions = list(check_fractions(self.split_fractions, "split_fractions"))
        if fractions[0] == 0:
            raise ValueError("split_fractions gives train no documents: the bins and z-scores are fitted on train")
        self.split_fractions = fractions
        if isinstance(self.num_bins, bool) or not isinstance(self.num_bins, int) or self.num_bins < 2:
            raise ValueError(f"num_bins must be an integer >= 2, got {self.num_bins!r} "
                             "(one bin says nothing about the value; 10 gives digits 0-9)")
        if self.bin_strategy not in BIN_STRATEGIES:
            raise ValueError(f"bin_strategy must be one of {BIN_STRATEGIES}, got {self.bin_strategy!r}")
        if self.report_tokens is not None and (len(self.report_tokens) != self.num_bins or len(set(self.report_tokens)) != self.num_bins):
            raise ValueError(f"report_tokens must be {self.num_bins} distinct strings (one per bin), got {self.report_tokens}")
        if not 0 < self.balance_min_keep <= 1:
            raise ValueError("balance_min_keep is the fraction of train rows balancing must keep: "
                             f"a number in (0, 1], got {self.balance_min_keep}")
        if self.balance and self.position == "all" and self.every_token_layout == "column":
            raise ValueError("balance works on rows with one value per neuron: with position 'all' use every_token_layout 'rows'")
        if not str(self.output_dir).strip():
            raise ValueError("output_dir is empty: name the folder the dataset is saved in")
        if self.push_to_hub is not None and not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", self.push_to_hub):
            raise ValueError(f"push_to_hub must be a Hub repo id like 'owner/name', got {self.push_to_hub!r}")

    @property
    def parsed_position(self):
        return parse_position(self.position)

    @property
    def layout(self) -> str:
        """``"document"`` (one row per text), ``"rows"`` or ``"column"`` (position ``"all"``)."""
        return self.every_token_layout if self.position == "all" else "document"


# ----------------------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class _OutOfDomainDocument(Document):
    """A document of the out-of-domain corpus (its class carries its split through de-duplication)."""


@dataclass
class _Shard:
    number: int  # global, in corpus order over all splits: decides the process
    split: str
    index: int  # within the split: names the folder
    documents: list[Document]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}"


def _config_hash(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ActivationDatasetGenerator:
    """Turns a corpus into an activation ``DatasetDict`` (see the module docstring for splits and columns).

    >>> gen = ActivationDatasetGenerator(DatasetConfig(neurons=["15.100"], max_documents=500, output_dir="out/ds"))
    >>> dd = gen.generate()          # resumes from output_dir/shards when a previous run was interrupted
    >>> gen.metadata["transform"]    # what also sits in the card and in each split's info.description

    ``model``/``tokenizer`` and ``corpus``/``ood_corpus`` (a ``TextSource``) may be passed in; otherwise they are
    loaded from the config. Under ``accelerate launch`` every process runs ``generate()``; each computes its
    shards, and all return the dataset saved by the main process.
    """

    def __init__(self, config: DatasetConfig, model=None, tokenizer=None, corpus: Optional[TextSource] = None,
                 ood_corpus: Optional[TextSource] = None):
        refuse_to_replace_dataset(config)  # before the model is loaded
        self.config = config
        self.state = distributed_state()  # the processes of `accelerate launch` (gloo on the CPU), or this one alone
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model= and tokenizer=, or neither (then config.model is loaded)")
        self._loaded_model = model is None  # else config.model names nothing: provenance comes from the model itself
        if model is None:
            model, tokenizer = load_model_and_tokenizer(config.model, revision=config.model_revision, device=self.state.device)
        self.model, self.tokenizer = model, tokenizer
        self.neurons = [validate_neuron(model, n) for n in config.neurons]
        self.position = config.parsed_position
        # capture_activations groups neurons by layer; remember where each requested neuron lands.
        self._by_layer: dict[int, list[int]] = {}
        for n in self.neurons:
            self._by_layer.setdefault(n.layer, []).append(n.index)
        self._columns = [(n.layer, self._by_layer[n.layer].index(n.index)) for n in self.neurons]
        if corpus is None:
            corpus = load_corpus(config.corpus, text_field=config.text_field, id_field=config.id_field, model=model, tokenizer=tokenizer)
        if ood_corpus is None and config.ood_corpus:
            ood_corpus = load_corpus(config.ood_corpus, text_field=config.text_field, id_field=config.id_field, model=model,
                                     tokenizer=tokenizer)
        self.corpus = corpus
        self.ood_corpus = ood_corpus
        self.splits = list(SPLITS) + ([OOD_SPLIT] if ood_corpus is not None else [])
        self.output_dir = Path(config.output_dir)
        # Shards are computed in output_dir (an interrupted run resumes there), or with overwrite in a fixed sibling, so that
        # the old dataset is untouched until the new one is saved; the same on every process.
        self.work_dir = work_folder(self.output_dir, "overwrite") if config.overwrite else self.output_dir
        self.shards_dir = self.work_dir / "shards"
        self.metadata: dict = {}
        self.transform: Optional[LabelTransform] = None
        # The tokenizer's single-token digits (or off/on for 2 bins); past 10 bins, the bin numbers, which a
        # token head cannot use (checked leniently here, strictly by the predictor).
        self._strict_tokens = config.report_tokens is not None or config.num_bins <= 10
        self._report_tokens = list(config.report_tokens or (default_report_tokens(tokenizer, config.num_bins)
                                                            if config.num_bins <= 10 else [str(i) for i in range(config.num_bins)]))

    # ------------------------------------------------------------------ identity

    def content_config(self) -> dict:
        """What decides the rows of every shard (compared on resume)."""

        content = {name: getattr(self.config, name) for name in _CONTENT_FIELDS}
        content["model"] = model_provenance(self.model)
        content["corpus"] = self.corpus.describe()
        content["ood_corpus"] = self.ood_corpus.describe() if self.ood_corpus is not None else None
        content["tokenizer"] = {"name": getattr(self.tokenizer, "name_or_path", None), "vocab_size": len(self.tokenizer)}
        return to_jsonable(content)

    # ------------------------------------------------------------------ documents and shards

    def documents(self) -> Iterator[tuple[str, Document]]:
        """``(split, document)`` in corpus order, exact duplicates dropped across both corpora."""
        cfg = self.config
        main = self.corpus.iter_documents(limit=cfg.max_documents)
        ood = ()
        if self.ood_corpus is not None:
            ood = (_OutOfDomainDocument(d.doc_id, d.text) for d in self.ood_corpus.iter_documents(limit=cfg.max_ood_documents))
        for doc in deduplicate(itertools.chain(main, ood)):
            if isinstance(doc, _OutOfDomainDocument):
                yield OOD_SPLIT, Document(doc.doc_id, doc.text)
            else:
                yield split_of(doc.doc_id, cfg.split_seed, cfg.split_fractions), doc

    def shards(self) -> Iterator[_Shard]:
        """Shards of ``shard_size`` documents per split, in the order their last document arrives."""
        buffers: dict[str, list[Document]] = {s: [] for s in self.splits}
        count = dict.fromkeys(self.splits, 0)
        number = 0
        for split, doc in self.documents():
            buffers[split].append(doc)
            if len(buffers[split]) == self.config.shard_size:
                yield _Shard(number, split, count[split], buffers[split])
                buffers[split], count[split], number = [], count[split] + 1, number + 1
        for split in self.splits:
            if buffers[split]:
                yield _Shard(number, split, count[split], buffers[split])
                number += 1

    # ------------------------------------------------------------------ one shard

    def schema(self) -> pa.Schema:
        k = len(self.neurons)
        ids = [("text", pa.string()), ("doc_id", pa.string()), ("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8()))]
        if self.config.layout == "column":
            return pa.schema(ids + [("activations", pa.list_(pa.list_(pa.float32(), k)))])
        return pa.schema(ids + [("label_position", pa.int32()), ("label_token_id", pa.int32()), ("activations", pa.list_(pa.float32(), k))])

    def _capture(self, docs: list[Document]) -> list[Optional[dict]]:
        """Per document: unpadded ids, per-token values ``(L, K)`` and labelled positions (``None``: skipped)."""
        batch = encode_texts(self.tokenizer, [d.text for d in docs], max_length=self.config.max_length)
        cap = capture_activations(self.model, batch, self._by_layer, position="all")
        acts = torch.stack([cap[layer][..., col] for layer, col in self._columns], -1).float().cpu()  # (b, seq, K)
        mask = batch["attention_mask"].bool()
        lengths = mask.sum(-1)
        first = mask.long().argmax(-1)
        pos = self.position
        valid = torch.ones(len(docs), dtype=torch.bool)
        if isinstance(pos, int):
            valid = (lengths > pos) if pos >= 0 else (lengths >= -pos)
        labelled = torch.full((len(docs),), -1, dtype=torch.long)
        if valid.any():
            if pos == "max":  # the first neuron's argmax labels the row
                labelled[valid] = select_positions(acts[valid][..., :1], mask[valid], "max")[1][:, 0]
            elif pos != "all":
                labelled[valid] = label_positions(mask[valid], pos)
        out = []
        for i in range(len(docs)):
            if not valid[i]:
                out.append(None)
                continue
            m = mask[i]
            out.append({
                "ids": batch["input_ids"][i][m].numpy().astype(np.int32),
                "values": acts[i][m].numpy(),
                "position": int(labelled[i] - first[i]) if pos != "all" else None,
            })
        return out

    def shard_table(self, docs: list[Document]) -> tuple[pa.Table, int]:
        """The Arrow table of one shard's rows, and how many documents were skipped."""
        bs = self.config.batch_size
        order = sorted(range(len(docs)), key=lambda i: len(docs[i].text))  # similar lengths batch with less padding
        results: list[Optional[dict]] = [None] * len(docs)
        for start in range(0, len(order), bs):
            chunk = order[start : start + bs]
            for i, res in zip(chunk, self._capture([docs[i] for i in chunk])):
                results[i] = res
        kept = [(d, r) for d, r in zip(docs, results) if r is not None]
        skipped = len(docs) - len(kept)
        if not kept:
            return self.schema().empty_table(), skipped
        layout = self.config.layout
        lengths = np.array([len(r["ids"]) for _, r in kept], dtype=np.int64)
        ids = [r["ids"] for _, r in kept]
        if layout == "rows":  # one row per token: each row repeats its document
            per_row = np.repeat(np.arange(len(kept)), lengths)
            texts = [kept[j][0].text for j in per_row]
            doc_ids = [kept[j][0].doc_id for j in per_row]
            id_rows = np.concatenate([np.tile(x, len(x)) for x in ids])
            row_lengths = lengths[per_row]
            positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
            values = np.concatenate([r["values"] for _, r in kept])
        else:
            texts, doc_ids = [d.text for d, _ in kept], [d.doc_id for d, _ in kept]
            id_rows, row_lengths = np.concatenate(ids), lengths
            if layout == "document":
                positions = np.array([r["position"] for _, r in kept], dtype=np.int32)
                values = np.stack([r["values"][r["position"]] for _, r in kept])
            else:
                values = np.concatenate([r["values"] for _, r in kept])
        columns = {
            "text": pa.array(texts, pa.string()),
            "doc_id": pa.array(doc_ids, pa.string()),
            "input_ids": list_array(id_rows, row_lengths, pa.int32()),
            "attention_mask": list_array(np.ones(len(id_rows), dtype=np.int8), row_lengths, pa.int8()),
        }
        if layout == "column":
            columns["activations"] = token_list_array(values.astype(np.float32), lengths, pa.float32())
        else:
            row_starts = np.concatenate([[0], np.cumsum(row_lengths)[:-1]]).astype(np.int64)
            columns["label_position"] = pa.array(positions, pa.int32())
            columns["label_token_id"] = pa.array(id_rows[row_starts + positions], pa.int32())
            columns["activations"] = fixed_list_array(values.astype(np.float32), pa.float32())
        return pa.table(columns, schema=self.schema()), skipped

    def _write_shard(self, shard: _Shard, content_hash: str) -> dict:
        from datasets import Dataset
        from datasets.table import InMemoryTable

        table, skipped = self.shard_table(shard.documents)
        manifest = {
            "config_hash": content_hash, "split": shard.split, "index": shard.index, "number": shard.number,
            "num_documents": len(shard.documents), "skipped_documents": skipped, "num_rows": table.num_rows,
            "process_index": self.state.process_index, "num_processes": self.state.num_processes,
        }
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{shard.name}-", dir=self.shards_dir))
        try:
            Dataset(InMemoryTable(table)).save_to_disk(str(tmp / "data"))
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            try:
                os.rename(tmp, self.shards_dir / shard.name)  # atomic: a shard folder is complete or absent
            except OSError:
                if self._finished(shard, content_hash) is None:  # not the same shard finished by another process
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return manifest

    def _finished(self, shard: _Shard, content_hash: str) -> Optional[dict]:
        path = self.shards_dir / shard.name / "manifest.json"
        if not path.exists():
            return None
        manifest = json.loads(path.read_text())
        if manifest.get("config_hash") != content_hash or manifest.get("num_documents") != len(shard.documents):
            raise ValueError(f"shard {path.parent} was made with another configuration or corpus; delete output_dir/shards "
                             "or pass --overwrite to start again")
        return manifest

    # ------------------------------------------------------------------ the whole run

    def _prepare_output(self, content: dict, content_hash: str) -> None:
        """Main process: start, resume or refuse (shards of another configuration). With ``overwrite``, shards of an
        interrupted overwrite of another configuration are dropped: they never were a finished dataset."""
        out = self.output_dir
        manifest_path = self.shards_dir / "manifest.json"
        if manifest_path.exists():
            previous = json.loads(manifest_path.read_text())
            if previous["config_hash"] != content_hash and self.config.overwrite:
                shutil.rmtree(self.work_dir)
            elif previous["config_hash"] != content_hash:
                old = previous["content"]
                changed = sorted(k for k in set(old) | set(content) if old.get(k) != content.get(k))
                details = "; ".join(f"{k}: {old.get(k)!r} -> {content.get(k)!r}" for k in changed)
                raise UserError(f"{out} holds unfinished shards of a different configuration ({details}). Resume with the "
                                "same settings, choose another --output_dir, or pass --overwrite to start again.")
            else:
                logger.warning("Resuming the unfinished dataset in %s", self.work_dir)
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.shards_dir.glob(".tmp-*"):  # shards interrupted while being written
            shutil.rmtree(stale, ignore_errors=True)
        manifest_path.write_text(json.dumps({"config_hash": content_hash, "content": content}, indent=1))

    def generate(self):
        """Compute (or resume) every shard, then join, fit, balance and save. Returns the saved ``DatasetDict``."""
        import datasets

        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # one bar per shard save would bury ours
        try:
            return self._generate()
        finally:
            if bars:
                datasets.enable_progress_bars()

    def _generate(self):
        from datasets import load_from_disk
        from tqdm.auto import tqdm

        state = self.state
        content = self.content_config()
        content_hash = _config_hash(content)
        if state.is_main_process:
            self._prepare_output(content, content_hash)
        state.wait_for_everyone()
        plan: dict[str, list[dict]] = {s: [] for s in self.splits}  # every shard, as the main process will join them
        computed = reused = 0
        total = self.config.max_documents if self.ood_corpus is None else None
        bar = tqdm(desc=f"dataset ({len(self.neurons)} neuron{'s' * (len(self.neurons) > 1)})", unit="doc",
                   total=total, disable=not state.is_local_main_process)
        for shard in self.shards():
            plan[shard.split].append({"name": shard.name, "num_documents": len(shard.documents)})
            if shard.number % state.num_processes == state.process_index:
                if self._finished(shard, content_hash) is None:
                    self._write_shard(shard, content_hash)
                    computed += 1
                else:
                    reused += 1
            bar.update(len(shard.documents))
            bar.set_postfix(computed=computed, resumed=reused)
        bar.close()
        self.shard_counts = {"computed": computed, "resumed": reused}
        state.wait_for_everyone()
        if state.is_main_process:
            self._finalise(plan, content)
        state.wait_for_everyone()
        dataset_dict = load_from_disk(str(self.output_dir))
        if not self.metadata:
            self.metadata = read_metadata(self.output_dir, dataset_dict)
        return dataset_dict

    def _join(self, split: str, shards: list[dict], content_hash: str):
        from datasets import Dataset, concatenate_datasets, load_from_disk
        from datasets.table import InMemoryTable

        parts = []
        for shard in shards:
            folder = self.shards_dir / shard["name"]
            manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").exists() else None
            if manifest is None or manifest["config_hash"] != content_hash:
                raise RuntimeError(f"shard {folder} is missing or stale after every process finished: rerun to compute it")
            if manifest["num_rows"]:  # a shard saved with no rows cannot be loaded (datasets fails on its empty file list)
                parts.append(load_from_disk(str(folder / "data")))
        return concatenate_datasets(parts) if parts else Dataset(InMemoryTable(self.schema().empty_table()))

    def _refuse_empty_splits(self, joined: dict, plan: dict[str, list[dict]]) -> None:
        """Before anything is saved: a split with no rows (too few documents, or every text too short for the position) is a
        ``UserError`` that says why. Every split must have rows: train fits the bins, validation and test are what training and
        the evaluation report on, and ``datasets`` cannot load a saved split without rows. The shards go too: with these
        settings they cannot give a dataset, and a corrected command (other settings) would be refused by them."""
        empty = [split for split in self.splits if len(joined[split]) == 0]
        if not empty:
            return
        documents = {s: sum(shard["num_documents"] for shard in plan[s]) for s in empty}
        too_short = [s for s in empty if documents[s]]
        why = ", ".join(f"{s} ({documents[s]} document{'s' * (documents[s] != 1)}"
                        + (f", all too short for position {self.config.position}" if documents[s] else "") + ")" for s in empty)
        if too_short:
            fix = (f"Use a position the texts reach (e.g. last, or a smaller index than {self.config.position}), longer texts, "
                   "or more documents")
        else:
            fix = (f"Use more documents ({'raise max_documents' if self.config.max_documents else 'a larger corpus'}; "
                   "documents go to splits by a hash of their id, in the proportions of split_fractions)")
        shutil.rmtree(self.shards_dir, ignore_errors=True)
        shutil.rmtree(self.work_dir / ".cache", ignore_errors=True)
        with contextlib.suppress(OSError):
            self.work_dir.rmdir()  # only when nothing else is in it (an overwrite's old dataset stays as it was)
        raise UserError(f"the dataset would have no rows in {why}: every split needs rows. {fix}. Nothing was saved in "
                        f"{self.output_dir}.")

    def _finalise(self, plan: dict[str, list[dict]], content: dict) -> None:
        from datasets import DatasetDict

        cfg, k = self.config, len(self.neurons)
        content_hash = _config_hash(content)
        joined = {split: self._join(split, plan[split], content_hash) for split in self.splits}
        self._refuse_empty_splits(joined, plan)
        skipped = {}
        for split in self.splits:
            manifests = [json.loads((self.shards_dir / s["name"] / "manifest.json").read_text()) for s in plan[split]]
            skipped[split] = sum(m["skipped_documents"] for m in manifests)
        train_values = read_column(joined["train"], "activations", k)
        transform = LabelTransform.fit(train_values, cfg.neurons, cfg.num_bins, cfg.bin_strategy, self._report_tokens)
        transform = transform.with_token_ids(self.tokenizer, strict=self._strict_tokens)
        self.transform = transform
        balance = None
        cache = self.work_dir / ".cache"
        cache.mkdir(parents=True, exist_ok=True)
        out = {}
        for split, ds in joined.items():
            ds = ds.with_format("arrow").map(
                TransformColumns(transform, cfg.layout), batched=True, batch_size=1000, desc=f"bins ({split})",
                cache_file_name=str(cache / f"{split}.arrow"), new_fingerprint=_config_hash({"split": split, "content": content,
                                                                                             "transform": transform.to_dict()}),
            ).with_format(None)
            out[split] = ds
        if cfg.balance:
            first_bins = transform.bin_of(train_values)[:, 0]
            keep, before, after = balance_indices(first_bins, cfg.num_bins, cfg.balance_min_keep, cfg.balance_seed)
            out["train"] = out["train"].select(keep)
            balance = {"neuron": cfg.neurons[0], "min_keep": cfg.balance_min_keep, "seed": cfg.balance_seed,
                       "rows_before": len(train_values), "rows_after": len(keep), "before": before, "after": after}
            print(format_balance(balance, transform.report_tokens))
        del train_values
        self.metadata = self._metadata(out, plan, skipped, transform, balance, content)
        description = json.dumps({METADATA_KEY: self.metadata})
        for ds in out.values():
            ds.info.description = description
        dataset_dict = DatasetDict(out)
        self._save(dataset_dict)
        del dataset_dict, out, joined

    def _save(self, dataset_dict) -> None:
        """Save the dataset and its card into a folder beside ``output_dir`` that replaces it once complete: an old
        dataset is deleted only after the new one is in place, and an interruption leaves no half-saved dataset that looks
        finished. The shards go with it when ``keep_shards``, else they are deleted with the work folder."""
        with written_atomically(self.output_dir) as tmp:
            dataset_dict.save_to_disk(str(tmp))
            dataset_card(self.metadata).save(tmp / "README.md")
            if self.config.keep_shards:
                os.rename(self.shards_dir, tmp / "shards")
        if self.work_dir != self.output_dir:  # the swap already removed output_dir's own shards and cache with the old folder
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def _metadata(self, out: dict, plan: dict, skipped: dict, transform: LabelTransform, balance, content: dict) -> dict:
        cfg, k = self.config, len(self.neurons)
        stats = {}
        for split, ds in out.items():
            values = read_column(ds, "activations", k).astype(np.float64)
            stats[split] = {n: ({"mean": float(values[:, j].mean()), "std": float(values[:, j].std()),
                                 "min": float(values[:, j].min()), "max": float(values[:, j].max())} if len(values) else None)
                            for j, n in enumerate(cfg.neurons)}
        return to_jsonable({
            "nsr_hf_version": __version__,
            "model": {**content["model"],
                      **({"requested": cfg.model, "requested_revision": cfg.model_revision} if self._loaded_model else {})},
            "tokenizer": content["tokenizer"],
            "neurons": list(cfg.neurons),
            "layers": sorted({n.layer for n in self.neurons}),
            "position": self.position,
            "layout": cfg.layout,
            "max_length": cfg.max_length,
            "corpus": content["corpus"],
            "ood_corpus": content["ood_corpus"],
            "split_seed": cfg.split_seed,
            "split_fractions": list(cfg.split_fractions),
            "splits": list(self.splits),
            "num_rows": {split: len(ds) for split, ds in out.items()},
            "num_documents": {split: sum(s["num_documents"] for s in plan[split]) - skipped[split] for split in self.splits},
            "skipped_documents": skipped,
            "statistics": stats,
            "transform": transform.to_dict(),
            "balance": balance,
            "columns": column_descriptions(cfg.layout),
            "config": asdict(cfg),
            "config_hash": _config_hash(content),
        })


def holds_dataset(folder: "str | os.PathLike") -> bool:
    """Whether ``folder`` holds a finished dataset (its ``dataset_dict.json``; the folder appears whole once saved)."""
    return (Path(folder) / "dataset_dict.json").is_file()


def _holds_unfinished(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but an unfinished generation's shards and cache."""
    entries = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    return bool(entries) and entries <= {"shards", ".cache"}


def refuse_to_replace_dataset(config: DatasetConfig) -> None:
    """Refuse ``output_dir`` before the model is loaded: a finished dataset without ``overwrite`` (unless it kept its
    shards: a rerun re-fits the bins and saves again), and a folder of other files always. Reads only (every process
    runs it)."""
    out = Path(config.output_dir)
    restore_interrupted_swap(out)
    finished, unfinished = holds_dataset(out), _holds_unfinished(out)
    if config.overwrite or unfinished or (finished and (out / "shards" / "manifest.json").exists()):
        refuse_finished(out, "a dataset", finished=finished or unfinished, overwrite=True)  # another folder's files: refused
    elif finished:
        raise UserError(f"{out} already holds a finished dataset. Nothing was changed: choose another --output_dir, or pass "
                        "--overwrite to replace it once the new dataset is saved.")
    else:
        refuse_finished(out, "a dataset", finished=False, overwrite=False)


# ----------------------------------------------------------------------------------------------------------
# Command line


def format_summary(dataset_dict, metadata: dict, output_dir: Optional[str] = None) -> str:
    """Rows per split, activation mean/std/min/max per neuron and split, and the bins."""
    lines = [(f"activation dataset{' in ' + str(output_dir) if output_dir else ''}: model {metadata['model'].get('name')}, "
             f"neurons {', '.join(metadata['neurons'])}, position {metadata['position']!r} ({metadata['layout']}), "
             f"max_length {metadata['max_length']}"), "",
             f"{'split':<10} {'rows':>8} {'documents':>10} {'skipped':>8}"]
    for split in metadata["splits"]:
        documents, skipped = metadata["num_documents"][split], metadata["skipped_documents"][split]
        lines.append(f"{split:<10} {len(dataset_dict[split]):>8} {documents:>10} {skipped:>8}")
    lines += ["", f"{'neuron':<10} {'split':<10} {'mean':>10} {'std':>10} {'min':>10} {'max':>10}"]
    for n in metadata["neurons"]:
        for split in metadata["splits"]:
            s = metadata["statistics"][split][n]
            if s:
                lines.append(f"{n:<10} {split:<10} {s['mean']:>10.4f} {s['std']:>10.4f} {s['min']:>10.4f} {s['max']:>10.4f}")
    t = metadata["transform"]
    lines += ["", (f"bins: {len(t['bin_edges'][0]) - 1} {t['bin_strategy']} bins fitted on train ({t['num_values']} values), "
                   f"report tokens {t['report_tokens']}")]
    for j, n in enumerate(t["neurons"]):
        lines.append(f"  {n}: edges " + " ".join(f"{e:.4g}" for e in t["bin_edges"][j]))
    if metadata.get("balance"):
        b = metadata["balance"]
        lines.append(f"balanced train: {b['rows_before']} -> {b['rows_after']} rows")
    return "\n".join(lines)


def run_dataset(config: DatasetConfig, model=None, tokenizer=None):
    """What ``nsr dataset`` does: generate (resuming if interrupted), save to ``output_dir``, print a summary,
    push to the Hub when ``push_to_hub`` is set. Returns the ``DatasetDict``."""
    if model is None:  # mistakes in the inputs fail before the model is loaded (a caller that passes one has checked them)
        check_dataset(config)
    generator = ActivationDatasetGenerator(config, model=model, tokenizer=tokenizer)
    dataset_dict = generator.generate()
    if generator.state.is_main_process:
        print(format_summary(dataset_dict, generator.metadata, config.output_dir))
        if config.push_to_hub:
            push_to_hub(dataset_dict, config.push_to_hub, dataset_card(generator.metadata), private=config.private)
            print(f"pushed to https://huggingface.co/datasets/{config.push_to_hub}")
    return dataset_dict
