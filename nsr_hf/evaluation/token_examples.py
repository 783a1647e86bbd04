"""Per-token examples of a neuron: what the dashboard highlights token by token (``evaluation/examples.json``).

No other file of a run holds the neuron's value at every token of a text: the dataset keeps the labelled token's value,
the scan its top tokens with a text window. This stage reads, for a few rows of the evaluated split — the rows with the
largest labelled value and one row near each of several quantiles — the neuron at every token of the row's
``input_ids`` (one forward pass per row, stopped after the target layer: a few hundred milliseconds for SmolLM2 on a
CPU), and writes the tokens, their values and the labelled token. The values come from the model the baselines read
(the original model) when the caller has it, else from the predictor's own base model; ``source`` says which, since a
strategy that trains the target's layer or the blocks before it moves the neuron away from the dataset's labels.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EXAMPLES_FILE = "examples.json"
TOP_ROWS = 8
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)


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


def token_values(model, input_ids: Sequence[int], neuron: str) -> np.ndarray:
    """The neuron's value at every token of one row's ``input_ids`` (float64, one per token)."""
    import torch

    from nsr_hf.capture import Neuron, capture_activations

    device = next(model.parameters()).device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    capture = capture_activations(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [neuron], position="all")
    return capture[Neuron.parse(neuron).layer][0, :, 0].double().cpu().numpy()


def token_examples(model, tokenizer, rows, neuron: str, column: int, *, split: str, source: str, top: int = TOP_ROWS,
                   quantiles: Sequence[float] = QUANTILES) -> dict:
    """The content of ``examples.json`` for ``neuron`` (column ``column`` of the dataset's ``activations``) on ``rows``
    (one split of an activation dataset): each chosen row's tokens (decoded one by one), the neuron's value at each,
    the labelled token's position and the dataset's value there. ``source`` names the model the values come from."""
    if "label_position" not in rows.column_names or not len(rows):
        return {"neuron": neuron, "split": split, "examples": [],
                "skipped": "the dataset has no labelled token per row (label_position): no per-token examples"}
    labelled = np.asarray([np.asarray(v, dtype=np.float64).reshape(-1)[column] for v in rows["activations"]])
    examples = []
    for group, row in example_rows(labelled, top, quantiles):
        record = rows[row]
        ids = list(record["input_ids"])
        values = token_values(model, ids, neuron)
        examples.append({"group": group, "row": row, "doc_id": record.get("doc_id"), "label_position": int(record["label_position"]),
                         "label_value": float(labelled[row]), "tokens": [tokenizer.decode([i]) for i in ids],
                         "values": [float(v) for v in values]})
    return {"neuron": neuron, "split": split, "source": source, "top": top, "quantiles": list(quantiles), "examples": examples}
