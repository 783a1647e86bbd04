"""The seed's public names import from the package root, and each is the class its own module defines."""
import subprocess
import sys

import nsr_hf


def test_the_stage_classes_import_from_the_package_root():
    from nsr_hf import ActivationDatasetGenerator, ActivationPredictor, NeuronScanner, PredictorTrainer
    from nsr_hf.data.generator import ActivationDatasetGenerator as generator
    from nsr_hf.modeling.predictor import ActivationPredictor as predictor
    from nsr_hf.scanner import NeuronScanner as scanner
    from nsr_hf.training.trainer import PredictorTrainer as trainer

    assert (NeuronScanner, ActivationDatasetGenerator, ActivationPredictor, PredictorTrainer) == (scanner, generator, predictor, trainer)


def test_every_name_in_all_resolves():
    for name in nsr_hf.__all__:
        assert getattr(nsr_hf, name) is not None, name


def test_importing_the_package_loads_no_stage_until_one_is_used():
    code = "import sys, nsr_hf; print(any(m in sys.modules for m in ('nsr_hf.training.trainer', 'nsr_hf.scanner', 'peft')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
