"""The ``nsr`` command: one sub-command per stage, each configured by a dataclass.

    nsr quickstart                                   # the main job on the embedded default
    nsr scan --layers 10 11 12 --top_n 20 --output_dir outputs/scan
    nsr dataset --neurons 15.100 --max_documents 2000 --output_dir outputs/dataset
    nsr capture --neurons 12.345 --corpus embedded --max_documents 5
    nsr evaluate --predictor outputs/train/predictor --output_dir outputs/evaluate
    nsr sweep recipes/quickstart.yaml --top_n 5 --seeds 0 1 --output_dir outputs/sweep
    nsr report outputs/quickstart                    # the dashboard of a run or a sweep (built by the commands above too)

Flags are the fields of the stage's config dataclass (``nsr <command> --help`` lists them with their
help); every command also takes a YAML recipe of those fields first, and the flags override it. One parser reads
them all: ``nsr_hf.parsing.RecipeParser`` (a ``transformers.HfArgumentParser``).
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nsr_hf.capture import capture_activations, encode_texts, parse_position, validate_neuron, validate_position
from nsr_hf.dashboard import build_dashboard, build_dashboard_after
from nsr_hf.dashboard.build import dashboard_owner
from nsr_hf.data.corpus import load_corpus
from nsr_hf.data.generator import DatasetConfig, run_dataset
from nsr_hf.data.preflight import check_neurons
from nsr_hf.errors import UserError, debug_requested, error_boundary
from nsr_hf.evaluation.protocol import EvaluateConfig, run_evaluate
from nsr_hf.models import load_model_and_tokenizer, load_model_config
from nsr_hf.parsing import RecipeParser
from nsr_hf.pipeline import main as train_main
from nsr_hf.pipeline import run_train
from nsr_hf.quickstart import quickstart_help, run_quickstart
from nsr_hf.scanner import ScanConfig, run_scan
from nsr_hf.shared_config import CorpusFields
from nsr_hf.sweep import SweepConfig, run_sweep
from nsr_hf.sweep import main as sweep_main
from nsr_hf.training.config import TrainConfig
from nsr_hf.utils import write_json


@dataclass
class CaptureConfig(CorpusFields):
    """Print (and optionally save) neuron values for the documents of a corpus."""

    neurons: list[str] = field(kw_only=True, metadata={"help": "Neurons as layer.index, e.g. 12.345 12.7"})
    max_documents: int = field(default=8, metadata={"help": "How many documents to read"})
    position: str = field(default="last", metadata={"help": "'last', 'max', or an integer token index (0 first, -1 last)"})
    max_length: int = field(default=256, metadata={"help": "Texts are cut to this many tokens"})
    batch_size: int = field(default=8, metadata={"help": "Texts per forward pass"})
    output: str | None = field(default=None, metadata={"help": "Write the values here as JSON"})


def run_capture(config: CaptureConfig) -> list[dict]:
    from tqdm.auto import tqdm

    position = validate_position(parse_position(config.position))
    if position == "all":
        raise ValueError("nsr capture prints one value per document: use position 'last', 'max' or an integer.")
    if config.output and Path(config.output).is_dir():  # found now, not after the model ran
        raise UserError(f"--output {config.output!r} is a folder: give the path of a JSON file to write "
                        f"(e.g. {config.output}/values.json).")
    check_neurons(load_model_config(config.model), config.neurons, config.model)  # from the config: before the weights load
    model, tokenizer = load_model_and_tokenizer(config.model)
    neurons = [validate_neuron(model, n) for n in config.neurons]
    corpus = load_corpus(config.corpus, text_field=config.text_field, model=model, tokenizer=tokenizer)
    docs = list(corpus.iter_documents(limit=config.max_documents))
    if not docs:
        raise ValueError(f"The corpus {config.corpus!r} yielded no documents.")
    rows = []
    for start in tqdm(range(0, len(docs), config.batch_size), desc="capture", unit="batch"):
        chunk = docs[start : start + config.batch_size]
        batch = encode_texts(tokenizer, [d.text for d in chunk], max_length=config.max_length)
        cap = capture_activations(model, batch, neurons, position=position)
        for i, doc in enumerate(chunk):
            values = {}
            for n in neurons:
                col = cap.neuron_indices[n.layer].tolist().index(n.index)
                pos = int(cap.positions[n.layer][i, col])
                values[str(n)] = {
                    "value": float(cap[n.layer][i, col]),
                    "token_index": pos,
                    "token": tokenizer.decode(batch["input_ids"][i, pos : pos + 1]),
                }
            rows.append({"doc_id": doc.doc_id, "text": doc.text, "neurons": values})
    print(format_capture_table(rows, neurons))
    if config.output:
        write_json(config.output, {"config": asdict(config), "rows": rows}, indent=2)
    return rows


def format_capture_table(rows: list[dict], neurons) -> str:
    names = [str(n) for n in neurons]
    header = f"{'document':<36} {'text':<44} " + " ".join(f"{name:>12}" for name in names)
    lines = [header, "-" * len(header)]
    for row in rows:
        text = " ".join(row["text"].split())
        text = text[:41] + "..." if len(text) > 44 else text
        values = " ".join(f"{row['neurons'][name]['value']:>12.4f}" for name in names)
        lines.append(f"{row['doc_id'][:36]:<36} {text:<44} {values}")
    return "\n".join(lines)


def _quickstart(argv: list[str]) -> int:
    argv, debug = debug_requested(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(quickstart_help())
        return 0

    def run() -> None:
        run_quickstart(argv)

    return error_boundary("nsr quickstart", run, debug=debug)


def _stage(name: str, argv: list[str]) -> int:
    """``nsr <stage> [recipe.yaml] [--flag value ...]`` for the stages configured by one dataclass."""
    config_cls, run = COMMANDS[name]
    argv, debug = debug_requested(argv)
    parser = RecipeParser(config_cls, prog=f"nsr {name}", description=(config_cls.__doc__ or "").strip())
    if any(a in ("-h", "--help") for a in argv):
        print(parser.format_help())
        return 0

    def parse_and_run() -> None:
        (config,) = parser.parse(argv)  # __post_init__ validates
        run(config)

    return error_boundary(f"nsr {name}", parse_and_run, debug=debug)


def evaluate_and_report(config: EvaluateConfig) -> dict:
    """``nsr evaluate``: ``run_evaluate``, then the dashboard of the run that holds the evaluation (an output_dir that is a
    train run's ``evaluation/``) or else of the evaluation's own folder. The evaluation is saved before: a dashboard that
    cannot be built costs nothing but itself."""
    evaluation = run_evaluate(config)
    dashboard = build_dashboard_after(dashboard_owner(config.output_dir), what="evaluation")
    if dashboard:
        print(f"dashboard: {dashboard}", flush=True)
    return evaluation


REPORT_USAGE = ("usage: nsr report RUN_OR_SWEEP_DIR [--debug]\n\nBuild (again) the dashboard of a run folder (nsr train, nsr quickstart, "
                "nsr evaluate) or a sweep folder (nsr sweep): <folder>/dashboard/index.html, one self-contained page that opens from "
                "disk (a sweep's page links every run's page, rebuilt too). It reads the folder's files only, never a model.")


def _report(argv: list[str]) -> int:
    argv, debug = debug_requested(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(REPORT_USAGE)
        return 0

    def run() -> None:
        if len(argv) != 1 or argv[0].startswith("-"):
            raise UserError(f"nsr report takes one folder (a run or a sweep), got {argv or 'nothing'}: nsr report outputs/quickstart")
        print(f"dashboard: {build_dashboard(argv[0])}", flush=True)

    return error_boundary("nsr report", run, debug=debug)


# name -> (its config dataclass, what runs it); the quickstart is a recipe of TrainConfig and report takes a folder, so neither
# has a dataclass of its own
COMMANDS = {
    "capture": (CaptureConfig, run_capture),
    "scan": (ScanConfig, run_scan),
    "dataset": (DatasetConfig, run_dataset),
    "quickstart": (None, run_quickstart),
    "train": (TrainConfig, run_train),
    "evaluate": (EvaluateConfig, evaluate_and_report),
    "sweep": (SweepConfig, run_sweep),
    "report": (None, build_dashboard),
}
SUMMARIES = {"quickstart": "The main job on the embedded default: recipes/quickstart.yaml (scan, dataset, train, evaluate) "
                           "into outputs/quickstart.",
             "report": "The dashboard of a run or a sweep folder: <folder>/dashboard/index.html (nsr report FOLDER)."}


def usage() -> str:
    lines = ["usage: nsr <command> [recipe.yaml] [--flag value ...]", "", "commands:"]
    for name, (config_cls, _) in COMMANDS.items():
        summary = SUMMARIES[name] if config_cls is None else (config_cls.__doc__ or "").strip().splitlines()[0]
        lines.append(f"  {name:<12} {summary}")
    return "\n".join(lines + ["", "`nsr <command> --help` lists a command's flags; `--debug` on any command (or NSR_DEBUG=1) shows "
                               "the full traceback of an error."])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(usage())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nnsr: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    if argv[0] == "sweep":  # [recipe.yaml] [--sweep flags] [--TrainConfig key value ...]
        return sweep_main(argv[1:])
    if argv[0] == "train":  # [recipe.yaml] [--key value ...]: defaults < recipe < command line (nsr_hf/train.py)
        return train_main(argv[1:], prog="nsr train")
    if argv[0] == "quickstart":
        return _quickstart(argv[1:])
    if argv[0] == "report":
        return _report(argv[1:])
    return _stage(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
