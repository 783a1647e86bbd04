"""Activation dataset generation: throughput and memory.

    python benchmarks/dataset_throughput.py [--layer 15] [--sizes 300 1200] [--neurons 1 16] [--json out.json]

Each run is a fresh subprocess (so peak RSS is its own) that loads the embedded SmolLM2 and the embedded corpus,
then generates an activation dataset (position "last", max_length 128, shard_size 100) for the first N documents
at a middle layer with K neurons. It reports:

* rows/s and tokens/s of ``ActivationDatasetGenerator.generate()`` (everything: capture, Arrow shards, join,
  transform columns, save), and the share of that time spent inside ``capture_activations`` (the forward pass):
  the rest is the writer and bookkeeping (PITFALLS HF-13: measure the writer, not only the forward);
* the RSS before generation (model and corpus loaded) and the peak RSS during generation (the kernel's peak mark
  is reset just before), at two corpus sizes: the increase must not grow with the number of documents.

A micro-benchmark compares the two ways of writing K float32 activations per row: the Arrow arrays the generator
builds, and ``Dataset.from_generator`` with declared ``List(Value("float32"), length=K)`` features.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to clear_refs), so that the peak measured afterwards is the
    generation's, not that of loading the model."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS since the last reset (VmHWM), else since the process started."""
    hwm = _status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if math.isnan(hwm) else hwm


def run_one(layer: int, num_neurons: int, documents: int, threads: int | None) -> dict:
    """One generation in this process (called in a fresh subprocess)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    import nsr_hf.data.generator as dg
    from nsr_hf.data.corpus import EmbeddedCorpus
    from nsr_hf.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    corpus = EmbeddedCorpus()
    list(corpus.iter_documents(limit=documents))  # the embedded corpus is parsed once and cached: not timed
    capture_seconds = [0.0]
    real_capture = dg.capture_activations

    def timed_capture(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real_capture(*args, **kwargs)
        finally:
            capture_seconds[0] += time.perf_counter() - t

    neurons = [f"{layer}.{i * 37}" for i in range(num_neurons)]
    import gc

    import accelerate  # noqa: F401  (imported by the generator; imported here so that RSS "before" includes them)
    import datasets  # noqa: F401

    # Warm-up: the first forward pass touches the (memory-mapped) weights and the allocator's buffers; that is
    # the model's memory, not the dataset's.
    dg.capture_activations(model, ["warm up " * 64] * 16, neurons, tokenizer=tokenizer, max_length=128)
    gc.collect()
    before = rss_mb()
    reset = reset_peak_rss()
    dg.capture_activations = timed_capture
    with tempfile.TemporaryDirectory() as out:
        config = dg.DatasetConfig(neurons=neurons, corpus="embedded", max_documents=documents, max_length=128,
                                  batch_size=16, shard_size=100, output_dir=os.path.join(out, "ds"))
        generator = dg.ActivationDatasetGenerator(config, model=model, tokenizer=tokenizer, corpus=corpus)
        t = time.perf_counter()
        dd = generator.generate()
        seconds = time.perf_counter() - t
        rows = sum(len(ds) for ds in dd.values())
        tokens = sum(sum(len(ids) for ids in ds["input_ids"]) for ds in dd.values())
    return {
        "layer": layer, "neurons": num_neurons, "documents": documents, "rows": rows, "tokens": tokens,
        "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1), "tokens_per_s": round(tokens / seconds, 0),
        "capture_share": round(capture_seconds[0] / seconds, 3),
        "rss_before_mb": round(before, 0), "peak_rss_mb": round(peak_rss_mb(), 0), "peak_reset": reset,
        "threads": torch.get_num_threads(),
    }


def writer_benchmark(rows: int = 100_000, k: int = 16) -> dict:
    """Rows/s writing K float32 values per row: Arrow arrays vs a generator with declared list features."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset, Features, List, Value, disable_progress_bars
    from datasets.table import InMemoryTable

    disable_progress_bars()
    values = np.random.default_rng(0).normal(size=(rows, k)).astype(np.float32)
    result = {"rows": rows, "neurons": k}
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        table = pa.table({"activations": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), k)})
        Dataset(InMemoryTable(table)).save_to_disk(os.path.join(out, "arrow"))
        result["arrow_rows_per_s"] = round(rows / (time.perf_counter() - t), 0)

        def gen():
            for row in values:
                yield {"activations": row}

        features = Features({"activations": List(Value("float32"), length=k)})
        t = time.perf_counter()
        Dataset.from_generator(gen, features=features, cache_dir=os.path.join(out, "cache"), fingerprint="bench",
                               writer_batch_size=1000)
        result["declared_features_rows_per_s"] = round(rows / (time.perf_counter() - t), 0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1200], help="documents per run (memory is compared across them)")
    parser.add_argument("--neurons", type=int, nargs="+", default=[1, 16], help="neuron counts (timed at the smallest size)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", nargs=3, type=int, metavar=("LAYER", "NEURONS", "DOCUMENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one, args.threads)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = [(k, min(args.sizes)) for k in args.neurons] + [(min(args.neurons), n) for n in sorted(args.sizes)[1:]]
    results = []
    for k, n in runs:
        command = [sys.executable, __file__, "--one", str(args.layer), str(k), str(n)] + (
            ["--threads", str(args.threads)] if args.threads else [])
        out = subprocess.run(command, capture_output=True, text=True, env=env)
        line = [text for text in out.stdout.splitlines() if text.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"run {k} neurons x {n} documents failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(line[0][len("RESULT "):]))
        r = results[-1]
        print(f"layer {r['layer']:>2} {r['neurons']:>3} neurons {r['documents']:>5} docs: {r['rows']:>5} rows {r['tokens']:>7} tokens "
              f"in {r['seconds']:>6.1f} s = {r['rows_per_s']:>6.1f} rows/s {r['tokens_per_s']:>7.0f} tokens/s "
              f"(capture {r['capture_share']:.0%}); RSS {r['rss_before_mb']:.0f} MB before, peak {r['peak_rss_mb']:.0f} MB", flush=True)
    by_size = {r["documents"]: r for r in results if r["neurons"] == min(args.neurons)}
    growth = {n: r["peak_rss_mb"] - r["rss_before_mb"] for n, r in by_size.items()}
    print("peak RSS increase during generation by size: " + ", ".join(f"{n} docs: {g:.0f} MB" for n, g in sorted(growth.items())))
    writer = writer_benchmark()
    print(f"writer, {writer['rows']} rows x {writer['neurons']} float32: Arrow arrays {writer['arrow_rows_per_s']:.0f} rows/s, "
          f"from_generator with declared List(float32, length={writer['neurons']}) {writer['declared_features_rows_per_s']:.0f} rows/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": results, "rss_growth_mb": growth, "writer": writer}, f, indent=2)


if __name__ == "__main__":
    main()
