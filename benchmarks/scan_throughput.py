"""Scan throughput against a bare forward pass, and peak memory against the corpus size.

    python benchmarks/scan_throughput.py [--documents 64] [--repeats 3] [--memory_sizes 200 800] [--json out.json]
    python benchmarks/scan_throughput.py --device cuda --batch_size 32 --documents 512     # on a GPU

On the embedded SmolLM2 and the embedded corpus, over all 30 layers with ``position="all"``:

* ``bare forward``: ``model(**inputs, use_cache=False)`` under ``inference_mode``, no hooks, logits included,
  on exactly the batches the scanner makes (same documents, same length-sorted batching, same padding);
* ``bare backbone``: the same without the LM head (the scan stops before it too; shown for honesty);
* ``scan``: ``NeuronScanner.accumulate_batches`` on those batches (statistics and top-k of all 46,080 neurons).

Tokenisation is done once beforehand and is not timed (it is the same for all three). Runs alternate
(bare, backbone, scan, bare, ...) and the best of ``--repeats`` is kept, because CPUs may be shared.
Target (issue "NeuronScanner"): scan tokens/s >= 0.8 x bare forward tokens/s.

Peak memory: for each of ``--memory_sizes`` a fresh subprocess runs a whole scan (``NeuronScanner.scan``:
accumulate + ranking + example windows) and reports its peak RSS (and peak CUDA memory on a GPU), so the
numbers do not pollute each other. Memory must not grow with the number of documents.

``--random_init`` builds the model from ``--model``'s config with random weights (for a machine that has
the config and tokenizer but not the weights); timings depend on shapes, not on weights.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from nsr_hf.capture import model_inputs
from nsr_hf.data.corpus import load_corpus
from nsr_hf.scanner import NeuronScanner, ScanConfig


def peak_rss_mib() -> float:
    """Peak resident memory of this process (VmHWM, which ``reset_peak_rss`` can reset; else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS (Linux >= 4.0), so that loading the model does not mask the scan's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    from nsr_hf.models import load_model_and_tokenizer, load_tokenizer, resolve_model_path

    dtype = getattr(torch, args.dtype)
    if args.random_init:
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(resolve_model_path(args.model))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(args.device).eval()
        return model, load_tokenizer(args.model)
    return load_model_and_tokenizer(args.model, dtype=dtype, device=args.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def memory_run(args) -> None:
    """One whole scan in this process; prints a JSON line with the peak memory."""
    model, tokenizer = load(args)
    source = load_corpus(args.corpus)
    next(iter(source))  # builds the embedded corpus (all of it, whatever the scan's size) before the baseline
    reset = reset_peak_rss()
    before = peak_rss_mib()
    config = ScanConfig(max_documents=args.memory_run, batch_size=args.batch_size, output_dir=None, histogram_documents=0)
    t = time.perf_counter()
    result = NeuronScanner(model, tokenizer, config).scan(source, progress=False)
    seconds = time.perf_counter() - t
    run = {"documents": result.metadata["documents"], "tokens": result.metadata["tokens"], "seconds": seconds,
           "peak_rss_before_scan_mib": before, "peak_rss_mib": peak_rss_mib(), "peak_reset": reset}
    if args.device.startswith("cuda"):
        run["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(run))


def throughput(args) -> dict:
    model, tokenizer = load(args)
    docs = list(enumerate(load_corpus(args.corpus).iter_documents(limit=args.documents)))
    scanner = NeuronScanner(model, tokenizer, ScanConfig(max_documents=args.documents, batch_size=args.batch_size, output_dir=None))
    t = time.perf_counter()
    batches = [(index, {k: v.to(args.device) for k, v in batch.items()}) for index, batch in scanner.iter_batches(docs)]
    tokenise_s = time.perf_counter() - t
    real_tokens = sum(int(b["attention_mask"].sum()) for _, b in batches)
    padded_tokens = sum(b["input_ids"].numel() for _, b in batches)

    def bare():
        with torch.inference_mode():
            for _, batch in batches:
                model(**model_inputs(batch), use_cache=False)

    def backbone():
        with torch.inference_mode():
            for _, batch in batches:
                model.model(**model_inputs(batch), use_cache=False)

    def scan():
        scanner.accumulate_batches(batches)

    runs = {"bare_forward": bare, "bare_backbone": backbone, "scan": scan}
    best = {name: float("inf") for name in runs}
    with torch.inference_mode():  # warm-up on one batch
        model(**model_inputs(batches[0][1]), use_cache=False)
    scanner.accumulate_batches(batches[:1])
    for _ in range(args.repeats):
        for name, fn in runs.items():
            sync(args.device)
            t = time.perf_counter()
            fn()
            sync(args.device)
            best[name] = min(best[name], time.perf_counter() - t)
    tps = {name: real_tokens / seconds for name, seconds in best.items()}
    return {
        "model": args.model, "random_init": args.random_init, "device": args.device, "dtype": args.dtype,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "documents": len(docs), "batches": len(batches), "batch_size": args.batch_size, "real_tokens": real_tokens,
        "padded_tokens": padded_tokens, "threads": torch.get_num_threads(), "tokenise_seconds": tokenise_s,
        "seconds": best, "tokens_per_s": tps,
        "ratio_scan_vs_bare_forward": tps["scan"] / tps["bare_forward"],
        "ratio_scan_vs_bare_backbone": tps["scan"] / tps["bare_backbone"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--random_init", action="store_true", help="random weights from the model's config")
    parser.add_argument("--corpus", default="embedded", help="a corpus spec for nsr_hf.data.corpus.load_corpus")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--documents", type=int, default=64, help="documents for the throughput comparison")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory_sizes", type=int, nargs="*", default=[200, 800], help="corpus sizes for the peak-memory runs")
    parser.add_argument("--memory_run", type=int, default=None, help=argparse.SUPPRESS)  # internal: one memory run
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if args.memory_run is not None:
        memory_run(args)
        return

    result = throughput(args)
    tps = result["tokens_per_s"]
    print(f"{result['model']}{' (random weights)' if args.random_init else ''} on {result['device_name']}, {args.dtype}: "
          f"{result['documents']} documents, {result['real_tokens']} real tokens ({result['padded_tokens']} with padding) "
          f"in {result['batches']} batches of {result['batch_size']}, {result['threads']} CPU threads, best of {args.repeats}")
    print(f"  bare forward (logits)   {tps['bare_forward']:10.0f} tokens/s")
    print(f"  bare backbone (no head) {tps['bare_backbone']:10.0f} tokens/s")
    print(f"  scan, all layers        {tps['scan']:10.0f} tokens/s")
    print(f"  ratio scan / bare forward  {result['ratio_scan_vs_bare_forward']:.3f}   (target >= 0.8)")
    print(f"  ratio scan / bare backbone {result['ratio_scan_vs_bare_backbone']:.3f}")
    print(f"  (tokenising the batches, not timed above: {result['tokenise_seconds']:.2f} s)", flush=True)

    result["memory"] = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    passed = ["--model", args.model, "--corpus", args.corpus, "--device", args.device, "--dtype", args.dtype,
              "--batch_size", str(args.batch_size)]
    passed += ["--random_init"] if args.random_init else []
    for size in args.memory_sizes:
        out = subprocess.run([sys.executable, __file__, "--memory_run", str(size), *passed], capture_output=True, text=True, env=env,
                             check=False)
        if out.returncode != 0:
            raise RuntimeError(f"memory run of {size} documents failed:\n{out.stderr[-3000:]}")
        run = json.loads(out.stdout.strip().splitlines()[-1])
        result["memory"].append(run)
        cuda = f", peak CUDA {run['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in run else ""
        print(f"  whole scan of {run['documents']:5d} documents ({run['tokens']:7d} tokens, {run['seconds']:6.1f} s): "
              f"peak RSS during the scan {run['peak_rss_mib']:.0f} MiB (at its start: {run['peak_rss_before_scan_mib']:.0f} MiB"
              f"{'' if run['peak_reset'] else '; peak not resettable here, includes loading'}){cuda}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
