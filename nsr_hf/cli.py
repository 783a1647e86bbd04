"""The ``nsr`` command: one sub-command per stage, each configured by a dataclass.

    nsr quickstart                                   # the main job on the embedded default
    nsr scan --layers 10 11 12 --top_n 20 --output_dir outputs/scan
    nsr dataset --neurons 15.100 --max_documents 2000 --output_dir outputs/dataset
    nsr capture --neurons 12.345 --corpus embedded --max_documents 5
    nsr evaluate --predictor outputs/train/predictor --output_dir outputs/evaluate
    nsr sweep recipes/quickstart.yaml --top_n 5 --seeds 0 1 --output_dir outputs/sweep
    nsr any-neuron recipes/any_neuron.yaml           # one reporter for many neurons, scored on neurons it never saw
    nsr report outputs/quickstart                    # the dashboard of a run or a sweep (built by the commands above too)

Flags are the fields of the stage's config dataclass (``nsr <command> --help`` lists them with their
help); every command also takes a YAML recipe of those fields first, and the flags override it. One parser reads
them all: ``nsr_hf.parsing.RecipeParser`` (a ``transformers.HfArgumentParser``).
"""
from __future__ import annotations

import sys
from importlib import import_module
from typing import TYPE_CHECKING

from nsr_hf.errors import UserError, debug_requested, error_boundary
from nsr_hf.utils import command_recorded

if TYPE_CHECKING:
    from nsr_hf.evaluation.protocol import EvaluateConfig


def _quickstart(argv: list[str]) -> int:
    from nsr_hf.quickstart import quickstart_help, run_quickstart

    argv, debug = debug_requested(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(quickstart_help())
        return 0

    def run() -> None:
        run_quickstart(argv)

    return error_boundary("nsr quickstart", run, debug=debug)


def _stage(name: str, argv: list[str]) -> int:
    """``nsr <stage> [recipe.yaml] [--flag value ...]`` for the stages configured by one dataclass."""
    from nsr_hf.parsing import RecipeParser

    config_cls, run = command(name)
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
    from nsr_hf.dashboard import build_dashboard_after
    from nsr_hf.dashboard.build import dashboard_owner
    from nsr_hf.evaluation.protocol import run_evaluate

    evaluation = run_evaluate(config)
    dashboard = build_dashboard_after(dashboard_owner(config.output_dir), what="evaluation")
    if dashboard:
        print(f"dashboard: {dashboard}", flush=True)
    return evaluation


REPORT_USAGE = ("usage: nsr report RUN_OR_SWEEP_DIR [--debug]\n\nBuild (again) the dashboard of a run folder (nsr train, nsr quickstart, "
                "nsr evaluate) or a sweep folder (nsr sweep): <folder>/dashboard/index.html, one self-contained page that opens from "
                "disk (a sweep's page links every run's page, rebuilt too). It reads the folder's files only, never a model.")


def _report(argv: list[str]) -> int:
    """``nsr report FOLDER``: the dashboard only, without torch or transformers (a few seconds)."""
    from nsr_hf.dashboard import build_dashboard

    argv, debug = debug_requested(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(REPORT_USAGE)
        return 0

    def run() -> None:
        if len(argv) != 1 or argv[0].startswith("-"):
            raise UserError(f"nsr report takes one folder (a run or a sweep), got {argv or 'nothing'}: nsr report outputs/quickstart")
        print(f"dashboard: {build_dashboard(argv[0])}", flush=True)

    return error_boundary("nsr report", run, debug=debug)


# name -> (its config dataclass, what runs it), each as "module:name", imported when the command runs (``command``): a command
# loads only what it needs, so that ``nsr report`` starts without torch. The quickstart is a recipe of TrainConfig and report
# takes a folder, so neither has a dataclass of its own.
COMMANDS = {
    "capture": ("nsr_hf.capture_command:CaptureConfig", "nsr_hf.capture_command:run_capture"),
    "scan": ("nsr_hf.scanner:ScanConfig", "nsr_hf.scanner:run_scan"),
    "dataset": ("nsr_hf.data.generator:DatasetConfig", "nsr_hf.data.generator:run_dataset"),
    "quickstart": (None, "nsr_hf.quickstart:run_quickstart"),
    "train": ("nsr_hf.training.config:TrainConfig", "nsr_hf.pipeline:run_train"),
    "evaluate": ("nsr_hf.evaluation.protocol:EvaluateConfig", "nsr_hf.cli:evaluate_and_report"),
    "sweep": ("nsr_hf.sweep:SweepConfig", "nsr_hf.sweep:run_sweep"),
    "any-neuron": ("nsr_hf.any_neuron:AnyNeuronConfig", "nsr_hf.any_neuron:run_any_neuron"),
    "report": (None, "nsr_hf.dashboard:build_dashboard"),
}


def _load(name: str | None):
    if name is None:
        return None
    module, attribute = name.split(":")
    return getattr(import_module(module), attribute)


def command(name: str) -> tuple:
    """``(config dataclass or None, the function that runs it)`` of the command ``name``, imported now."""
    config_cls, run = COMMANDS[name]
    return _load(config_cls), _load(run)


SUMMARIES = {"quickstart": "The main job on the embedded default: recipes/quickstart.yaml (scan, dataset, train, evaluate) "
                           "into outputs/quickstart.",
             "report": "The dashboard of a run or a sweep folder: <folder>/dashboard/index.html (nsr report FOLDER)."}


def usage() -> str:
    lines = ["usage: nsr <command> [recipe.yaml] [--flag value ...]", "", "commands:"]
    for name in COMMANDS:
        config_cls, _ = command(name)
        summary = SUMMARIES[name] if config_cls is None else (config_cls.__doc__ or "").strip().splitlines()[0]
        lines.append(f"  {name:<12} {summary}")
    return "\n".join(lines + ["", "`nsr <command> --help` lists a command's flags; `--debug` on any command (or NSR_DEBUG=1) shows "
                               "the full traceback of an error."])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with command_recorded(["nsr", *argv]):  # what a run records as the command that produced it
        return _main(argv)


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(usage())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nnsr: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    if argv[0] == "sweep":  # [recipe.yaml] [--sweep flags] [--TrainConfig key value ...]
        from nsr_hf.sweep import main as sweep_main

        return sweep_main(argv[1:])
    if argv[0] == "train":  # [recipe.yaml] [--key value ...]: defaults < recipe < command line (nsr_hf/train.py)
        from nsr_hf.pipeline import main as train_main

        return train_main(argv[1:], prog="nsr train")
    if argv[0] == "quickstart":
        return _quickstart(argv[1:])
    if argv[0] == "report":
        return _report(argv[1:])
    return _stage(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
