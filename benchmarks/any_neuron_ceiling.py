"""What a reporter of any neuron could reach: three readings of a layer's neurons that need no training on them.

    python benchmarks/any_neuron_ceiling.py --layer 3 --output_dir outputs/any_ceiling        # the embedded default
    python benchmarks/any_neuron_ceiling.py --layer 3 --read_layers 2 3 5 --neurons 300 --json ceiling.json

A conditioned reporter (``nsr_hf.modeling.neuron_queries``) is told a neuron by its weights. Before training one, this
measures on the held-out documents (the test split), for ``--neurons`` neurons of ``--layer`` drawn at random, at each
read layer (the final-normed residual stream after that block, at the labelled token):

* ``ridge_probe_r2``: a ridge probe per neuron fitted on that neuron's own train labels (alpha on validation): the
  reference, which an any-neuron reporter cannot beat without the labels (first ``--probe_neurons`` neurons);
* ``output_read_r2``: the neuron read along its own output direction (``w_out / |w_out|^2``, the value written into the
  residual stream), with the best scale and mean *per neuron* fitted on its train labels: the ceiling of reading the
  write linearly, which a faithful reporter must do;
* ``input_recompute_r2``: the neuron computed again from the representation with its own input weights (the final norm's
  gain undone and the MLP norm's applied, then ``act(gate) * up`` or ``act(in)``), times one scale for every neuron:
  what a reporter gets by recomputing the neuron from what its input left in the residual stream, without reading the
  neuron at all (a read before the neuron's block is by construction unfaithful: the neuron cannot reach it).

The dataset holds every drawn neuron (``nsr dataset``), in ``output_dir/dataset`` (kept and reused).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def r2_columns(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    from nsr_hf.metrics import r2_rows

    return r2_rows(pred.T, true.T)


def quartiles(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(values)), "q25": float(np.percentile(values, 25)), "q75": float(np.percentile(values, 75))}


def recompute(model, layer: int, h: np.ndarray, neurons: list[int]) -> np.ndarray:
    """(rows, K) each neuron of ``layer`` computed from the representation ``h`` (final-normed) with its own input weights."""
    import torch

    from nsr_hf.architectures import arch_spec, get_final_norm, get_mlp, get_pre_mlp_norm

    spec = arch_spec(model)
    mlp = get_mlp(model, layer)
    gain = lambda module: module.weight.detach().double().numpy() if getattr(module, "weight", None) is not None else 1.0  # noqa: E731
    x = h / gain(get_final_norm(model)) * gain(get_pre_mlp_norm(model, layer))

    def project(name):
        module = getattr(mlp, name)
        w = module.weight.detach().double().numpy()
        w = w[:, neurons].T if spec.mlp_kind == "conv1d" else w[neurons]
        bias = getattr(module, "bias", None)
        return x @ w.T + (0.0 if bias is None else bias.detach().double().numpy()[neurons])

    act = getattr(mlp, spec.act)
    with torch.no_grad():
        if spec.mlp_kind == "gated":
            gate, up = (project(name) for name in spec.mlp_in)
            return act(torch.as_tensor(gate)).numpy() * up
        return act(torch.as_tensor(project(spec.mlp_in[0]))).numpy()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default="embedded")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--read_layers", type=int, nargs="+", default=None, help="default: the layer before, the layer, layer + 2")
    parser.add_argument("--neurons", type=int, default=300, help="neurons of the layer, drawn at random (seed 0)")
    parser.add_argument("--probe_neurons", type=int, default=64, help="of those, how many get a ridge probe each")
    parser.add_argument("--documents", type=int, default=1200)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/any_ceiling"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from nsr_hf.architectures import num_neurons
    from nsr_hf.data.columns import read_column
    from nsr_hf.data.generator import DatasetConfig, run_dataset
    from nsr_hf.data.storage import load_activation_dataset
    from nsr_hf.modeling.neuron_queries import neuron_queries
    from nsr_hf.modeling.probes import RidgeProbe, layer_features
    from nsr_hf.models import load_model_and_tokenizer

    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)
    picked = np.sort(np.random.default_rng(0).choice(num_neurons(model), size=args.neurons, replace=False))
    names = [f"{args.layer}.{i}" for i in picked]
    folder = args.output_dir / "dataset"
    if not (folder / "dataset_dict.json").is_file():
        run_dataset(DatasetConfig(neurons=names, model=args.model, corpus=args.corpus, max_documents=args.documents,
                                  max_length=args.max_length, output_dir=str(folder)), model=model, tokenizer=tokenizer)
    dd, _ = load_activation_dataset(folder)
    splits = ("train", "validation", "test")
    y = {s: read_column(dd[s], "activations", len(names)).astype(np.float64) for s in splits}
    live = np.flatnonzero(y["train"].std(0) > 1e-6)
    read_layers = args.read_layers or [max(args.layer - 1, 0), args.layer, args.layer + 2]
    features = {s: layer_features(model, dd[s], read_layers, batch_size=32, progress=False) for s in splits}
    hidden = model.config.hidden_size
    out_read = neuron_queries(model, names, "weights").double().numpy()[:, :hidden]  # w_out / |w_out|^2
    result = {"model": args.model, "layer": args.layer, "neurons": len(live), "rows": {s: len(dd[s]) for s in splits}, "by_read_layer": {}}
    for read in read_layers:
        X = {s: features[s][read] for s in splits}
        probes = []
        for j in live[: args.probe_neurons]:
            probe = RidgeProbe().fit(X["train"], y["train"][:, j], X["validation"], y["validation"][:, j])
            probes.append(r2_columns(probe.predict(X["test"])[:, None], y["test"][:, [j]])[0])
        center = X["train"].mean(0)
        read_train, read_test = ((X[s] - center) @ out_read[live].T for s in ("train", "test"))
        dev = y["train"][:, live] - y["train"][:, live].mean(0)
        scale = (read_train * dev).sum(0) / np.maximum((read_train ** 2).sum(0), 1e-12)
        output_read = r2_columns(scale * read_test + y["train"][:, live].mean(0), y["test"][:, live])
        v_train, v_test = (recompute(model, args.layer, X[s], list(picked[live])) for s in ("train", "test"))
        pooled = float((v_train * y["train"][:, live]).sum() / max((v_train ** 2).sum(), 1e-12))
        recomputed = r2_columns(pooled * v_test, y["test"][:, live])
        result["by_read_layer"][str(read)] = {"ridge_probe_r2": quartiles(probes), "output_read_r2": quartiles(output_read),
                                              "input_recompute_r2": quartiles(recomputed), "input_recompute_scale": pooled,
                                              "faithful_path": read >= args.layer}
    result["seconds"] = round(time.perf_counter() - started, 1)
    lines = [f"{args.model}, layer {args.layer}: {len(live)} neurons, test split ({result['rows']['test']} rows); medians [q25, q75]", "",
             "| read layer | ridge probe (own labels) | output direction (per-neuron fit) | recompute from input weights (one scale) |",
             "| --- | --- | --- | --- |"]
    for read, r in result["by_read_layer"].items():
        cell = lambda q: f"{q['median']:.3f} [{q['q25']:.3f}, {q['q75']:.3f}]"  # noqa: E731
        lines.append(f"| {read}{'' if r['faithful_path'] else ' (before the neuron)'} | {cell(r['ridge_probe_r2'])} | "
                     f"{cell(r['output_read_r2'])} | {cell(r['input_recompute_r2'])} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
