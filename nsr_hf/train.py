"""Train a self-reporter: scan for a neuron, build its dataset, fine-tune the predictor, evaluate, save.

    python nsr_hf/train.py recipes/quickstart.yaml                          # a recipe
    python nsr_hf/train.py recipes/quickstart.yaml --learning_rate 3e-4     # a recipe and overrides
    accelerate launch nsr_hf/train.py recipes/regression.yaml               # several processes
    nsr train recipes/quickstart.yaml --unfreeze last_k --unfreeze_k 2

Configuration is ``TrainConfig``: its defaults, then the YAML recipe, then ``--key value`` flags, each value
coerced to the field's type (PyYAML reads ``2e-5`` as a string; an uncoercible value or an unknown key is a
clear error naming the field).

Steps (``run_train``), each written under ``output_dir``:

1. ``scan/``: unless ``neuron`` names one (``"layer.index"``) or ``dataset`` is given, scan the *training*
   documents only (as ``nsr quickstart`` does) and take the neuron at rank ``neuron`` (``"auto"`` = 1).
2. ``dataset/``: the activation dataset (train / validation / test by document, transforms fitted on train),
   or ``dataset`` (a folder or Hub id made by ``nsr dataset``) loaded instead.
3. ``PredictorTrainer`` on train (validation for evaluation during training), the unfreezing strategy applied.
4. ``metrics.json``: validation and test metrics (activation units), the trainable parameter count, and the
   target neuron's drift (its live value after training against the labels from the frozen original model);
   ``predictor/``: the predictor (or its adapter) with its card, tokenizer and label transform.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from nsr_hf.models import EMBEDDED_NAME

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Train a self-reporter for one neuron: scan, dataset, fine-tune, evaluate (a recipe's fields)."""

    model: str = field(default=EMBEDDED_NAME, metadata={"help": "HF model id, local folder, or 'smollm2-135m' (embedded)"})
    corpus: str = field(default="embedded", metadata={"help": "'embedded', a local file, 'synthetic', or a Hub dataset ('hub:NAME[:CONFIG[:SPLIT]]')"})
    text_field: str = field(default="text", metadata={"help": "Column that holds the text (files and Hub datasets)"})
    neuron: str = field(default="auto", metadata={"help": "'auto' (the scan's best), a scan rank (e.g. 3), or a neuron 'layer.index' (quote it in YAML)"})
    layers: Optional[list[int]] = field(default=None, metadata={"help": "Layers to scan (default: all)"})
    scan_documents: int = field(default=600, metadata={"help": "Training documents to scan"})
    dataset: Optional[str] = field(default=None, metadata={"help": "Load this activation dataset (folder or Hub id) instead of building one"})
    dataset_documents: int = field(default=1500, metadata={"help": "Documents of the built dataset (all splits)"})
    max_length: int = field(default=128, metadata={"help": "Texts are cut to this many tokens"})
    position: str = field(default="last", metadata={"help": "The labelled token: 'last' or an integer index"})
    num_bins: int = field(default=10, metadata={"help": "Bins of the classification and token heads"})
    split_seed: int = field(default=0, metadata={"help": "Seed of the split by document id"})
    head_type: str = field(default="regression", metadata={"help": "'regression', 'classification' or 'token'"})
    read_layer: Optional[int] = field(default=None, metadata={"help": "Block whose output the head reads (default: the last)"})
    unfreeze: str = field(default="head_only", metadata={"help": "head_only, last_k, after_target, full, lora or gradual (nsr_hf.unfreezing)"})
    unfreeze_k: Optional[int] = field(default=None, metadata={"help": "Blocks for last_k (and lora: LoRA on the last k blocks only)"})
    unfreeze_every_n_steps: int = field(default=50, metadata={"help": "gradual: steps between two blocks joining"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over train"})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: use num_train_epochs)"})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Rows per step and process"})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Rows per evaluation batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step"})
    eval_strategy: str = field(default="epoch", metadata={"help": "Evaluate on validation during training: 'no', 'steps' or 'epoch'"})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "With eval_strategy 'steps'"})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every this many steps"})
    seed: int = field(default=0, metadata={"help": "Seed of the head's initialisation and of the data order"})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision (GPUs that support it)"})
    report_to: str = field(default="none", metadata={"help": "'none', 'wandb', 'tensorboard', ... (set explicitly: transformers 5 defaults to none)"})
    output_dir: str = field(default="outputs/train", metadata={"help": "Where everything is written"})
    push_to_hub: Optional[str] = field(default=None, metadata={"help": "Push the saved predictor to this Hub repo id (owner/name)"})

    def __post_init__(self):
        from nsr_hf.predictor import HEAD_TYPES
        from nsr_hf.unfreezing import STRATEGIES

        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name), hints[f.name]))
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {', '.join(HEAD_TYPES)}, got {self.head_type!r}.")
        if self.unfreeze not in STRATEGIES:
            raise ValueError(f"unfreeze must be one of {', '.join(STRATEGIES)}, got {self.unfreeze!r}.")
        if self.unfreeze == "last_k" and self.unfreeze_k is None:
            raise ValueError("unfreeze 'last_k' needs unfreeze_k (how many blocks, counted down from the block the head reads).")
        self.neuron_choice()  # validates
        if self.position != "last":
            try:
                int(self.position)
            except ValueError:
                raise ValueError(f"position must be 'last' or an integer token index, got {self.position!r}.") from None
        for name in ("scan_documents", "max_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "lora_r", "unfreeze_every_n_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.dataset is None and self.dataset_documents < 10:
            raise ValueError("dataset_documents must be at least 10 (three splits need documents).")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}.")

    def neuron_choice(self) -> "int | str":
        """The scan rank to take (an int) or a neuron name ``"layer.index"``."""
        from nsr_hf.capture import Neuron

        text = str(self.neuron).strip()
        if text == "auto":
            return 1
        if text.isdigit():
            if int(text) < 1:
                raise ValueError("neuron: a scan rank counts from 1 (the best neuron).")
            return int(text)
        try:
            return str(Neuron.parse(text))
        except ValueError:
            raise ValueError(f"neuron must be 'auto', a scan rank (1, 2, ...) or 'layer.index', got {self.neuron!r}.") from None


# ----------------------------------------------------------------------------------------------------------
# Recipes: defaults < YAML < --key value


_NONE = ("none", "null", "~", "")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce(name: str, value, annotation):
    """``value`` (from YAML or the command line) as ``annotation``; a ValueError names the field otherwise."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        (annotation,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)

    def fail(expected: str):
        return ValueError(f"{name}: expected {expected}, got {value!r}.")

    if origin is list:
        items = value.replace(",", " ").split() if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise fail(f"a list of {args[0].__name__}")
        return [coerce(name, item, args[0]) for item in items]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise fail("true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise fail("an integer")
        try:
            number = float(value) if isinstance(value, str) else value
            if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                return int(value)
            if float(number) != int(number):
                raise ValueError
            return int(number)
        except (TypeError, ValueError, OverflowError):
            raise fail("an integer") from None
    if annotation is float:
        if isinstance(value, bool):
            raise fail("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise fail("a number") from None
    if annotation is str:
        if isinstance(value, float) and name == "neuron":
            # YAML reads 12.340 as the float 12.34: the neuron would silently become 12.34
            raise ValueError(f"neuron: write a neuron as a quoted string ('12.340'): YAML read {value!r} as a number.")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise fail("a string")
        return str(value)
    return value


def valid_keys() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def check_keys(values: dict, where: str) -> None:
    unknown = sorted(set(values) - set(valid_keys()))
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in {where}. Valid keys: {', '.join(valid_keys())}.")


def load_recipe(path: "str | os.PathLike") -> dict:
    """The recipe's values (a flat YAML mapping of ``TrainConfig`` fields), keys checked."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a flat mapping of TrainConfig fields, got {type(data).__name__}.")
    check_keys(data, str(path))
    return data


def parse_overrides(argv: list[str]) -> dict:
    """``--key value`` / ``--key=value`` pairs (a flag with no value means true)."""
    values, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"Expected --key value, got {arg!r}.")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"
        values[key.replace("-", "_")] = value
        i += 1
    check_keys(values, "the command line")
    return values


def parse_config(argv: list[str]) -> TrainConfig:
    """``[recipe.yaml] [--key value ...]`` -> ``TrainConfig`` (defaults < recipe < command line)."""
    values = {}
    if argv and not argv[0].startswith("--"):
        values.update(load_recipe(argv[0]))
        argv = argv[1:]
    values.update(parse_overrides(argv))
    return TrainConfig(**values)


def usage() -> str:
    lines = ["usage: python nsr_hf/train.py [recipe.yaml] [--key value ...]", "", (TrainConfig.__doc__ or "").strip(), "", "keys:"]
    for f in fields(TrainConfig):
        default = f.default if f.default is not f.default_factory else None
        lines.append(f"  --{f.name:<30} {f.metadata.get('help', '')} (default: {default!r})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The pipeline


def choose_neuron_and_build_dataset(config: TrainConfig, model, tokenizer, out: Path):
    """(DatasetDict, metadata, scan rank or None): load ``config.dataset``, or scan the train documents and build the dataset."""
    from nsr_hf.capture import validate_neuron
    from nsr_hf.corpus import load_corpus, split_of
    from nsr_hf.dataset_generator import DatasetConfig, load_activation_dataset, run_dataset
    from nsr_hf.scanner import ScanConfig, run_scan

    if config.dataset:
        dataset, metadata = load_activation_dataset(config.dataset)
        labelled_by = (metadata.get("model") or {}).get("name")
        if labelled_by and labelled_by != config.model:
            # self-report needs labels from this very model; another model's labels make it cross-prediction
            logger.warning("The dataset was labelled by %r but the model is %r: this trains cross-prediction, not self-report.", labelled_by, config.model)
        return dataset, metadata, None
    choice = config.neuron_choice()
    rank = None
    if isinstance(choice, str):
        neuron = validate_neuron(model, choice)
    else:
        corpus = load_corpus(config.corpus, text_field=config.text_field, model=model, tokenizer=tokenizer)
        docs = corpus.iter_documents(limit=config.dataset_documents)
        # the neuron is chosen on train documents only, never on validation or test ones
        train_docs = [d for d in docs if split_of(d.doc_id, config.split_seed) == "train"][: config.scan_documents]
        scan = run_scan(ScanConfig(model=config.model, corpus=config.corpus, layers=config.layers, position="last" if config.position == "last" else "all",
                                   max_documents=len(train_docs), max_length=config.max_length, top_n=10, output_dir=str(out / "scan")),
                        model=model, tokenizer=tokenizer, source=train_docs)
        neuron, rank = scan.neuron_at_rank(choice), choice
    print(f"\nneuron: {neuron}" + (f" (scan rank {rank})" if rank else ""), flush=True)
    run_dataset(DatasetConfig(neurons=[str(neuron)], model=config.model, corpus=config.corpus, text_field=config.text_field,
                              position=config.position, max_length=config.max_length, max_documents=config.dataset_documents,
                              split_seed=config.split_seed, num_bins=config.num_bins, output_dir=str(out / "dataset"), overwrite=True),
                model=model, tokenizer=tokenizer)
    dataset, metadata = load_activation_dataset(out / "dataset")
    return dataset, metadata, rank


def neuron_drift(trained_base, rows, neurons, position, batch_size: int = 32) -> dict:
    """How far the target neurons moved: their live values in ``trained_base`` at each row's labelled token
    against the ``activations`` column (the frozen original model's values). Units: activations."""
    import numpy as np
    import torch

    from nsr_hf.capture import capture_activations
    from nsr_hf.trainer import PredictorDataCollator

    collate = PredictorDataCollator(pad_token_id=0)
    live, ref = [], []
    device = next(trained_base.parameters()).device
    for start in range(0, len(rows), batch_size):
        batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        cap = capture_activations(trained_base, {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}, neurons, position=position)
        values = []
        for name in neurons:
            layer, index = (int(x) for x in name.split("."))
            col = cap.neuron_indices[layer].tolist().index(index)
            values.append(cap[layer][:, col].float().cpu())
        live.append(torch.stack(values, 1))
        ref.append(batch["labels"])
    live, ref = torch.cat(live).numpy().astype(np.float64), torch.cat(ref).numpy().astype(np.float64)
    diff = np.abs(live - ref)
    std = ref.std(0)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "mean_abs_over_std": float(np.mean(diff.mean(0) / np.where(std > 0, std, 1.0))), "rows": len(ref)}


def run_train(config: TrainConfig) -> dict:
    """``nsr train``: the whole pipeline (module docstring); returns the summary written to ``metrics.json``."""
    import torch
    from transformers import TrainingArguments, set_seed

    from nsr_hf.dataset_generator import parse_position
    from nsr_hf.models import load_model_and_tokenizer, model_provenance
    from nsr_hf.predictor import ActivationPredictor, save_predictor
    from nsr_hf.trainer import PredictorTrainer, _unwrap, count_parameters

    start = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    if config.unfreeze == "gradual" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("gradual unfreezing adds parameters after DDP has registered them (their gradients would not be "
                         "synchronised): run it in one process, or use last_k / after_target / lora.")
    model, tokenizer = load_model_and_tokenizer(config.model)
    dataset, metadata, rank = choose_neuron_and_build_dataset(config, model, tokenizer, out)
    neurons = list(metadata["neurons"])
    empty = [s for s in ("train", "validation") if s not in dataset or len(dataset[s]) == 0]
    if empty:
        raise ValueError(f"The dataset has no rows in {empty}: use more documents (dataset_documents).")

    position = parse_position(config.position if not config.dataset else metadata.get("position", "last"))
    predictor = ActivationPredictor.from_base(model, tokenizer, neurons=neurons, head_type=config.head_type, read_layer=config.read_layer,
                                              position=position, label_transform=metadata["transform"], num_bins=config.num_bins,
                                              dataset_name=config.dataset or str(out / "dataset"))
    del model  # the predictor holds its own copy of the base weights
    eval_strategy = config.eval_strategy if len(dataset["validation"]) else "no"
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps, num_train_epochs=config.num_train_epochs, max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size, per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, eval_strategy=eval_strategy, eval_steps=config.eval_steps,
        logging_steps=config.logging_steps, save_strategy="no", seed=config.seed, bf16=config.bf16, report_to=config.report_to,
        remove_unused_columns=False, label_names=["labels"],
        # every trainable parameter reaches the loss by construction of the strategies (blocks after read_layer stay frozen)
        ddp_find_unused_parameters=False, disable_tqdm=not sys.stderr.isatty(), dataloader_pin_memory=torch.cuda.is_available(),
    )
    unfreeze = {"strategy": config.unfreeze, "k": config.unfreeze_k, "lora_r": config.lora_r, "every_n_steps": config.unfreeze_every_n_steps}
    trainer = PredictorTrainer(model=predictor, args=args, train_dataset=dataset["train"],
                               eval_dataset=dataset["validation"] if len(dataset["validation"]) else None, unfreeze=unfreeze)
    trainable, total = count_parameters(trainer.model)
    train_result = trainer.train()

    metrics = {}
    for split in ("validation", "test", "test_ood"):
        if split in dataset and len(dataset[split]):
            metrics[split] = trainer.evaluate(dataset[split], metric_key_prefix=split)
    inner = _unwrap(trainer.model)
    check_split = next((s for s in ("test", "validation", "train") if s in dataset and len(dataset[s])), "train")
    inner.eval()
    with torch.no_grad():
        drift = neuron_drift(inner.base, dataset[check_split], neurons, position)
    drift["split"] = check_split
    summary = {
        "model": model_provenance(inner.base),
        "neurons": neurons,
        "scan_rank": rank,
        "head_type": config.head_type,
        "unfreeze": config.unfreeze,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "rows": {split: len(ds) for split, ds in dataset.items()},
        "train": {k: v for k, v in train_result.metrics.items() if isinstance(v, (int, float))},
        "metrics": metrics,
        "neuron_drift": drift,
        "seconds": round(time.perf_counter() - start, 1),
        "config": asdict(config),
    }
    if trainer.is_world_process_zero():
        inner.evaluation_results = {split: {k.removeprefix(f"{split}_"): v for k, v in m.items()} for split, m in metrics.items()}
        save_predictor(trainer.model, str(out / "predictor"))
        (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
        if config.push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(config.push_to_hub, exist_ok=True)
            api.upload_folder(folder_path=str(out / "predictor"), repo_id=config.push_to_hub, commit_message="Upload nsr_hf predictor")
            print(f"pushed to https://huggingface.co/{config.push_to_hub}")
        test = metrics.get("test") or metrics.get("validation") or {}
        shown = {k: round(v, 4) for k, v in test.items() if k.split("_", 1)[-1] in ("pearson", "r2", "mse", "loss")}
        print(f"\ntrain finished in {summary['seconds']} s: neuron(s) {', '.join(neurons)}, {shown}, drift max {drift['max_abs']:.3g}; "
              f"everything is in {out}/", flush=True)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    try:
        config = parse_config(argv)
        run_train(config)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
