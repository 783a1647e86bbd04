"""Any-neuron self-report: one reporter for many neurons of a layer, scored on neurons it never trained on.

    nsr any-neuron recipes/any_neuron.yaml                       # the embedded default, CPU
    nsr any-neuron recipes/any_neuron.yaml --neuron_count 48 --held_out_neurons 16 --output_dir outputs/any_small

Steps (``run_any_neuron``), everything under ``output_dir``:

1. The neurons: ``neurons`` as given, or ``neuron_count`` neurons of ``neuron_layer`` drawn at random (``neuron_seed``), or
   the scan's top ``scan_top_n`` across the recipe's ``layers`` (``scan/``: the train documents, as ``nsr train`` scans them).
2. ``dataset/``: one activation dataset of all of them (``nsr dataset``; an interrupted build resumes its shards). Neurons
   that do not vary on the train documents are dropped (no value to report, no R² to score).
3. ``neuron_split.json``: the split by neuron (``nsr_hf.data.neuron_split``): ``validation_neurons`` and
   ``held_out_neurons`` drawn at random (``neuron_split_seed``, default ``neuron_seed``), the rest train. The split by
   document is the dataset's, for every group.
4. ``<conditioning>/predictor``: for each of ``conditionings`` (``weights``: the neuron's own weights; ``weights+inputs``:
   the same, and the neuron computed again from its input weights, the shortcut; ``name``: the control, a random vector
   seeded by its name; ``nsr_hf.modeling.neuron_queries``) a conditioned reporter (head ``conditioned``) trained on the
   train neurons' columns only, with the recipe's unfreezing, intervention training and Trainer options.
5. ``any_neuron.json``, ``any_neuron.md``, ``any_neuron.png``: for every neuron of every group, on the held-out documents
   (test split): the reporter's natural R², its causal slope ratio (``nsr_hf.evaluation.causal``: the neuron set to
   ``causal_values`` values on ``causal_rows`` rows; the report's slope on the set value over its slope on the natural
   value), the same for the name-only control, and the ridge probe of the same representation fitted on that neuron's
   own train labels (the reference an any-neuron reporter aims at: it sees every neuron's labels). Then the medians per group.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nsr_hf.architectures import num_layers, num_neurons
from nsr_hf.capture import Neuron, parse_position, validate_neuron
from nsr_hf.dashboard import build_dashboard_after
from nsr_hf.data.columns import read_column
from nsr_hf.data.generator import DatasetConfig, run_dataset
from nsr_hf.data.labels import shared_bins, with_shared_bins
from nsr_hf.data.neuron_split import GROUPS, NeuronSplit, asking, neuron_columns, varying_neurons
from nsr_hf.data.storage import load_activation_dataset
from nsr_hf.errors import UserError
from nsr_hf.evaluation.causal import causal_tests
from nsr_hf.evaluation.figures import plot_any_neuron
from nsr_hf.evaluation.predictions import predict_split
from nsr_hf.metrics import finite_median, r2_rows
from nsr_hf.modeling.neuron_queries import CONDITIONINGS, check_conditioning
from nsr_hf.modeling.predictor import ActivationPredictor, load_predictor, save_predictor
from nsr_hf.modeling.probes import RidgeProbe, layer_features
from nsr_hf.models import load_model_and_tokenizer, process_device
from nsr_hf.pipeline import intervention_sampler, scan_train_documents, trainer_arguments
from nsr_hf.scanner import TOP_FILE, load_scan
from nsr_hf.shared_config import CorpusFields, SplitFields, values_of
from nsr_hf.stage_clock import stage_clock, timed
from nsr_hf.training.config import TrainConfig
from nsr_hf.training.trainer import PredictorTrainer
from nsr_hf.utils import to_jsonable, write_json

logger = logging.getLogger(__name__)

ANY_NEURON_HEADS = ("conditioned", "conditioned_token")
HEAD_WORDS = {"conditioned": "a readout of the representation, in activation units",
              "conditioned_token": "the model says a bin, on one scale shared by every neuron, after a prompt that names the neuron"}
RESULT_FILE = "any_neuron.json"
TRAINED_FILE = "training.json"  # beside a reporter's predictor/, once it is saved
FIGURES = ("natural_r2", "slope_ratio")


@dataclass
class AnyNeuronConfig(TrainConfig):
    """Train one reporter for many neurons of a layer and score it on neurons it never trained on (a recipe's fields:
    every ``nsr train`` key, and the keys below)."""

    neuron_layer: int | None = field(default=None, metadata={"help": "The layer whose neurons are drawn (with neuron_count)"})
    neuron_count: int = field(default=96, metadata={"help": "How many neurons of neuron_layer to draw (all groups together)"})
    scan_top_n: int | None = field(default=None, metadata={
        "help": "Instead of a draw: the scan's top N neurons across the recipe's layers (train documents only; scan_documents, "
                "scan_score), in output_dir/scan (read back when it is there)"})
    neurons: list[str] | None = field(default=None, metadata={"help": "These neurons (layer.index) instead of a draw"})
    neuron_seed: int = field(default=0, metadata={"help": "Seed of the draw of neurons (and of their split into groups, unless "
                                                          "neuron_split_seed)"})
    neuron_split_seed: int | None = field(default=None, metadata={
        "help": "Seed of the split of the neurons into train, validation and held-out groups (default: neuron_seed); nsr sweep "
                "sets it to each seed: the same neurons and dataset, held out anew"})
    validation_neurons: int = field(default=16, metadata={"help": "Neurons held out of training to choose settings on"})
    held_out_neurons: int = field(default=32, metadata={"help": "Neurons never trained on, the figure of merit"})
    train_neurons: int | None = field(default=None, metadata={
        "help": "Train on only the first N train neurons of the split (the held-out and validation groups stay the same): "
                "a point of the curve of held-out R² against the number of training neurons"})
    conditionings: list[str] = field(default_factory=lambda: list(CONDITIONINGS), metadata={
        "help": "One reporter per conditioning: 'weights' (the neuron's own weights), 'weights+inputs' (also recomputing the neuron "
                "from its input weights: the shortcut) and 'name' (the control)"})
    closed_form_only: bool = field(default=False, metadata={
        "help": "Keep each reporter at its closed-form start (fitted on the train neurons' labels, head_init probe) and run no "
                "Trainer: on SmolLM2's block 3 the closed form generalises to held-out neurons and gradient training does not"})
    scored_groups: list[str] = field(default_factory=lambda: list(GROUPS), metadata={
        "help": "The groups of neurons the evaluation scores: train, validation, held_out (a curve point needs held_out only)"})
    causal_rows: int = field(default=32, metadata={"help": "Test rows of each neuron's causal test (slope ratio)"})
    causal_values: int = field(default=5, metadata={"help": "Values each neuron is set to in its causal test"})
    head_type: str = field(default="conditioned", metadata={
        "help": "'conditioned' (a readout of the representation, in activation units) or 'conditioned_token' (the model says a "
                "bin's report token after a prompt that names the neuron by query embeddings): the heads that report any neuron"})
    questions_per_row: int = field(default=4, metadata={
        "help": "conditioned_token: how many train neurons each training row asks about (one prompt each, balanced over the "
                "neurons: nsr_hf.data.neuron_split.asking); the conditioned head reads every train neuron from each row"})
    query_tokens: int = field(default=2, metadata={"help": "conditioned_token: the prompt embeddings that name a neuron"})
    head_init: str = field(default="probe", metadata={
        "help": "'probe': the conditioned head's closed-form start (its mean and recompute weight are kept; the read direction trains)"})
    output_dir: str = field(default="outputs/any_neuron", metadata={"help": "Where dataset/, the reporters and any_neuron.json go"})

    def __post_init__(self):
        if self.head_type not in ANY_NEURON_HEADS:
            raise ValueError(f"any-neuron training needs a head that reports any neuron ({' or '.join(ANY_NEURON_HEADS)}), got "
                             f"{self.head_type!r}.")
        for c in self.conditionings:
            check_conditioning(c)
        if self.head_type == "conditioned_token":
            if "weights+inputs" in self.conditionings:
                raise ValueError("conditionings: the conditioned token head takes 'weights' and 'name' ('weights+inputs' is a readout "
                                 "term of the conditioned head).")
            if self.head_init == "probe":
                raise ValueError("head_init 'probe' is the conditioned head's closed-form start; the conditioned token head starts from "
                                 "zero query embeddings: set head_init random.")
            if self.closed_form_only:
                raise ValueError("closed_form_only: the conditioned token head has no closed form; it trains (closed_form_only false).")
            if self.questions_per_row < 1 or self.query_tokens < 1:
                raise ValueError(f"questions_per_row and query_tokens must be at least 1, got {self.questions_per_row} and "
                                 f"{self.query_tokens}.")
        if not self.conditionings:
            raise ValueError("conditionings is empty: give 'weights', 'name' or both.")
        sources = [name for name, given in (("neurons", self.neurons is not None), ("neuron_layer", self.neuron_layer is not None),
                                            ("scan_top_n", self.scan_top_n is not None)) if given]
        if len(sources) != 1:
            raise ValueError("Give one source of neurons: neuron_layer (and neuron_count), a list of neurons, or scan_top_n"
                             + (f"; got {' and '.join(sources)}." if sources else "."))
        if self.scan_top_n is not None and self.scan_top_n < 2:
            raise ValueError(f"scan_top_n must be at least 2 (neurons to train on and to hold out), got {self.scan_top_n}.")
        total = len(self.neurons) if self.neurons else self.scan_top_n if self.scan_top_n is not None else self.neuron_count
        if min(self.validation_neurons, self.held_out_neurons) < 0 or self.validation_neurons + self.held_out_neurons >= total:
            raise ValueError(f"validation_neurons ({self.validation_neurons}) + held_out_neurons ({self.held_out_neurons}) must leave at "
                             f"least one of the {total} neurons to train on: draw more neurons (neuron_count) or hold out fewer.")
        left = total - self.validation_neurons - self.held_out_neurons
        if self.train_neurons is not None and self.train_neurons > left:
            raise ValueError(f"train_neurons {self.train_neurons} is more than the {left} neurons left to train on after the validation "
                             "and held-out ones.")
        if self.train_neurons is not None and self.train_neurons < 1:
            raise ValueError(f"train_neurons must be at least 1 (or left out: every train neuron), got {self.train_neurons}.")
        unknown = [g for g in self.scored_groups if g not in GROUPS]
        if unknown or not self.scored_groups:
            raise ValueError(f"scored_groups must name some of {', '.join(GROUPS)}, got {self.scored_groups}.")
        if min(self.causal_rows, self.causal_values) < 2:
            raise ValueError("causal_rows and causal_values must be at least 2 (a slope needs two values).")
        super().__post_init__()

    @property
    def split_seed_of_neurons(self) -> int:
        """The seed of the split by neuron: ``neuron_split_seed``, else ``neuron_seed``."""
        return self.neuron_seed if self.neuron_split_seed is None else self.neuron_split_seed


def draw_neurons(model, layer: int, count: int, seed: int) -> list[str]:
    """``count`` neurons of ``layer`` drawn at random (``seed``), in index order."""
    width = num_neurons(model)
    if not 0 < count <= width:
        raise ValueError(f"neuron_count must be between 1 and the layer's {width} neurons, got {count}.")
    validate_neuron(model, f"{layer}.0")
    picked = np.sort(np.random.default_rng(seed).choice(width, size=count, replace=False))
    return [f"{layer}.{i}" for i in picked]


def choose_neurons(config: AnyNeuronConfig, model, tokenizer, out: Path) -> list[str]:
    """The run's neurons: ``neurons``, a draw of ``neuron_count`` of ``neuron_layer``, or the scan's top ``scan_top_n`` (a scan
    of the train documents in ``out/scan``, read back when it is there)."""
    if config.neurons:
        return [str(validate_neuron(model, n)) for n in config.neurons]
    if config.scan_top_n is None:
        return draw_neurons(model, config.neuron_layer, config.neuron_count, config.neuron_seed)
    scan_dir = out / "scan"
    if (scan_dir / TOP_FILE).is_file():
        scan = load_scan(scan_dir)
        print(f"using the scan in {scan_dir} (delete it to scan again)", flush=True)
    else:
        with timed("scan"):
            scan, _ = scan_train_documents(config, model, tokenizer, scan_dir, top_n=config.scan_top_n)
    if len(scan.table) < config.scan_top_n:
        raise UserError(f"The scan ranked {len(scan.table)} neurons, fewer than scan_top_n = {config.scan_top_n}.")
    return [str(scan.neuron_at_rank(rank)) for rank in range(1, config.scan_top_n + 1)]


def refuse_finished(config: AnyNeuronConfig) -> None:
    out = Path(config.output_dir)
    if (out / RESULT_FILE).exists() and not config.overwrite:
        raise UserError(f"{out} already holds a finished any-neuron run ({RESULT_FILE}). Nothing was changed: choose another "
                        "--output_dir, or pass --overwrite true to run it again (its dataset is kept and reused).")


def build_dataset(config: AnyNeuronConfig, model, tokenizer, neurons: list[str], out: Path):
    """``(dataset, metadata)``: ``config.dataset`` when given (it must hold every neuron), else ``out/dataset``, built unless
    it is there (an interrupted build resumes its shards)."""
    if config.dataset:
        dataset, metadata = load_activation_dataset(config.dataset)
        return neuron_columns(dataset, metadata, neurons)  # a neuron it lacks is named (column_indices) before anything trains
    dataset_config = DatasetConfig(neurons=neurons, **values_of(config, CorpusFields), **values_of(config, SplitFields),
                                   position=config.position, max_length=config.max_length, max_documents=config.dataset_documents,
                                   num_bins=config.num_bins, output_dir=str(out / "dataset"), overwrite=False)
    if not (out / "dataset" / "dataset_dict.json").is_file():
        run_dataset(dataset_config, model=model, tokenizer=tokenizer)
    return load_activation_dataset(out / "dataset")


def statistics_of(metadata: dict) -> dict:
    """The label transform's z-score statistics only (the conditioned head has no bins)."""
    t = metadata["transform"]
    return {"mean": list(t["mean"]), "std": list(t["std"]), "fitted_on": t.get("fitted_on", "train")}


def reporter_transform(config: AnyNeuronConfig, dataset, metadata: dict) -> dict:
    """The reporter's label transform: the train neurons' z-score statistics, and for the conditioned token head the bins
    every neuron shares (fitted on the train neurons' pooled train values: ``nsr_hf.data.labels.shared_bins``)."""
    statistics = statistics_of(metadata)
    if config.head_type != "conditioned_token":
        return statistics
    values = read_column(dataset["train"], "activations", len(metadata["neurons"]))
    shared = shared_bins(values, config.num_bins, config.bin_strategy or "quantile")
    return with_shared_bins(statistics, len(metadata["neurons"]), shared)


def train_reporter(config: AnyNeuronConfig, model, tokenizer, dataset, metadata, conditioning: str, read_layer: int,
                   features: dict, out: Path) -> tuple[ActivationPredictor, dict]:
    """A conditioned reporter of ``metadata["neurons"]`` (the train neurons' columns only), trained and saved in ``out``. The
    conditioned token head trains on each row ``questions_per_row`` times, each asking about another train neuron
    (``nsr_hf.data.neuron_split.asking``)."""
    neurons = list(metadata["neurons"])
    predictor = ActivationPredictor.from_base(model, tokenizer, neurons=neurons, head_type=config.head_type, read_layer=read_layer,
                                              position=parse_position(config.position),
                                              label_transform=reporter_transform(config, dataset, metadata), num_bins=config.num_bins,
                                              prompt_suffix=config.prompt_suffix, conditioning=conditioning,
                                              query_tokens=config.query_tokens, dataset_name=str(out.parent / "dataset"))
    info = {}
    if config.head_init == "probe":
        info["head_init"] = predictor.init_head_from_probe(dataset["train"], dataset["validation"],
                                                           features=(features["train"], features["validation"]))
    if config.closed_form_only:
        info.update(train_seconds=0.0, train_loss=None, prefix_cache=None, global_step=0, closed_form_only=True)
        save_predictor(predictor, out / "predictor")
        write_json(out / TRAINED_FILE, {"neurons": neurons, "conditioning": conditioning, "head_type": config.head_type, **info})
        return predictor.eval(), info
    args = trainer_arguments(config, out, [f"any-{conditioning}"], has_validation=len(dataset["validation"]) > 0)
    train_rows = (asking(dataset["train"], len(neurons), config.questions_per_row, seed=config.seed) if predictor.head.asks_one_neuron
                  else dataset["train"])
    trainer = PredictorTrainer(model=predictor, args=args, train_dataset=train_rows,
                               eval_dataset=dataset["validation"] if len(dataset["validation"]) else None,
                               unfreeze={"strategy": config.unfreeze, "k": config.unfreeze_k, "lora_r": config.lora_r,
                                         "every_n_steps": config.unfreeze_every_n_steps},
                               interventions=intervention_sampler(config, predictor, dataset["train"], neurons),
                               prefix_cache=config.prefix_cache, prefix_cache_max_gb=config.prefix_cache_max_gb)
    started = time.perf_counter()
    result = trainer.train()
    info.update(train_seconds=round(time.perf_counter() - started, 1), train_loss=float(result.training_loss),
                prefix_cache=trainer.prefix_cache_info, global_step=int(trainer.state.global_step), train_prompts=len(train_rows))
    save_predictor(predictor, out / "predictor")
    # last: the reporter is complete
    write_json(out / TRAINED_FILE, {"neurons": neurons, "conditioning": conditioning, "head_type": config.head_type, **info})
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return predictor.eval(), info


def trained_reporter(config: AnyNeuronConfig, neurons: list[str], conditioning: str, out: Path) -> tuple[ActivationPredictor, dict] | None:
    """The reporter an interrupted run of the same recipe finished in ``out`` (``training.json`` written after its weights, for
    these train neurons), or None: a rerun trains only what is missing. ``--overwrite`` trains every reporter again."""
    if config.overwrite or not (out / TRAINED_FILE).is_file():
        return None
    info = json.loads((out / TRAINED_FILE).read_text())
    if (info.get("neurons") != neurons or info.get("conditioning") != conditioning
            or info.get("head_type", "conditioned") != config.head_type or bool(info.get("closed_form_only")) != config.closed_form_only):
        return None
    predictor = load_predictor(out / "predictor")
    print(f"{conditioning}: the reporter trained before is kept ({out / 'predictor'})", flush=True)
    return predictor.eval(), {k: v for k, v in info.items() if k not in ("neurons", "conditioning", "head_type")}


def probe_r2(features: dict, targets: dict, column: int) -> float:
    """Test R² of the ridge probe of the representation fitted on this neuron's own train labels (alpha on validation);
    ``targets``: each split's (rows, K) values."""
    y = {s: targets[s][:, column] for s in ("train", "validation", "test")}
    probe = RidgeProbe().fit(features["train"], y["train"], features["validation"], y["validation"])
    return float(r2_rows(probe.predict(features["test"])[None], y["test"][None])[0])


def slope_ratios(predictors: list, rows, neuron: str, config: AnyNeuronConfig, shared: bool = False) -> list[dict]:
    """The causal test of ``neuron`` on each reporter (views of the same neurons) pointed at it alone (a reporter of K neurons
    would report all K: the conditioned token head runs one prompt per neuron), with that neuron's train statistics (the
    causal test sets it to values on its own scale). ``shared``: the reporters share one base model (``share_frozen_base``),
    so one forward per set value serves them all (``causal_tests``)."""
    column = predictors[0].config.neurons.index(neuron)
    alone = [p.retarget([neuron], {k: [p.config.label_transform[k][column]] for k in ("mean", "std")}) for p in predictors]
    rows = [{**row, "activations": [np.asarray(row["activations"]).reshape(-1)[column]]} for row in rows]  # its own column
    options = {"neuron": neuron, "num_values": config.causal_values, "max_rows": config.causal_rows, "seed": config.seed,
               "batch_size": config.per_device_eval_batch_size}
    results = causal_tests(alone, rows, **options) if shared else [causal_tests([a], rows, **options)[0] for a in alone]
    out = []
    for result in results:
        natural = result["natural_slope"]
        ratio = result["slope"] / natural if natural not in (None, 0) and result["slope"] is not None else None
        out.append({"slope_ratio": ratio, "slope": result["slope"], "natural_slope": natural, "meaningful": result["meaningful"]})
    return out


def share_frozen_base(reporters: dict) -> bool:
    """Give every reporter the first one's base model object when their bases are equal (head_only reporters of a conditioned
    head: training moved no base weight) and their heads read the representation alone. Their causal tests then share their
    forward passes (``causal_tests``: one per set value for all of them) and memory holds one base. Returns whether they share
    one now."""
    items = list(reporters.values())
    if len(items) < 2 or not all(r.head.reads_representation for r in items):
        return False
    first = items[0].base.state_dict()
    for r in items[1:]:
        other = r.base.state_dict()
        if other.keys() != first.keys() or not all(torch.equal(first[k], other[k]) for k in first):
            return False
    for r in items[1:]:
        r.base = items[0].base
    return True


def score_groups(config: AnyNeuronConfig, reporters: dict, dataset, metadata, split: NeuronSplit, features: dict) -> dict:
    """Per neuron and per group: each reporter's natural R² and slope ratio on the test split, and the ridge probe's R². Reporters
    that can share one base (``share_frozen_base``) share their causal tests' forward passes."""
    shared = share_frozen_base(reporters)
    per_neuron = {}
    for group, members in split.groups().items():
        if not members or group not in config.scored_groups:
            continue
        group_dd, group_meta = neuron_columns(dataset, metadata, members)
        targets = {s: read_column(group_dd[s], "activations", len(members)).astype(np.float64) for s in ("train", "validation", "test")}
        true = targets["test"]
        scores = {n: {"group": group} for n in members}
        for j, n in enumerate(members):
            scores[n]["ridge_probe_r2"] = probe_r2(features, targets, j)
        views = {c: predictor.retarget(members, statistics_of(group_meta)) for c, predictor in reporters.items()}
        r2 = {}
        for conditioning, view in views.items():
            expected, _ = predict_split(view, group_dd["test"], batch_size=config.per_device_eval_batch_size)
            r2[conditioning] = r2_rows(expected.T, true.T)
        test_rows = group_dd["test"].to_list()
        for j, n in enumerate(members):
            causal = slope_ratios(list(views.values()), test_rows, n, config, shared=shared)
            for (conditioning, _), result in zip(views.items(), causal):
                scores[n][conditioning] = {"natural_r2": float(r2[conditioning][j]), **result}
        per_neuron.update(scores)
    return per_neuron


def summarise(per_neuron: dict, conditionings: list[str]) -> dict:
    """Medians per group: each reporter's natural R² and slope ratio, and the ridge probe's R²."""
    out = {}
    for group in GROUPS:
        rows = [s for s in per_neuron.values() if s["group"] == group]
        if not rows:
            continue
        entry = {"neurons": len(rows), "ridge_probe_r2": finite_median(s["ridge_probe_r2"] for s in rows)}
        for c in conditionings:
            entry[c] = {figure: finite_median(s[c][figure] for s in rows) for figure in FIGURES}
        out[group] = entry
    return out


def markdown(result: dict) -> str:
    conditionings = result["conditionings"]
    head = result.get("head_type", "conditioned")
    lines = [f"# Any-neuron self-report: {result['model']}, layer(s) {result['layers']}, read at block {result['read_layer']}", "",
             f"Head: {head} ({HEAD_WORDS.get(head, head)}).", "",
             "Medians over each group's neurons, on the held-out documents (test split).", "",
             "| neurons | n | " + " | ".join(f"{c} R² | {c} slope ratio" for c in conditionings) + " | ridge probe R² (own labels) |",
             "| --- | --- | " + " | ".join("--- | ---" for _ in conditionings) + " | --- |"]

    def num(x):
        return "–" if x is None else f"{x:.3f}"

    for group, entry in result["summary"].items():
        cells = " | ".join(f"{num(entry[c]['natural_r2'])} | {num(entry[c]['slope_ratio'])}" for c in conditionings)
        lines.append(f"| {group.replace('_', '-')} | {entry['neurons']} | {cells} | {num(entry['ridge_probe_r2'])} |")
    lines += ["", "The ridge probe sees each neuron's own train labels; the reporters see only the train neurons' labels. "
              "A weight-conditioned reporter that generalises reads a held-out neuron from its weights; the name-only control cannot.",
              "", "![per-neuron figures](any_neuron.png)"]
    return "\n".join(lines) + "\n"


def run_any_neuron(config: AnyNeuronConfig) -> dict:
    """``nsr any-neuron`` (module docstring); returns what ``any_neuron.json`` holds."""
    refuse_finished(config)
    out = Path(config.output_dir)
    start = time.perf_counter()
    with stage_clock() as stage_seconds:
        with timed("load model"):
            model, tokenizer = load_model_and_tokenizer(config.model, device=process_device())
        neurons = choose_neurons(config, model, tokenizer, out)
        if "weights+inputs" in config.conditionings and len({Neuron.parse(n).layer for n in neurons}) > 1:
            raise UserError(f"conditioning 'weights+inputs' recomputes neurons of one layer (with its MLP norm), but the neurons span "
                            f"layers {sorted({Neuron.parse(n).layer for n in neurons})}: drop it from conditionings, or take neurons of "
                            "one layer (neuron_layer).")
        with timed("dataset"):
            dataset, metadata = build_dataset(config, model, tokenizer, neurons, out)
        live = varying_neurons(metadata)
        dropped = [n for n in metadata["neurons"] if n not in live]
        split = NeuronSplit.draw(live, config.validation_neurons, config.held_out_neurons, seed=config.split_seed_of_neurons)
        if config.train_neurons is not None:
            if config.train_neurons > len(split.train):
                raise UserError(f"train_neurons {config.train_neurons} is more than the {len(split.train)} train neurons of the split: "
                                "draw more neurons (neuron_count) or ask for fewer.")
            unused = split.train[config.train_neurons:]
            split = NeuronSplit(train=split.train[:config.train_neurons], validation=split.validation, held_out=split.held_out)
            dropped_for_curve = unused
        else:
            dropped_for_curve = []
        write_json(out / "neuron_split.json", {**split.to_dict(), "dropped_constant": dropped, "unused_train_neurons": dropped_for_curve})
        layer = max(Neuron.parse(n).layer for n in live)
        read_layer = config.read_layer_for(layer, num_layers(model))
        read_layer = num_layers(model) - 1 if read_layer is None else read_layer
        with timed("features"):  # the original model's representation: the head's closed-form start and the ridge probes
            features = {s: layer_features(model, dataset[s], [read_layer], batch_size=config.per_device_eval_batch_size,
                                          progress=False)[read_layer] for s in ("train", "validation", "test")}
        train_dd, train_meta = neuron_columns(dataset, metadata, split.train)  # never a held-out neuron's column
        reporters, training = {}, {}
        for conditioning in config.conditionings:
            folder = out / conditioning
            with timed(f"train ({conditioning})"):
                reporters[conditioning], training[conditioning] = (
                    trained_reporter(config, split.train, conditioning, folder)
                    or train_reporter(config, model, tokenizer, train_dd, train_meta, conditioning, read_layer, features, folder))
        with timed("evaluation"):
            per_neuron = score_groups(config, reporters, dataset, metadata, split, features)
    result = {"model": config.model, "head_type": config.head_type, "layers": sorted({Neuron.parse(n).layer for n in live}),
              "read_layer": read_layer,
              "unfreeze": config.unfreeze, "intervention_rate": config.intervention_rate, "conditionings": list(config.conditionings),
              "split": split.to_dict(), "dropped_constant": dropped, "unused_train_neurons": dropped_for_curve,
              "rows": {s: len(dataset[s]) for s in dataset},
              "summary": summarise(per_neuron, list(config.conditionings)), "per_neuron": per_neuron, "training": training,
              "stage_seconds": stage_seconds, "seconds": round(time.perf_counter() - start, 1)}
    plot_any_neuron(per_neuron, list(config.conditionings), out / "any_neuron.png")
    (out / "any_neuron.md").write_text(markdown(result))
    write_json(out / RESULT_FILE, to_jsonable(result))
    print(markdown(result).split("\n\nThe ridge")[0], flush=True)
    print(f"\nany-neuron result: {out / RESULT_FILE}", flush=True)
    dashboard = build_dashboard_after(out, what="any-neuron run")
    if dashboard:
        print(f"dashboard: {dashboard} (rebuild it with: nsr report {out})", flush=True)
    return result


def load_result(folder) -> dict:
    return json.loads((Path(folder) / RESULT_FILE).read_text())
