# %% [markdown]
# # What did the self-reporter learn? Every analysis, with its figures
#
# A trained self-reporter predicts its neuron well on held-out text, but *how*? It could read the neuron's own
# write to the residual stream, recompute the value from the neuron's inputs, or lean on the context that
# usually makes the neuron fire. Each analysis of `nsr_hf.analysis` (and the causal test of `nsr_hf.evaluation.causal`)
# asks one such question:
#
# | analysis | question |
# | --- | --- |
# | `weight_alignment` | is the head's weight vector the neuron's output (or input) weight vector, more than chance allows? |
# | `projection_analysis` | where in the residual stream, block by block, is the neuron's value linearly present? |
# | `activation_patching` | does the report move when the neuron is patched, and not when a random neuron of its layer is? |
# | `direction_ablation` | does the report survive removing the neuron's output direction from what the head reads? |
# | `causal_test` | clamped to a range of values, does the report follow the neuron as much as it does naturally? |
# | `drift_anatomy` | how did training move the neuron's weights, against the other neurons of its layer? |
#
# This script trains a small self-reporter on the embedded default (`run_train(quickstart_config(...))`), or
# reuses a trained run (`--from_run DIR`, a folder with `predictor/` and `dataset/`, as `nsr quickstart` or
# `examples/quickstart_api.py` write), then runs each analysis, saves its numbers (JSON) and figure (PNG) under
# `--output_dir` (default `outputs/examples/analyses`) and prints a one-line reading of the numbers.
#
#     python examples/analyses.py                                  # small budget (CI-sized)
#     python examples/analyses.py --budget full                    # the quickstart recipe as it is (minutes)
#     python examples/analyses.py --from_run outputs/quickstart    # analyse a run you already have

# %%
import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model and corpus need no network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

parser = argparse.ArgumentParser(description="Train a small self-reporter and run every analysis of nsr_hf.analysis on it.")
parser.add_argument("--budget", choices=("small", "full"), default="small",
                    help="small: a CI-sized run (minutes on two CPU cores); full: the quickstart recipe as it is")
parser.add_argument("--output_dir", default="outputs/examples/analyses")
parser.add_argument("--from_run", default=None, help="a trained run's folder (predictor/ and dataset/) to analyse instead of training one")
args, _ = parser.parse_known_args()  # known args only: Jupyter passes its own

# The small budget trains on a few hundred short documents for one epoch (12 steps: hence a larger learning rate
# than the recipe's) with only the cheap baselines, and runs each analysis on fewer rows; every analysis still runs.
SMALL = {"layers": [0, 1, 2], "scan_documents": 60, "dataset_documents": 240, "max_length": 32, "select_candidates": 5,
         "num_train_epochs": 1, "learning_rate": 1e-3, "eval_methods": ["mean", "ridge_probe", "shuffled_labels"], "n_bootstrap": 100}
BUDGET = SMALL if args.budget == "small" else {}
ANALYSIS = {"small": {"rows": 32, "patching_rows": 16, "control_neurons": 1, "causal_values": 5, "drift_steps": 3},
        "full": {"rows": 256, "patching_rows": 64, "control_neurons": 3, "causal_values": 9, "drift_steps": 30}}[args.budget]

out = Path(args.output_dir)
out.mkdir(parents=True, exist_ok=True)
readings, timings = {}, {}
clock = time.perf_counter()


def lap(stage: str) -> None:
    """Record how long the stage that just finished took."""
    global clock
    now = time.perf_counter()
    timings[stage] = round(now - clock, 1)
    clock = now


def say(name: str, line: str) -> None:
    """Print an analysis' one-line reading and keep it for summary.json."""
    readings[name] = line
    print(f"\n>>> {name}: {line}\n", flush=True)


def num(value, spec: str = ".2f") -> str:
    """A number for a sentence ('n/a' for None: an undefined value, e.g. a correlation with a constant)."""
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


# %% [markdown]
# ## A trained self-reporter
#
# `run_train` scans the lower layers, picks the most linearly readable of the top candidates, builds its
# dataset, fine-tunes the blocks after the target (`after_target`: the neuron itself cannot change) with a
# regression head reading two blocks after the target, and evaluates it. The analyses below need only the saved
# predictor and dataset, and the original model.

# %%
from transformers import set_seed

from nsr_hf.data.storage import load_activation_dataset
from nsr_hf.modeling.predictor import load_predictor
from nsr_hf.models import load_model_and_tokenizer
from nsr_hf.pipeline import run_train
from nsr_hf.quickstart import quickstart_config

set_seed(0)
if args.from_run:
    run = Path(args.from_run)
    print(f"analysing the trained run in {run}/")
else:
    run = out / "run"
    run_train(quickstart_config(**BUDGET, output_dir=str(run), overwrite=True))
lap("train")

predictor = load_predictor(str(run / "predictor"))
# the run's own dataset, or the one it was trained on (a run given `dataset:` keeps none of its own)
dataset, metadata = load_activation_dataset(run / "dataset" if (run / "dataset").is_dir() else predictor.config.dataset_name)
config = predictor.config
neuron = config.target_neurons[0]
read_layer = config.effective_read_layer
original, tokenizer = load_model_and_tokenizer(config.base_model_name_or_path)
rows = dataset["test"]  # held-out documents: neither the scan nor training saw them
print(f"neuron {neuron}, head {config.head_type} reading block {read_layer}; {len(rows)} test rows")

# %% [markdown]
# ## Weight alignment
#
# Does the head read the neuron's own write? The head's weight vector, taken into the residual basis through the
# final norm, is compared with the neuron's output vector (the column of `down_proj` it writes) and its input
# vectors: the cosine, a z-score and p-value against random directions, and its rank among all neurons of the
# layer. A ridge probe fitted on the same representation the head reads gives a second, closed-form readout
# direction to compare with: if both point the same way, training found the obvious linear readout.

# %%
from nsr_hf.analysis import weight_alignment
from nsr_hf.modeling.probes import RidgeProbe, labels_of, layer_features

features = {split: layer_features(predictor, dataset[split], [read_layer], progress=False)[read_layer] for split in ("train", "validation")}
probe = RidgeProbe().fit(features["train"], labels_of(dataset["train"]), features["validation"], labels_of(dataset["validation"]))
alignment = weight_alignment(predictor, probe_direction=probe.direction)
alignment.save(out, "weight_alignment")

n = alignment.numbers
cos, z, p, rank = n["cosine"]["out"], n["z_score"]["out"], n["p_value"]["out"], n["layer_rank"]["out"]
aligned = z is not None and z > 3 and p < 0.01
probe_cos = n["probe"]["cosine_with_head"]
say("weight_alignment",
    f"the head's direction is {'aligned' if aligned else 'not aligned'} with the neuron's output vector "
    f"(cos {num(cos)}, z = {num(z, '.1f')}, p = {num(p, '.3g')}, rank {rank} of {n['layer_neurons']} in layer {neuron.layer}); "
    f"the ridge probe (validation R^2 {num(probe.val_r2)}) points "
    f"{'the same way' if probe_cos is not None and abs(probe_cos) > 0.5 else 'elsewhere'} "
    f"(cos {num(probe_cos)} with the head) and has cos {num(n['probe']['cosine']['out'])} with the output vector")
lap("weight_alignment")

# %% [markdown]
# ## Projection analysis
#
# Where is the value? The residual stream at the labelled token is projected, block by block, on the neuron's
# directions (input vectors, output vector, and the head's direction), and each projection is correlated with the
# true activation. Before the target block only the input directions can carry it (the neuron has not fired
# yet); after it, the output direction carries the neuron's write until later blocks overwrite it.

# %%
from nsr_hf.analysis import projection_analysis

projection = projection_analysis(predictor, rows, max_rows=ANALYSIS["rows"])
projection.save(out, "projection_analysis")

n = projection.numbers
after = {label: i for i, label in enumerate(n["layers"])}  # "embeddings", then block indices
out_r = n["correlation"]["out"]
best_name, best_i = max(((name, i) for name, values in n["correlation"].items() for i, v in enumerate(values) if v is not None),
                        key=lambda item: abs(n["correlation"][item[0]][item[1]]), default=(None, None))
best = "no projection varies" if best_name is None else (
    f"strongest along {best_name} after {'the embeddings' if n['layers'][best_i] == 'embeddings' else 'block ' + str(n['layers'][best_i])} "
    f"(r = {num(n['correlation'][best_name][best_i])})")
say("projection_analysis",
    f"the value is linearly present along the neuron's output direction right after its block {neuron.layer} "
    f"(r = {num(out_r[after[neuron.layer]])}) and at the read layer {read_layer} (r = {num(out_r[after[read_layer]])}); {best}; "
    f"the report itself has r = {num(n['head_output_r'])} (R^2 {num(n['head_output_r2'])})")
lap("projection_analysis")

# %% [markdown]
# ## Activation patching
#
# Patch the neuron at the labelled token (set it to values across its range, zero it, scale it) and regress the
# change in the report on the change in the neuron. A reporter of this neuron has a clear positive slope; the
# same patches on random neurons of the same layer (the controls) should leave the report alone.

# %%
from nsr_hf.analysis import activation_patching

patching = activation_patching(predictor, rows, control_neurons=ANALYSIS["control_neurons"], max_rows=ANALYSIS["patching_rows"])
patching.save(out, "activation_patching")

n = patching.numbers
target = n["target"]["all"]
control_slopes = [abs(c["all"]["slope"] or 0.0) for c in n["controls"]]
slope, se = target["slope"], target["slope_se"]
follows = slope is not None and se is not None and slope - 2 * se > 0
specific = follows and abs(slope) > 3 * max(control_slopes, default=0.0)
if specific:
    verdict = "moves with the neuron and hardly with random neurons of its layer"
elif follows:
    verdict = "moves with the neuron, but about as much with random neurons of its layer: not specific"
else:
    verdict = "does not move with the neuron"
say("activation_patching",
    f"the report {verdict} (slope {num(slope, '.3f')} ± {num(se, '.3f')} per unit of activation, r = {num(target['r'])}; "
    f"controls |slope| up to {num(max(control_slopes, default=None), '.3f')})"
    + ("" if n["meaningful"] else f" [not meaningful: {n['note']}]"))
lap("activation_patching")

# %% [markdown]
# ## Direction ablation
#
# Remove the neuron's output direction from the residual stream at the read layer (every token), and score the
# report again. If its accuracy collapses, the head reads the neuron's write directly; if it survives, the value
# comes from elsewhere (recomputed by later blocks, or read from the neuron's inputs). Random directions, removed
# the same way, show what removing *a* direction costs.

# %%
from nsr_hf.analysis import direction_ablation

ablation = direction_ablation(predictor, rows, control_directions=3, max_rows=ANALYSIS["rows"])
ablation.save(out, "direction_ablation")

n = ablation.numbers
retained, control_retained = n["r2_retained"], n["control_r2_retained_mean"]
controls = "n/a" if control_retained is None else f"{control_retained:.0%}"
if retained is None:
    line = (f"the report's R^2 before ablation is {num(n['before']['r2'])} (not above 0): there is no accuracy to retain. "
            f"With the output direction removed at block {n['read_layer']} its r goes from {num(n['before']['r'])} "
            f"to {num(n['after']['r'])}")
else:
    if retained < 0.5:
        verdict = f"collapses (R^2 keeps {retained:.0%}): the head reads the neuron's write directly"
    elif retained > 0.8:
        verdict = f"survives (R^2 keeps {retained:.0%}): the value is read from elsewhere (recomputed, or from the neuron's inputs)"
    else:
        verdict = f"partly survives (R^2 keeps {retained:.0%}): the head reads the neuron's write and something else"
    line = f"with the output direction removed at block {n['read_layer']}, the report {verdict}; random directions keep {controls}"
say("direction_ablation", f"{line} (mean |change| of the report {num(n['mean_abs_report_change'], '.3g')})")
lap("direction_ablation")

# %% [markdown]
# ## The causal test
#
# Clamp the neuron to values across its range (1st to 99th percentile) at the labelled token and fit the report
# against the value given. The *causal* slope is how much the report follows the neuron when nothing else
# changes; the *natural* slope is the report against the true activation without intervention. A reporter that
# reads its neuron has a causal slope close to the natural one; one that reads correlated context has a causal
# slope near 0.

# %%
from nsr_hf.analysis import AnalysisResult
from nsr_hf.evaluation.causal import causal_test
from nsr_hf.evaluation.figures import plot_causal
from nsr_hf.utils import to_jsonable as jsonable

causal = causal_test(predictor, rows, num_values=ANALYSIS["causal_values"], max_rows=ANALYSIS["rows"])
AnalysisResult(jsonable(causal), plot_causal(causal)).save(out, "causal_test")

slope, se, natural = causal["slope"], causal["row_slope_se"] or causal["slope_se"], causal["natural_slope"]
moves = se is not None and slope - 2 * se > 0
if not moves:
    verdict = "ignores the clamped neuron: it reads correlated context, not the neuron"
elif natural is not None and natural > 0 and slope >= 0.5 * natural:
    verdict = "follows the clamped neuron about as much as it follows the neuron naturally: it reads the neuron"
else:
    verdict = "follows the clamped neuron, but less than it does naturally: part of the report comes from correlated context"
say("causal_test",
    f"the report {verdict} (causal slope {num(slope, '.3f')} ± {num(se, '.3f')}, natural slope {num(natural, '.3f')})"
    + ("" if causal["meaningful"] else f" [not meaningful: {causal['note']}]"))
lap("causal_test")

# %% [markdown]
# ## Drift anatomy
#
# How did training move the neuron's weights? For each of its weight vectors (inputs, output): how far it moved,
# against how far the other neurons of its layer moved. The trained run used `after_target`, which freezes
# every block up to the target's: its neuron should not have moved at all. To see a neuron that does move, a
# second, short fine-tune trains a fresh predictor with `unfreeze: last_k` reaching down to the target's block.

# %%
from nsr_hf.analysis import drift_anatomy

frozen = drift_anatomy(original, predictor, neuron)
frozen.save(out, "drift_anatomy_trained_run")
moved = [name for name, v in frozen.numbers["vectors"].items() if v["change_norm"] > 0]
say("drift_anatomy_trained_run",
    "the trained run left the neuron's weights untouched (no weight vector moved)" if not frozen.numbers["changed"]
    else f"the trained run moved the neuron's weights ({', '.join(moved) or 'biases'} changed)")

# A short, in-memory fine-tune of a fresh predictor: the same head and read layer, but the last k blocks the head
# reads, down to the target's own block, are trainable.
from transformers import TrainingArguments

from nsr_hf.evaluation.causal import live_activations
from nsr_hf.modeling.predictor import ActivationPredictor
from nsr_hf.training.trainer import PredictorTrainer

set_seed(0)
moving = ActivationPredictor.from_base(original, tokenizer, neurons=[str(neuron)], head_type=config.head_type, read_layer=read_layer,
                                       position=config.position, label_transform=config.label_transform)
unfreeze = {"strategy": "last_k", "k": read_layer - neuron.layer + 1}  # blocks neuron.layer .. read_layer
drift_args = TrainingArguments(output_dir=str(out / "drift_run"), learning_rate=quickstart_config(**BUDGET).learning_rate,
                               max_steps=ANALYSIS["drift_steps"], per_device_train_batch_size=16, logging_steps=ANALYSIS["drift_steps"],
                               save_strategy="no", eval_strategy="no", report_to="none", seed=0, disable_tqdm=True,
                               use_cpu=not torch.cuda.is_available())
PredictorTrainer(model=moving, args=drift_args, train_dataset=dataset["train"], unfreeze=unfreeze).train()
anatomy = drift_anatomy(original, moving, neuron)
anatomy.save(out, "drift_anatomy")

n = anatomy.numbers
name, vector = max(n["vectors"].items(), key=lambda item: item[1]["relative_change"] or 0.0)
z = vector["change_z"]
live = live_activations(moving, rows, [neuron])[:, 0]
true = np.asarray(rows["activations"], dtype=np.float64)[:, 0]
value_drift = float(np.mean(np.abs(live - true)) / true.std())
say("drift_anatomy",
    f"{ANALYSIS['drift_steps']} steps of last_k (blocks {neuron.layer}..{read_layer} trainable) moved the neuron's {name} vector most: by "
    f"{num(100 * (vector['relative_change'] or 0.0), '.2g')}% of its norm (cos {num(vector['cosine'], '.5f')}), more than "
    f"{num(vector['change_percentile'], '.0f')}% of the other neurons of its layer (z = {num(z, '.1f')}): "
    f"{'an unusually large' if z is not None and z > 2 else 'an ordinary'} move for its layer; on the test rows its value moved by "
    f"{value_drift:.2g} standard deviations on average")
lap("drift_anatomy")

# %%
summary = {"budget": args.budget, "run": str(run), "neuron": str(neuron), "read_layer": read_layer, "readings": readings,
           "seconds": timings}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print("\n".join(f"{name}: {line}" for name, line in readings.items()))
print(f"\ndone in {sum(timings.values()):.0f} s ({', '.join(f'{k} {v:g} s' for k, v in timings.items())}); "
      f"figures and numbers in {out}/")
