"""nsr_hf: fine-tune a language model to report the values of its own MLP neurons.

The four stages' public names import from here; each loads its module only when first used, so that
``import nsr_hf`` stays light (no torch, datasets, Trainer or PEFT until a name that needs them is used)::

    from nsr_hf import NeuronScanner, ActivationDatasetGenerator, ActivationPredictor, PredictorTrainer
"""
from importlib import import_module

from nsr_hf.version import __version__

# public name -> the module that defines it (the package's layers: README, "How the code is laid out")
_LAZY = {
    **dict.fromkeys(("Capture", "Intervention", "Neuron", "NeuronRecorder", "capture_activations", "encode_texts", "intervene"),
                    "nsr_hf.capture"),
    "EMBEDDED_NAME": "nsr_hf.models",
    "load_model_and_tokenizer": "nsr_hf.models",
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


__all__ = ["__version__", *_LAZY]
