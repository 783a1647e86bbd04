"""One pass where the pipeline used to make several (issue 18): the shared passes give the same numbers as separate ones."""
import numpy as np
import pytest

from nsr_hf.capture import Neuron, capture_activations, encode_texts, label_positions
from nsr_hf.modeling.probes import layer_features
from nsr_hf.pipeline import candidate_readings

TEXTS = ["the cat sat on the mat", "a dog", "one two three four five six seven eight nine ten eleven", "hello there world",
         "x", "alpha beta gamma delta", "we read the neuron from the residual stream of the model itself"]


@pytest.mark.parametrize("position", ["last", 0])
def test_the_readability_selection_reads_values_and_features_in_one_pass_as_two_passes_give_them(tiny, position):
    model, tok = tiny
    candidates = [Neuron(0, 3), Neuron(1, 7), Neuron(0, 11), Neuron(2, 1)]
    layers = [1, 2]
    values, features = candidate_readings(model, tok, TEXTS, candidates, layers, position, max_length=16, batch_size=3)
    assert values.shape == (len(TEXTS), len(candidates))
    for start in range(0, len(TEXTS), 3):  # the two passes it replaces, batch by batch, in the texts' own order
        batch = encode_texts(tok, TEXTS[start : start + 3], max_length=16)
        capture = capture_activations(model, batch, [str(n) for n in candidates], position=position)
        for j, n in enumerate(candidates):
            col = capture.neuron_indices[n.layer].tolist().index(n.index)
            np.testing.assert_allclose(values[start : start + 3, j], capture[n.layer][:, col].double().numpy(), atol=1e-5)
        lengths = batch["attention_mask"].sum(-1).tolist()
        at = label_positions(batch["attention_mask"], position)
        rows = {"input_ids": [batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)],
                "attention_mask": [[1] * n for n in lengths], "label_position": [int(p) for p in at]}
        expected = layer_features(model, rows, layers, progress=False)
        for layer in layers:
            np.testing.assert_allclose(features[layer][start : start + 3], expected[layer], atol=1e-5)
