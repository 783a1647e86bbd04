"""Capture throughput against a full forward pass and against the FLOP floor.

    python benchmarks/capture_throughput.py [--batch 8] [--seq 128] [--repeats 5] [--json out.json]

For the embedded SmolLM2 and a randomly initialised gpt2-small-shaped model, and for a layer near the
start, the middle and the end, it times:

* ``full``: a full forward pass (logits included) with a hook that reads the layer (what one would do
  without nsr_hf);
* ``hf_early_stop``: plain HF with a hook that reads the layer and stops the forward there;
* ``nsr_capture``: ``nsr_hf.capture_activations`` for one neuron of the layer (early stop, and only the
  requested neurons of the deepest layer's MLP);
* ``nsr_capture_all``: the same for every neuron of the layer.

The FLOP floor is the forward FLOPs of the work the capture must do (every block before the layer, the
attention of the layer, and the requested part of its MLP) over this machine's float32 matmul rate,
measured on back-to-back 2048-square matmuls for a few seconds (``sustained``; the fastest single one,
``burst``, is reported too: on this 2-core machine it is about 1.25x the sustained rate). Targets (issue "Foundation"):
capture of layer L of N costs at most (L+1)/N + 10% of the full forward, and reaches at least 0.85 of the floor's tokens/s.

``gemm replay``: the capture's own matrix multiplies (recorded with a dispatch mode: same shapes, same strides, same
order) replayed back-to-back with nothing else. Their rate is what this machine's BLAS reaches on these shapes, an
upper bound for the fraction of the floor that any capture doing these multiplies can reach; their share of the
capture's time says how much is left outside the GEMMs (attention, norms, activations, indexing).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from nsr_hf.architectures import get_neuron_module, num_layers, num_neurons
from nsr_hf.capture import capture_activations, model_inputs


class _Stop(Exception):
    pass


def matmul_rates(n: int = 2048, seconds: float = 4.0) -> dict[str, float]:
    """This machine's float32 matmul FLOP/s on ``n``-square matrices: ``sustained`` (total FLOPs over total
    time of back-to-back matmuls for ``seconds``, the rate a long forward pass can count on) and ``burst``
    (the fastest single matmul, with the cores at their highest clock)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    flops = 2 * n**3
    return {"sustained": flops * len(times) / sum(times), "burst": flops / min(times)}


class GemmRecorder:
    """Records every matrix multiply a forward pass dispatches (``linear``, ``mm``, ``addmm``, ``bmm``, ``baddbmm``:
    ``nn.Linear``, GPT-2's ``Conv1D`` and unfused attention) with its operands' shapes and strides, so that exactly those GEMMs
    can be replayed back-to-back with nothing between them (``replay``). The replay's rate is what this machine's
    BLAS achieves on the model's own shapes: no implementation that does these multiplies can run them faster, so it
    bounds the fraction of any floor a capture can reach. Fused attention (SDPA's flash kernel) is not a GEMM call
    and is not replayed: its FLOPs are few next to the projections'."""

    def __init__(self):
        self.calls: list[tuple] = []

    def record(self, fn):
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        gemms = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
        calls = self.calls

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in gemms:
                    calls.append((func, [(tuple(a.shape), tuple(a.stride())) if isinstance(a, torch.Tensor) else a for a in args],
                                  dict(kwargs or {})))
                return func(*args, **(kwargs or {}))

        with _Mode():
            fn()
        return self

    @staticmethod
    def _flops(func, specs) -> float:
        aten = torch.ops.aten
        tensors = [s for s in specs if isinstance(s, tuple)]
        if func is aten.linear.default:  # (input (..., k), weight (n, k), bias)
            x, w = tensors[0][0], tensors[1][0]
            return 2.0 * math.prod(x[:-1]) * w[0] * w[1]
        a, b = (tensors[-2][0], tensors[-1][0])
        if func in (aten.mm.default, aten.addmm.default):
            return 2.0 * a[0] * a[1] * b[1]
        return 2.0 * a[0] * a[1] * a[2] * b[2]

    @property
    def flops(self) -> float:
        return sum(self._flops(f, specs) for f, specs, _ in self.calls)

    def operands(self) -> list[tuple]:
        out = []
        for func, specs, kwargs in self.calls:
            args = []
            for spec in specs:
                if isinstance(spec, tuple):
                    shape, stride = spec
                    size = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
                    args.append(torch.randn(max(size, 1)).as_strided(shape, stride))
                else:
                    args.append(spec)
            out.append((func, args, kwargs))
        return out

    def replay(self, repeats: int) -> dict:
        """Mean seconds of the recorded GEMMs run back-to-back, their FLOPs and rate."""
        ops = self.operands()

        def run():
            for func, args, kwargs in ops:
                func(*args, **kwargs)

        seconds = mean_time(run, repeats)
        return {"gemms": len(ops), "flops": self.flops, "seconds": seconds, "rate": self.flops / seconds}


def block_flops(config, seq: int, neuron_fraction: float = 1.0, with_mlp_out: bool = True) -> float:
    """Forward FLOPs per token of one block: projections (2 FLOPs per weight) and attention scores/values."""
    d = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    m = num_neurons(config)
    attn = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2  # q, o + k, v
    n_in = 2 if config.model_type in ("llama", "mistral", "qwen2") else 1
    mlp_in = n_in * d * m * neuron_fraction
    mlp_out = d * m if with_mlp_out else 0
    scores = 2 * seq * heads * head_dim  # QK^T and AV for one query over the (causal, average) sequence: 2 * seq/2 * 2
    return 2 * (attn + mlp_in + mlp_out) + scores


def floor_flops(config, layer: int, seq: int, n_neurons: int) -> float:
    """FLOPs per token the capture of ``n_neurons`` neurons of ``layer`` must do."""
    m = num_neurons(config)
    return layer * block_flops(config, seq) + block_flops(config, seq, n_neurons / m, with_mlp_out=False)


def full_flops(config, seq: int) -> float:
    return num_layers(config) * block_flops(config, seq) + 2 * config.hidden_size * config.vocab_size


def mean_time(fn, repeats: int) -> float:
    """Mean seconds per call after a warm-up call (the same kind of figure as the sustained matmul rate)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench_model(name: str, plain, model, batch: dict, layers: list[int], repeats: int, rates: dict) -> list[dict]:
    """``plain``: the model as HF builds it (baselines); ``model``: as nsr_hf loads it (fused kernels)."""
    tokens = batch["input_ids"].numel()
    seq = batch["input_ids"].shape[1]
    inputs = model_inputs(batch)
    n_layers = num_layers(model)

    def run_full(layer):
        seen = {}

        def hook(m, a):
            seen["x"] = a[0][..., :1].clone()

        h = get_neuron_module(plain, layer).register_forward_pre_hook(hook)
        try:
            with torch.inference_mode():
                plain(**inputs, use_cache=False)
        finally:
            h.remove()

    def run_hf_early(layer):
        def hook(m, a):
            a[0][..., :1].clone()
            raise _Stop

        h = get_neuron_module(plain, layer).register_forward_pre_hook(hook)
        try:
            with torch.inference_mode():
                plain(**inputs, use_cache=False)
        except _Stop:
            pass
        finally:
            h.remove()

    rows = []
    t_full = mean_time(lambda: run_full(n_layers - 1), repeats)
    for layer in layers:
        times = {
            "full": t_full,
            "hf_early_stop": mean_time(lambda: run_hf_early(layer), repeats),
            "nsr_capture": mean_time(lambda: capture_activations(model, batch, {layer: [0]}), repeats),
            "nsr_capture_all": mean_time(lambda: capture_activations(model, batch, {layer: None}), repeats),
        }
        row = {
            "model": name,
            "layer": layer,
            "n_layers": n_layers,
            "tokens_per_s": {k: tokens / v for k, v in times.items()},
            "cost_vs_full": {k: v / t_full for k, v in times.items()},
            "allowed_cost_vs_full": (layer + 1) / n_layers + 0.10,
            "fraction_of_floor": {},
        }
        for rate_name, rate in rates.items():
            floor_one = tokens * floor_flops(model.config, layer, seq, 1) / rate
            floor_all = tokens * floor_flops(model.config, layer, seq, num_neurons(model)) / rate
            row["fraction_of_floor"][rate_name] = {
                "full_forward": tokens * full_flops(model.config, seq) / rate / t_full,
                "hf_early_stop": floor_all / times["hf_early_stop"],
                "nsr_capture": floor_one / times["nsr_capture"],
                "nsr_capture_all": floor_all / times["nsr_capture_all"],
            }
        # the capture's own GEMMs replayed back-to-back: the rate this machine's BLAS gives these shapes
        replays = {}
        for key, neurons in (("nsr_capture", [0]), ("nsr_capture_all", None)):
            with torch.inference_mode():
                recorder = GemmRecorder().record(lambda: capture_activations(model, batch, {layer: neurons}))
            replays[key] = {**recorder.replay(repeats), "capture_seconds": times[key]}
            replays[key]["gemm_share_of_capture"] = replays[key]["seconds"] / times[key]
            replays[key]["rate_of"] = {r: replays[key]["rate"] / v for r, v in rates.items()}
        row["gemm_replay"] = replays
        rows.append(row)
        f = row["fraction_of_floor"]
        print(
            f"{name:>17} layer {layer:>2}/{n_layers}  tok/s: full {tokens / t_full:6.0f}, "
            f"hf early stop {row['tokens_per_s']['hf_early_stop']:6.0f}, "
            f"nsr 1 neuron {row['tokens_per_s']['nsr_capture']:6.0f}, nsr all {row['tokens_per_s']['nsr_capture_all']:6.0f} | "
            f"nsr cost {row['cost_vs_full']['nsr_capture']:.3f} of full (allowed {row['allowed_cost_vs_full']:.3f}) | "
            + " | ".join(
                f"of {r} floor: hf {v['hf_early_stop']:.2f}, nsr 1 {v['nsr_capture']:.2f}, nsr all {v['nsr_capture_all']:.2f}"
                for r, v in f.items()
            ),
            flush=True,
        )
        for key, rep in replays.items():
            print(f"{'':>17} {key}: its {rep['gemms']} GEMMs alone, back-to-back: {rep['rate'] / 1e9:.1f} GFLOP/s = "
                  + ", ".join(f"{v:.2f} of {r}" for r, v in rep["rate_of"].items())
                  + f"; they are {rep['gemm_share_of_capture']:.2f} of the capture's time", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="smollm2-135m,gpt2-small-random")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, GPT2Config

    from nsr_hf.models import fuse_kernels, load_model_and_tokenizer

    torch.manual_seed(0)
    rates = matmul_rates()
    print(f"float32 matmul rate (2048^3): sustained {rates['sustained'] / 1e9:.1f} GFLOP/s, burst {rates['burst'] / 1e9:.1f} GFLOP/s "
          f"on {torch.get_num_threads()} threads; batch {args.batch} x {args.seq} tokens")
    results = {"gflops": {k: v / 1e9 for k, v in rates.items()}, "batch": args.batch, "seq": args.seq,
               "threads": torch.get_num_threads(), "models": {}}
    for name in args.models.split(","):
        if name == "gpt2-small-random":
            plain = AutoModelForCausalLM.from_config(GPT2Config()).eval()  # gpt2-small shape, random weights
            model = copy.deepcopy(plain)
            fuse_kernels(model)
        else:
            plain, _ = load_model_and_tokenizer(name, fused_kernels=False)
            t = time.perf_counter()
            model, _ = load_model_and_tokenizer(name)
            print(f"loaded {name} in {time.perf_counter() - t:.2f} s (already converted, in a warm process)")
        n = num_layers(model)
        batch = {
            "input_ids": torch.randint(0, model.config.vocab_size, (args.batch, args.seq)),
            "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
        }
        results["models"][name] = {"rows": bench_model(name, plain, model, batch, [0, n // 2, n - 1], args.repeats, rates)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
