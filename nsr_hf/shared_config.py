"""Config fields that several stages share, declared once: the stage configs and ``TrainConfig`` inherit them.

- ``CorpusFields``: the model and the corpus (``ScanConfig``, ``DatasetConfig``, ``TrainConfig``, ``nsr capture``);
- ``SplitFields``: how documents are split into train / validation / test (``DatasetConfig``, ``TrainConfig``);
- ``EvaluationFields``: the evaluation's controls, intervals and faithfulness section (``EvaluateConfig``, ``TrainConfig``).

Each stage validates its fields in its own ``__post_init__``; a recipe's keys are the same in every stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from nsr_hf.errors import require_folder
from nsr_hf.models import EMBEDDED_NAME

# The precision of the baselines' other models (``EvaluationFields.baseline_dtype``; resolved by
# ``nsr_hf.evaluation.baselines.baseline_torch_dtype``).
BASELINE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class CorpusFields:
    """The model whose neurons are read, and the corpus of documents it reads."""

    model: str = field(default=EMBEDDED_NAME, metadata={"help": "HF model id, local folder, or 'smollm2-135m' (embedded)"})
    corpus: str = field(default="embedded", metadata={
        "help": "'embedded', a .txt/.jsonl/.json/.csv/.parquet file, 'synthetic', or a Hub dataset ('hub:NAME[:CONFIG[:SPLIT]]')"})
    text_field: str = field(default="text", metadata={"help": "Column that holds the text (files and Hub datasets)"})


@dataclass
class SplitFields:
    """The split of the documents by a hash of their id (the same split in the scan, the dataset and training)."""

    split_seed: int = field(default=0, metadata={"help": "Seed of the document-id hash that assigns splits"})
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1], metadata={
        "help": "Fractions of the documents in train, validation and test (sum to 1). "
                "A larger test split gives a sparse neuron's rare large values a chance to appear in it"})


@dataclass
class EvaluationFields:
    """The evaluation's cross-prediction control, R²-by-layer probe, confidence intervals and faithfulness section."""

    cross_models: list[str] = field(default_factory=lambda: ["minilm"], metadata={
        "help": "Other models for the cross-prediction control: 'minilm' (offline) or any HF id"})
    probe_layers: str = field(default="all", metadata={
        "help": "Layers of the R^2-by-layer probe: 'all', or 'up_to_read' (blocks up to the read layer: cheaper)"})
    baseline_dtype: str = field(default="auto", metadata={
        "help": "Precision of the baselines' other models, the random-init copy and the cross models: 'auto' (bfloat16 where "
                "this machine multiplies it natively: a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX; else float32), "
                "'float32' or 'bfloat16'. Their probes are fitted in float64 either way; the model under study always runs "
                "in its own precision"})
    n_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for every confidence interval (0: no intervals)"})
    counterfactual_rows: int = field(default=256, metadata={
        "help": "Faithfulness: held-out rows per split (and train rows for the probes) with the neuron set to counterfactual "
                "values (0: no faithfulness section)"})
    counterfactual_source: Optional[str] = field(default=None, metadata={
        "help": "Faithfulness: where the set values come from (interchange, uniform, shift); default: the predictor's training "
                "source, else interchange"})
    compare_predictor: Optional[str] = field(default=None, metadata={
        "help": "Faithfulness: another predictor of the same neuron (a folder written by nsr train, <output_dir>/predictor, or a "
                "Hub id), typically the plainly trained one, scored on the same counterfactual rows next to this one"})


def check_evaluation_fields(config) -> None:
    """The rules of ``EvaluationFields``, checked by every config that has them (``EvaluateConfig``, ``TrainConfig``)."""
    if config.probe_layers not in ("all", "up_to_read"):
        raise ValueError(f"probe_layers must be 'all' or 'up_to_read', got {config.probe_layers!r}.")
    if config.baseline_dtype not in BASELINE_DTYPES:
        raise ValueError(f"baseline_dtype must be one of {', '.join(BASELINE_DTYPES)}, got {config.baseline_dtype!r}.")
    if config.n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be 0 (no intervals) or more, got {config.n_bootstrap}.")
    if config.counterfactual_rows < 0:  # checked by TrainConfig too, so that a typo fails before training, not after it
        raise ValueError(f"counterfactual_rows must be 0 (no faithfulness section) or more, got {config.counterfactual_rows}.")
    if config.compare_predictor:  # checked before a train run trains, so that a typo does not cost the training
        require_folder(config.compare_predictor, "compare_predictor",
                       "Give the predictor folder another run wrote (<its output_dir>/predictor) or a Hub id 'owner/name'.")


def values_of(config, shared: type) -> dict:
    """The values of ``shared``'s fields in ``config`` (a config that inherits them), to build another stage's config."""
    return {f.name: getattr(config, f.name) for f in fields(shared)}
