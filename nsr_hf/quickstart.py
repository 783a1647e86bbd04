"""The main job on the embedded default: scan for a neuron worth self-reporting, build its dataset.

    nsr quickstart                          # SmolLM2-135M (embedded) on Python's own docs, offline
    nsr quickstart --model gpt2 --corpus hub:wikitext:wikitext-2-raw-v1:train   # online users

Steps, each written under ``output_dir``:

1. ``scan/``: scan the *training* documents (the split by document id that the dataset uses, so the
   choice of neuron never looks at validation or test documents) at the labelled position, and rank
   neurons; the neuron at ``neuron_rank`` is chosen unless ``neuron`` names one.
2. ``dataset/``: the activation dataset of that neuron (train / validation / test by document, bins and
   z-score statistics fitted on train), saved with its card.

Training the self-reporter on it is the next stage (``nsr_hf/train.py``, issue "PredictorTrainer").
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from nsr_hf.models import EMBEDDED_NAME


@dataclass
class QuickstartConfig:
    """Run the main job on the embedded default: scan a corpus for a neuron, then build its activation dataset."""

    model: str = field(default=EMBEDDED_NAME, metadata={"help": "HF model id, local folder, or 'smollm2-135m' (embedded)"})
    corpus: str = field(default="embedded", metadata={"help": "'embedded', a local file, 'synthetic', or a Hub dataset"})
    text_field: str = field(default="text", metadata={"help": "Column that holds the text (files and Hub datasets)"})
    layers: Optional[list[int]] = field(default=None, metadata={"help": "Layers to scan (default: all)"})
    scan_documents: int = field(default=300, metadata={"help": "Training documents to scan"})
    dataset_documents: int = field(default=1200, metadata={"help": "Documents of the dataset (all splits)"})
    max_length: int = field(default=128, metadata={"help": "Texts are cut to this many tokens"})
    position: str = field(default="last", metadata={"help": "The labelled token: 'last' or an integer index"})
    neuron_rank: int = field(default=1, metadata={"help": "Take the neuron at this rank of the scan (1 = best)"})
    neuron: Optional[str] = field(default=None, metadata={"help": "Use this neuron (layer.index) instead of the scan's choice"})
    split_seed: int = field(default=0, metadata={"help": "Seed of the split by document id"})
    output_dir: str = field(default="outputs/quickstart", metadata={"help": "Where everything is written"})

    def __post_init__(self):
        if self.neuron_rank < 1:
            raise ValueError(f"neuron_rank counts from 1 (the best neuron), got {self.neuron_rank}.")
        if self.scan_documents < 1 or self.dataset_documents < 10:
            raise ValueError("scan_documents must be >= 1 and dataset_documents >= 10 (three splits need documents).")


def run_quickstart(config: QuickstartConfig) -> dict:
    from nsr_hf.capture import validate_neuron
    from nsr_hf.corpus import load_corpus, split_of
    from nsr_hf.dataset_generator import DatasetConfig, run_dataset
    from nsr_hf.models import load_model_and_tokenizer, model_provenance
    from nsr_hf.scanner import ScanConfig, run_scan

    start = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(config.model)
    print(f"model: {config.model} ({model.config.model_type}, {model.config.num_hidden_layers} layers)", flush=True)

    corpus = load_corpus(config.corpus, text_field=config.text_field, model=model, tokenizer=tokenizer)
    docs = corpus.iter_documents(limit=config.dataset_documents)
    train_docs = [d for d in docs if split_of(d.doc_id, config.split_seed) == "train"][: config.scan_documents]

    if config.neuron:
        neuron = validate_neuron(model, config.neuron)
        scan = None
    else:
        scan_config = ScanConfig(
            model=config.model, corpus=config.corpus, layers=config.layers, position="last" if config.position == "last" else "all",
            max_documents=len(train_docs), max_length=config.max_length, top_n=10, output_dir=str(out / "scan"),
        )
        scan = run_scan(scan_config, model=model, tokenizer=tokenizer, source=train_docs)
        neuron = scan.neuron_at_rank(config.neuron_rank)
    print(f"\nchosen neuron: {neuron} (layer {neuron.layer}, index {neuron.index})", flush=True)

    dataset_config = DatasetConfig(
        neurons=[str(neuron)], model=config.model, corpus=config.corpus, text_field=config.text_field, position=config.position,
        max_length=config.max_length, max_documents=config.dataset_documents, split_seed=config.split_seed,
        output_dir=str(out / "dataset"), overwrite=True,
    )
    dataset = run_dataset(dataset_config, model=model, tokenizer=tokenizer)

    summary = {
        "model": model_provenance(model),
        "neuron": str(neuron),
        "scan_rank": None if scan is None else config.neuron_rank,
        "rows": {split: len(ds) for split, ds in dataset.items()},
        "seconds": round(time.perf_counter() - start, 1),
        "config": asdict(config),
        "outputs": {"scan": None if scan is None else str(out / "scan"), "dataset": str(out / "dataset")},
    }
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nquickstart finished in {summary['seconds']} s: neuron {neuron}, rows {summary['rows']}; everything is in {out}/")
    return summary
