"""``PredictorDataCollator``: rows of an activation dataset -> a padded batch for ``ActivationPredictor.forward``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from nsr_hf.capture import pad_right


@dataclass
class PredictorDataCollator:
    """Batches rows of an activation dataset for ``ActivationPredictor.forward``.

    ``input_ids`` / ``attention_mask`` are right-padded to the longest row of the batch (dynamic padding) with
    ``pad_token_id`` (the tokenizer's pad id, else its eos id, else 0); ``label_positions`` comes from
    ``label_position`` (right padding never moves it); ``labels`` is float32 (batch, K) from ``activations``.
    An ``asked`` column (the conditioned token head's training rows: which of the predictor's neurons each row asks about)
    becomes ``asked`` (batch,) int64. Other columns (``text``, ``doc_id``, ``bin`` ...) are ignored.
    """

    tokenizer: Any = None
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if self.pad_token_id is None and self.tokenizer is not None:
            self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if self.pad_token_id is None:
            self.pad_token_id = 0

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PredictorDataCollator got an empty batch.")
        missing = [c for c in ("input_ids", "label_position", "activations") if c not in rows[0]]
        if missing:
            raise ValueError(f"Rows lack column(s) {missing}: an activation dataset (nsr dataset) has input_ids, label_position and "
                             "activations. If they exist in the dataset, set remove_unused_columns=False.")
        ids, mask = pad_right([r["input_ids"] for r in rows], self.pad_token_id, [r.get("attention_mask") for r in rows])
        positions = torch.as_tensor([int(r["label_position"]) for r in rows], dtype=torch.long)
        if (positions < 0).any() or (positions >= mask.sum(-1)).any():
            raise ValueError("A label_position points outside its row's real tokens.")
        labels = np.asarray([np.asarray(r["activations"], dtype=np.float32).reshape(-1) for r in rows])
        labels = torch.as_tensor(labels, dtype=torch.float32)
        batch = {"input_ids": ids, "attention_mask": mask, "label_positions": positions, "labels": labels}
        if "asked" in rows[0]:
            batch["asked"] = torch.as_tensor([int(r["asked"]) for r in rows], dtype=torch.long)
        return batch
