"""``NeuronScanner``: the scan loop. Documents stream through the model; a ``NeuronRecorder`` hands each scanned
layer's neurons to the statistics while the forward pass runs (it stops after the deepest scanned layer), shards
of an ``accelerate launch`` are merged exactly, and ``finish`` scores, ranks and reads the top examples' text.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from nsr_hf.architectures import num_layers, num_neurons
from nsr_hf.capture import (
    Neuron,
    NeuronRecorder,
    capture_activations,
    encode_texts,
    pad_right,
    position_ids_from_mask,
    real_token_bounds,
    validate_layer,
)
from nsr_hf.data.corpus import Document, TextSource, load_corpus
from nsr_hf.data.preflight import check_scan
from nsr_hf.models import distributed_state, load_model_and_tokenizer, model_provenance
from nsr_hf.run_folder import refuse_finished, restore_interrupted_swap, written_atomically
from nsr_hf.scanner.config import ScanConfig
from nsr_hf.scanner.results import STAT_COLUMNS, TABLE_FILE, TOP_FILE, ScanResult, finite, holds_scan
from nsr_hf.scanner.scores import SCORES, compute_scores, dead_neurons, rank_order
from nsr_hf.scanner.statistics import MomentStats, ScanState, TopExamples

logger = logging.getLogger(__name__)


def as_source(source):
    """A ``TextSource`` from a source, a spec string for ``load_corpus``, or a list of ``Document``s / texts
    (texts get ids ``"text:<i>"``)."""

    if isinstance(source, TextSource):
        return source
    if isinstance(source, str):
        return load_corpus(source)
    docs = tuple(d if isinstance(d, Document) else Document(f"text:{i}", str(d)) for i, d in enumerate(source))

    class InMemory(TextSource):
        kind = "in_memory"

        def _documents(self):
            return iter(docs)

        def _provenance(self):
            return {"documents": len(docs)}

    return InMemory("in_memory")


class NeuronScanner:
    """Streams documents through ``model`` and accumulates per-neuron statistics and top examples.

    ``scan(source)`` does it all (sharding across ``accelerate`` processes, merging, ranking, text windows);
    ``accumulate`` and ``finish`` are its two halves, for scanning shards by hand and merging them.
    """

    def __init__(self, model, tokenizer, config: ScanConfig | None = None, **overrides):
        self.model, self.tokenizer = model, tokenizer
        self.config = ScanConfig(**{**(asdict(config) if config else {}), **overrides})
        self.layers = list(range(num_layers(model))) if self.config.layers is None else self.config.layers
        for layer in self.layers:
            validate_layer(model, layer)
        self.neurons = num_neurons(model)
        self.device = next(model.parameters()).device
        # the histogram documents' values, kept from the scan's own pass where they are few (one position per document):
        # the top neurons' histograms then need no second pass (activation_samples)
        self.kept_samples: dict[int, list] = {}
        self.kept_documents = 0

    def _keeps_samples(self) -> bool:
        """One position per document, one process, and at most ``SAMPLE_BUDGET`` bytes of values to keep."""
        size = self.config.histogram_documents * len(self.layers) * self.neurons * 4
        return self.config.position != "all" and 0 < size <= SAMPLE_BUDGET and distributed_state().num_processes == 1

    # -- batches -------------------------------------------------------------------------------

    def iter_batches(self, documents: Iterable[tuple[int, Document]]) -> Iterator[tuple[torch.Tensor, dict]]:
        """``(document indices, tokenised batch)`` for ``(index, Document)`` pairs.

        Documents of similar length are batched together (sorted within a window of 16 batches) to
        waste less compute on padding; indices say which document each row is.
        """
        size = self.config.batch_size
        window: list = []

        def flush():
            window.sort(key=lambda item: len(item[1].text))
            for start in range(0, len(window), size):
                chunk = window[start : start + size]
                batch = encode_texts(self.tokenizer, [doc.text for _, doc in chunk], max_length=self.config.max_length)
                yield torch.tensor([i for i, _ in chunk]), batch
            window.clear()

        for item in documents:
            window.append(item)
            if len(window) == 16 * size:
                yield from flush()
        yield from flush()

    def _positions(self, attention_mask: torch.Tensor, doc_index: torch.Tensor):
        """Which positions to read: ``(flat index into batch x sequence, document index, token index)``,
        one entry per read position. Token indices count real tokens (0 = first), so they do not depend
        on the padding side. ``None`` as flat index means every position (no copy needed)."""
        attention_mask = attention_mask.cpu()  # small; the indices are moved to the model's device by the caller
        mask = attention_mask.bool()
        seq = mask.shape[1]
        if self.config.position == "all":
            token = position_ids_from_mask(attention_mask)[mask]
            flat = None if mask.all() else mask.flatten().nonzero().squeeze(1)
            return flat, doc_index[:, None].expand_as(mask)[mask], token
        first, last = real_token_bounds(attention_mask)
        return torch.arange(mask.shape[0]) * seq + last, doc_index, last - first

    @staticmethod
    def _read(acts: torch.Tensor, flat: torch.Tensor | None) -> torch.Tensor:
        """``(positions, neurons)`` from ``(batch, seq, neurons)`` activations (index_select: much
        cheaper than boolean-mask indexing on CPU)."""
        acts = acts.reshape(-1, acts.shape[-1])
        return acts if flat is None else acts.index_select(0, flat)

    # -- the two halves of a scan ---------------------------------------------------------------

    def new_state(self) -> ScanState:
        rows = len(self.layers)
        return ScanState(list(self.layers), MomentStats(rows, self.neurons, self.config.threshold, self.device),
                         TopExamples(rows, self.neurons, self.config.top_k_examples, self.device))

    def accumulate(self, documents: Iterable[tuple[int, Document]], state: ScanState | None = None, progress: bool = False,
                   total: int | None = None) -> ScanState:
        """Scan ``(global index, Document)`` pairs into ``state`` (a new one by default) and return it."""
        return self.accumulate_batches(self.iter_batches(documents), state, progress, total)

    def accumulate_batches(self, batches: Iterable[tuple[torch.Tensor, dict]], state: ScanState | None = None, progress: bool = False,
                           total: int | None = None) -> ScanState:
        """Scan ``(document indices, tokenised batch)`` pairs (as ``iter_batches`` makes them) into ``state``."""
        from tqdm.auto import tqdm

        state = state or self.new_state()
        row_of = {layer: i for i, layer in enumerate(self.layers)}
        current: dict = {}
        keep = self._keeps_samples()
        limit = self.config.histogram_documents

        def consume(layer: int, acts: torch.Tensor) -> None:
            flat, doc, token = current["positions"]
            x = self._read(acts, flat)
            row = row_of[layer]
            batch_max = state.stats.update(row, x)
            state.examples.update(row, x, doc, token, batch_max)
            if keep and bool((doc < limit).any()):
                self.kept_samples.setdefault(layer, []).append(x[doc < limit].float().cpu())

        recorder = NeuronRecorder(self.model, {layer: None for layer in self.layers}, stop_early=True, callback=consume)
        bar = tqdm(total=total, desc="scan", unit="doc", disable=not progress, dynamic_ncols=True)
        start = time.perf_counter()
        with torch.inference_mode():
            for doc_index, batch in batches:
                mask = batch["attention_mask"]
                current["positions"] = tuple(None if t is None else t.to(self.device) for t in self._positions(mask, doc_index))
                recorder.run(batch)
                state.stats.flush()
                state.documents += len(doc_index)
                self.kept_documents += int((doc_index < limit).sum()) if keep else 0
                state.tokens += int(mask.sum())
                bar.update(len(doc_index))
                bar.set_postfix(tokens_per_s=f"{state.tokens / (time.perf_counter() - start):.0f}", refresh=False)
        bar.close()
        return state

    def finish(self, state: ScanState, source, metadata: dict | None = None) -> ScanResult:
        """Scores, ranking, and the top N neurons' examples with text windows. The examples' documents are
        read again from ``source``: the indices in ``state`` must be positions in
        ``source.iter_documents(limit=max_documents)``, as ``scan`` makes them."""
        import pandas as pd

        source = as_source(source)
        if state.documents == 0:
            raise ValueError(f"The corpus gave no documents to scan ({source.describe()}): check the corpus, its text_field and "
                             f"max_documents (empty texts and exact duplicates are dropped).")
        cfg = self.config
        stats = state.stats
        stats.flush()
        rows, neurons = stats.count.shape
        columns = {
            "layer": np.repeat(np.asarray(self.layers), neurons),
            "neuron": np.tile(np.arange(neurons), rows),
            "count": stats.count.flatten().cpu().numpy().astype(np.int64),
        }
        for name in STAT_COLUMNS[1:]:
            columns[name] = getattr(stats, name).flatten().cpu().numpy()
        dead = dead_neurons(columns["std"], columns["max"] - columns["min"], cfg.dead_std_ratio)
        columns["dead"] = dead
        scores = compute_scores(columns, dead)
        for name, values in scores.items():
            columns[f"score_{name}"] = values
        order = rank_order(scores[cfg.score], columns["std"])
        rank = np.empty(order.size, dtype=np.int64)
        rank[order] = np.arange(1, order.size + 1)
        columns["rank"] = rank
        table = pd.DataFrame(columns).iloc[order].reset_index(drop=True)
        if cfg.score in ("selectivity", "composite") and not (table["frac_above"][~table["dead"]] > 0).any():
            logger.warning("No neuron is ever above threshold %g: the '%s' score is 0 for all; lower --threshold.",
                           cfg.threshold, cfg.score)

        top = table.head(cfg.top_n)
        windows = self._example_windows(state, top, source)
        top_neurons = []
        for row in top.itertuples(index=False):
            name = f"{row.layer}.{row.neuron}"
            top_neurons.append({
                "rank": int(row.rank), "neuron": name, "layer": int(row.layer), "index": int(row.neuron), "dead": bool(row.dead),
                "score": finite(getattr(row, f"score_{cfg.score}")),
                "scores": {s: finite(getattr(row, f"score_{s}")) for s in SCORES},
                "stats": {s: (int(row.count) if s == "count" else finite(getattr(row, s))) for s in STAT_COLUMNS},
                "examples": windows[(int(row.layer), int(row.neuron))],
            })
        meta = {"documents": state.documents, "tokens": state.tokens, "positions": int(stats.count[0, 0]),
                "neurons": int(rows * neurons), "layers": list(self.layers), "threshold_rule": "value > threshold", **(metadata or {})}
        # where the scan is written is not part of what it found: overwrite stays out of top_neurons.json
        recorded = {k: v for k, v in asdict(cfg).items() if k != "overwrite"}
        return ScanResult(table=table, top_neurons=top_neurons, config=recorded, metadata=meta)

    def _example_windows(self, state: ScanState, top, source) -> dict:
        """``{(layer, neuron): [example, ...]}`` for the ``top`` rows, reading only the documents they need."""
        row_of = {layer: i for i, layer in enumerate(self.layers)}
        ex = state.examples
        wanted = {}
        for layer, neuron in zip(top["layer"], top["neuron"]):
            r, n = row_of[int(layer)], int(neuron)
            keep = torch.isfinite(ex.values[r, :, n])
            wanted[(int(layer), n)] = list(zip(ex.values[r, keep, n].tolist(), ex.doc[r, keep, n].tolist(), ex.token[r, keep, n].tolist()))
        needed = {doc for items in wanted.values() for _, doc, _ in items}
        docs = {}
        if needed:
            last_needed = max(needed)
            for i, doc in enumerate(source.iter_documents(limit=self.config.max_documents)):
                if i in needed:
                    ids = encode_texts(self.tokenizer, [doc.text], max_length=self.config.max_length)["input_ids"][0].tolist()
                    docs[i] = (doc.doc_id, ids)
                if i >= last_needed:
                    break

        def decode(ids):
            return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)

        w = self.config.example_window
        by_doc = self._window_values(wanted, docs)
        out = {}
        for key, items in wanted.items():
            out[key] = []
            for value, doc, token in items:
                if doc not in docs:
                    raise RuntimeError(f"Document {doc} could not be read again: the corpus must iterate the same way twice.")
                doc_id, ids = docs[doc]
                first, stop = max(0, token - w), token + 1 + w
                out[key].append({
                    "value": value, "doc_id": doc_id, "doc_index": doc, "token_index": token, "token": decode(ids[token : token + 1]),
                    "before": decode(ids[first:token]), "after": decode(ids[token + 1 : stop]),
                    # the window token by token, with the neuron's value at each (the dashboard colours them)
                    "window_tokens": [decode([i]) for i in ids[first:stop]],
                    "window_values": [float(v) for v in by_doc[doc][key][first:stop]],
                    "window_label": token - first,
                })
        return out

    def _window_values(self, wanted: dict, docs: dict) -> dict:
        """``{doc: {(layer, neuron): values at every token}}`` for the documents of the examples, reading every wanted
        neuron: the documents in batches of the scan's ``batch_size``, by length, right-padded (a causal model's real
        tokens never see the padding after them)."""
        neurons = {}
        for layer, n in wanted:
            neurons.setdefault(layer, []).append(n)
        order = sorted(docs, key=lambda doc: len(docs[doc][1]))
        size = max(1, int(self.config.batch_size))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = {}
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            input_ids, mask = pad_right([docs[doc][1] for doc in chunk], pad_id, device=self.device)
            capture = capture_activations(self.model, {"input_ids": input_ids, "attention_mask": mask}, neurons, position="all")
            for row, doc in enumerate(chunk):
                n = len(docs[doc][1])
                out[doc] = {(layer, i): capture[layer][row, :n, j].double().cpu().numpy() for layer, ns in neurons.items()
                            for j, i in enumerate(ns)}
        return out

    # -- the whole scan --------------------------------------------------------------------------

    def scan(self, source, progress: bool = True) -> ScanResult:
        """Scan a ``TextSource`` (or any iterable of ``Document`` with ``iter_documents``); every process of
        an ``accelerate launch`` takes documents ``i`` with ``i % num_processes == process_index``, and the
        shards' statistics are gathered and merged exactly. Every process returns the same result."""
        from accelerate.utils import gather_object

        source = as_source(source)
        dist = distributed_state()
        world, rank = dist.num_processes, dist.process_index
        self.kept_samples, self.kept_documents = {}, 0  # this scan's own
        limit = self.config.max_documents
        mine = ((i, doc) for i, doc in enumerate(source.iter_documents(limit=limit)) if i % world == rank)
        total = None if limit is None else len(range(rank, limit, world))
        state = self.accumulate(mine, progress=progress and dist.is_main_process, total=total)
        per_process = [state.documents]
        if world > 1:
            # Every process gets every shard and merges them in rank order: all return the same result.
            shards = gather_object([state.state_dict()])
            per_process = [shard["documents"] for shard in shards]
            state = ScanState.from_state_dict(shards[0])
            for shard in shards[1:]:
                state.merge(ScanState.from_state_dict(shard))
        metadata = {"corpus": source.describe(), "model": model_provenance(self.model), "num_processes": world,
                    "documents_per_process": per_process}
        return self.finish(state, source, metadata)

    def activation_samples(self, source, neurons: Sequence[Neuron], documents: int | None = None) -> dict[str, np.ndarray]:
        """``{"layer.index": values}`` of ``neurons`` at the scan's positions over the first ``documents``
        documents (``histogram_documents`` by default): a short second pass that captures only those neurons."""
        documents = self.config.histogram_documents if documents is None else documents
        source = as_source(source)
        if not neurons or documents == 0:
            return {}
        if documents == self.config.histogram_documents and self.kept_documents and all(n.layer in self.kept_samples for n in neurons):
            # the scan's own pass kept every histogram document's values (``_keeps_samples``): no second pass
            return {str(n): torch.cat(self.kept_samples[n.layer])[:, n.index].numpy() for n in neurons}
        wanted: dict[int, list[int]] = {}
        for n in neurons:
            wanted.setdefault(n.layer, []).append(n.index)
        values = {n: [] for n in map(str, neurons)}
        current: dict = {}

        def consume(layer: int, acts: torch.Tensor) -> None:
            x = self._read(acts, current["flat"]).float().cpu()
            for j, index in enumerate(wanted[layer]):
                values[f"{layer}.{index}"].append(x[:, j])

        recorder = NeuronRecorder(self.model, wanted, stop_early=True, callback=consume)
        with torch.inference_mode():
            for doc_index, batch in self.iter_batches(enumerate(source.iter_documents(limit=documents))):
                flat = self._positions(batch["attention_mask"], doc_index)[0]
                current["flat"] = None if flat is None else flat.to(self.device)
                recorder.run(batch)
        return {name: torch.cat(parts).numpy() for name, parts in values.items() if parts}


SAMPLE_BUDGET = 256e6  # bytes of histogram values the scan's pass may keep (200 documents x 30 layers x 8192 neurons: 197 MB)


def refuse_to_replace_scan(config: ScanConfig) -> None:
    """Refuse an ``output_dir`` that holds a finished scan (unless ``overwrite``) or files that are not a scan (always):
    checked before the model is loaded, on every process (it only reads)."""
    if not config.output_dir:
        return
    out = Path(config.output_dir)
    restore_interrupted_swap(out)
    refuse_finished(out, "a scan", finished=holds_scan(out), overwrite=config.overwrite, fix="pass --overwrite")


def run_scan(config: ScanConfig, model=None, tokenizer=None, source=None) -> ScanResult:
    """``nsr scan``: load the model and corpus (unless given), scan, and on the main process write the
    outputs into ``config.output_dir`` and print the table of top neurons.

    A finished scan in ``output_dir`` is refused before anything runs, unless ``config.overwrite``; the new scan is
    written beside it and replaces it only once every file is written (an interrupted scan leaves the old one)."""
    refuse_to_replace_scan(config)
    if model is None:  # mistakes in the inputs fail before the model is loaded
        check_scan(config)
    dist = distributed_state()
    torch.manual_seed(config.seed)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(config.model, device=dist.device)
    if source is None:
        extra = {"seed": config.seed} if config.corpus == "synthetic" else {}
        source = load_corpus(config.corpus, text_field=config.text_field, model=model, tokenizer=tokenizer, **extra)
    scanner = NeuronScanner(model, tokenizer, config)
    result = scanner.scan(source)
    if dist.is_main_process:
        top = [Neuron(int(r.layer), int(r.neuron)) for r in result.top(config.top_n).itertuples(index=False)]
        result.histograms = scanner.activation_samples(source, top)
        if config.output_dir:
            with written_atomically(config.output_dir) as tmp:
                result.save(tmp)
        print(result.format_table())
        if config.output_dir:
            print(f"wrote {Path(config.output_dir) / TABLE_FILE}, {TOP_FILE} and plots")
    return result
