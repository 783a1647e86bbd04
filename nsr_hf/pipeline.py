"""Train a self-reporter: scan for a neuron, build its dataset, fine-tune the predictor, evaluate, save.

    python nsr_hf/train.py recipes/quickstart.yaml                          # a recipe
    python nsr_hf/train.py recipes/quickstart.yaml --learning_rate 3e-4     # a recipe and overrides
    accelerate launch nsr_hf/train.py recipes/regression.yaml               # several processes
    nsr train recipes/quickstart.yaml --unfreeze last_k --unfreeze_k 2

Configuration is ``TrainConfig`` (a ``transformers.TrainingArguments``, so every Trainer option is a key): its
defaults, then the YAML recipe, then ``--key value`` flags, read by ``nsr_hf.parsing.RecipeParser``.

Steps (``run_train``), each written under ``output_dir``:

1. ``scan/``: unless ``neuron`` names one (``"layer.index"``) or ``dataset`` is given, scan the *training*
   documents only and take the neuron at rank ``neuron`` (``"auto"`` = 1), or with ``select: readable`` the
   most linearly readable of the top ``select_candidates`` (``scan/selection.json``).
2. ``dataset/``: the activation dataset (train / validation / test by document, transforms fitted on train),
   or ``dataset`` (a folder or Hub id made by ``nsr dataset``) loaded instead.
3. ``PredictorTrainer`` on train (validation for evaluation during training), the unfreezing strategy applied,
   reference or live labels, a ``DriftMonitor`` (``drift.json``, ``drift.png``), a checkpoint in ``checkpoints/``
   each epoch (``save_strategy``; deleted when the run finishes unless ``keep_checkpoints``). With
   ``intervention_rate`` > 0, intervention training (``nsr_hf.training.interventions``): counterfactual values fitted on
   the train split's activations, recorded in the predictor's config (``intervention``) and in ``metrics.json``.
4. ``predictor/``: the predictor (or its adapter) with its card, tokenizer and label transform; ``metrics.json``:
   validation and test metrics (activation units), the trainable parameter count, the target neuron's drift (its live
   value after training against the labels from the frozen original model); ``log_history.json``. All written before
   the evaluation, so that an evaluation that fails never costs the training (the error says how to rerun it).
5. ``evaluation/``: the evaluation protocol (``nsr_hf.evaluation.protocol``): the predictor next to baselines and controls
   on the same held-out rows, the causal test, ``metrics.json``, ``report.md`` and PNGs; then the predictor's card gets
   the headline table and ``metrics.json`` the evaluation. Pushed to the Hub with ``push_to_hub: owner/name``.

The run's folder (``claim_run_folder``): ``run_config.json`` records the keys that decide the result. A finished run
(``finished_run``) is refused unless ``overwrite``: the new run is then written in ``.tmp-<name>-overwrite`` beside it and
replaces it only once it succeeded, evaluation included. An unfinished run (Ctrl-C, kill -9, a crash, a failed evaluation)
is resumed by the same command: its dataset and neuron are reused and the training continues from the newest checkpoint,
to the result an uninterrupted run gives (the evaluation, logging and checkpoint keys may change: ``RESUME_FREE_KEYS``).
Gradual unfreezing cannot continue from a checkpoint: its rerun trains again from step 0.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from transformers import TrainerCallback

from nsr_hf.architectures import num_layers, num_neurons
from nsr_hf.capture import Neuron, NeuronRecorder, encode_texts, label_positions, parse_position, read_live_neurons, validate_neuron
from nsr_hf.dashboard import DASHBOARD_DIR, build_dashboard_after
from nsr_hf.data.columns import read_column
from nsr_hf.data.corpus import load_corpus, split_of
from nsr_hf.data.counterfactuals import CounterfactualValues
from nsr_hf.data.generator import DatasetConfig, run_dataset
from nsr_hf.data.labels import LabelTransform
from nsr_hf.data.storage import load_activation_dataset
from nsr_hf.errors import UserError, debug_requested, error_boundary
from nsr_hf.evaluation.baselines import RowsKey, missing_self_features, probe_layers_of, self_features, store_self_features
from nsr_hf.evaluation.protocol import EvaluateConfig, run_evaluate
from nsr_hf.methods import headline_table, verdicts
from nsr_hf.metrics import r2_score
from nsr_hf.modeling.heads import head_class
from nsr_hf.modeling.predictor import ActivationPredictor, save_predictor
from nsr_hf.modeling.probes import RidgeProbe, layer_features, recording_layer_features, rows_content
from nsr_hf.models import load_model_and_tokenizer, model_provenance, process_device
from nsr_hf.parsing import RecipeParser
from nsr_hf.preflight import check_train
from nsr_hf.run_folder import TMP_PREFIX, is_empty, refuse_finished, rename_recorded_paths, replace_folder, restore_interrupted_swap
from nsr_hf.scanner import ScanConfig, run_scan
from nsr_hf.shared_config import CorpusFields, EvaluationFields, SplitFields, values_of
from nsr_hf.stage_clock import stage_clock, timed
from nsr_hf.training.collator import PredictorDataCollator
from nsr_hf.training.config import TrainConfig
from nsr_hf.training.interventions import InterventionSampler
from nsr_hf.training.monitoring import DriftMonitor
from nsr_hf.training.prefix_cache import PrefixCache, recording_states
from nsr_hf.training.trainer import PredictorTrainer, count_parameters
from nsr_hf.utils import command_recorded, recorded_command, to_jsonable, unwrap, write_json

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# The pipeline


def scan_train_documents(config: TrainConfig, model, tokenizer, scan_dir: str | os.PathLike, top_n: int = 10):
    """(ScanResult, the scanned documents): a scan of the *training* documents only (split by document id, as the
    dataset splits them), never validation or test ones, written to ``scan_dir``."""
    corpus = load_corpus(config.corpus, text_field=config.text_field, model=model, tokenizer=tokenizer)
    docs = corpus.iter_documents(limit=config.dataset_documents)
    train_docs = [d for d in docs if split_of(d.doc_id, config.split_seed, config.split_fractions) == "train"][: config.scan_documents]
    if not train_docs:
        raise ValueError(f"The corpus {config.corpus!r} gave no training documents to scan: raise dataset_documents.")
    scan = run_scan(scan_config(config, len(train_docs), top_n, scan_dir), model=model, tokenizer=tokenizer, source=train_docs)
    return scan, train_docs


def scan_config(config: TrainConfig, documents: int, top_n: int, scan_dir: str | os.PathLike) -> ScanConfig:
    """The ``ScanConfig`` of a train run: its model and corpus, layers and lengths, over ``documents`` train documents."""
    return ScanConfig(**values_of(config, CorpusFields), layers=config.layers, position="last" if config.position == "last" else "all",
                      max_documents=documents, max_length=config.max_length, top_n=max(10, top_n), output_dir=str(scan_dir),
                      overwrite=True)  # the run's own scan/: a new scan of this run replaces it


def dataset_config(config: TrainConfig, neuron, out: Path) -> DatasetConfig:
    """The ``DatasetConfig`` of a train run: ``neuron``'s dataset from its model, corpus and split, into ``out/dataset``."""
    return DatasetConfig(neurons=[str(neuron)], **values_of(config, CorpusFields), **values_of(config, SplitFields),
                         position=config.position, max_length=config.max_length, max_documents=config.dataset_documents,
                         num_bins=config.num_bins, bin_strategy=config.bin_strategy or "quantile", output_dir=str(out / "dataset"),
                         overwrite=False)  # the run's folder decided already: an interrupted dataset of this run resumes its shards


def select_readable(config: TrainConfig, model, tokenizer, scan, docs, out: Path, folds: int = 5,
                    record: RecordedPass | None = None) -> tuple[str, int]:
    """(neuron, its scan rank): of the scan's top ``select_candidates``, the neuron that a ridge probe reads best from the
    head's representation (the block ``read_layer_for`` gives, final-normed, at the labelled token), by ``folds``-fold
    cross-validated R^2 on the scanned *training* documents. Writes ``scan/selection.json``. ``record``: what the scan's
    own pass kept (``recording_scan_pass``), read instead of running its blocks again."""
    import numpy as np

    candidates = [scan.neuron_at_rank(r) for r in range(1, min(config.select_candidates, len(scan.table)) + 1)]
    n_layers = num_layers(model)
    read = {str(n): config.read_layer_for(n.layer, n_layers) for n in candidates}
    read = {k: (n_layers - 1 if v is None else v) for k, v in read.items()}
    y, features = candidate_readings(model, tokenizer, [d.text for d in docs], candidates, sorted(set(read.values())),
                                     parse_position(config.position), config.max_length, record=record)
    fold = np.arange(len(y)) % folds
    table = []
    for j, neuron in enumerate(candidates):
        X, target = features[read[str(neuron)]], y[:, j]
        pred = np.zeros_like(target)
        for f in range(folds):
            probe = RidgeProbe().fit(X[fold != f], target[fold != f])
            pred[fold == f] = probe.predict(X[fold == f])
        table.append({"rank": j + 1, "neuron": str(neuron), "read_layer": read[str(neuron)], "cv_r2": r2_score(target, pred)})
    best = max(table, key=lambda row: row["cv_r2"])
    (out / "scan").mkdir(parents=True, exist_ok=True)
    rule = f"best {folds}-fold ridge R^2 of the top {len(candidates)} on {len(y)} scanned train documents"
    reused = {"from_scan_pass_block": record.states.layer} if record is not None and record.used else {}
    write_json(out / "scan" / "selection.json", {"rule": rule, "chosen": best, "candidates": table, **reused})
    print("readability of the top candidates (5-fold ridge R^2 on the scanned train documents):\n" +
          "\n".join(f"  rank {row['rank']:>3}  {row['neuron']:>9}  read {row['read_layer']:>2}  R^2 {row['cv_r2']:.3f}"
                    for row in table[:10]), flush=True)
    return best["neuron"], best["rank"]


def candidate_readings(model, tokenizer, texts, candidates, layers, position, max_length: int, batch_size: int = 16,
                       record: RecordedPass | None = None):
    """``(values (texts, candidates), {layer: features (texts, hidden)})``: each candidate neuron at each text's labelled
    token, and the representation a head reads there at each of ``layers`` (``layer_features``), from one forward pass
    per batch (the neurons are recorded on the way). ``record``: what an earlier pass over these texts kept
    (``recording_scan_pass``): the blocks below its states' block are not run again (``recorded_readings``)."""
    import numpy as np

    values, features = [], {layer: [] for layer in layers}
    for start in range(0, len(texts), batch_size):
        batch = encode_texts(tokenizer, texts[start : start + batch_size], max_length=max_length)
        positions = label_positions(batch["attention_mask"], position)
        lengths = batch["attention_mask"].sum(-1).tolist()
        order = np.argsort(lengths, kind="stable")  # the order layer_features runs rows in: the recorded values follow it
        rows = {"input_ids": [batch["input_ids"][i, : lengths[i]].tolist() for i in order],
                "attention_mask": [[1] * lengths[i] for i in order], "label_position": [int(positions[i]) for i in order]}
        read = recorded_readings(model, rows, candidates, layers, record) if record is not None and record.states is not None else None
        picked, batch_features = read if read is not None else readings(model, rows, candidates, layers)
        if record is not None:
            record.used = read is not None and (record.used or start == 0)  # every batch so far read from it
        back = np.argsort(order)  # to the texts' own order
        values.append(picked[back])
        for layer in layers:
            features[layer].append(batch_features[layer][back])
    return np.concatenate(values), {layer: np.concatenate(parts) for layer, parts in features.items()}


def readings(model, rows: dict, candidates, layers, prefix=None) -> tuple:
    """``(values (rows, candidates), {layer: features})`` of ``rows`` (sorted by length, as ``layer_features`` runs them) from
    one forward pass: ``layer_features`` with the candidates recorded on the way (from ``prefix``'s block, when given)."""
    import numpy as np
    import torch

    picked = np.zeros((len(rows["input_ids"]), len(candidates)))
    with NeuronRecorder(model, [str(n) for n in candidates]) if candidates else contextlib.nullcontext() as recorder:
        batch_features = layer_features(model, rows, layers, batch_size=len(rows["input_ids"]), progress=False, prefix=prefix)
    at, every = torch.as_tensor(rows["label_position"]), torch.arange(len(picked))
    for j, n in enumerate(candidates):
        col = recorder.neurons[n.layer].tolist().index(n.index)
        picked[:, j] = recorder.activations[n.layer][every, at, col].double().cpu().numpy()
    return picked, batch_features


def recorded_readings(model, rows: dict, candidates, layers, record: RecordedPass) -> tuple | None:
    """``readings`` from what the scan's pass kept: the candidates and the features of the blocks below its states' block
    from ``record.features``, the rest from one pass of the blocks from there on its states. ``None`` when a row was not
    recorded."""
    import numpy as np

    top = record.states.layer
    low_layers, high_layers = [layer for layer in layers if layer < top], [layer for layer in layers if layer >= top]
    low, high = [n for n in candidates if n.layer < top], [n for n in candidates if n.layer >= top]
    below = record.features.features(rows, low_layers)
    values = record.features.neuron_values(rows, low)
    listed = [{"input_ids": ids, "label_position": p} for ids, p in zip(rows["input_ids"], rows["label_position"])]
    prefix = PrefixCache.from_states(record.states, listed)
    if below is None or values is None or prefix is None:
        return None
    above, picked = {}, np.zeros((len(listed), len(candidates)))
    if high or high_layers:
        high_values, above = readings(model, rows, high, high_layers or [top], prefix=prefix)
        for j, n in enumerate(high):
            picked[:, candidates.index(n)] = high_values[:, j]
    for j, n in enumerate(low):
        picked[:, candidates.index(n)] = values[:, j]
    return picked, {layer: (below | above)[layer] for layer in layers}


@contextlib.contextmanager
def recording_scan_pass(config: TrainConfig, model):
    """Inside the ``with`` block, the scan's forward passes keep what the readability selection reads again: the states
    entering the deepest scanned block, and below it the probe features of every block and its neurons, at each document's
    labelled token. Yields a ``RecordedPass``, filled at the end, or ``None`` when the selection is not ``readable``, the
    position rule is not one the attention mask gives, or the scanned documents' states could exceed
    ``prefix_cache_max_gb``."""
    position = parse_position(config.position)
    n_layers = num_layers(model)
    top = n_layers - 1 if config.layers is None else max(int(layer) for layer in config.layers)
    hidden = model.config.hidden_size
    # the states (float32) of every token, and below them each document's features and neurons (float64) of every block
    bound = config.scan_documents * (config.max_length * hidden * 4 + top * (hidden + num_neurons(model)) * 8)
    if (config.select != "readable" or not (position == "last" or isinstance(position, int)) or top < 1
            or bound > config.prefix_cache_max_gb * 1e9):
        yield None
        return
    record = RecordedPass()
    below = list(range(top))
    with recording_states(model, top) as states, recording_layer_features(model, below, position, neuron_layers=below) as features:
        yield record
    record.states, record.features = states, features


def choose_neuron_and_build_dataset(config: TrainConfig, model, tokenizer, out: Path, record: RecordedPass | None = None):
    """(DatasetDict, metadata, scan rank or None): load ``config.dataset``, or the complete dataset already in ``out`` (a
    resumed run), or choose the neuron (the one ``neuron.json`` kept, or scan the train documents) and build the dataset
    (an interrupted build resumes its shards). A dataset built here fills ``record`` (``recording_dataset_pass``)."""
    if config.dataset:
        dataset, metadata = load_activation_dataset(config.dataset)
        labelled_by = (metadata.get("model") or {}).get("name")
        if labelled_by and labelled_by != config.model:
            # self-report needs labels from this very model; another model's labels make it cross-prediction
            logger.warning("The dataset was labelled by %r but the model is %r: this trains cross-prediction, not self-report.",
                           labelled_by, config.model)
        return dataset, metadata, None
    kept = kept_neuron(out)
    if kept is not None and (out / "dataset" / "dataset_dict.json").is_file():
        try:
            dataset, metadata = load_activation_dataset(out / "dataset")
            print(f"resuming: using the dataset in {out / 'dataset'} (neuron(s) {', '.join(metadata['neurons'])})", flush=True)
            return dataset, metadata, kept.get("scan_rank")
        except (ValueError, FileNotFoundError) as err:
            logger.warning("resuming: the dataset in %s is not complete (%s): building it again.", out / "dataset", err)
    if kept is not None:
        neuron, rank = validate_neuron(model, kept["neuron"]), kept.get("scan_rank")
        print(f"\nneuron: {neuron} (kept from {out / 'neuron.json'})", flush=True)
    else:
        neuron, rank = choose_neuron(config, model, tokenizer, out)
        print(f"\nneuron: {neuron}" + (f" (scan rank {rank})" if rank else ""), flush=True)
        write_json(out / "neuron.json", {"neuron": str(neuron), "scan_rank": rank, "select": config.select}, indent=None)
    # the run folder is this run's own (its run_config.json matched): an unfinished build there resumes its shards
    with timed("dataset"), recording_dataset_pass(config, model, neuron, record):
        run_dataset(dataset_config(config, neuron, out), model=model, tokenizer=tokenizer)
        dataset, metadata = load_activation_dataset(out / "dataset")
    return dataset, metadata, rank


@dataclass
class RecordedPass:
    """What a forward pass that runs anyway kept for a later one: each sequence's residual stream entering one block
    (``states``: ``RecordedStates``) and, below it, the probes' features (and neurons) at its labelled token (``features``:
    ``RecordedFeatures``). The dataset's pass gives the head's probe, the evaluation's probes of the original model and the
    frozen-prefix cache their start (``recording_dataset_pass``, ``prefill_features``); the scan's pass gives the
    readability selection its start (``recording_scan_pass``, ``recorded_readings``)."""

    states: object = None
    features: object = None
    used: bool = False  # a later pass read from it


@contextlib.contextmanager
def recording_dataset_pass(config: TrainConfig, model, neuron, record: RecordedPass | None):
    """Inside the ``with`` block, the dataset's forward passes fill ``record``: the states entering ``neuron``'s block and
    the features of the probe layers below it, when a later pass would read them (``head_init: probe`` on the original
    model), the position rule is one the attention mask gives (``last`` or an index), and the states of every document
    fit ``prefix_cache_max_gb``. Otherwise, or with ``record`` ``None``, nothing is recorded."""
    position = parse_position(config.position)
    target = neuron.layer
    hidden = model.config.hidden_size  # the states (float32) of every token, and each document's features (float64) below
    bound = config.dataset_documents * (config.max_length * hidden * 4 + target * hidden * 8)
    wanted = (record is not None and config.head_init == "probe" and config.evaluate and config.unfreeze != "head_only"
              and config.prefix_cache != "off" and target >= 1 and (position == "last" or isinstance(position, int))
              and bound <= config.prefix_cache_max_gb * 1e9)
    if not wanted:
        yield
        return
    read_layer = config.read_layer_for(target, num_layers(model))
    layers = [layer for layer in probe_layers_of(evaluate_config(config, Path(config.output_dir)).methods, read_layer,
                                                 num_layers(model), config.probe_layers) if layer < target]
    with recording_states(model, target) as states, recording_layer_features(model, layers, position) as features:
        yield
    record.states, record.features = states, features


def kept_neuron(out: Path) -> dict | None:
    """``neuron.json`` of an earlier start of this run (``neuron``, ``scan_rank``, ``select``), or ``None``."""
    try:
        return json.loads((out / "neuron.json").read_text())
    except (OSError, ValueError):
        return None


def choose_neuron(config: TrainConfig, model, tokenizer, out: Path):
    """(Neuron, scan rank or None): the neuron the config names, or the scan's (``select``) over the train documents."""
    choice = config.neuron_choice()
    if isinstance(choice, str):
        return validate_neuron(model, choice), None
    shutil.rmtree(out / "scan", ignore_errors=True)  # a scan cut short by an interruption: this run's own, done again
    with timed("scan"), recording_scan_pass(config, model) as record:
        scan, train_docs = scan_train_documents(config, model, tokenizer, out / "scan", top_n=max(choice, config.select_candidates))
    if config.select == "readable":
        with timed("readability selection"):
            neuron, rank = select_readable(config, model, tokenizer, scan, train_docs, out, record=record)
        return validate_neuron(model, neuron), rank
    return scan.neuron_at_rank(choice), choice


def neuron_drift(trained_base, rows, neurons, position, batch_size: int = 32, prefix: PrefixCache | None = None) -> dict:
    """How far the target neurons moved: their live values in ``trained_base`` at each row's labelled token
    against the ``activations`` column (the frozen original model's values). Units: activations. ``prefix``: the rows'
    states entering a block at or below the neurons', from blocks that training left unchanged: only the blocks from there
    run."""
    import numpy as np
    import torch

    collate = PredictorDataCollator(pad_token_id=0)
    live, ref = [], []
    for start in range(0, len(rows), batch_size):
        batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        # the labelled token by the recipe's position rule, as the dataset was labelled
        at = label_positions(batch["attention_mask"], position)
        with prefix.feeding(trained_base, batch) if prefix is not None else contextlib.nullcontext():
            live.append(read_live_neurons(trained_base, neurons, batch, at)[1].cpu())
        ref.append(batch["labels"])
    live, ref = torch.cat(live).numpy().astype(np.float64), torch.cat(ref).numpy().astype(np.float64)
    diff = np.abs(live - ref)
    std = ref.std(0)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "mean_abs_over_std": float(np.mean(diff.mean(0) / np.where(std > 0, std, 1.0))), "rows": len(ref)}


@dataclass
class SharedPasses:
    """What the runs of one process share (``nsr sweep`` keeps one for all its runs): the original model, loaded once, and
    what its passes gave on one dataset: the baselines' features (``nsr_hf.evaluation.baselines.self_features`` and the
    cross models' and the random-init copy's, keyed by the model object and the rows' content: ``feature_key``) and the
    states entering a target's block (the dataset's pass, or the head's probe pass: ``recording_states``). The seeds of
    one neuron train on the same dataset: from the second seed on, the head's probe, the evaluation's probes of the
    original model, the cross-model features, the frozen-prefix cache's lower blocks and the drift monitor's start cost
    nothing. The datasets of other neurons built from the same documents (the same tokens and labelled tokens; only the
    labels differ) keep the features too. A run on other documents drops the previous ones' entries, so memory holds one
    set of documents' worth. The original model is never trained: every predictor holds a copy of its weights."""

    model: object = None
    tokenizer: object = None
    model_name: str | None = None
    fingerprint: str | None = None
    features: dict = field(default_factory=dict)
    states: dict = field(default_factory=dict)  # (target block, train fingerprint) -> RecordedStates

    def load(self, name: str):
        """``(model, tokenizer)`` of ``name``: the one already loaded, else loaded now (and kept)."""
        if self.model is None or self.model_name != name:
            self.model, self.tokenizer = load_model_and_tokenizer(name, device=process_device())
            self.model_name = name
            self.on(None)
        return self.model, self.tokenizer

    def kept_states(self, dataset, neurons) -> object:
        """The states entering the neurons' lowest block that an earlier run on ``dataset`` kept (``RecordedStates``: the
        dataset pass's hold every split's rows), or ``None``."""
        target = min(Neuron.parse(n).layer for n in neurons)
        return self.states.get((target, getattr(dataset["train"], "_fingerprint", None)))

    def on(self, dataset) -> None:
        """Keep only what serves ``dataset``: the states when it is the same dataset (its train split's fingerprint), the
        features of rows it holds (by content, ``feature_key``: another neuron's dataset of the same documents keeps the
        baselines' features, the cross models' and the random-init copy's); ``None``: keep nothing."""
        fingerprint = None if dataset is None else getattr(dataset["train"], "_fingerprint", None)
        if fingerprint is None or fingerprint != self.fingerprint:
            self.states.clear()
            if dataset is None:
                self.features.clear()
            contents = set() if dataset is None else {rows_content(dataset[split]) for split in dataset}
            for key in [k for k in self.features if isinstance(k[-1], RowsKey) and k[-1].content not in contents]:
                del self.features[key]
        self.fingerprint = fingerprint


def run_train(config: TrainConfig, shared: SharedPasses | None = None) -> dict:
    """``nsr train``: the whole pipeline (module docstring); returns the summary written to ``metrics.json``, whose
    ``stage_seconds`` says where the time went (``nsr_hf.stage_clock``; ``benchmarks/pipeline.py`` reads it).
    ``shared``: what several runs of one process share (``SharedPasses``; ``nsr sweep`` passes one)."""
    with stage_clock() as stage_seconds:
        return _run_train(config, stage_seconds, shared)


def _run_train(config: TrainConfig, stage_seconds: dict, shared: SharedPasses | None = None) -> dict:
    start = time.perf_counter()
    check_train(config)  # every mistake that needs no model weights fails here, before anything is loaded or written
    folder = prepare_output_dir(config)
    if folder.complete:  # an --overwrite run that finished but was stopped before it replaced the old run
        return finish_run(config, folder, json.loads((folder.work / "metrics.json").read_text()))
    out = folder.work
    resume = checkpoint_to_resume(config, folder)
    with timed("load model"):
        model, tokenizer = (shared.load(config.model) if shared is not None
                            else load_model_and_tokenizer(config.model, device=process_device()))
    record = RecordedPass()
    dataset, metadata, rank = choose_neuron_and_build_dataset(config, model, tokenizer, out, record)
    neurons, position = list(metadata["neurons"]), labelled_position(config, metadata)
    original = model if config.evaluate and config.unfreeze != "head_only" else None  # the baselines read the original model
    if shared is not None:
        shared.on(dataset)
    # the original model's features, computed once for the head's probe and the evaluation's probes (and other runs)
    features: dict = shared.features if shared is not None else {}
    with timed("predictor and head init"):
        predictor, prefix_start = build_predictor(config, model, tokenizer, dataset, metadata, folder.final, original=original,
                                                  feature_cache=features, states=shared.states if shared is not None else None,
                                                  record=record)
    reused = {"probe_features_from_dataset_pass_block": record.states.layer} if record.used else {}
    # the dataset pass's states of the held-out rows: the drift monitor and the neuron drift start from them
    held_out_states = record.states if record.used else shared.kept_states(dataset, neurons) if shared is not None else None
    del model, record
    trainer = PredictorTrainer(model=predictor, args=trainer_arguments(config, out, neurons, has_validation=len(dataset["validation"]) > 0),
                               train_dataset=dataset["train"], eval_dataset=dataset["validation"] if len(dataset["validation"]) else None,
                               unfreeze={"strategy": config.unfreeze, "k": config.unfreeze_k, "lora_r": config.lora_r,
                                         "every_n_steps": config.unfreeze_every_n_steps},
                               label_mode=config.labels, live_guard_weight=config.live_guard_weight,
                               interventions=intervention_sampler(config, predictor, dataset["train"], neurons),
                               prefix_cache=config.prefix_cache, prefix_cache_max_gb=config.prefix_cache_max_gb,
                               prefix_start=prefix_start)
    trainer.keep_prefix_cache = bool(config.evaluate)  # the evaluation's honest reader starts from it (trained_prefix)
    probe_split = next(s for s in ("validation", "test", "train") if s in dataset and len(dataset[s]))
    monitor = DriftMonitor(dataset[probe_split], every_n_steps=config.drift_every_n_steps, output_dir=str(out),
                           max_probe_rows=config.drift_probe_rows, max_lm_rows=config.drift_lm_rows).bind(trainer)
    if held_out_states is not None:
        monitor.start_from(held_out_states)
    if os.environ.get(KILL_AFTER_CHECKPOINT):
        trainer.add_callback(KillAfterCheckpoint(os.environ[KILL_AFTER_CHECKPOINT]))
    trainable, total = count_parameters(trainer.model)
    with timed("train"):
        train_result = train_resumably(config, trainer, resume)
    if monitor.history:  # the drift monitor's passes run inside the training steps' time
        stage_seconds["train/drift monitor"] = round(sum(h.get("seconds", 0.0) for h in monitor.history), 3)

    with timed("validation and test loss"):
        metrics, predictions = validation_and_test(config, trainer, dataset)
    with timed("neuron drift"):
        drift = drift_after_training(trainer, dataset, neurons, position, held_out_states)
    del held_out_states
    summary = train_summary(config, trainer, train_result, dataset, metrics, drift, monitor,
                            neurons=neurons, rank=rank, parameters=(trainable, total), resume=resume)
    # which passes later stages read instead of running again (benchmarks/pipeline.py counts their floors from there)
    held = trainer.prefix_start is not None and (trainer.prefix_cache_info or {}).get("used") and \
        trainer.prefix_cache_info.get("layer", -1) >= trainer.prefix_start.layer and \
        all(split not in dataset or trainer.prefix_start.holds_rows(dataset[split]) for split in ("validation", "test"))
    summary["passes_reused"] = {**reused, "evaluation_predictions_from_loss_pass": sorted(predictions),
                                **({"held_out_from_block": trainer.prefix_start.layer} if held else {})}
    if trainer.is_world_process_zero():
        write_json(out / "log_history.json", trainer.state.log_history, indent=1)
        inner = unwrap(trainer.model)
        inner.evaluation_results = {split: {k.removeprefix(f"{split}_"): v for k, v in m.items()} for split, m in metrics.items()}
        # the trained predictor and its training figures are on disk before the evaluation runs: an evaluation that fails
        # (a typo in an option, a cross model that cannot be loaded) never costs the training
        with timed("save"):
            summary["stage_seconds"] = stage_seconds
            summary["seconds"] = round(time.perf_counter() - start, 1)
            save_trained(out, trainer, summary)
        if config.evaluate:
            try:
                with timed("evaluation"):
                    evaluation = evaluate_trained(config, out, trainer, dataset, metadata, original, tokenizer, monitor, features,
                                                  unchanged_prefix(trainer, prefix_start), predictions, trained_prefix(trainer))
            except Exception as err:
                err.add_note(evaluation_kept_note(config, folder))
                raise
            summary["evaluation"] = to_jsonable(evaluation)
            inner.evaluation = evaluation
            summary.pop("seconds")  # the time comes last in metrics.json, as it always has (stage_seconds, the same dict
            summary["seconds"] = round(time.perf_counter() - start, 1)  # filled in since, stays before the evaluation)
            # the weights are saved: only the card (now with the evaluation's headline table) and metrics.json change
            (out / "predictor" / "README.md").write_text(inner.model_card())
            write_json(out / "metrics.json", summary)
        finish_run(config, folder, summary)
    return summary


def train_resumably(config: TrainConfig, trainer, resume: str | None):
    """``trainer.train`` from ``resume``; an interruption of gradual unfreezing says that its rerun starts the training again."""
    try:
        for callback in trainer.callback_handler.callbacks:  # the drift monitor continues its history from the checkpoint
            if isinstance(callback, DriftMonitor):
                callback.resume_from = resume
        return trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        if config.unfreeze == "gradual":
            print(GRADUAL_CANNOT_RESUME, file=sys.stderr, flush=True)
        raise


# NSR_KILL_AFTER_CHECKPOINT=<step>[:<signal>]: the process sends itself the signal (SIGKILL, as `kill -9` does; SIGINT is
# Ctrl-C) right after saving the checkpoint of that step, so that the tests of resumption (tests/test_train_resume.py)
# interrupt a run at a known point, not at a timed guess.
KILL_AFTER_CHECKPOINT = "NSR_KILL_AFTER_CHECKPOINT"


class KillAfterCheckpoint(TrainerCallback):
    """Sends ``signal_name`` to its own process once the checkpoint of ``step`` is saved (``NSR_KILL_AFTER_CHECKPOINT``)."""

    def __init__(self, value: str):
        step, _, name = value.partition(":")
        self.step, self.signal = int(step), getattr(signal, name or "SIGKILL")

    def on_save(self, args, state, control, **kwargs):
        # the main process only, once it wrote the checkpoint: the launcher then stops the others (one dying first could
        # get the main process stopped in the middle of its write)
        if state.global_step == self.step and state.is_world_process_zero:
            os.kill(os.getpid(), self.signal)


def finish_run(config: TrainConfig, folder: "RunFolder", summary: dict) -> dict:
    """Main process, once the run succeeded (evaluation included): its checkpoints deleted (unless ``keep_checkpoints``),
    the old run replaced by this one when ``--overwrite`` wrote it beside, the predictor pushed, the result printed."""
    if not config.keep_checkpoints:
        shutil.rmtree(folder.work / "checkpoints", ignore_errors=True)
    if folder.replacing:
        rename_recorded_paths(folder.work, folder.final)  # every config, card and report names output_dir, not the sibling
        replace_folder(folder.work, folder.final)
        print(f"--overwrite: the new run replaced the old one in {folder.final}", flush=True)
    out = folder.final
    try:
        push_trained(config, out)
    except Exception as err:
        err.add_note(f"The run is complete and saved in {out}; push the predictor later with: "
                     f"hf upload {config.push_to_hub} {out / 'predictor'}")
        raise
    build_dashboard_after(out)  # after everything is saved: a failure here costs only the dashboard (it says how to rebuild it)
    print_result(config, out, summary, summary.get("evaluation"))
    finish_wandb(summary)
    return summary


def evaluation_kept_note(config: TrainConfig, folder: "RunFolder") -> str:
    """What a failed evaluation of a finished training leaves, and the command that runs the evaluation again."""
    if folder.replacing:
        return (f"Nothing was replaced: the old run in {folder.final} is as it was. The new run's training is kept in {folder.work}: "
                "fix the evaluation option and rerun the same command (with --overwrite): it evaluates the new run and then replaces "
                "the old one.")
    out = folder.final
    dataset = config.dataset or out / "dataset"
    return (f"The training is kept: the predictor is in {out / 'predictor'} and its training figures in {out / 'metrics.json'}. "
            f"Fix the evaluation option and run the evaluation alone: nsr evaluate --predictor {out / 'predictor'} --dataset {dataset} "
            f"--output_dir {out / 'evaluation'} (with the evaluation options of your recipe).")


# ----------------------------------------------------------------------------------------------------------
# The run's folder: a finished run is refused (or replaced with --overwrite, once the new one succeeded), an unfinished one
# with the same configuration is resumed


RUN_CONFIG = "run_config.json"
# what a train run writes in output_dir: a folder that holds only these is a train run (finished or not)
RUN_ENTRIES = frozenset({RUN_CONFIG, "neuron.json", "scan", "dataset", "checkpoints", "predictor", "metrics.json", "log_history.json",
                         "drift.json", "drift.png", "evaluation", DASHBOARD_DIR})
# Keys that may differ between an interrupted run and the command that resumes it: they say where the run is written, how it
# is launched, logged and checkpointed, and how it is evaluated after training (a failed evaluation is fixed by rerunning
# with the corrected option), never what is trained. Every other key must be the same.
RESUME_FREE_KEYS = frozenset({
    "output_dir", "overwrite", "keep_checkpoints", "resume_from_checkpoint", "push_to_hub", "report_to", "run_name", "project",
    "disable_tqdm", "skip_memory_metrics", "local_rank", "use_cpu", "ddp_backend", "ddp_timeout", "debug", "dataloader_num_workers",
    "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "evaluate", "eval_methods", "do_eval", "do_predict", "do_train", "per_device_eval_batch_size", "batch_eval_metrics",
    "include_for_metrics", "prediction_loss_only", "drift_every_n_steps", "drift_probe_rows", "drift_lm_rows",
    "prefix_cache", "prefix_cache_max_gb",  # the same result to float round-off: a run resumes with the cache on or off
    *(f.name for f in fields(EvaluationFields))})
RESUME_FREE_PREFIXES = ("logging_", "log_", "hub_", "save_", "eval_", "trackio_")
GRADUAL_CANNOT_RESUME = ("gradual unfreezing cannot continue from a checkpoint (its optimizer's groups depend on the step): "
                         "a rerun of the same command reuses the dataset and the neuron, and trains again from step 0.")


@dataclass
class RunFolder:
    """Where a train run writes. ``final``: ``output_dir``, the folder every recorded path names. ``work``: where the run
    writes, ``final`` itself, or with ``--overwrite`` over an earlier run the sibling ``.tmp-<name>-overwrite``, which
    replaces ``final`` once the run succeeded. ``resumed``: ``work`` held an unfinished run of the same configuration.
    ``complete``: the sibling holds a run that finished but did not yet replace ``final``. (The other processes of a launch
    decide after the main process: they see ``resumed`` where it started the run; only the main process says so.)"""

    final: Path
    work: Path
    resumed: bool = False
    complete: bool = False

    @property
    def replacing(self) -> bool:
        return self.work != self.final


def prepare_output_dir(config: TrainConfig) -> RunFolder:
    """The run's folder, decided and claimed by the main process first (``claim_run_folder``: refuse, resume or start),
    the seed set; a setting that cannot run in this launch refused before any work."""
    from transformers import set_seed

    if config.unfreeze == "gradual" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("gradual unfreezing adds parameters after DDP has registered them (their gradients would not be "
                         "synchronised): run it in one process, or use last_k / after_target / lora.")
    # the other processes wait, then see what the main process wrote and decide the same (a refusal raises in every process)
    with config.main_process_first(desc="the run folder"):
        folder = claim_run_folder(config)
    set_seed(config.seed)
    return folder


def claim_run_folder(config: TrainConfig) -> RunFolder:
    """Refuse a finished run (unless ``overwrite``) and a folder of other files; otherwise the folder the run writes in,
    with its ``run_config.json`` written (a new run) or checked (a resumed one)."""
    final = Path(config.output_dir)
    restore_interrupted_swap(final)
    final.mkdir(parents=True, exist_ok=True)  # a file there is named by the error boundary
    foreign = foreign_entries(final)
    if foreign:
        raise UserError(f"{final} holds files that are not a train run ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): "
                        "choose a new or empty output_dir" + (" (--overwrite only replaces a train run)." if config.overwrite else "."))
    finished = finished_run(final)
    if finished:
        refuse_finished(final, "a train run", finished=True, overwrite=config.overwrite, fix="pass --overwrite")
    if config.overwrite and not is_empty(final):
        work = final.parent / f"{TMP_PREFIX}{final.name}-overwrite"
        resumed = claim_work_folder(config, work, discard_other=True)
        return RunFolder(final, work, resumed=resumed, complete=resumed and finished_run(work))
    return RunFolder(final, final, resumed=claim_work_folder(config, final, discard_other=False))


def claim_work_folder(config: TrainConfig, work: Path, discard_other: bool) -> bool:
    """Whether ``work`` holds an unfinished run of this configuration (to resume); a new run's ``run_config.json`` written
    otherwise. A run of another configuration (or from before ``run_config.json``) is refused, or with ``discard_other``
    (an earlier ``--overwrite`` attempt beside output_dir) deleted."""
    wanted = run_config(config)
    recorded = read_run_config(work)
    if recorded is not None and not computed_entries(work):  # a start that failed before computing anything: start again
        recorded = None
        for name in (RUN_CONFIG, "neuron.json"):
            (work / name).unlink(missing_ok=True)
        shutil.rmtree(work / "dataset", ignore_errors=True)  # at most the manifest of a build that computed no shard
    if recorded == wanted:
        drop_incomplete_checkpoints(work / "checkpoints")
        return True
    if recorded is not None and config.resume_from_checkpoint:  # the user continues from a checkpoint with these settings
        print(f"resume_from_checkpoint: continuing the run in {work} with other settings ({config_changes(recorded, wanted)})", flush=True)
        write_json(work / RUN_CONFIG, wanted)
        return True
    if not is_empty(work):
        if discard_other:
            shutil.rmtree(work)
        elif recorded is not None:
            raise UserError(f"{work} holds an unfinished train run with other settings ({config_changes(recorded, wanted)}). Nothing "
                            "was changed: rerun the command that started it to resume it, choose another output_dir, or pass "
                            "--overwrite to start again (the new run replaces it once it succeeded).")
        elif config.resume_from_checkpoint:  # a run from before run_config.json, resumed as the user asked
            write_json(work / RUN_CONFIG, wanted)
            return True
        else:
            raise UserError(f"{work} holds an unfinished train run without {RUN_CONFIG} (from an older nsr_hf), so its settings "
                            "cannot be checked. Nothing was changed: pass --resume_from_checkpoint latest to continue it with "
                            "these settings, choose another output_dir, or pass --overwrite to start again.")
    write_json(work / RUN_CONFIG, wanted)
    return False


def run_config(config: TrainConfig) -> dict:
    """The keys that decide a run's result (every key but ``RESUME_FREE_KEYS`` and ``RESUME_FREE_PREFIXES``), as JSON reads
    them back: what ``run_config.json`` records and a resuming command must repeat."""
    values = {k: v for k, v in config.to_dict().items()
              if k not in RESUME_FREE_KEYS and not k.startswith(RESUME_FREE_PREFIXES) and not k.startswith("_")}
    return json.loads(json.dumps(to_jsonable(values), sort_keys=True))


def read_run_config(folder: Path) -> dict | None:
    """``run_config.json`` of ``folder``; ``None`` when there is none (or it cannot be read)."""
    try:
        return json.loads((folder / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return None


def config_changes(recorded: dict, wanted: dict, shown: int = 6) -> str:
    """``key: old -> new`` for the keys that differ (the first ``shown``)."""
    changed = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
    text = "; ".join(f"{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in changed[:shown])
    return text + (f"; and {len(changed) - shown} more" if len(changed) > shown else "")


def computed_entries(folder: Path) -> list[str]:
    """What an earlier start of a run in ``folder`` computed (scan, dataset shards, checkpoints, predictor ...): everything
    but its ``run_config.json``, ``neuron.json`` (a neuron named in the config) and a dataset build that has no shard yet,
    which cost nothing to redo."""
    def cheap(path: Path) -> bool:
        if path.name == "dataset":
            return not (path / "dataset_dict.json").exists() and not any(p.is_dir() for p in (path / "shards").glob("*"))
        return path.name in (RUN_CONFIG, "neuron.json") or path.name.startswith(TMP_PREFIX)

    return sorted(p.name for p in folder.iterdir() if not cheap(p))


def foreign_entries(folder: Path) -> list[str]:
    """The names in ``folder`` that a train run does not write (leftovers of an interrupted atomic write aside)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in RUN_ENTRIES and not p.name.startswith(TMP_PREFIX))


def finished_run(folder: str | os.PathLike) -> bool:
    """Whether the train run in ``folder`` finished: its ``metrics.json`` holds the evaluation, or the run had the evaluation
    off. ``metrics.json`` is written before the evaluation (a failed evaluation keeps the training), so alone it is not a
    finished run."""
    try:
        summary = json.loads((Path(folder) / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return "evaluation" in summary or not (summary.get("config") or {}).get("evaluate", True)


def latest_checkpoint(folder: Path) -> str | None:
    """The newest complete ``checkpoint-<step>`` in ``folder`` (the Trainer writes ``trainer_state.json`` last)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    steps = {}
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir() else ():
        if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").is_file():
            steps[int(path.name.split("-")[-1])] = path
    return str(steps[max(steps)]) if steps else None


def drop_incomplete_checkpoints(folder: Path) -> None:
    """Delete the checkpoints that a kill cut short (no ``trainer_state.json``, which the Trainer writes last)."""
    for path in folder.glob("checkpoint-*") if folder.is_dir() else ():
        if path.is_dir() and not (path / "trainer_state.json").is_file():
            shutil.rmtree(path, ignore_errors=True)


def checkpoint_to_resume(config: TrainConfig, folder: RunFolder) -> str | None:
    """The checkpoint the training continues from: the newest in ``output_dir/checkpoints`` (none: from the start), or the
    one ``resume_from_checkpoint`` names (``latest``: the newest, which must exist; with ``--overwrite``, the replaced run's
    when the new one has none yet). Gradual unfreezing starts again."""
    checkpoints = folder.work / "checkpoints"
    if config.resume_from_checkpoint:
        latest = config.resume_from_checkpoint == "latest"
        resume = latest_checkpoint(checkpoints) if latest else config.resume_from_checkpoint
        if latest and resume is None and folder.replacing:
            checkpoints = folder.final / "checkpoints"
            resume = latest_checkpoint(checkpoints)
        if resume is None or not Path(resume).is_dir():
            raise UserError(f"resume_from_checkpoint {config.resume_from_checkpoint!r}: no checkpoint found "
                            f"({'no complete checkpoint-* folder in ' + str(checkpoints) if latest else 'not a folder'}). "
                            "Checkpoints are written with save_strategy 'steps' or 'epoch', and kept once the run finished only with "
                            "keep_checkpoints.")
        return resume
    says = folder.resumed and config.process_index == 0  # the other processes see the main process's run_config.json
    if config.unfreeze == "gradual":
        if says:
            print(f"resuming {folder.final}: {GRADUAL_CANNOT_RESUME}", flush=True)
        return None
    resume = latest_checkpoint(checkpoints)
    if resume and config.process_index == 0:
        print(f"resuming the interrupted run in {folder.final}: training continues from {Path(resume).name}", flush=True)
    elif not resume and says:
        save = str(getattr(config.save_strategy, "value", config.save_strategy))  # TrainingArguments makes it an enum
        print(f"resuming the interrupted run in {folder.final}: it stopped before its first checkpoint (save_strategy {save!r}), "
              "so the training starts from step 0; what it computed before is reused.", flush=True)
    return resume


def labelled_position(config: TrainConfig, metadata: dict):
    """The labelled token: the config's, or a loaded dataset's own."""
    return parse_position(config.position if not config.dataset else metadata.get("position", "last"))


def build_predictor(config: TrainConfig, model, tokenizer, dataset, metadata: dict, out: Path, *, original=None,
                    feature_cache: dict | None = None, states: dict | None = None,
                    record: RecordedPass | None = None) -> tuple[ActivationPredictor, PrefixCache | None]:
    """The ``ActivationPredictor`` on ``model`` for the dataset's neurons, its head initialised from the ridge probe
    when ``head_init: probe``; its config names ``out/dataset`` (``out``: the run's final folder) unless ``dataset``.

    ``original``: the untouched ``model`` the evaluation's baselines will read (the predictor holds a copy of its weights).
    The probe's train and validation features are then computed from it, at every layer the evaluation's probes read, into
    ``feature_cache`` (``nsr_hf.evaluation.baselines.self_features``): one pass serves the head and those probes. The same
    pass keeps the train rows' residual stream entering the target's block (``recording_states``), returned as a
    ``PrefixCache`` (or ``None``): the frozen-prefix cache of training and the honest reader's features start from it.
    ``states``: the states of earlier runs on this dataset (``SharedPasses.states``), read and filled. ``record``: what the
    dataset's own pass kept (``RecordedPass``): the features of every split then come from it and from the blocks from the
    neuron's up only (``prefill_features``), and the cache holds every split's rows (the evaluation's causal test and
    counterfactual rows start from it too). Returns ``(predictor, that cache)``."""
    empty = [s for s in ("train", "validation") if s not in dataset or len(dataset[s]) == 0]
    if empty:
        raise ValueError(f"The dataset has no rows in {empty}: use more documents (dataset_documents).")
    neurons = list(metadata["neurons"])
    transform = train_label_transform(config, metadata["transform"], dataset["train"], neurons, balance=metadata.get("balance"))
    read_layer = config.read_layer_for(max(Neuron.parse(n).layer for n in neurons), num_layers(model))
    predictor = ActivationPredictor.from_base(model, tokenizer, neurons=neurons, head_type=config.head_type, read_layer=read_layer,
                                              position=labelled_position(config, metadata), label_transform=transform,
                                              num_bins=config.num_bins, expected_value_loss_weight=config.expected_value_loss_weight,
                                              prompt_suffix=config.prompt_suffix, dataset_name=config.dataset or str(out / "dataset"))
    start = None
    if config.head_init == "probe":
        features = None
        if original is not None and feature_cache is not None:
            layers = probe_layers_of(evaluate_config(config, out).methods, read_layer, num_layers(original), config.probe_layers)
            target = min(Neuron.parse(n).layer for n in neurons)
            keep = keeps_prefix(config, predictor, dataset["train"], target)
            key = (target, getattr(dataset["train"], "_fingerprint", None))
            known = (states or {}).get(key) if keep else None
            if record is not None and record.states is not None and record.states.layer == target and \
                    prefill_features(original, dataset, layers, feature_cache, record, batch_size=config.per_device_eval_batch_size):
                known = record.states if keep else None
            by_split = {}
            for split in ("train", "validation"):  # the train rows' states entering the target's block are kept on the way
                recording = keep and known is None and split == "train"
                with recording_states(original, target) if recording else contextlib.nullcontext() as kept:
                    by_split.update(self_features(original, {split: dataset[split]}, layers, feature_cache,
                                                  batch_size=config.per_device_eval_batch_size, progress=False))
                known = kept if recording else known
            start = None
            if keep and known is not None:  # every split's rows where the states hold them (the dataset pass's), else train's
                every = [{"input_ids": ids, "label_position": p} for split in ("train", "validation", "test") if split in dataset
                         for ids, p in zip(dataset[split]["input_ids"], dataset[split]["label_position"])]
                start = PrefixCache.from_states(known, every) or PrefixCache.from_states(known, dataset["train"])
            if start is not None and states is not None and key[1] is not None:
                states[key] = known
            features = (by_split["train"][read_layer], by_split["validation"][read_layer])
        probe = predictor.init_head_from_probe(dataset["train"], dataset["validation"], batch_size=config.per_device_eval_batch_size,
                                               features=features)
        print(f"head initialised from the ridge probe of its representation: {probe}", flush=True)
    return predictor, start


def prefill_features(original, dataset, layers: list[int], feature_cache: dict, record: RecordedPass, batch_size: int) -> bool:
    """Fill ``feature_cache`` with the original model's ``self_features`` of every split of ``dataset`` at ``layers`` from
    what the dataset's pass recorded: the blocks below the neuron's from ``record.features``, the blocks from there by
    running only those blocks on ``record.states`` (``layer_features`` with a ``PrefixCache``). The same features as a
    whole pass, to float round-off. ``False`` (nothing filled) when the record lacks a row or a layer."""
    target = record.states.layer
    filled = {}
    for split in ("train", "validation", "test"):
        if split not in dataset or not len(dataset[split]):
            continue
        rows = dataset[split]
        missing = missing_self_features(original, split, rows, layers, feature_cache)  # another neuron's run of these rows
        low, high = [layer for layer in missing if layer < target], [layer for layer in missing if layer >= target]
        below = record.features.features(rows, low) if low else {}
        prefix = PrefixCache.from_states(record.states, rows)
        if below is None or prefix is None:
            return False
        above = layer_features(original, rows, high, batch_size=batch_size, progress=False, prefix=prefix) if high else {}
        filled[split] = (rows, {**below, **above})
    for split, (rows, by_layer) in filled.items():
        store_self_features(original, split, rows, by_layer, feature_cache)
    record.used = True
    return True


def keeps_prefix(config: TrainConfig, predictor: ActivationPredictor, train, target: int) -> bool:
    """Whether the head's probe pass keeps the train rows' states entering the target's block: the cache is on, the head
    runs the rows themselves (not the token head's prompt), the target is above block 0, and the states fit
    ``prefix_cache_max_gb``."""
    if config.prefix_cache == "off" or predictor.head.takes_prompt or target < 1 or target > predictor.config.effective_read_layer:
        return False
    positions = sum(len(ids) for ids in train["input_ids"])
    return positions * predictor.base.config.hidden_size * 4 <= config.prefix_cache_max_gb * 1e9


def intervention_sampler(config: TrainConfig, predictor: ActivationPredictor, train, neurons: list[str]) -> InterventionSampler | None:
    """Intervention training's sampler (``intervention_rate`` > 0), its values fitted on the train split's activations and
    recorded in the predictor's config (``intervention``); ``None`` when off. Refuses a head that reads a block before a
    target neuron's layer: the set value could not reach it."""
    if not config.intervention_rate:
        return None
    read = predictor.config.effective_read_layer
    early = [n for n in neurons if Neuron.parse(n).layer > read]
    if early:
        raise ValueError(f"intervention_rate > 0: the head reads block {read}, before the layer of neuron(s) {', '.join(early)}, so the "
                         "set value cannot reach it. Read a later block (read_layer target+2, or none for the last).")
    values = CounterfactualValues.fit(read_column(train, "activations", len(neurons)), neurons, source=config.intervention_source,
                                      shift_scale=config.intervention_shift_scale)
    sampler = InterventionSampler(values, config.intervention_rate, seed=config.seed)
    predictor.config.intervention = sampler.describe()
    return sampler


def trainer_arguments(config: TrainConfig, out: Path, neurons: list[str], has_validation: bool):
    """The Trainer's ``TrainingArguments``: every Trainer option of the config as it is, except what the run decides:
    checkpoints in ``output_dir/checkpoints`` (none for gradual unfreezing, which cannot resume, unless kept), no
    evaluation during training without validation rows, the run's name, and no push of the Trainer's own (the saved
    predictor is pushed: ``push_trained``)."""
    from transformers import TrainingArguments

    values = {f.name: getattr(config, f.name) for f in fields(TrainingArguments) if f.init}
    values.update(output_dir=str(out / "checkpoints"), eval_strategy=config.eval_strategy if has_validation else "no", push_to_hub=False,
                  run_name=config.run_name or f"nsr-{'-'.join(neurons)}-{config.unfreeze}")
    if config.unfreeze == "gradual" and not config.keep_checkpoints:
        values.update(save_strategy="no")  # gradual unfreezing cannot resume: its checkpoints would serve nothing
    return TrainingArguments(**values)


def drift_after_training(trainer, dataset, neurons: list[str], position, states=None) -> dict:
    """``neuron_drift`` of the trained base on the test split (else validation, else train). ``states``: the dataset
    pass's ``RecordedStates`` entering the neurons' block; used when training's frozen-prefix cache sat at that block or
    above it (the blocks below stayed frozen and unchanged)."""
    import torch

    inner = unwrap(trainer.model)
    check_split = next((s for s in ("test", "validation", "train") if s in dataset and len(dataset[s])), "train")
    info = trainer.prefix_cache_info or {}
    below_frozen = states is not None and info.get("used") and info.get("layer", -1) >= states.layer
    prefix = PrefixCache.from_states(states, dataset[check_split]) if below_frozen else None
    inner.eval()
    with torch.no_grad():
        drift = neuron_drift(inner.base, dataset[check_split], neurons, position, prefix=prefix)
    drift["split"] = check_split
    return drift


def train_summary(config: TrainConfig, trainer, train_result, dataset, metrics: dict, drift: dict, monitor, *, neurons, rank,
                  parameters, resume) -> dict:
    """The summary ``metrics.json`` holds (the evaluation and the time are added once they are known)."""
    inner = unwrap(trainer.model)
    return {
        "model": model_provenance(inner.base),
        "neurons": neurons,
        "scan_rank": rank,
        "select": config.select if rank else None,
        "read_layer": inner.config.effective_read_layer,
        "head_type": config.head_type,
        "unfreeze": config.unfreeze,
        "labels": config.labels,
        **({"intervention": inner.config.intervention} if inner.config.intervention else {}),
        "prefix_cache": trainer.prefix_cache_info,
        "trainable_parameters": parameters[0],
        "total_parameters": parameters[1],
        "rows": {split: len(ds) for split, ds in dataset.items()},
        "train": {k: v for k, v in train_result.metrics.items() if isinstance(v, (int, float))},
        "global_step": trainer.state.global_step,
        "world_size": trainer.args.world_size,
        "resumed_from": resume,
        "metrics": metrics,
        "neuron_drift": drift,
        "drift_monitor": monitor.history[-1] if monitor.history else None,
        "config": config.to_dict(),
        "command": recorded_command(),
    }


def trained_prefix(trainer) -> PrefixCache | None:
    """Training's own frozen-prefix cache, for the evaluation's natural features of the train rows; ``None`` under mixed
    precision (its states were computed in the steps' precision, the evaluation's passes are float32)."""
    cache = trainer.take_prefix_cache()
    return None if trainer.args.bf16 or trainer.args.fp16 else cache


def unchanged_prefix(trainer, start: PrefixCache | None) -> PrefixCache | None:
    """``start`` (the train rows' states entering the target's block, from the original model) when training kept every
    block below it frozen (its own frozen-prefix cache sat at that block or above), so the trained predictor computes the
    same states; else ``None``."""
    info = trainer.prefix_cache_info or {}
    return start if start is not None and info.get("used") and info.get("layer", -1) >= start.layer else None


def validation_and_test(config: TrainConfig, trainer, dataset) -> tuple[dict, dict]:
    """``(metrics, predictions)``: the Trainer's loss and metrics of the validation and test splits (logged as ``evaluate``
    logs them), and each split's ``(expected, greedy)`` predictions from the same pass, for the evaluation to reuse: only
    where they are what ``predict_split`` gives (one process, no mixed precision, labels from the dataset)."""
    import numpy as np

    metrics, predictions = {}, {}
    reusable = trainer.args.world_size == 1 and not (trainer.args.bf16 or trainer.args.fp16) and config.labels != "live"
    for split in ("validation", "test", "test_ood"):
        if split not in dataset or not len(dataset[split]):
            continue
        output = trainer.predict(dataset[split], metric_key_prefix=split)
        trainer.log(output.metrics)  # as evaluate does: the figures go to log_history and the loggers
        metrics[split] = output.metrics
        pred = None if output.predictions is None else np.asarray(output.predictions, dtype=np.float64)
        if reusable and pred is not None and pred.shape == (len(dataset[split]), 2, len(unwrap(trainer.model).config.neurons)):
            greedy = pred[:, 1]
            predictions[split] = (pred[:, 0], None if np.isnan(greedy).all() else greedy)
    return metrics, predictions


def evaluate_trained(config: TrainConfig, out: Path, trainer, dataset, metadata, original, tokenizer, monitor, features=None,
                     train_prefix: PrefixCache | None = None, predictions: dict | None = None,
                     natural_prefix: PrefixCache | None = None) -> dict:
    """The evaluation protocol on the trained predictor (``output_dir/evaluation``), from the rows already loaded.
    ``predictions``: the validation and test predictions of ``validation_and_test``. ``natural_prefix``: training's own
    frozen-prefix cache (``PredictorTrainer.take_prefix_cache``)."""
    shutil.rmtree(out / "evaluation", ignore_errors=True)  # what an evaluation of this unfinished run left when it failed
    return run_evaluate(evaluate_config(config, out), predictor=trainer.model, dataset=dataset, metadata=metadata, base_model=original,
                        tokenizer=tokenizer, log_history=trainer.state.log_history, drift=monitor.summary(), feature_cache=features,
                        train_prefix=train_prefix, predictions=predictions, natural_prefix=natural_prefix,
                        resumable=True)  # the predictor in memory is the one just saved: an interrupted evaluation resumes its stages


def evaluate_config(config: TrainConfig, out: Path) -> EvaluateConfig:
    """The ``EvaluateConfig`` of a train run: its evaluation keys, and the predictor and dataset it writes."""
    return EvaluateConfig(output_dir=str(out / "evaluation"), predictor=str(out / "predictor"),
                          dataset=config.dataset or str(out / "dataset"),
                          methods=config.eval_methods if config.eval_methods is not None else EvaluateConfig().methods,
                          **values_of(config, EvaluationFields), seed=config.seed, base_unchanged=config.unfreeze == "head_only",
                          batch_size=config.per_device_eval_batch_size, overwrite=True)  # a re-evaluated run replaces its own


def save_trained(out: Path, trainer, summary: dict) -> None:
    """``predictor/`` (with its card) and ``metrics.json``."""
    save_predictor(trainer.model, str(out / "predictor"))
    write_json(out / "metrics.json", summary)


def push_trained(config: TrainConfig, out: Path) -> None:
    """The saved predictor pushed when ``push_to_hub`` names a repo."""
    if config.push_to_hub:
        _push_folder(out / "predictor", config.push_to_hub)
        print(f"pushed to https://huggingface.co/{config.push_to_hub}")


def print_result(config: TrainConfig, out: Path, summary: dict, evaluation: dict | None) -> None:
    """The closing lines: the held-out figures, the drift, and with an evaluation its headline table and verdicts."""
    metrics, neurons, drift = summary["metrics"], summary["neurons"], summary["neuron_drift"]
    test = metrics.get("test") or metrics.get("validation") or {}
    shown = {k: round(v, 4) for k, v in test.items() if k.split("_", 1)[-1] in ("pearson", "r2", "mse", "loss")}
    print(f"\ntrain finished in {summary['seconds']} s: neuron(s) {', '.join(neurons)}, {shown}, drift max {drift['max_abs']:.3g}; "
          f"everything is in {out}/", flush=True)
    if config.evaluate:
        split = next((s for s in ("test", "test_ood", "validation") if s in (evaluation.get("metrics") or {})), None)
        if split:
            print(f"\n{split} split, neuron {neurons[0]}:\n{headline_table(evaluation, split)}\n" +
                  "\n".join(f"- {v}" for v in verdicts(evaluation, split)), flush=True)
        print(f"evaluation report: {out / 'evaluation' / 'report.md'}", flush=True)
    dashboard = out / DASHBOARD_DIR / "index.html"
    if dashboard.is_file():
        print(f"dashboard: {dashboard} (open it in a browser; rebuild it with: nsr report {out})", flush=True)


def train_label_transform(config: TrainConfig, transform: dict, train, neurons: list[str], balance=None) -> dict:
    """The label transform the heads train with: the dataset's, re-binned on its ``train`` split when the config asks
    for other bins (``bin_strategy`` set and different from the dataset's, or another ``num_bins`` with it), and
    given bin centres (each bin's train mean) when the dataset predates them. The dataset itself is not changed: its
    ``bin`` column keeps its own bins, and the predictor carries the transform it was trained with."""
    if not head_class(config.head_type).has_bins:
        return transform

    have = (transform.get("bin_strategy", "quantile"), len(transform["bin_edges"][0]) - 1)
    want = (config.bin_strategy, config.num_bins)
    if config.bin_strategy is not None and have != want:
        if balance:
            raise ValueError(f"The dataset was balanced on its own {have[1]} {have[0]} bins (train rows dropped from full bins), so its "
                             f"train split no longer has the neuron's distribution and {config.bin_strategy} bins fitted on it would be "
                             f"skewed by the old ones. Build the dataset with bin_strategy {config.bin_strategy!r} and num_bins "
                             f"{config.num_bins} (nsr dataset ... --bin_strategy {config.bin_strategy}), or leave bin_strategy unset "
                             "to train on the dataset's bins.")
        fitted = LabelTransform.fit(read_column(train, "activations", len(neurons)), neurons, config.num_bins, config.bin_strategy)
        print(f"Bins: the dataset's are {have[1]} {have[0]}; this run refits {config.num_bins} {config.bin_strategy} bins on its train "
              "split (the dataset is not changed).", flush=True)
        refitted = {**transform,
                    **{k: v for k, v in fitted.to_dict().items() if k in ("bin_edges", "bin_strategy", "bin_centers", "num_values")}}
        if config.num_bins != have[1]:  # the dataset's report tokens were one per old bin: the predictor picks new ones
            refitted.pop("report_tokens", None), refitted.pop("report_token_ids", None)
        return refitted
    if config.num_bins != have[1]:
        print(f"Bins: the dataset has {have[1]} {have[0]} bins per neuron and they are used (num_bins {config.num_bins} "
              f"applies when a run builds its dataset; set bin_strategy to refit {config.num_bins} bins on its train split).", flush=True)
    if not transform.get("bin_centers"):
        transform = LabelTransform.from_dict(transform).with_bin_centers(read_column(train, "activations", len(neurons))).to_dict()
        print("The dataset's label transform has no bin centres (it was made before nsr_hf fitted them): each bin reports "
              "the mean of the train split's values in it, not the midpoint of its edges.", flush=True)
    return transform


def finish_wandb(summary: dict) -> None:
    """Put the test figures of every method into the wandb run's summary and close the run (the Trainer leaves it
    open); nothing when wandb is not in use."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    figures = {}
    for split, by_method in ((summary.get("evaluation") or {}).get("metrics") or {}).items():
        for method, values in by_method.items():
            for key in ("r2", "pearson", "mse"):
                if isinstance(values, dict) and isinstance(values.get(key), (int, float)):
                    figures[f"evaluation/{split}/{method}/{key}"] = values[key]
    for split, values in (summary.get("metrics") or {}).items():
        figures.update({f"final/{k}": v for k, v in values.items() if isinstance(v, (int, float))})
    wandb.run.summary.update(figures)
    wandb.finish()


def _push_folder(folder: Path, repo_id: str) -> None:
    """Upload the saved predictor folder as it is: weights (or the PEFT adapter), tokenizer, label transform and the
    model card with the evaluation's headline table."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload nsr_hf predictor")


def main(argv: list[str] | None = None, prog: str = "python nsr_hf/train.py") -> int:
    """``[recipe.yaml] [--key value ...]`` -> ``run_train`` (``nsr train``, ``nsr_hf/train.py``, ``accelerate launch``)."""
    argv, debug = debug_requested(list(sys.argv[1:] if argv is None else argv))
    parser = RecipeParser(TrainConfig, prog=prog, usage=f"{prog} [recipe.yaml] [--key value ...] [--debug]",
                          description=(TrainConfig.__doc__ or "").strip())
    if any(a in ("-h", "--help") for a in argv):
        print(parser.format_help())
        return 0

    def parse_and_run() -> None:
        (config,) = parser.parse(argv)
        run_train(config)

    launched = "accelerate launch nsr_hf/train.py" if prog.startswith("python ") and "LOCAL_RANK" in os.environ else prog
    with command_recorded([*launched.split(), *argv]):
        return error_boundary(prog, parse_and_run, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
