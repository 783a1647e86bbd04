"""Find the neurons worth self-reporting: streaming statistics of every MLP neuron over a whole corpus.

    nsr scan --corpus embedded --max_documents 2000 --top_n 20 --output_dir outputs/scan
    accelerate launch -m nsr_hf.cli scan ...          # each process scans its share, merged exactly

>>> scanner = NeuronScanner(model, tokenizer, ScanConfig(layers=[10, 11], top_n=5))
>>> result = scanner.scan(load_corpus("embedded", limit=500))
>>> print(result.format_table())
>>> result.neuron_at_rank(1)          # Neuron(11, 345): what a recipe's ``neuron: auto`` takes

How it works. A ``NeuronRecorder`` hands each layer's neuron vector to a callback while the forward
pass runs, so activations are reduced layer by layer and never stored for the whole model; the forward
stops after the deepest scanned layer (no logits). For every neuron of the scanned layers the scan keeps,
in float64 and in memory that does not grow with the corpus:

* count, mean and the central moment sums M2, M3, M4 (merged batch by batch with the exact pairwise
  formulas of Chan et al. and Pébay, so two shards merge into exactly what one pass gives),
* min, max, and the number of positions whose value is strictly above ``threshold``,
* the ``top_k_examples`` largest values with the document and token they came from.

Positions (``position``): ``"all"`` reads every real (non-padding) token, ``"last"`` the last real token
of each document (the readout rule of nsr_hf.capture).

Statistics are population statistics over positions: ``variance`` = M2 / n (numpy's ``var``),
``skewness`` = sqrt(n) M3 / M2^1.5 and ``kurtosis`` = n M4 / M2^2 - 3, the *excess* kurtosis (0 for a
Gaussian), as ``scipy.stats.skew`` / ``kurtosis`` with their defaults. They are NaN for a constant neuron.

The scores are documented in ``SCORES`` and ``compute_scores``. Dead neurons (constant on the corpus, or
with a standard deviation below ``dead_std_ratio`` times the median one) get ``-inf`` in every score, so
they are never ranked ahead of a live one.

The package, by meaning: ``config`` (``ScanConfig``), ``statistics`` (the streaming moments and top examples),
``scores`` (scores and ranking), ``scan`` (``NeuronScanner``, ``run_scan``), ``results`` (``ScanResult``, the files a
scan writes, ``load_scan``) and ``plots``. The public names import from ``nsr_hf.scanner``.
"""
from nsr_hf.scanner.config import POSITIONS, ScanConfig
from nsr_hf.scanner.plots import plot_histograms, plot_score_heatmap
from nsr_hf.scanner.results import HEATMAP_FILE, HISTOGRAM_FILE, STAT_COLUMNS, TABLE_FILE, TOP_FILE, ScanResult, holds_scan, load_scan
from nsr_hf.scanner.scan import NeuronScanner, as_source, distributed_state, refuse_to_replace_scan, run_scan
from nsr_hf.scanner.scores import SCORES, compute_scores, dead_neurons, rank_order
from nsr_hf.scanner.statistics import MomentStats, ScanState, TopExamples

__all__ = [
    "HEATMAP_FILE",
    "HISTOGRAM_FILE",
    "POSITIONS",
    "SCORES",
    "STAT_COLUMNS",
    "TABLE_FILE",
    "TOP_FILE",
    "MomentStats",
    "NeuronScanner",
    "ScanConfig",
    "ScanResult",
    "ScanState",
    "TopExamples",
    "as_source",
    "compute_scores",
    "dead_neurons",
    "distributed_state",
    "holds_scan",
    "load_scan",
    "plot_histograms",
    "plot_score_heatmap",
    "rank_order",
    "refuse_to_replace_scan",
    "run_scan",
]
