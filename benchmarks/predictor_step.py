"""Forward+backward time per batch of an ActivationPredictor on the embedded SmolLM2, by read layer.

    python benchmarks/predictor_step.py [--batch 8] [--seq 128] [--repeats 3] [--json out.json]

The regression head reads block 8, 16 or 30 (1-based, i.e. ``read_layer`` 7, 15, 29); the reference is
the full causal LM (every block and the LM head's logits over the vocabulary) with its language-modelling loss. All
parameters train, so the backward pass covers every block the forward ran.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from nsr_hf.modeling.predictor import ActivationPredictor
from nsr_hf.models import load_model_and_tokenizer


def step_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", default="8,16,30", help="1-based block counts the head reads after")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    base, tok = load_model_and_tokenizer(args.model)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    labels = torch.randn(args.batch, 1)

    def full_step():  # the full causal LM with its own language-modelling loss
        base(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()

    base.train()
    t_full = step_time(full_step, args.repeats)
    print(f"full model (all {base.config.num_hidden_layers} blocks + LM head): "
          f"{t_full:.2f} s per forward+backward of {args.batch}x{args.seq} tokens")
    results = {"batch": args.batch, "seq": args.seq, "full_s": t_full, "rows": []}
    for blocks in [int(b) for b in args.blocks.split(",")]:
        predictor = ActivationPredictor.from_base(base, tok, neurons=["5.0"], read_layer=blocks - 1).train()

        def step(predictor=predictor):
            predictor(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

        t = step_time(step, args.repeats)
        results["rows"].append({"blocks": blocks, "seconds": t, "ratio_to_full": t / t_full})
        print(f"head after block {blocks:>2}: {t:.2f} s per step, {t / t_full:.2f} of the full model "
              f"(blocks ratio {blocks / base.config.num_hidden_layers:.2f})")
        del predictor, step
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
