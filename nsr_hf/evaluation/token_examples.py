"""Per-token examples of a neuron: what the dashboard highlights token by token (``evaluation/examples.json``).

No other file of a run holds the neuron's value at every token of a text: the dataset keeps the labelled token's value,
the scan its top tokens with a text window. This stage reads, for a few rows of the evaluated split — the rows with the
largest labelled value and one row near each of several quantiles — the neuron at every token of the row's
``input_ids`` (one forward pass per row for all of the run's neurons, stopped after the deepest target layer: a few
hundred milliseconds for SmolLM2 on a CPU), and writes the tokens, their values and the labelled token, per neuron. The
values come from the model the baselines read (the original model) when the caller has it, else from the predictor's
own base model; ``source`` says which, since a strategy that trains the target's layer or the blocks before it moves the
neuron away from the dataset's labels.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EXAMPLES_FILE = "examples.json"
TOP_ROWS = 8
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)
MAX_NEURONS = 16  # a predictor of many neurons: examples for its first 16 (one pass per row reads them all)


def example_rows(values: Sequence[float], top: int = TOP_ROWS, quantiles: Sequence[float] = QUANTILES) -> list[tuple[str, int]]:
    """``(group, row)`` pairs: the ``top`` rows with the largest values (group ``"top"``), then for each quantile the row
    whose value is nearest to it (group ``"q<percent>"``), each row shown once."""
    values = np.asarray(values, dtype=np.float64)
    chosen = [("top", int(i)) for i in np.argsort(-values, kind="stable")[:top]]
    seen = {row for _, row in chosen}
    for q in quantiles:
        target = np.quantile(values, q) if values.size else 0.0
        for row in np.argsort(np.abs(values - target), kind="stable"):
            if int(row) not in seen:
                chosen.append((f"q{round(100 * q):g}", int(row)))
                seen.add(int(row))
                break
    return chosen


def token_values(model, input_ids: Sequence[int], neurons: Sequence[str]) -> dict[str, np.ndarray]:
    """Each of ``neurons``' value at every token of one row's ``input_ids`` (float64, one per token), from one forward pass."""
    import torch

    from nsr_hf.capture import Neuron, capture_activations

    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    capture = capture_activations(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, list(neurons), position="all")
    out, seen = {}, {}
    for name in neurons:  # within a layer, the capture's columns follow the order the neurons were asked in
        layer = Neuron.parse(name).layer
        out[name] = capture[layer][0, :, seen.get(layer, 0)].double().cpu().numpy()
        seen[layer] = seen.get(layer, 0) + 1
    return out


def token_examples(model, tokenizer, rows, neurons: Sequence[str], columns: Sequence[int], *, split: str, source: str,
                   top: int = TOP_ROWS, quantiles: Sequence[float] = QUANTILES, max_neurons: int = MAX_NEURONS) -> dict:
    """The content of ``examples.json`` for ``neurons`` (columns ``columns`` of the dataset's ``activations``) on ``rows``
    (one split of an activation dataset): for each neuron, its chosen rows' tokens (decoded one by one), the neuron's value
    at each, the labelled token's position and the dataset's value there. A row chosen for several neurons is read once,
    for all of them. Only the first ``max_neurons`` neurons get examples (``not_shown`` lists the others). ``source``
    names the model the values come from."""
    neurons, columns = list(neurons), list(columns)
    shown = neurons[:max_neurons]
    result = {"split": split, "source": source, "top": top, "quantiles": list(quantiles), "neurons": shown, "by_neuron": {}}
    if len(neurons) > max_neurons:
        result["not_shown"] = neurons[max_neurons:]
    if "label_position" not in rows.column_names or not len(rows):
        return {**result, "skipped": "the dataset has no labelled token per row (label_position): no per-token examples"}
    labelled = np.asarray([np.asarray(v, dtype=np.float64).reshape(-1) for v in rows["activations"]])
    chosen = {n: example_rows(labelled[:, c], top, quantiles) for n, c in zip(shown, columns)}
    read: dict[int, tuple[list[str], dict[str, np.ndarray], dict]] = {}
    for row in sorted({row for pairs in chosen.values() for _, row in pairs}):
        record = rows[row]
        ids = list(record["input_ids"])
        read[row] = ([tokenizer.decode([i]) for i in ids], token_values(model, ids, shown), record)
    for neuron, column in zip(shown, columns):
        examples = []
        for group, row in chosen[neuron]:
            tokens, values, record = read[row]
            examples.append({"group": group, "row": row, "doc_id": record.get("doc_id"),
                             "label_position": int(record["label_position"]), "label_value": float(labelled[row, column]),
                             "tokens": tokens, "values": [float(v) for v in values[neuron]]})
        result["by_neuron"][neuron] = {"neuron": neuron, "examples": examples}
    return result


def examples_of(data: dict | None, neuron: str) -> dict | None:
    """One neuron's entry of an ``examples.json`` (``split``, ``source`` and its ``examples``), or None. Reads the
    single-neuron files that evaluations wrote before the file held every neuron too."""
    data = data or {}
    if "by_neuron" in data:
        entry = data["by_neuron"].get(neuron)
        if entry is None and data.get("skipped") and neuron in data.get("neurons", []):
            entry = {"examples": []}
        shared = {k: data[k] for k in ("split", "source", "skipped") if k in data}
        return None if entry is None else {**shared, **entry, "neuron": neuron}
    return data if data.get("neuron") == neuron else None
