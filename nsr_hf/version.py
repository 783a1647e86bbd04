"""The version of nsr_hf (read by setup.py, written into datasets and model cards)."""
__version__ = "0.1.0"
