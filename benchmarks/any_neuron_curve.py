"""Held-out R² of an any-neuron reporter against the number of neurons it trains on, and what each point costs.

    python benchmarks/any_neuron_curve.py --output_dir outputs/any_curve --points 8 24 48 80     # the embedded default
    python benchmarks/any_neuron_curve.py --output_dir outputs/any_curve --points 8 16 --recipe recipes/any_neuron.yaml \\
        --set neuron_count=64 --set held_out_neurons=24
    python benchmarks/any_neuron_curve.py --curve outputs/any_curve                             # the table of a finished curve

Every point is ``nsr any-neuron`` (``nsr_hf.any_neuron``) with the recipe and ``train_neurons`` N: the same draw of neurons,
the same held-out and validation neurons (``neuron_seed``), and the first N of the train group. The first point builds the
activation dataset of all the drawn neurons; the others read it (``dataset``), so every point scores the same rows. Each
point scores the held-out neurons only (``scored_groups``) and records its seconds. Writes ``curve.json``, ``curve.md`` and
``curve.png`` in ``output_dir``: per point, the held-out medians of each reporter's natural R² and slope ratio, the ridge
probes' median R² (the reference: each probe sees its own neuron's labels), the training seconds and the point's seconds.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def point_row(folder: Path, seconds: float | None = None) -> dict:
    """One point of the curve from its run folder's ``any_neuron.json``."""
    result = json.loads((folder / "any_neuron.json").read_text())
    held = result["summary"]["held_out"]
    row = {"train_neurons": len(result["split"]["train"]), "held_out_neurons": held["neurons"], "ridge_probe_r2": held["ridge_probe_r2"],
           "seconds": seconds if seconds is not None else result.get("seconds"),
           "train_seconds": {c: t.get("train_seconds") for c, t in result["training"].items()}}
    for c in result["conditionings"]:
        row[c] = held[c]
    return row


def markdown(rows: list[dict]) -> str:
    conditionings = [k for k in rows[0] if isinstance(rows[0][k], dict) and "natural_r2" in rows[0][k]]

    def num(x):
        return "–" if x is None else f"{x:.3f}"

    lines = ["| train neurons | held-out | " + " | ".join(f"{c} R² | {c} slope ratio" for c in conditionings)
             + " | ridge probe R² | training s | point s |",
             "| --- | --- | " + " | ".join("--- | ---" for _ in conditionings) + " | --- | --- | --- |"]
    for r in rows:
        cells = " | ".join(f"{num(r[c]['natural_r2'])} | {num(r[c]['slope_ratio'])}" for c in conditionings)
        train_s = sum(v or 0 for v in r["train_seconds"].values())
        lines.append(f"| {r['train_neurons']} | {r['held_out_neurons']} | {cells} | {num(r['ridge_probe_r2'])} | {train_s:.0f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    from nsr_hf.plotting import new_figure, save_figure

    fig, ax = new_figure(6, 4)
    x = [r["train_neurons"] for r in rows]
    conditionings = [k for k in rows[0] if isinstance(rows[0][k], dict) and "natural_r2" in rows[0][k]]
    for i, c in enumerate(conditionings):
        ax.plot(x, [r[c]["natural_r2"] for r in rows], "o-", color=f"C{i}", label=f"{c}: median R² (held-out neurons)")
        ax.plot(x, [r[c]["slope_ratio"] for r in rows], "s--", color=f"C{i}", alpha=0.6, label=f"{c}: median slope ratio")
    ax.plot(x, [r["ridge_probe_r2"] for r in rows], "k:", label="ridge probe per neuron (own labels)")
    ax.axhline(0.7, color="grey", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("train neurons")
    ax.set_ylim(-0.5, 1.05)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/any_neuron.yaml")
    parser.add_argument("--points", type=int, nargs="+", default=[8, 24, 48, 80])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/any_curve"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe key for every point")
    parser.add_argument("--curve", type=Path, default=None, help="a finished curve's output_dir: print its table only")
    args = parser.parse_args(argv)
    if args.curve is not None:
        rows = json.loads((args.curve / "curve.json").read_text())
        print(markdown(rows))
        return rows
    from nsr_hf.any_neuron import AnyNeuronConfig, run_any_neuron
    from nsr_hf.parsing import RecipeParser

    extra = [x for kv in args.set for x in (f"--{kv.split('=', 1)[0]}", kv.split("=", 1)[1])]
    rows, dataset = [], None
    for n in sorted(args.points):
        folder = args.output_dir / f"train-{n}"
        flags = [args.recipe, *extra, "--train_neurons", str(n), "--scored_groups", "held_out", "--output_dir", str(folder)]
        if dataset is not None:
            flags += ["--dataset", str(dataset)]
        (config,) = RecipeParser(AnyNeuronConfig).parse(flags)
        if not (folder / "any_neuron.json").exists():
            started = time.perf_counter()
            run_any_neuron(config)
            seconds = time.perf_counter() - started
        else:
            seconds = None
        dataset = dataset or (Path(config.dataset) if config.dataset else folder / "dataset")  # the recipe's, or the first point's
        rows.append(point_row(folder, seconds))
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "curve.json").write_text(json.dumps(rows, indent=1))
    (args.output_dir / "curve.md").write_text(markdown(rows))
    plot(rows, args.output_dir / "curve.png")
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
