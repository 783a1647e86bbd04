"""What the read block saves by running its token-wise work at the labelled token only (``labelled_token_block``).

    python benchmarks/labelled_token_block.py [--batch 16] [--seq 64] [--rounds 6] [--steps 10] [--json out.json]

The quickstart's training step on the embedded SmolLM2: blocks 8 and 9 train, the head reads block 9 (``read_layer`` 9)
at the last token, and blocks 0..7 are a passthrough, as under the frozen-prefix cache. Three ways of running the read
block, timed in turns (``--rounds`` rounds of ``--steps`` steps each; the best round of each is kept, because CPUs are
shared):

* ``whole``: every token through the whole block;
* ``mlp``: its MLP at the labelled token only;
* ``mlp+projections``: its MLP and its attention's query and output projections at the labelled token only (what
  ``nsr_hf.architectures.labelled_token_block`` does). The keys and values still come from every token.

It also checks that the three give the same representation at the labelled token (to float round-off).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time

import torch

import nsr_hf.architectures as architectures
from nsr_hf.models import load_model_and_tokenizer


class Passthrough(torch.nn.Module):
    """A frozen block whose output the prefix cache would give: its input, unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--read_layer", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model, _ = load_model_and_tokenizer(args.model)
    read = args.read_layer
    layers = architectures.get_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in layers[read - 1:read + 1]:
        for p in block.parameters():
            p.requires_grad_(True)
    parent_path, _, name = architectures.arch_spec(model).layers.rpartition(".")
    setattr(model.get_submodule(parent_path), name,
            torch.nn.ModuleList([Passthrough() for _ in range(read - 1)] + list(layers[read - 1:])))
    spec = architectures.arch_spec(model)
    ways = {"whole": None, "mlp": (), "mlp+projections": spec.token_wise}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator)
    mask = torch.ones_like(ids)
    at = torch.full((args.batch,), args.seq - 1)
    rows = torch.arange(args.batch)

    def step(way, backward=True):
        if ways[way] is None:
            context = contextlib.nullcontext()
        else:
            architectures.ARCHITECTURES[model.config.model_type] = dataclasses.replace(spec, token_wise=ways[way])
            context = architectures.labelled_token_block(model, read, at)
        try:
            with architectures.truncated(model, read), context:
                h = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[rows, at]
        finally:
            architectures.ARCHITECTURES[model.config.model_type] = spec
        if backward:
            h.pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
        return h.detach()

    reference = step("whole", backward=False)
    difference = {way: float((step(way, backward=False) - reference).abs().max()) for way in ways}
    best = {way: float("inf") for way in ways}
    for _ in range(args.rounds):
        for way in ways:
            step(way)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(way)
            best[way] = min(best[way], (time.perf_counter() - start) / args.steps)
    print(f"{args.model}: a training step of blocks {read - 1}..{read}, {args.batch} rows x {args.seq} tokens, "
          f"{torch.get_num_threads()} threads, best of {args.rounds} rounds of {args.steps} steps")
    for way in ways:
        print(f"  {way:16s} {best[way]:.3f} s a step ({best[way] / best['whole']:.2f} of whole); "
              f"max |difference| of the representation from whole {difference[way]:.2e}")
    result = {"model": args.model, "batch": args.batch, "seq": args.seq, "read_layer": read, "seconds_per_step": best,
              "max_abs_difference": difference}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
