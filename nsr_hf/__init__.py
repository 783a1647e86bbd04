"""nsr_hf: fine-tune a language model to report the values of its own MLP neurons.

The four stages' public names import from here; each loads its module only when first used, so that
``import nsr_hf`` stays light (no datasets, Trainer or PEFT until a stage needs them)::

    from nsr_hf import NeuronScanner, ActivationDatasetGenerator, ActivationPredictor, PredictorTrainer
"""
from importlib import import_module

from nsr_hf.capture import Capture, Intervention, Neuron, NeuronRecorder, capture_activations, encode_texts, intervene
from nsr_hf.models import EMBEDDED_NAME, load_model_and_tokenizer
from nsr_hf.version import __version__

# public name -> the module that defines it (the package's layers: README, "How the code is laid out")
_LAZY = {
    "NeuronScanner": "nsr_hf.scanner",
    "ScanConfig": "nsr_hf.scanner",
    "ActivationDatasetGenerator": "nsr_hf.data.generator",
    "DatasetConfig": "nsr_hf.data.generator",
    "load_activation_dataset": "nsr_hf.data.storage",
    "ActivationPredictor": "nsr_hf.modeling.predictor",
    "ActivationPredictorConfig": "nsr_hf.modeling.predictor",
    "load_predictor": "nsr_hf.modeling.predictor",
    "save_predictor": "nsr_hf.modeling.predictor",
    "PredictorTrainer": "nsr_hf.training.trainer",
    "PredictorDataCollator": "nsr_hf.training.collator",
    "TrainConfig": "nsr_hf.training.config",
    "EvaluateConfig": "nsr_hf.evaluation.protocol",
    "run_evaluate": "nsr_hf.evaluation.protocol",
    "run_train": "nsr_hf.pipeline",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nsr_hf' has no attribute {name!r}")


__all__ = [
    "Capture",
    "EMBEDDED_NAME",
    "Intervention",
    "Neuron",
    "NeuronRecorder",
    "__version__",
    "capture_activations",
    "encode_texts",
    "intervene",
    "load_model_and_tokenizer",
    *_LAZY,
]
