"""Balancing the train split (``nsr_hf.data.balance``): never below its floor, every cut bin cut to one cap, seeded."""
from __future__ import annotations

import numpy as np

from nsr_hf.data.balance import balance_indices


def test_balancing_never_keeps_fewer_rows_than_its_floor():
    rng = np.random.default_rng(0)
    for trial in range(50):
        num_bins = int(rng.integers(2, 12))
        bins = rng.choice(num_bins, size=int(rng.integers(1, 400)), p=rng.dirichlet(np.ones(num_bins) * 0.3))
        min_keep = float(rng.uniform(0.05, 1))
        kept, before, after = balance_indices(bins, num_bins, min_keep, seed=trial)
        assert len(kept) >= np.ceil(min_keep * len(bins)) and len(set(kept.tolist())) == len(kept)
        assert before == np.bincount(bins, minlength=num_bins).tolist() and after == np.bincount(bins[kept], minlength=num_bins).tolist()
        assert all(a <= b for a, b in zip(after, before))
        assert len({a for a, b in zip(after, before) if a < b}) <= 1  # every cut bin is cut to the same cap


def test_balancing_is_reproducible_from_its_seed():
    bins = np.random.default_rng(0).choice(5, size=300, p=[0.6, 0.2, 0.1, 0.05, 0.05])
    first, _, _ = balance_indices(bins, 5, 0.1, seed=7)
    np.testing.assert_array_equal(first, balance_indices(bins, 5, 0.1, seed=7)[0])
    assert not np.array_equal(first, balance_indices(bins, 5, 0.1, seed=8)[0])
