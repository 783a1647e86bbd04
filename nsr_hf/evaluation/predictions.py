"""What a trained predictor reports on the rows of an activation dataset split, and the truth it is scored against."""
from __future__ import annotations

import numpy as np

from nsr_hf.training.collator import PredictorDataCollator
from nsr_hf.utils import unwrap


def predict_split(predictor, rows, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
    """``(expected, greedy)`` of ``predictor`` on the rows of an activation dataset split, each (rows, K) float64 in
    activation units, read at each row's ``label_position`` (the labelled token); ``greedy`` is None for the
    regression head. The predictor is run in eval mode without gradients (its mode is restored after)."""
    import torch

    if len(rows) == 0:
        raise ValueError("predict_split got no rows.")
    inner = unwrap(predictor)
    collate = PredictorDataCollator(inner.tokenizer,
                                    pad_token_id=None if inner.tokenizer is not None else getattr(inner.base.config, "pad_token_id", None))
    device = next(predictor.parameters()).device
    was_training = predictor.training
    predictor.eval()
    expected, greedy = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
                out = predictor(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                                label_positions=batch["label_positions"].to(device))
                expected.append(out.predictions.float().cpu().numpy())
                if out.greedy_predictions is not None:
                    greedy.append(out.greedy_predictions.float().cpu().numpy())
    finally:
        predictor.train(was_training)
    expected = np.concatenate(expected).astype(np.float64)
    return expected, (np.concatenate(greedy).astype(np.float64) if greedy else None)


def targets_of(rows) -> np.ndarray:
    """(rows, K) float64: the ``activations`` column of a split (the labels from the frozen original model)."""
    values = rows["activations"]
    return np.asarray([np.asarray(v, dtype=np.float64).reshape(-1) for v in values]).reshape(len(rows), -1)
