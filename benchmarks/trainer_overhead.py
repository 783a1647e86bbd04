"""Seconds per training step of ``PredictorTrainer`` against a plain ``transformers.Trainer`` fine-tune of the same
model, batch and trainable weights with an equivalent head (target: at most 10% overhead).

    python benchmarks/trainer_overhead.py [--model smollm2-135m] [--read_layer 9] [--k 2] [--batch 16] [--seq 64] [--steps 12]

Both train the last ``k`` blocks up to ``read_layer``, the final norm and a linear head on the final-normed residual at
the last token with an MSE loss, on the same pre-tokenised rows (same lengths, so the same padding), AdamW, fp32, one
process. The plain side is a minimal ``nn.Module`` (hidden states of the truncated model -> norm -> linear) fed by the
default collator; ``PredictorTrainer`` adds its collator (dynamic padding), label transform, metrics plumbing and the
drift monitor when ``--monitor`` is given. Step times are measured by a callback from ``on_step_begin`` to
``on_step_end`` after ``--warmup`` steps; the table shows the median and the overhead.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t)


class PlainRegressor(nn.Module):
    """The baseline: a causal LM's hidden state after ``read_layer`` through its final norm, a linear head, MSE."""

    def __init__(self, base, read_layer: int):
        super().__init__()
        self.base, self.read_layer = base, read_layer
        self.head = nn.Linear(base.config.hidden_size, 1)

    def forward(self, input_ids, attention_mask, labels=None):
        from nsr_hf.architectures import truncated

        with truncated(self.base, self.read_layer):
            hidden = self.base.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.sum(-1) - 1
        pred = self.head(hidden[torch.arange(hidden.shape[0]), last])
        loss = None if labels is None else nn.functional.mse_loss(pred, labels)
        return {"loss": loss, "logits": pred}


def rows(tokenizer, n: int, seq: int, seed: int = 0) -> dict:
    g = np.random.default_rng(seed)
    ids = g.integers(10, tokenizer.vocab_size - 10, size=(n, seq)).tolist()
    return {"input_ids": ids, "attention_mask": [[1] * seq for _ in ids], "label_position": [seq - 1] * n,
            "activations": [[float(v)] for v in g.normal(size=n)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--read_layer", type=int, default=9)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternate the two trainers this many times (fair on a busy machine)")
    parser.add_argument("--monitor", action="store_true", help="also attach the DriftMonitor (every 50 steps) to PredictorTrainer")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from nsr_hf.modeling.predictor import ActivationPredictor
    from nsr_hf.models import load_model_and_tokenizer
    from nsr_hf.training.trainer import PredictorTrainer

    base, tok = load_model_and_tokenizer(args.model)
    data = rows(tok, args.batch * (args.steps + 1), args.seq)
    common = dict(max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=1e-4, report_to="none", save_strategy="no",
                  logging_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0, dataloader_num_workers=0)
    results = {"plain Trainer": [], "PredictorTrainer": []}
    trainable = 0
    for _ in range(args.rounds):
        # plain Trainer
        torch.manual_seed(0)
        plain = PlainRegressor(base, args.read_layer)
        names = [f"base.model.layers.{i}." for i in range(args.read_layer - args.k + 1, args.read_layer + 1)] + [
            "base.model.norm.", "head."]
        for name, p in plain.named_parameters():
            p.requires_grad_(any(name.startswith(n) for n in names))
        plain_data = Dataset.from_dict({"input_ids": data["input_ids"], "attention_mask": data["attention_mask"],
                                        "labels": [[v[0]] for v in data["activations"]]})
        timer = StepTimer()
        Trainer(model=plain, args=TrainingArguments("/tmp/nsr_bench_plain", **common), train_dataset=plain_data, callbacks=[timer]).train()
        results["plain Trainer"] += timer.times[args.warmup:]
        del plain

        # PredictorTrainer
        torch.manual_seed(0)
        predictor = ActivationPredictor.from_base(base, tok, neurons=[f"{max(args.read_layer - args.k, 0)}.0"], read_layer=args.read_layer)
        predictor.config.label_transform = {"mean": [0.0], "std": [1.0]}
        timer = StepTimer()
        trainer = PredictorTrainer(model=predictor, args=TrainingArguments("/tmp/nsr_bench_predictor", **common),
                                   train_dataset=Dataset.from_dict(data), unfreeze={"strategy": "last_k", "k": args.k}, callbacks=[timer])
        if args.monitor:
            from nsr_hf.training.monitoring import DriftMonitor

            DriftMonitor(Dataset.from_dict(data), every_n_steps=50).bind(trainer)
        trainer.train()
        results["PredictorTrainer"] += timer.times[args.warmup:]
        trainable = sum(p.numel() for p in predictor.parameters() if p.requires_grad)
        del predictor, trainer

    plain_s = statistics.median(results["plain Trainer"])
    print(f"\n{args.model}: last {args.k} blocks up to block {args.read_layer} + norm + head ({trainable:,} trainable), "
          f"batch {args.batch}x{args.seq}, "
          f"{len(results['plain Trainer'])} timed steps each")
    print(f"{'trainer':<20} {'median s/step':>14} {'min':>8} {'overhead':>9}")
    out = {"model": args.model, "read_layer": args.read_layer, "k": args.k, "batch": args.batch, "seq": args.seq, "rows": []}
    for name, times in results.items():
        med = statistics.median(times)
        print(f"{name:<20} {med:>14.3f} {min(times):>8.3f} {100 * (med / plain_s - 1):>8.1f}%")
        out["rows"].append({"trainer": name, "median_s": med, "min_s": min(times), "overhead": med / plain_s - 1})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
