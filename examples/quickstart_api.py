# %% [markdown]
# # The quickstart through the Python API, stage by stage
#
# `nsr quickstart` (or `run_train(quickstart_config())`) does all of this in one call. Here every stage is
# spelled out, so that you can see which class does what and what flows between them (plain HF objects:
# a `DatasetDict`, a `PreTrainedModel`, a dict of metrics):
#
# 1. load the embedded SmolLM2-135M and its tokenizer;
# 2. scan the training documents for neurons worth reporting (`nsr_hf.scanner`);
# 3. build the chosen neuron's activation dataset (`nsr_hf.data.generator`);
# 4. wrap the model in an `ActivationPredictor` with a regression head;
# 5. fine-tune it with `PredictorTrainer`, unfreezing only the blocks after the target (`after_target`);
# 6. ask it about new texts with `predict`;
# 7. run the evaluation protocol (baselines, controls, causal test);
# 8. save the predictor and load it back.
#
#     python examples/quickstart_api.py                  # small budget (about two minutes on two CPU cores)
#     python examples/quickstart_api.py --budget full    # the quickstart recipe as it is (minutes)
#
# Everything is written under `--output_dir` (default `outputs/examples/quickstart_api`). The file is in
# percent format: open it in Jupyter or VS Code to run it cell by cell.

# %%
import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded model and corpus need no network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from nsr_hf.quickstart import quickstart_config

parser = argparse.ArgumentParser(description="The nsr_hf Python API end to end on the embedded default.")
parser.add_argument("--budget", choices=("small", "full"), default="small",
                    help="small: a CI-sized run (minutes on two CPU cores); full: the quickstart recipe as it is")
parser.add_argument("--output_dir", default="outputs/examples/quickstart_api")
args, _ = parser.parse_known_args()  # known args only: Jupyter passes its own

# The small budget keeps every stage but shrinks the data: 3 layers scanned, a few hundred short documents, one
# epoch (12 steps: hence a larger learning rate than the recipe's), and only the cheap baselines of the evaluation.
SMALL = {"layers": [0, 1, 2], "scan_documents": 60, "dataset_documents": 240, "max_length": 32, "select_candidates": 5,
         "num_train_epochs": 1, "learning_rate": 1e-3}
SMALL_EVALUATION = {"methods": ["mean", "ridge_probe", "shuffled_labels"], "n_bootstrap": 100}

out = Path(args.output_dir)
out.mkdir(parents=True, exist_ok=True)
recipe = quickstart_config(**(SMALL if args.budget == "small" else {}), output_dir=str(out))
print(f"budget {args.budget}: layers {recipe.layers}, {recipe.scan_documents} scanned / {recipe.dataset_documents} dataset documents, "
      f"max_length {recipe.max_length}, {recipe.num_train_epochs:g} epoch(s); output in {out}/")
timings = {}
clock = time.perf_counter()


def lap(stage: str) -> None:
    """Record how long the stage that just finished took."""
    global clock
    now = time.perf_counter()
    timings[stage] = round(now - clock, 1)
    clock = now


# %% [markdown]
# ## 1. The model
#
# `load_model_and_tokenizer("smollm2-135m")` loads the embedded SmolLM2-135M (converted once into the cache,
# then offline). SmolLM2-135M is 30 Llama blocks with 1536 MLP neurons each; a neuron is named `layer.index`.

# %%
from transformers import set_seed

from nsr_hf.architectures import num_layers, num_neurons
from nsr_hf.models import load_model_and_tokenizer

set_seed(recipe.seed)
model, tokenizer = load_model_and_tokenizer(recipe.model)
print(f"{recipe.model}: {num_layers(model)} blocks x {num_neurons(model)} neurons")
lap("load")

# %% [markdown]
# ## 2. Scan for a neuron
#
# The scan streams documents through the model and keeps float64 statistics of every neuron of the scanned
# layers at the labelled token (the last one), then ranks them (by default `composite`: large swings that are
# neither dead nor always on). Only *training* documents are scanned: `split_of` assigns each document to
# train / validation / test by a hash of its id, the same rule the dataset uses, so the choice of neuron never
# looks at held-out text.
#
# Among the top candidates the recipe (`select: readable`) keeps the one that a ridge probe reads best from the
# representation the head will read (`target+2`), cross-validated on the same scanned documents.

# %%
from nsr_hf.data.corpus import load_corpus, split_of
from nsr_hf.pipeline import select_readable
from nsr_hf.scanner import NeuronScanner, ScanConfig

corpus = load_corpus(recipe.corpus)
documents = list(corpus.iter_documents(limit=recipe.dataset_documents))
train_documents = [d for d in documents if split_of(d.doc_id, recipe.split_seed) == "train"][: recipe.scan_documents]
scanner = NeuronScanner(model, tokenizer, ScanConfig(layers=recipe.layers, position="last", max_length=recipe.max_length,
                                                     max_documents=len(train_documents), top_n=max(10, recipe.select_candidates)))
scan = scanner.scan(train_documents, progress=False)
scan.save(out / "scan")  # neurons.parquet, top_neurons.json, score_heatmap.png
print(scan.format_table(5))

neuron_name, scan_rank = select_readable(recipe, model, tokenizer, scan, train_documents, out)
print(f"\nchosen neuron {neuron_name} (scan rank {scan_rank})")
lap("scan")

# %% [markdown]
# ## 3. The activation dataset
#
# One row per document: the token ids the model saw, the labelled token's position, and the neuron's value
# there (`activations`), split train / validation / test by document. The z-score statistics and bin edges are
# fitted on train only and travel in the metadata (`metadata["transform"]`). It is a plain `DatasetDict`,
# saved with `save_to_disk` and a dataset card.

# %%
from nsr_hf.data.generator import DatasetConfig, run_dataset
from nsr_hf.data.storage import load_activation_dataset

run_dataset(DatasetConfig(neurons=[neuron_name], model=recipe.model, corpus=recipe.corpus, position=recipe.position,
                          max_length=recipe.max_length, max_documents=recipe.dataset_documents, split_seed=recipe.split_seed,
                          output_dir=str(out / "dataset"), overwrite=True),
            model=model, tokenizer=tokenizer)
dataset, metadata = load_activation_dataset(out / "dataset")
print(dataset)
lap("dataset")

# %% [markdown]
# ## 4. The predictor
#
# `ActivationPredictor` is a `PreTrainedModel`: the causal LM plus a head. The regression head reads the
# residual stream after `read_layer` (here two blocks after the target: `target+2`), through the model's final
# norm, at the labelled token, and predicts the z-scored value; predictions come back in activation units.
# Blocks after `read_layer` are never run.

# %%
from nsr_hf.capture import Neuron
from nsr_hf.modeling.predictor import ActivationPredictor

neuron = Neuron.parse(neuron_name)
read_layer = recipe.read_layer_for(neuron.layer, num_layers(model))
predictor = ActivationPredictor.from_base(model, tokenizer, neurons=[neuron_name], head_type=recipe.head_type, read_layer=read_layer,
                                          position=recipe.position, label_transform=metadata["transform"],
                                          dataset_name=str(out / "dataset"))
print(f"the head reads block {predictor.config.effective_read_layer}; the target neuron is in block {neuron.layer}")
if recipe.head_init == "probe":
    # as the recipe does: start from the closed-form ridge probe of the head's own representation (LP-FT)
    probe = predictor.init_head_from_probe(dataset["train"], dataset["validation"])
    print(f"head initialised from the ridge probe: {probe}")
lap("predictor")

# %% [markdown]
# ## 5. Training
#
# `PredictorTrainer` is a `transformers.Trainer`: the usual `TrainingArguments`, with an unfreezing strategy.
# `after_target` trains only the blocks strictly after the target's (up to the read layer), the final norm and
# the head: every weight that computes the neuron stays frozen, so the neuron cannot change while the model
# learns to report it. The `DriftMonitor` callback checks that claim on held-out rows (the neuron's live value
# against the dataset's labels), and measures the head's agreement and the LM loss along the way.
#
# `model` (the original, untouched copy) is kept: the evaluation's baselines must read the original weights.

# %%
from transformers import TrainingArguments

from nsr_hf.training.monitoring import DriftMonitor
from nsr_hf.training.trainer import PredictorTrainer

training_args = TrainingArguments(
    output_dir=str(out / "checkpoints"), learning_rate=recipe.learning_rate, num_train_epochs=recipe.num_train_epochs,
    per_device_train_batch_size=recipe.per_device_train_batch_size, per_device_eval_batch_size=recipe.per_device_eval_batch_size,
    logging_steps=recipe.logging_steps, eval_strategy="no", save_strategy="no", seed=recipe.seed, report_to="none",
    remove_unused_columns=False, label_names=["labels"], disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
)
trainer = PredictorTrainer(model=predictor, args=training_args, train_dataset=dataset["train"], eval_dataset=dataset["validation"],
                           unfreeze="after_target")
monitor = DriftMonitor(dataset["validation"], every_n_steps=recipe.drift_every_n_steps, output_dir=str(out),
                       max_probe_rows=64, max_lm_rows=8).bind(trainer)
trainer.train()
test_metrics = trainer.evaluate(dataset["test"], metric_key_prefix="test")
drift = monitor.history[-1][f"{neuron_name}/max_abs_change"]
print(f"test: r = {test_metrics['test_pearson']:.3f}, R^2 = {test_metrics['test_r2']:.3f}; "
      f"largest change of the neuron during training: {drift:.2g} (after_target: 0 up to float round-off)")
lap("train")

# %% [markdown]
# ## 6. Asking the predictor about new text
#
# `predict(texts)` reads each text's last token (the dataset's position rule) and returns the reported value,
# shape `(texts, neurons)`. The truth for comparison is the original model's neuron on the same tokens
# (`capture_activations`), cut at the same `max_length` the training rows were.

# %%
from nsr_hf.capture import capture_activations, encode_texts

texts = [
    "import os\nprint(os.getcwd())",
    "The dictionary maps each key to a value; lookups take constant time on average.",
    "Raises ValueError if the argument is negative.",
    "for i in range(10):\n    total += i",
]
reports = predictor.predict(texts, max_length=recipe.max_length)[:, 0]
truth = capture_activations(model, encode_texts(tokenizer, texts, max_length=recipe.max_length), [neuron_name],
                            position="last")[neuron.layer][:, 0]
for text, report, value in zip(texts, reports.tolist(), truth.tolist()):
    print(f"  report {report:+.3f}   true {value:+.3f}   {text[:60]!r}")
lap("predict")

# %% [markdown]
# ## 7. The evaluation protocol
#
# A self-report number means something only next to baselines on the same held-out rows: the training mean, a
# closed-form ridge probe of the very representation the head reads, the same probe on shuffled labels
# (selectivity), and for the full budget also a token lookup table, a probe of every layer, a randomly initialised
# model and another model reading the same text (cross-prediction). The causal test sets the neuron to a range of
# values and checks that the report follows. `run_evaluate` writes `metrics.json`, `predictions.json` and a
# `report.md` with its figures.

# %%
from nsr_hf.evaluation.protocol import EvaluateConfig, run_evaluate

eval_config = EvaluateConfig(output_dir=str(out / "evaluation"), dataset=str(out / "dataset"), probe_layers=recipe.probe_layers,
                             cross_models=recipe.cross_models, seed=recipe.seed, batch_size=recipe.per_device_eval_batch_size,
                             **(SMALL_EVALUATION if args.budget == "small" else {}))
evaluation = run_evaluate(eval_config, predictor=trainer.model, dataset=dataset, metadata=metadata, base_model=model, tokenizer=tokenizer,
                          log_history=trainer.state.log_history, drift=monitor.summary())
test = evaluation["metrics"]["test"]
for method, figures in test.items():  # None marks an undefined figure (e.g. r of a constant prediction)
    r2, r = (float("nan") if figures.get(k) is None else figures[k] for k in ("r2", "pearson"))
    print(f"  {method:>16}: R^2 {r2:+.3f}   r {r:+.3f}")
causal = evaluation["causal"]
if causal and "slope" in causal:
    print(f"  causal test: report slope {causal['slope']:.3f} per unit of the clamped neuron (natural slope {causal['natural_slope']:.3f})")
lap("evaluate")

# %% [markdown]
# ## 8. Save and load back
#
# `save_predictor` writes a regular `save_pretrained` folder (safetensors, the config with the label transform,
# the tokenizer, and a model card with the evaluation's headline table); `load_predictor` reads it back, tokenizer included, and
# never runs code from the checkpoint. The reloaded predictor reports exactly what the trained one did.

# %%
from nsr_hf.modeling.predictor import load_predictor, save_predictor

predictor.evaluation = evaluation  # the model card shows its headline table
save_predictor(trainer.model, str(out / "predictor"))
reloaded = load_predictor(str(out / "predictor"))
again = reloaded.predict(texts, max_length=recipe.max_length)[:, 0]
max_difference = float((again - reports).abs().max())
print(f"saved to {out / 'predictor'}; reloaded predictions differ by at most {max_difference:.2g}")
assert max_difference < 1e-4, "the reloaded predictor should report what the trained one did"
lap("save_and_load")

# %%
summary = {
    "budget": args.budget,
    "neuron": neuron_name,
    "scan_rank": scan_rank,
    "read_layer": read_layer,
    "test": {k.removeprefix("test_"): v for k, v in test_metrics.items() if isinstance(v, float)},
    "neuron_max_abs_change": drift,
    "new_texts": [{"text": t, "report": r, "true": v} for t, r, v in zip(texts, reports.tolist(), truth.tolist())],
    "reload_max_difference": max_difference,
    "seconds": timings,
}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(f"\ndone in {sum(timings.values()):.0f} s ({', '.join(f'{k} {v:g} s' for k, v in timings.items())}); "
      f"summary in {out / 'summary.json'}")
