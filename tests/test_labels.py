"""The label transform (``nsr_hf.data.labels``) and its bin strategies (``nsr_hf.data.binning``): exact bin edges,
train means as bin centres, optimal k-means bins, and one rule for numpy and torch (the dataset's columns, the
metrics and the predictor's loss give the same z-scores, bins and centres)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nsr_hf.data.binning import kmeans_edges
from nsr_hf.data.labels import LabelTransform, bins_of, centers_of, zscore_of

# ------------------------------------------------------------------------------------------------ bins and z-scores


@pytest.mark.parametrize("strategy", ["quantile", "equal_width", "kmeans"])
def test_every_inner_bin_edge_falls_in_its_own_bin_and_the_max_in_the_last(strategy):
    values = np.random.default_rng(0).normal(size=(500, 2))
    t = LabelTransform.fit(values, ["0.1", "0.2"], num_bins=10, strategy=strategy)
    for k, edges in enumerate(t.bin_edges):
        assert len(edges) == 11 and np.all(np.diff(edges) > 0)
        column = np.zeros((len(edges), 2)) + np.array(edges)[:, None]
        bins = t.bin_of(column)[:, k]
        assert bins.tolist() == list(range(10)) + [9]  # edge i -> bin i; edge 10 (train max) -> bin 9
        below = np.nextafter(np.array(edges[1:-1]), -np.inf)
        assert t.bin_of(np.stack([below, below], -1))[:, k].tolist() == list(range(9))  # just under edge i -> bin i-1
    all_bins = t.bin_of(values)
    assert all_bins.min() == 0 and all_bins.max() == 9
    if strategy == "quantile":
        assert np.bincount(all_bins[:, 0], minlength=10).tolist() == [50] * 10


def test_values_outside_the_train_range_go_to_the_end_bins():
    t = LabelTransform.fit(np.arange(100.0), ["3.4"], num_bins=4)
    assert t.bin_of(np.array([[-1e9], [-0.5], [99.5], [1e9]]))[:, 0].tolist() == [0, 0, 3, 3]


def test_quantile_edges_of_tied_values_are_strictly_increasing_with_min_and_max_in_the_end_bins():
    values = np.array([0.0] * 60 + list(np.linspace(0.1, 1, 30)) + [1.0] * 10)
    t = LabelTransform.fit(values, ["1.1"], num_bins=10, strategy="quantile")
    edges = np.array(t.bin_edges[0])
    assert np.all(np.diff(edges) > 0) and edges[0] == 0.0 and edges[-1] == 1.0
    bins = t.bin_of(values)[:, 0]
    assert bins[0] == 0 and bins[-1] == 9  # the tied minimum in bin 0, the tied maximum in the last bin
    assert np.all(np.diff(bins[np.argsort(values, kind="stable")]) >= 0)


def test_a_constant_neuron_cannot_be_binned():
    with pytest.raises(ValueError, match="single value"):
        LabelTransform.fit(np.ones((20, 1)), ["2.2"])


def test_zscore_inverts_and_the_transform_survives_json():
    values = np.random.default_rng(1).normal(3, 2, size=(200, 2))
    t = LabelTransform.fit(values, ["0.1", "0.2"], num_bins=5, strategy="equal_width")
    np.testing.assert_allclose(t.inverse_zscore(t.zscore(values)), values, rtol=1e-5)
    back = LabelTransform.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back == t
    np.testing.assert_array_equal(back.bin_of(values), t.bin_of(values))


def test_each_bin_reports_the_mean_of_its_train_values_not_its_midpoint():
    # hand-computed: 2 quantile bins of [0, 1, 2, 3, 10, 20] have edges [0, 2.5, 20]; bin means 1 and 11 (midpoints 1.25, 11.25)
    t = LabelTransform.fit(np.array([0, 1, 2, 3, 10, 20.0]), ["0.1"], num_bins=2)
    np.testing.assert_allclose(t.bin_edges, [[0, 2.5, 20]])
    np.testing.assert_allclose(t.centers(), [[1, 11]])
    np.testing.assert_allclose(t.bin_midpoints(), [[1.25, 11.25]])
    # an empty bin keeps its midpoint; a transform saved before centres were fitted reports midpoints
    refit = t.with_bin_centers(np.array([0.0, 2.0]))
    np.testing.assert_allclose(refit.centers(), [[1, 11.25]])
    old = {k: v for k, v in t.to_dict().items() if k != "bin_centers"}
    np.testing.assert_allclose(LabelTransform.from_dict(old).centers(), t.bin_midpoints())
    with pytest.raises(ValueError, match="bin_centers needs one list of 2 values per neuron"):
        LabelTransform(**{**t.to_dict(), "bin_centers": [[1.0, 2.0, 3.0]]})


def test_bin_means_are_the_better_report_for_a_skewed_neuron():
    """A perfect classifier's R² with the reported values: a long tail puts the top bin's midpoint far above its values."""
    rng = np.random.default_rng(0)
    train, test = rng.lognormal(0, 1.2, 4000), rng.lognormal(0, 1.2, 1000)
    t = LabelTransform.fit(train, ["0.1"], num_bins=10)
    bins = t.bin_of(test)[:, 0]

    def r2(pred):
        return 1 - ((pred - test) ** 2).sum() / ((test - test.mean()) ** 2).sum()

    assert r2(t.centers()[0, bins]) > 0.6 and r2(t.bin_midpoints()[0, bins]) < 0  # 0.70 and -3.4


# ------------------------------------------------------------------------------------------------ k-means bins


def test_kmeans_bins_are_the_least_squares_quantizer():
    # hand-computed: three clusters 0, 1 and 10 -> centres 0, 1, 10 and edges halfway between them
    values = np.array([0, 0, 0, 1, 1, 1, 10, 10.0])
    np.testing.assert_allclose(kmeans_edges(values, 3), [0, 0.5, 5.5, 10])
    t = LabelTransform.fit(values, ["0.1"], num_bins=3, strategy="kmeans")
    np.testing.assert_allclose(t.bin_edges, [[0, 0.5, 5.5, 10]])
    np.testing.assert_allclose(t.centers(), [[0, 1, 10]])
    assert t.bin_strategy == "kmeans"
    # on a skewed neuron: every inner edge is halfway between its neighbouring bins' means (a fixed point of Lloyd), and
    # a perfect classifier's report loses less than with quantile or equal-width bins, on held-out values too
    rng = np.random.default_rng(0)
    train, test = rng.lognormal(0, 1.2, 4000), rng.lognormal(0, 1.2, 1000)
    fits = {s: LabelTransform.fit(train, ["0.1"], num_bins=10, strategy=s) for s in ("quantile", "equal_width", "kmeans")}
    km = fits["kmeans"]
    np.testing.assert_allclose(km.bin_edges[0][1:-1], (km.centers()[0, 1:] + km.centers()[0, :-1]) / 2, rtol=1e-9)
    sse = {s: ((t.centers()[0, t.bin_of(x)[:, 0]] - x) ** 2).sum() for s, t in fits.items() for x in [train]}
    r2 = {s: 1 - ((t.centers()[0, t.bin_of(test)[:, 0]] - test) ** 2).sum() / ((test - test.mean()) ** 2).sum() for s, t in fits.items()}
    assert sse["kmeans"] < sse["equal_width"] < sse["quantile"]
    assert r2["kmeans"] > 0.97 and r2["quantile"] < 0.75  # 0.985, 0.70
    # deterministic, and fine with ties and with more bins than distinct values (the extra bins stay empty)
    assert kmeans_edges(train, 10).tolist() == kmeans_edges(train[::-1].copy(), 10).tolist()
    tied = LabelTransform.fit(np.array([0, 0, 0, 0, 5, 5, 5.0]), ["0.1"], num_bins=4, strategy="kmeans")
    assert np.all(np.diff(tied.bin_edges[0]) > 0) and tied.bin_of(np.array([0.0, 5.0]))[:, 0].tolist() == [0, 3]


def _least_squared_error(x, num_bins):
    """The optimum over every partition of sorted ``x`` into ``num_bins`` runs, by brute-force dynamic programming."""
    x = np.sort(x)
    s, q = np.r_[0, np.cumsum(x)], np.r_[0, np.cumsum(x * x)]

    def cost(a, b):
        return q[b] - q[a] - (s[b] - s[a]) ** 2 / (b - a)

    best = [cost(0, j) if j else 0.0 for j in range(len(x) + 1)]
    for k in range(1, num_bins):
        best = [min((best[i] + cost(i, j) for i in range(k, j)), default=np.inf) for j in range(len(x) + 1)]
    return best[-1]


@pytest.mark.parametrize("case", ["bulk_and_tail", "spikes", "lognormal", "atoms"])
def test_kmeans_bins_reach_the_least_squared_error_where_lloyd_alone_stalls(case):
    """Against brute force. Lloyd's iterations alone, from quantile or equal-width bins, stall with empty bins on a
    narrow bulk with outliers (2-9 times this error); above max_atoms distinct values the result is within a hair."""
    rng = np.random.default_rng(1)
    x = {"bulk_and_tail": lambda: np.r_[rng.normal(0, 0.05, 380), rng.lognormal(0, 1, 20)],
         "spikes": lambda: np.r_[rng.normal(0, 0.1, 290), [5, 5.1, 9, 20, 20.5]],
         "lognormal": lambda: rng.lognormal(0, 1.2, 300),
         "atoms": lambda: np.r_[rng.normal(0, 0.05, 380), rng.lognormal(0, 1, 20)]}[case]()
    t = LabelTransform.fit(x, ["0.1"], num_bins=10, strategy="kmeans", ) if case != "atoms" else None
    if t is None:  # 400 distinct values grouped into 64 runs, then Lloyd on all of them
        edges = kmeans_edges(x, 10, max_atoms=64)
        quantile = LabelTransform.fit(x, ["0.1"], 10).to_dict()
        t = LabelTransform(**{**quantile, "bin_edges": [edges.tolist()], "bin_centers": None}).with_bin_centers(x)
    error = ((t.centers()[0, t.bin_of(x)[:, 0]] - x) ** 2).sum()
    optimum = _least_squared_error(x, 10)
    assert error == pytest.approx(optimum, rel=1e-9) if case != "atoms" else error <= 1.05 * optimum
    assert np.all(np.bincount(t.bin_of(x)[:, 0], minlength=10) > 0)


def test_kmeans_edges_refuses_what_it_cannot_bin():
    with pytest.raises(ValueError, match="at least one value"):
        kmeans_edges(np.array([]), 4)
    with pytest.raises(ValueError, match="NaN or infinite"):
        kmeans_edges(np.array([0.0, np.nan, 1.0]), 4)
    # a large offset keeps its precision (the sums are centred): the bins of a normal sample are symmetric
    x = 1e8 + np.random.default_rng(0).normal(0, 1e-4, 2000)
    inner = kmeans_edges(x, 4)[1:-1] - np.median(x)
    assert abs(inner[0] + inner[2]) < 0.15 * inner[2] and abs(inner[1]) < 0.1 * inner[2]


def test_a_report_token_that_is_not_a_single_token_is_refused(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    t = LabelTransform.fit(np.arange(10.0), ["0.1"], num_bins=2, report_tokens=["low", "zzqqxxyy"])
    with pytest.raises(ValueError, match="zzqqxxyy"):
        t.with_token_ids(tokenizer)


# ------------------------------------------------------------------------------------------------ one rule for numpy and torch


def skewed_transform(strategy: str = "kmeans") -> tuple[LabelTransform, np.ndarray]:
    """A two-neuron transform fitted on float32 values (as a dataset stores them), and those values."""
    rng = np.random.default_rng(3)
    values = np.stack([rng.lognormal(0, 1.2, 600), rng.normal(0.3, 0.7, 600)], -1).astype(np.float32)
    return LabelTransform.fit(values, ["0.1", "0.2"], num_bins=10, strategy=strategy), values


def at_every_edge(t: LabelTransform, dtype) -> np.ndarray:
    """(rows, K) values of ``dtype``: each edge rounded to ``dtype``, and its neighbours one step below and above."""
    edges = np.asarray(t.bin_edges).T.astype(dtype)  # (bins + 1, K)
    return np.concatenate([np.nextafter(edges, dtype(-np.inf)), edges, np.nextafter(edges, dtype(np.inf))])


@pytest.mark.parametrize("strategy", ["quantile", "equal_width", "kmeans"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_and_torch_put_every_edge_and_its_neighbours_in_the_same_bin(strategy, dtype):
    t, values = skewed_transform(strategy)
    for x in (at_every_edge(t, dtype), values.astype(dtype)):
        expected = t.bin_of(x)
        np.testing.assert_array_equal(bins_of(torch.from_numpy(x), t.bin_edges).numpy(), expected)
        np.testing.assert_array_equal(bins_of(x, t.bin_edges), expected)


def test_a_float32_value_just_below_a_float64_edge_stays_below_it_in_torch():
    """0.7 in float32 is 0.69999998, below the edge 0.7: bin 0 in numpy, and in torch too (an edge merely cast to
    float32 would equal the value and put it in bin 1)."""
    edges = [0.0, 0.7, 1.0]
    value = np.float32(0.7)
    assert float(value) < 0.7
    assert bins_of(np.array([value]), edges).tolist() == [0]
    assert bins_of(torch.tensor([value]), edges).tolist() == [0]
    assert bins_of(torch.tensor([0.0, 1.0, -5.0, 5.0]), edges).tolist() == [0, 1, 0, 1]  # the max in the last bin; outside: end bins


def test_numpy_and_torch_give_identical_zscores():
    t, values = skewed_transform()
    expected = t.zscore(values)
    assert expected.dtype == np.float32
    z = zscore_of(torch.from_numpy(values), t.mean, t.std)
    assert z.dtype == torch.float32
    np.testing.assert_array_equal(z.numpy(), expected)
    grad = torch.from_numpy(values).requires_grad_()
    zscore_of(grad, t.mean, t.std).sum().backward()  # differentiable: the loss trains through it
    np.testing.assert_allclose(grad.grad.numpy(), np.broadcast_to(1 / np.asarray(t.std, dtype=np.float32), values.shape), rtol=1e-6)


def test_bin_centres_are_the_train_means_or_for_old_transforms_the_midpoints():
    t, _ = skewed_transform()
    np.testing.assert_array_equal(centers_of(t.bin_edges, t.bin_centers), np.asarray(t.bin_centers))
    np.testing.assert_array_equal(centers_of(t.bin_edges), t.bin_midpoints())
    np.testing.assert_array_equal(centers_of(t.bin_edges, []), t.bin_midpoints())


def test_the_predictor_uses_the_rule_of_the_dataset(tiny_model_dirs):
    from nsr_hf.modeling.predictor import ActivationPredictor
    from nsr_hf.models import load_model_and_tokenizer

    t, values = skewed_transform()
    model, tokenizer = load_model_and_tokenizer(tiny_model_dirs["gpt2"])
    predictor = ActivationPredictor.from_base(model, tokenizer, neurons=t.neurons, head_type="classification", label_transform=t.to_dict())
    for x in (values, at_every_edge(t, np.float32)):
        tensor = torch.from_numpy(x)
        np.testing.assert_array_equal(predictor.bin_of(tensor).numpy(), t.bin_of(x))
        np.testing.assert_array_equal(predictor.zscore(tensor).numpy(), t.zscore(x))
    np.testing.assert_array_equal(predictor.bin_centers(torch.zeros(1)).numpy(), t.centers().astype(np.float32))
    old = ActivationPredictor.from_base(model, tokenizer, neurons=t.neurons, head_type="classification",
                                        label_transform={k: v for k, v in t.to_dict().items() if k != "bin_centers"})
    np.testing.assert_array_equal(old.bin_centers(torch.zeros(1)).numpy(), t.bin_midpoints().astype(np.float32))
