"""Train a self-reporter from a recipe: the script that ``accelerate launch`` runs.

    python nsr_hf/train.py recipes/quickstart.yaml                          # a recipe
    python nsr_hf/train.py recipes/quickstart.yaml --learning_rate 3e-4     # a recipe and overrides
    accelerate launch nsr_hf/train.py recipes/regression.yaml               # several processes

The pipeline itself is ``nsr_hf.pipeline.run_train``; the recipe's keys are ``nsr_hf.training.config.TrainConfig``.
"""
import sys

from nsr_hf.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
