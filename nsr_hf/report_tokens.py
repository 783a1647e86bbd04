"""Report tokens: the single tokens a token-head predictor emits, one per activation bin.

Chosen per tokenizer: digits for up to 10 bins, with a leading space where those are single tokens
(GPT-2: ``" 0"``), else without (SmolLM2, where ``" 0"`` is two tokens and ``"0"`` one); ``off``/``on``
for two bins. Every report token must be exactly one token of the vocabulary (PITFALLS 13).
"""
from __future__ import annotations

from typing import Sequence

DEFAULT_PROMPT_SUFFIX = "\nNeuron {neuron} level:"  # the token head's question, after the labelled token
DIGIT_SETS = ([f" {i}" for i in range(10)], [str(i) for i in range(10)])
ON_OFF_SETS = ([" off", " on"], ["off", "on"])


def _single(tokenizer, token: str) -> bool:
    return len(tokenizer.encode(token, add_special_tokens=False)) == 1


def default_report_tokens(tokenizer, num_bins: int) -> list[str]:
    """The default report tokens for ``num_bins`` bins in this tokenizer (a clear error when none fit)."""
    if num_bins > 10:
        raise ValueError(f"No default report tokens for {num_bins} bins: "
                         "pass report_tokens (one single token per bin), or use at most 10 bins.")
    candidates = ON_OFF_SETS + DIGIT_SETS if num_bins == 2 else DIGIT_SETS
    for tokens in candidates:
        if all(_single(tokenizer, t) for t in tokens[:num_bins]):
            return list(tokens[:num_bins])
    raise ValueError("Neither ' 0'..' 9' nor '0'..'9' are single tokens in this tokenizer: pass report_tokens (one single token per bin).")


def check_report_tokens(tokenizer, tokens: Sequence[str]) -> list[int]:
    """The id of each report token; a clear error names any token that is not exactly one token."""
    ids = []
    for t in tokens:
        encoded = tokenizer.encode(t, add_special_tokens=False)
        if len(encoded) != 1:
            pieces = tokenizer.convert_ids_to_tokens(encoded)
            raise ValueError(
                f"Report token {t!r} is {len(encoded)} tokens in this tokenizer ({pieces}); every report token must be one token. "
                "Choose single-token strings (one per bin) or fewer bins."
            )
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"Report tokens {list(tokens)} are not distinct tokens.")
    return ids
