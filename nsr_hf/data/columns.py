"""The columns of an activation dataset: their names and descriptions, the check that a dataset has them, and the
Arrow arrays they are built from and read back as numpy (datasets' row writer would turn every numpy row into a
Python list, PITFALLS HF-13).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nsr_hf.data.labels import LabelTransform

BASE_COLUMNS = ("text", "doc_id", "input_ids", "attention_mask", "activations")
LABEL_COLUMNS = ("label_position", "label_token_id")
TRANSFORM_COLUMNS = ("activations_z", "bin")


def column_descriptions(layout: str) -> dict[str, str]:
    """What each column holds, for ``layout`` ``"document"``, ``"rows"`` or ``"column"`` (the card lists them)."""
    columns = {
        "text": "the document's original text (not cut)",
        "doc_id": "the document's id in its corpus (splits are assigned by it)",
        "input_ids": "token ids the model saw: encode_texts(text, max_length), no padding",
        "attention_mask": "all ones, same length as input_ids (for HF collators)",
    }
    if layout == "column":
        columns["activations"] = "per token of input_ids, the K neuron values (float32)"
        columns["activations_z"] = "per token, z-scores with train mean and std"
        columns["bin"] = "per token, bin index per neuron (train edges)"
    else:
        columns["label_position"] = "index in input_ids of the labelled token" + (" (one row per token)" if layout == "rows" else "")
        columns["label_token_id"] = "input_ids[label_position]"
        columns["activations"] = "the K neuron values at label_position (float32)"
        columns["activations_z"] = "z-scores with train mean and std (float32)"
        columns["bin"] = "bin index per neuron (train edges); report_tokens[bin] is the report"
    return columns


def required_columns(layout: Optional[str] = None) -> list[str]:
    """Columns an activation dataset must have (``layout`` ``None``: the per-document/per-row set)."""
    columns = list(BASE_COLUMNS)
    if layout != "column":
        columns += list(LABEL_COLUMNS)
    return columns


def validate_columns(dataset_dict, layout: Optional[str] = None) -> None:
    """Raise a ``ValueError`` naming the missing columns (and those present) of each split that lacks some."""
    needed = required_columns(layout)
    problems = []
    for split, ds in dataset_dict.items():
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            problems.append(f"split {split!r} lacks {missing} (it has {ds.column_names})")
    if problems:
        raise ValueError("not an nsr_hf activation dataset: " + "; ".join(problems) +
                         f". An activation dataset has the columns {needed}; make one with `nsr dataset`.")


# ----------------------------------------------------------------------------------------------------------
# Arrow arrays


def list_array(flat: np.ndarray, lengths: np.ndarray, value_type) -> pa.Array:
    """``flat`` values cut into one list per row of ``lengths``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


def fixed_list_array(values: np.ndarray, value_type) -> pa.Array:
    """``(n, K)`` values as n fixed-length K-lists."""
    values = np.asarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=value_type), values.shape[-1])


def token_list_array(values: np.ndarray, lengths: np.ndarray, value_type) -> pa.Array:
    """``(total_tokens, K)`` values as one list of K-lists per document."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), fixed_list_array(values, value_type))


def column_values(table_or_column, k: int) -> np.ndarray:
    """``(n, K)`` numpy values of an ``activations``-like column (fixed K-lists, or per-token lists of them)."""
    column = table_or_column
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    while pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type):
        column = pc.list_flatten(column)
    return column.to_numpy(zero_copy_only=False).reshape(-1, k)


def read_column(dataset, name: str, k: int, batch_size: int = 10_000) -> np.ndarray:
    """All values of a column of a (memory-mapped) Dataset, read in Arrow batches."""
    parts = [column_values(batch[name], k) for batch in dataset.with_format("arrow").iter(batch_size=batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, k), dtype=np.float32)


class TransformColumns:
    """``map`` function adding ``activations_z`` and ``bin`` to an Arrow batch (picklable, no closure)."""

    def __init__(self, transform: LabelTransform, layout: str):
        self.transform, self.layout = transform, layout

    def __call__(self, batch: pa.Table) -> pa.Table:
        k = len(self.transform.neurons)
        values = column_values(batch["activations"], k)
        z, bins = self.transform.zscore(values), self.transform.bin_of(values).astype(np.int32)
        if self.layout == "column":
            lengths = pc.list_value_length(batch["activations"]).to_numpy(zero_copy_only=False)
            z_col, bin_col = token_list_array(z, lengths, pa.float32()), token_list_array(bins, lengths, pa.int32())
        else:
            z_col, bin_col = fixed_list_array(z, pa.float32()), fixed_list_array(bins, pa.int32())
        for name in TRANSFORM_COLUMNS:
            if name in batch.column_names:
                batch = batch.drop_columns([name])
        return batch.append_column("activations_z", z_col).append_column("bin", bin_col)
