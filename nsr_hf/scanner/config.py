"""``ScanConfig``: what a scan reads, how it scores and ranks the neurons, and what it writes."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from nsr_hf.scanner.scores import SCORES
from nsr_hf.shared_config import CorpusFields

POSITIONS = ("all", "last")


@dataclass
class ScanConfig(CorpusFields):
    """Scan a corpus for the MLP neurons worth self-reporting (statistics, scores, top examples, plots)."""

    max_documents: Optional[int] = field(default=2000, metadata={
        "help": "Scan at most this many documents (after dropping duplicates); 0 or None: all"})
    layers: Optional[list[int]] = field(default=None, metadata={"help": "Layers to scan, e.g. --layers 10 11 12 (None: all layers)"})
    position: str = field(default="all", metadata={"help": "'all': every real token; 'last': the last real token of each document"})
    threshold: float = field(
        default=0.5,
        metadata={"help": "A neuron 'fires' at a position when its value is strictly above this (frac_above, selectivity, composite). "
                  "Never a test of == 0: GELU/SiLU outputs are almost never exactly 0. The default suits SmolLM2, whose values "
                  "centre on 0 with a std of 0.1 to 0.5 per layer"},
    )
    score: str = field(default="composite", metadata={"help": f"Ranking score, one of: {', '.join(SCORES)}"})
    dead_std_ratio: float = field(
        default=1e-3,
        metadata={"help": "A neuron whose std is at most this times the median std of the scanned neurons is dead "
                  "(constant ones always are): -inf in every score"},
    )
    top_n: int = field(default=20, metadata={"help": "How many top-ranked neurons to report with examples"})
    top_k_examples: int = field(default=10, metadata={"help": "Top activating examples kept per neuron"})
    example_window: int = field(default=8, metadata={"help": "Tokens of context shown on each side of an example's token"})
    batch_size: int = field(default=8, metadata={"help": "Documents per forward pass"})
    max_length: int = field(default=256, metadata={"help": "Documents are cut to this many tokens"})
    histogram_documents: int = field(default=200, metadata={
        "help": "Documents read again for the top neurons' histograms (0: no histograms)"})
    output_dir: Optional[str] = field(default="outputs/scan", metadata={
        "help": "Where to write the table, top_neurons.json and plots (None: do not write)"})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace a finished scan in output_dir (it is replaced only once the new scan is written; without this it is refused)"})
    seed: int = field(default=0, metadata={"help": "Random seed (the synthetic corpus samples with it)"})

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"Unknown score {self.score!r}: choose one of {', '.join(SCORES)}.")
        if self.position not in POSITIONS:
            raise ValueError(f"Unknown position rule {self.position!r} for a scan: "
                             "use 'all' (every real token) or 'last' (last real token).")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold}.")
        if not 0.0 <= self.dead_std_ratio < 1.0:
            raise ValueError(f"dead_std_ratio must be in [0, 1), got {self.dead_std_ratio}.")
        for name in ("top_n", "top_k_examples", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("example_window", "histogram_documents"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}.")
        if self.max_documents == 0:  # the command line cannot say None
            self.max_documents = None
        if self.max_documents is not None and self.max_documents < 0:
            raise ValueError(f"max_documents must be at least 1 (or 0 / None for the whole corpus), got {self.max_documents}.")
        if self.layers is not None:
            layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
            if not layers:
                raise ValueError("layers is empty: name at least one layer, or leave it unset to scan all layers.")
            if any(isinstance(x, bool) or not isinstance(x, int) for x in layers):
                raise ValueError(f"layers must be integers, got {self.layers!r}.")
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers lists a layer twice: {self.layers!r}.")
            self.layers = sorted(layers)
