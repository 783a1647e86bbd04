"""Counterfactual values: what intervention training and the faithfulness evaluation set a neuron to."""
import numpy as np
import pytest
import torch

from nsr_hf.data.counterfactuals import SOURCES, CounterfactualValues

TRAIN = np.stack([np.arange(100, dtype=np.float64), 10 + 2 * np.arange(100, dtype=np.float64)], 1)  # two neurons


def fitted(source, **kwargs):
    return CounterfactualValues.fit(TRAIN, ["1.2", "3.4"], source=source, **kwargs)


def test_interchange_draws_only_values_that_occur_in_the_training_split():
    draws = fitted("interchange").draw(torch.zeros(500, 2), torch.rand(500, 2, generator=torch.Generator().manual_seed(0)))
    assert set(draws[:, 0].tolist()) <= set(TRAIN[:, 0].tolist()) and set(draws[:, 1].tolist()) <= set(TRAIN[:, 1].tolist())
    assert len(set(draws[:, 0].tolist())) > 50  # it spans the marginal, not one value


def test_interchange_maps_u_onto_the_sorted_marginal():
    draws = fitted("interchange").draw(torch.zeros(3, 2), torch.tensor([[0.0, 0.0], [0.5, 0.5], [0.999, 0.999]]))
    assert draws[:, 0].tolist() == [0.0, 50.0, 99.0] and draws[:, 1].tolist() == [10.0, 110.0, 208.0]


def test_uniform_spans_the_training_1st_to_99th_percentile():
    values = fitted("uniform")
    low, high = np.percentile(TRAIN, [1, 99], axis=0)
    draws = values.draw(torch.zeros(2, 2), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    np.testing.assert_allclose(draws.numpy(), np.stack([low, high]), rtol=1e-6)


def test_shift_moves_the_natural_value_by_a_normal_amount_in_training_stds():
    values = fitted("shift", shift_scale=0.5)
    natural = torch.full((20000, 2), 7.0)
    draws = values.draw(natural, torch.rand(20000, 2, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(values.draw(natural[:1], torch.full((1, 2), 0.5)), natural[:1])  # the median shift is none
    np.testing.assert_allclose((draws - natural).std(0).numpy(), 0.5 * TRAIN.std(0), rtol=0.03)


def test_the_same_uniform_numbers_give_the_same_values():
    u = torch.rand(8, 2, generator=torch.Generator().manual_seed(3))
    for source in SOURCES:
        assert torch.equal(fitted(source).draw(torch.ones(8, 2), u), fitted(source).draw(torch.ones(8, 2), u))


def test_an_unknown_source_names_the_sources():
    with pytest.raises(ValueError, match="interchange, uniform, shift"):
        fitted("permute")


def test_shapes_that_do_not_match_the_neurons_are_refused():
    with pytest.raises(ValueError, match=r"\(rows, 2\)"):
        fitted("uniform").draw(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="one column per neuron"):
        CounterfactualValues.fit(TRAIN, ["1.2"])


def test_the_record_leaves_out_the_training_values():
    record = fitted("interchange").to_dict()
    assert "values" not in record and record["train_rows"] == 100 and record["source"] == "interchange"
