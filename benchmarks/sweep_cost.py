"""What a sweep costs per run: every run's seconds and where they went, next to the per-run cost of a reference run.

    python benchmarks/sweep_cost.py --output_dir outputs/bench_sweep --top_n 5 --seeds 0 1   # run the sweep, then the table
    python benchmarks/sweep_cost.py --sweep outputs/sweep --reference outputs/quickstart    # the table of a finished sweep
    python benchmarks/sweep_cost.py --sweep outputs/sweep --reference_seconds 417 --json cost.json

A sweep scans (and selects) once, then trains every neuron x seed (``nsr_hf.sweep``). Each run's ``metrics.json`` holds its
``seconds`` and ``stage_seconds`` (``nsr_hf.stage_clock``); the sweep's own scan and selection are read from its
``scan/`` folder's times when the sweep is run here. The per-run cost of the reference is what a run costs on its own:
its ``seconds`` less its scan and readability selection (a sweep does those once for all its runs), or
``--reference_seconds`` as given. The table: per run, its seconds and its largest stages; then the mean per run, the mean
of the first seed of each neuron (it builds the neuron's dataset) and of the later seeds (they reuse the dataset and what
the original model's passes gave on it: ``nsr_hf.pipeline.SharedPasses``), and the reference's per-run cost over the mean.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHARED_ONCE = ("scan", "readability selection")  # stages a sweep runs once for all its runs


def reference_cost(run: Path) -> float:
    """Seconds a run costs on its own, less what a sweep does once (its scan and readability selection)."""
    summary = json.loads((run / "metrics.json").read_text())
    stages = summary.get("stage_seconds") or {}
    return float(summary["seconds"]) - sum(float(stages.get(s, 0.0)) for s in SHARED_ONCE)


def run_rows(sweep: Path) -> list[dict]:
    """One row per run of the sweep (``sweep.json``'s order): neuron, seed, seconds and stage seconds."""
    record = json.loads((sweep / "sweep.json").read_text())
    rows = []
    for run in record["runs"]:
        path = Path(run["output_dir"]) / "metrics.json"
        if not path.is_file():
            rows.append({"neuron": run["neuron"], "seed": run["seed"], "seconds": None, "stages": {}, "status": run.get("status")})
            continue
        summary = json.loads(path.read_text())
        rows.append({"neuron": run["neuron"], "seed": run["seed"], "seconds": float(summary["seconds"]),
                     "stages": summary.get("stage_seconds") or {}, "status": run.get("status")})
    return rows


def summary(rows: list[dict], reference: float | None, seeds: list[int]) -> dict:
    """Means per run (all, first seed, later seeds) and the reference's per-run cost over the mean."""
    timed = [r for r in rows if r["seconds"] is not None]
    first = [r for r in timed if r["seed"] == seeds[0]]
    later = [r for r in timed if r["seed"] != seeds[0]]

    def mean(items):
        return sum(r["seconds"] for r in items) / len(items) if items else None

    out = {"timed_runs": len(timed), "mean_seconds": mean(timed), "first_seed_mean_seconds": mean(first),
           "later_seeds_mean_seconds": mean(later), "reference_seconds_per_run": reference}
    out["cheaper_than_reference"] = reference / out["mean_seconds"] if reference and out["mean_seconds"] else None
    return out


def markdown(rows: list[dict], figures: dict, once: dict) -> str:
    lines = ["| neuron | seed | seconds | largest stages |", "| --- | --- | --- | --- |"]
    for r in rows:
        top = sorted(((k, v) for k, v in r["stages"].items() if "/" not in k), key=lambda kv: -kv[1])[:4]
        stages = ", ".join(f"{k} {v:.0f}" for k, v in top)
        lines.append(f"| {r['neuron']} | {r['seed']} | {_s(r['seconds'])} | {stages} |")
    text = "\n".join(lines)
    parts = [f"{k} {v:.0f} s" for k, v in once.items()]
    text += ("\n\nOnce for the sweep: " + ", ".join(parts) + "." if parts else "")
    text += (f"\n\nMean per run: {figures['mean_seconds']:.0f} s over {figures['timed_runs']} runs (first seed of each neuron "
             f"{_s(figures['first_seed_mean_seconds'])}, later seeds {_s(figures['later_seeds_mean_seconds'])}).")
    if figures["reference_seconds_per_run"]:
        text += (f" A run on its own costs {figures['reference_seconds_per_run']:.0f} s (less its scan and selection): the sweep's "
                 f"runs are {figures['cheaper_than_reference']:.2f}x cheaper.")
    return text


def _s(value) -> str:
    """Seconds, rounded, or a dash."""
    return "–" if value is None else f"{value:.0f} s"


def machine_rate(recipe: str) -> float:
    """This machine's fp32 matmul rate on the recipe's model's shapes (``benchmarks/pipeline.py``'s ``matmul_rate``)."""
    import importlib.util

    import yaml

    from nsr_hf.models import load_model_config
    from nsr_hf.training.config import TrainConfig

    spec = importlib.util.spec_from_file_location("bench_pipeline", Path(__file__).with_name("pipeline.py"))
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    model = load_model_config((yaml.safe_load(Path(recipe).read_text()) or {}).get("model") or TrainConfig.model)
    hidden, inner = model.hidden_size, getattr(model, "intermediate_size", 4 * model.hidden_size)
    return pipeline.matmul_rate([(hidden, hidden), (hidden, inner), (inner, hidden)])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", type=Path, default=None, help="a finished sweep folder to read (else the sweep is run)")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/bench_sweep"), help="where the sweep is run")
    parser.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"))
    parser.add_argument("--top_n", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--reference", type=Path, default=None, help="a run folder whose per-run cost is the reference")
    parser.add_argument("--reference_seconds", type=float, default=None, help="or the reference per-run cost in seconds")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    sweep, once, rates = args.sweep, {}, {}
    if sweep is None:
        from nsr_hf.sweep import SweepConfig, run_sweep

        rates["before"] = machine_rate(args.recipe)
        start = time.perf_counter()
        result = run_sweep(SweepConfig(recipe=args.recipe, top_n=args.top_n, seeds=args.seeds, output_dir=str(args.output_dir)))
        sweep = args.output_dir
        runs = sum(float(json.loads((Path(r["output_dir"]) / "metrics.json").read_text())["seconds"])
                   for r in result["runs"] if (Path(r["output_dir"]) / "metrics.json").is_file())
        once["scan, selection and summary"] = time.perf_counter() - start - runs
        rates["after"] = machine_rate(args.recipe)
        print(f"Machine: {rates['before'] / 1e9:.1f} GFLOP/s before the sweep, {rates['after'] / 1e9:.1f} after (fp32 matmul, best of "
              "the model's shapes: benchmarks/pipeline.py). Wall times on a shared machine move with it.")
    seeds = json.loads((sweep / "sweep.json").read_text())["seeds"]
    reference = reference_cost(args.reference) if args.reference else args.reference_seconds
    rows = run_rows(sweep)
    figures = summary(rows, reference, seeds)
    print(markdown(rows, figures, once))
    result = {"sweep": str(sweep), "runs": rows, "once": once, "matmul_flops_per_second": rates, **figures}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
