"""nsr_hf: fine-tune a language model to report the values of its own MLP neurons."""
__version__ = "0.1.0"

from nsr_hf.capture import Capture, Intervention, Neuron, NeuronRecorder, capture_activations, encode_texts, intervene
from nsr_hf.models import EMBEDDED_NAME, load_model_and_tokenizer

__all__ = [
    "Capture",
    "EMBEDDED_NAME",
    "Intervention",
    "Neuron",
    "NeuronRecorder",
    "capture_activations",
    "encode_texts",
    "intervene",
    "load_model_and_tokenizer",
]
