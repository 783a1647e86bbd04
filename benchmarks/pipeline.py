"""The pipeline at the speed of its arithmetic: where a train run's time goes, next to the work each stage needs.

    python benchmarks/pipeline.py --output_dir outputs/bench_pipeline     # run the quickstart (recipes/quickstart.yaml), then the table
    python benchmarks/pipeline.py --run outputs/quickstart                # the table of a finished run (nsr train / nsr quickstart)
    python benchmarks/pipeline.py --run RUN --json pipeline.json          # also the figures as JSON

For every stage of ``nsr train`` (``metrics.json`` ``stage_seconds``, written by ``nsr_hf.stage_clock``): its wall seconds,
the floating-point work of the passes that the *result* needs from that stage (its FLOP floor), the floor's seconds at this
machine's measured matmul rate, and the ratio. The floors, per stage (F(a..b): one token through blocks a..b; 2 FLOPs per
weight of every linear map of a block, plus the attention's 4 x context x hidden; backward = 2 x forward):

* scan: the scanned tokens through the scanned layers;
* readability selection: the same tokens to the candidates' read layer; from the deepest scanned block only when the scan's
  pass kept its states and the features and neurons below (``selection.json`` ``from_scan_pass_block``);
* dataset: the dataset's tokens to the target's block;
* predictor and head init: when the dataset's pass kept the states entering the target's block and the features below
  (``metrics.json`` ``passes_reused``), every split's tokens through blocks target..read, which the head's probe and the
  evaluation's probes of the original model share; else the train rows to the read layer, and the validation rows when the
  evaluation's probes of the original model reuse these features (``head_init: probe``, any unfreezing but head_only);
* train: epochs x train tokens x 3 x F(first trainable block..read layer), on the frozen prefix's output (with interventions
  the target's block runs too); train/prefix cache: the train tokens once through the frozen blocks below (the
  frozen-prefix cache, ``nsr_hf.training.prefix_cache``), from the target's block when an earlier pass kept the
  states entering it (``prefix_cache.started_at_block``);
* train/drift monitor, neuron drift: 0 (the result does not need them: they watch the training);
* validation and test loss: validation and test tokens to the read layer, from the target's block when the dataset's pass
  kept those rows' states there (``passes_reused`` ``held_out_from_block``);
* evaluation/predictions: the evaluated splits to the read layer, but those the validation and test loss pass predicted;
  baselines: one feature pass of the original model (the splits no earlier pass read, to the read layer: every probe and
  layer share it), of the random-init model, and of each cross model; causal test: rows x values x F(target..read);
  faithfulness: counterfactual rows x F(target..read) for the report and the honest reader's intervened train rows (its
  natural train rows start from training's own cache: not in the floor); token examples: the shown rows to the target.

A pass read at the labelled token of its last block counts that block's MLP and its attention's query and output
projections at that token only (at the other tokens they never run: ``nsr_hf.architectures.labelled_token_block``).

The machine's rate is the best of a few fp32 matmuls of the model's own shapes (a batch of 1024 tokens) on every thread
torch uses: the rate that a pass of the model could reach here. A stage that ran in bfloat16 (the random-init and cross
models' passes under ``baseline_dtype``) counts at the rate of bf16 matmuls of the same shapes. A stage far above its floor
is named with why, when known.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# The arithmetic of one token through a block


def block_flops(config, context: float) -> list[float]:
    """FLOPs of one token through each block of a model of ``config`` (a ``PretrainedConfig``), at ``context`` tokens of
    attention: 2 per weight of each linear map of the block (counted on a weightless copy of the model: any architecture
    ``transformers`` builds) plus 4 x context x hidden for the attention's scores and mixing."""
    import torch
    from transformers import AutoModelForCausalLM

    from nsr_hf.architectures import get_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    hidden = config.hidden_size if hasattr(config, "hidden_size") else config.n_embd
    out = []
    for block in get_layers(model):
        weights = sum(m.weight.numel() for m in block.modules() if type(m).__name__ in ("Linear", "Conv1D"))
        out.append(2.0 * weights + 4.0 * context * hidden)
    return out


def mlp_flops(config) -> list[float]:
    """FLOPs of one token through what each block runs at the labelled token alone when a head reads it: its MLP and its
    attention's query and output projections (2 per weight of their linear maps; ``nsr_hf.architectures.labelled_token_block``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from nsr_hf.architectures import arch_spec, get_layers, token_wise_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    spec = arch_spec(model)
    return [2.0 * sum(m.weight.numel() for path in token_wise_modules(block, spec) for m in block.get_submodule(path).modules()
                      if type(m).__name__ in ("Linear", "Conv1D"))
            for block in get_layers(model)]


def read_span(flops: list[float], mlp: list[float], first: int, last: int, tokens_per_row: float) -> float:
    """``span`` of a pass read at the labelled token of block ``last``: that block's MLP and query and output projections
    run at one token of each row."""
    if last < first:
        return 0.0
    return span(flops, first, last) - mlp[last] * (1.0 - 1.0 / max(tokens_per_row, 1.0))


def span(flops: list[float], first: int, last: int) -> float:
    """F(first..last): one token through blocks ``first..last`` (0 when the span is empty)."""
    return float(sum(flops[first:last + 1])) if last >= first else 0.0


def matmul_rate(shapes, tokens: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of this machine: the best of ``repeats`` matmuls of (tokens x d_in) by (d_in x d_out) for each shape, in
    ``dtype`` (``"float32"`` or ``"bfloat16"``)."""
    import torch

    best = 0.0
    for d_in, d_out in shapes:
        a, b = torch.randn(tokens, d_in, dtype=getattr(torch, dtype)), torch.randn(d_in, d_out, dtype=getattr(torch, dtype))
        a @ b  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2.0 * tokens * d_in * d_out / (time.perf_counter() - start))
    return best


# ----------------------------------------------------------------------------------------------------------
# What the run did


def run_facts(run: Path) -> dict:
    """The counts the floors need, from a run folder's files: tokens by split, scanned tokens, layers, epochs, rows."""
    from datasets import load_from_disk

    summary = json.loads((run / "metrics.json").read_text())
    config, evaluation = summary["config"], summary.get("evaluation") or {}
    dataset = load_from_disk(str(run / "dataset"))
    tokens = {s: int(sum(len(ids) for ids in dataset[s]["input_ids"])) for s in dataset}
    rows = {s: len(dataset[s]) for s in dataset}
    scan = json.loads((run / "scan" / "top_neurons.json").read_text()) if (run / "scan" / "top_neurons.json").is_file() else {}
    target = max(int(n.split(".")[0]) for n in summary["neurons"])
    selection = run / "scan" / "selection.json"
    selection = json.loads(selection.read_text()) if selection.is_file() else {}
    return {"summary": summary, "config": config, "evaluation_config": evaluation.get("config") or {}, "tokens": tokens, "rows": rows,
            "scan_tokens": scan.get("tokens", 0), "scan_layers": scan.get("layers") or [],
            "scan_top_layers": [int(n["neuron"].split(".")[0]) for n in scan.get("top_neurons") or []],
            "target": target, "read": int(summary["read_layer"]), "epochs": float((summary.get("train") or {}).get("epoch") or 0),
            "selection_from_scan_pass_block": selection.get("from_scan_pass_block"),
            "precision": stage_precision(run)}


BASELINE_STAGES = {"random_init": "evaluation/baselines/random-init probe", "cross": "evaluation/baselines/cross-model probes"}


def stage_precision(run: Path) -> dict[str, str]:
    """``{stage: dtype}`` of the stages that ran below float32: the random-init and cross-model probes when the evaluation
    ran them in bfloat16 (``baseline_dtype``; ``baselines_info`` of ``evaluation/metrics.json``)."""
    path = run / "evaluation" / "metrics.json"
    info = (json.loads(path.read_text()).get("baselines_info") or {}) if path.is_file() else {}
    out = {}
    for method, entry in info.items():
        stage = BASELINE_STAGES.get(method.split(":")[0])
        if stage and isinstance(entry, dict) and entry.get("dtype") not in (None, "float32"):
            out[stage] = entry["dtype"]
    return out


def first_trainable_block(unfreeze: str, target: int, read: int, k: int, intervened: bool) -> int | None:
    """The first block a training step must run with a cached prefix below it; None where every block trains."""
    if unfreeze in ("after_target", "lora_after_target"):
        return target if intervened else target + 1  # an intervention is set inside the target's block: it runs
    if unfreeze == "last_k":
        return min(read - k + 1, target) if intervened else read - k + 1
    if unfreeze == "head_only":
        return target if intervened else read + 1  # no block trains: the read layer's features are the cache
    return None


def floors(facts: dict, flops: list[float], cross_flops: dict[str, float], mlp: list[float] | None = None) -> dict[str, tuple[float, str]]:
    """``{stage: (FLOPs, the passes counted)}`` of the floors the module docstring defines. ``mlp``: each block's MLP FLOPs
    (``mlp_flops``); a pass read at the labelled token of its last block counts that block's MLP and query and output
    projections at that token only."""
    t, rows, config, evaluation = facts["tokens"], facts["rows"], facts["config"], facts["evaluation_config"]
    target, read = facts["target"], facts["read"]
    mean_len = {s: t[s] / max(rows[s], 1) for s in t}
    all_tokens = sum(t.values())
    per_row = all_tokens / max(sum(rows.values()), 1)
    mlp = mlp if mlp is not None else [0.0] * len(flops)

    def reads(first: int, last: int, length: float = per_row) -> float:  # a pass read at the labelled token of block `last`
        return read_span(flops, mlp, first, last, length)

    reused = facts["summary"].get("passes_reused") or {}
    from_dataset = reused.get("probe_features_from_dataset_pass_block")
    from_scan = facts.get("selection_from_scan_pass_block")
    predicted = reused.get("evaluation_predictions_from_loss_pass") or []
    held_out = reused.get("held_out_from_block")
    intervened = bool(config.get("intervention_rate"))
    first = first_trainable_block(config.get("unfreeze", ""), target, read, int(config.get("unfreeze_k") or 1), intervened)
    train_span = reads(first, read) if first is not None else reads(0, read)
    scan_last = max(facts["scan_layers"] or [target])
    selection_read = min(max(facts["scan_top_layers"] or [target]) + 2, len(flops) - 1)
    evaluated = [s for s in ("validation", "test", "test_ood") if s in t]
    causal_rows = min(int(evaluation.get("causal_max_rows") or 64), rows.get(evaluated[-1] if evaluated else "test", 0))
    cf_rows = int(evaluation.get("counterfactual_rows") or 0)
    cache_from = int((facts["summary"].get("prefix_cache") or {}).get("started_at_block") or 0)  # built from the probe pass's states
    # nsr train computes the original model's train and validation features once, for the head's probe and the evaluation
    shared = config.get("head_init") == "probe" and config.get("unfreeze") != "head_only"
    if from_scan is not None:
        selection = (facts["scan_tokens"] * reads(from_scan, selection_read),
                     f"the scanned tokens through blocks {from_scan}..{selection_read} (below: the scan's pass kept them)")
    else:
        selection = (facts["scan_tokens"] * reads(0, selection_read), f"the scanned tokens to block {selection_read}")
    if from_dataset is not None:
        head_init = (all_tokens * reads(from_dataset, read), f"every split's tokens through blocks {from_dataset}..{read} (below: the "
                     "dataset's pass kept them); the head's probe and the evaluation's probes of the original model read them")
    else:
        head_init = ((t.get("train", 0) + (t.get("validation", 0) if shared else 0)) * reads(0, read),
                     f"train{' and validation' if shared else ''} tokens to block {read} (the head's probe"
                     + ("; the evaluation's probes of the original model reuse them)" if shared else ")"))
    if from_dataset is not None:
        original_probes = (0.0, "every split came from the head init's pass")
    else:
        original_probes = ((all_tokens - (t.get("train", 0) + t.get("validation", 0) if shared else 0)) * reads(0, read),
                           "the evaluated splits to the read layer (train and validation: from the head init)" if shared
                           else "every split to the read layer, once for every probe and layer")
    out = {
        "scan": (facts["scan_tokens"] * span(flops, 0, scan_last), f"{facts['scan_tokens']} tokens through blocks 0..{scan_last}"),
        "readability selection": selection,
        "dataset": (all_tokens * span(flops, 0, target), f"{all_tokens} tokens through blocks 0..{target}"),
        "predictor and head init": head_init,
        "train": (facts["epochs"] * t.get("train", 0) * 3 * train_span,
                  f"{facts['epochs']:g} epochs x {t.get('train', 0)} train tokens x 3 x blocks {first}..{read} on a cached prefix"
                  if first is not None else "every block trains: the whole forward and backward"),
        "train/prefix cache": (t.get("train", 0) * span(flops, cache_from, (first if first is not None else 0) - 1),
                               f"train tokens through blocks {cache_from}..{(first if first is not None else 0) - 1} once"
                               + (" (blocks below: the head's probe pass kept their output)" if cache_from else "")),
        "train/drift monitor": (0.0, "not needed by the result"),
        "neuron drift": (0.0, "not needed by the result (the neuron is unchanged by construction below the trainable blocks)"),
        "validation and test loss": ((sum(t[s] for s in evaluated) * reads(held_out, read),
                                      f"validation and test tokens through blocks {held_out}..{read} (below: the dataset's pass kept them)")
                                     if held_out is not None else
                                     (sum(t[s] for s in evaluated) * reads(0, read), "validation and test tokens to the read layer")),
        "evaluation/predictions": (sum(t[s] for s in evaluated if s not in predicted) * reads(0, read),
                                   "the evaluated splits to the read layer" + (f" ({', '.join(predicted)}: from the validation and test "
                                                                                "loss pass)" if predicted else "")),
        "evaluation/baselines/probes of the original model": original_probes,
        "evaluation/baselines/random-init probe": (all_tokens * reads(0, read), "every split through a random-init copy"),
        "evaluation/baselines/cross-model probes": (all_tokens * sum(cross_flops.values()),
                                                    f"every split through {', '.join(cross_flops) or 'no cross model'}"),
        "evaluation/causal test": (causal_rows * int(evaluation.get("causal_num_values") or 9) * mean_len.get("test", 0)
                                   * reads(target, read), "rows x set values x blocks target..read"),
        "evaluation/faithfulness": ((cf_rows * mean_len.get("test", 0) + t.get("train", 0)) * reads(target, read),
                                    "counterfactual rows and the honest reader's intervened train rows, blocks target..read"),
        "evaluation/token examples": (14 * mean_len.get("test", 0) * span(flops, 0, target), "the shown rows to the target"),
    }
    out["evaluation/baselines"] = (sum(v for k, (v, _) in out.items() if k.startswith("evaluation/baselines/")), "the three above")
    out["evaluation"] = (sum(v for k, (v, _) in out.items() if k.startswith("evaluation/") and k.count("/") == 1), "the parts below")
    return out


WHY = {  # what a ratio far above 1 comes from, where known
    "scan": "small batches (8 texts) and per-layer statistics on every token",
    "readability selection": ("from the scan's pass: the documents tokenised again and 100 cross-validated ridge fits (20 candidates "
                              "x 5 folds), which the floor does not count; else a pass of its own to the read layer"),
    "predictor and head init": ("building the predictor (a fresh copy of the base, initialised at random and then overwritten: about "
                                "1.6 s here) and the ridge probe's fit, which the floor does not count"),
    "train": ("small batches (16 rows of 64 tokens) through two blocks: a step costs its forward and backward (the Trainer adds "
              "little), and every epoch a checkpoint of the whole model"),
    "evaluation/baselines/random-init probe": "building the random-init model (initialising 135M weights) costs more than its pass",
    "evaluation/causal test": "small batches (16 rows), each set value a forward of its own from the target's block",
    "evaluation/faithfulness": ("the honest reader's train rows run twice (natural values from training's cache, set values from the "
                                "target's block): the floor counts them once; the rest is a plain forward's ratio and the bootstraps"),
    "evaluation/baselines/cross-model probes": ("the texts are decoded and tokenised again, and MiniLM's matmuls (384 wide) are "
                                                "smaller than the shapes the machine's rate is measured on"),
    "evaluation": "the sum of the parts below: each says why it is above its floor",
    "evaluation/baselines": "the sum of the three above: each says why it is above its floor",
    "load model": "reading and converting the weights: no arithmetic floor",
    "save": "writing the predictor's weights: no arithmetic floor",
    "evaluation/report": "plotting: no arithmetic floor",
}


def floor_seconds(floor: dict, rates: dict[str, float], precision: dict[str, str]) -> dict[str, float | None]:
    """Each stage's floor in seconds: its FLOPs at the matmul rate of the precision it ran in (``precision``; float32 by
    default); a stage made of parts (``evaluation``, ``evaluation/baselines``) is the sum of its parts' seconds."""
    out = {stage: (flop / rates[precision.get(stage, "float32")] if flop else None) for stage, (flop, _) in floor.items()}
    for parent in sorted({k.rsplit("/", 1)[0] for k in floor if k.startswith("evaluation/")}, key=len, reverse=True):
        parts = [k for k in floor if k.startswith(parent + "/") and k.count("/") == parent.count("/") + 1]
        if parent in floor and any(stage in precision for stage in floor if stage.startswith(parent + "/")):
            out[parent] = sum(out[k] or 0.0 for k in parts) or None
    return out


def table(facts: dict, floor: dict, rate: float | dict[str, float]) -> list[dict]:
    """One row per stage of the run. A stage above 2x its floor says why: its own reason (``WHY``) when known, else, when
    it is within 1.5x of the dataset stage's ratio, that a plain batched forward pass of this model runs at that ratio here
    (the dataset stage is one: tokenise, forward, write). ``rate``: the float32 matmul rate, or ``{dtype: rate}`` with a
    rate for every precision in ``facts["precision"]`` (stages that ran in bfloat16 count at bfloat16's rate)."""
    rates = rate if isinstance(rate, dict) else {"float32": rate}
    precision = facts.get("precision") or {}
    seconds_of = floor_seconds(floor, rates, precision)
    rows = []
    stages = facts["summary"].get("stage_seconds", {})
    for stage, seconds in stages.items():
        flop, passes = floor.get(stage, (None, "no arithmetic floor (files, plots)"))
        passes += f" (in {precision[stage]})" if stage in precision else ""
        floor_s = seconds_of.get(stage)
        ratio = seconds / floor_s if floor_s else None
        rows.append({"stage": stage, "seconds": seconds, "floor_gflop": flop / 1e9 if flop is not None else None, "floor_seconds": floor_s,
                     "ratio": ratio, "passes": passes, "why": WHY.get(stage) if (ratio is None or ratio > 2) else None})
    forward = next((r["ratio"] for r in rows if r["stage"] == "dataset" and r["ratio"]), None)
    for r in rows:
        if r["why"] is None and r["ratio"] and r["ratio"] > 2 and forward and r["ratio"] <= 1.5 * forward:
            r["why"] = (f"a plain batched forward pass of this model runs at {forward:.1f}x the floor here (the dataset stage): "
                        "attention, norms, activations and memory traffic are not in the floor")
    return rows


def markdown(rows: list[dict], rate: float | dict[str, float], total: float) -> str:
    def num(x, d=1):
        return "–" if x is None else f"{x:.{d}f}"

    rates = rate if isinstance(rate, dict) else {"float32": rate}
    machine = ", ".join(f"{r / 1e9:.1f} GFLOP/s in {'fp32' if d == 'float32' else d}" for d, r in rates.items())
    lines = [f"Machine: {machine} (matmul, best of the model's shapes). Run: {total:.0f} s wall.", "",
             "| stage | seconds | floor GFLOP | floor seconds | × floor | the floor counts | why above 2× |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['stage']} | {num(r['seconds'])} | {num(r['floor_gflop'])} | {num(r['floor_seconds'], 2)} | {num(r['ratio'])} | "
                     f"{r['passes']} | {r['why'] or ''} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="a finished run folder to read (else the quickstart is run)")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/bench_pipeline"), help="where the quickstart is run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    run = args.run
    if run is None:
        from nsr_hf.pipeline import run_train
        from nsr_hf.quickstart import quickstart_config

        run_train(quickstart_config(["--output_dir", str(args.output_dir)]))
        run = args.output_dir
    facts = run_facts(run)
    from nsr_hf.models import load_model_config

    model_config = load_model_config(facts["config"]["model"])
    mean_context = sum(facts["tokens"].values()) / max(sum(facts["rows"].values()), 1) / 2
    flops = block_flops(model_config, mean_context)
    cross = {}
    for name in (facts["evaluation_config"].get("cross_models") or []):
        from transformers import AutoConfig

        from nsr_hf.evaluation.baselines import MINILM_NAME, minilm_path

        cross_config = AutoConfig.from_pretrained(str(minilm_path()) if name == MINILM_NAME else name)
        cross[name] = 2.0 * sum(p for p in _encoder_weights(cross_config))
    hidden, inner = model_config.hidden_size, getattr(model_config, "intermediate_size", 4 * model_config.hidden_size)
    shapes = [(hidden, hidden), (hidden, inner), (inner, hidden)]
    rates = {dtype: matmul_rate(shapes, dtype=dtype) for dtype in ["float32", *sorted(set(facts["precision"].values()))]}
    rows = table(facts, floors(facts, flops, cross, mlp_flops(model_config)), rates)
    text = markdown(rows, rates, facts["summary"].get("seconds", 0.0))
    print(text)
    result = {"run": str(run), "matmul_flops_per_second": rates["float32"], "matmul_flops_per_second_by_dtype": rates,
              "seconds": facts["summary"].get("seconds"), "stages": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def _encoder_weights(config):
    """The weights of the linear maps of an encoder's layers (a cross model such as MiniLM), from its config."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return [m.weight.numel() for m in model.modules() if type(m).__name__ == "Linear"]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1:])
