"""The checks of a scan's and a dataset's inputs that need no model weights, run before the model is loaded.

A mistake that would otherwise surface after the model is loaded or the activations are computed fails here, in
seconds, with one line: the model's name, its architecture, its neurons and layers (from its config alone), its
tokenizer and the report tokens the bins map to (the tokenizer alone), and whether the corpus gives every split
documents (from the documents' ids alone: ``nsr_hf.data.corpus.split_of`` decides a split without the model)::

    check_dataset(DatasetConfig(neurons=["7.3"], model="tests/gpt2"))   # UserError: neuron 7.3: layer 7 is out of range ...

``nsr dataset`` and ``nsr scan`` call these first (``run_dataset``, ``run_scan``); ``nsr train`` calls them through
``nsr_hf.preflight``, which adds what only training knows (read_layer, the token head, a given dataset).

Which splits need documents: all three (train, validation, test). Train fits the bins and z-scores, validation and
test are what training and the evaluation report on, and ``datasets`` cannot load a saved split that has no rows.
A split can still end with no rows when every one of its texts is too short for an integer ``position``: the
generator refuses that when it joins the shards, before anything is saved.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from nsr_hf.architectures import num_layers
from nsr_hf.capture import Neuron, validate_neuron
from nsr_hf.data.corpus import SPLITS, documents_per_split, load_corpus
from nsr_hf.errors import UserError
from nsr_hf.models import load_model_config, load_tokenizer
from nsr_hf.report_tokens import check_report_tokens, default_report_tokens

MIN_DOCUMENTS_PER_SPLIT = 5  # what the suggested number of documents aims at for the smallest split


def check_neurons(model_config, neurons: Sequence, model: str) -> list[Neuron]:
    """Each neuron (``"layer.index"``) checked against the model's depth and width, from its config."""
    checked = []
    for name in neurons:
        try:
            checked.append(validate_neuron(model_config, name))
        except ValueError as err:
            raise UserError(f"neuron {name} is not in the model {model!r}: {err} Name a neuron as layer.index within those.") from None
    return checked


def check_layers(model_config, layers: Sequence[int] | None, model: str, key: str = "layers") -> None:
    """The layers a scan reads, checked against the model's depth."""
    depth = num_layers(model_config)
    outside = [layer for layer in layers or () if not 0 <= layer < depth]
    if outside:
        raise UserError(f"{key}: layer(s) {', '.join(map(str, outside))} are not in the model {model!r}, which has layers 0..{depth - 1}. "
                        f"Give layers within that range, or leave {key} unset for all.")


def dataset_report_tokens(tokenizer, num_bins: int, report_tokens: Sequence[str] | None = None) -> list[str]:
    """The report tokens a dataset's bins map to, checked against the tokenizer as the dataset generator checks them: given
    tokens must each be one token; the default digits (or off/on for 2 bins) must exist for up to 10 bins. Past 10 bins the
    generator names the bins by their numbers, which only the token head has to find in the vocabulary."""
    if report_tokens:
        check_report_tokens(tokenizer, report_tokens)
        return list(report_tokens)
    if num_bins <= 10:
        return default_report_tokens(tokenizer, num_bins)
    return [str(i) for i in range(num_bins)]


def check_documents_per_split(corpus: str, *, text_field: str = "text", id_field: str | None = None, limit: int | None,
                              seed: int, fractions: Sequence[float], limit_key: str) -> dict[str, int] | None:
    """Refuse a corpus (at most ``limit`` documents) that gives a split no documents, saying how many each split got and
    what to raise (``limit_key``: the option that sets ``limit``). Reads only until every split has a document.
    ``None`` for the synthetic corpus, whose texts need the model."""
    if corpus == "synthetic":
        return None
    source = load_corpus(corpus, text_field=text_field, id_field=id_field)
    counts = documents_per_split(source.iter_documents(limit=limit), seed, fractions, enough=1)
    empty = [split for split in SPLITS if counts[split] == 0]
    if not empty:
        return counts
    read = sum(counts.values())
    got = ", ".join(f"{split} {counts[split]}" for split in SPLITS)
    shares = "/".join(f"{f:g}" for f in fractions)
    zero = [split for split, f in zip(SPLITS, fractions) if f == 0]
    if zero:
        fix = f"Give {', '.join(zero)} a fraction above 0 in split_fractions (now {shares})."
    elif limit is not None and read >= limit:
        wanted = math.ceil(MIN_DOCUMENTS_PER_SPLIT / min(fractions))
        fix = f"Raise {limit_key} (e.g. to {max(wanted, limit + 1)}, about {MIN_DOCUMENTS_PER_SPLIT} documents in the smallest split)."
    else:
        fix = f"Use a larger corpus, or give {', '.join(empty)} a larger share of split_fractions (now {shares})."
    first = f"the first {read} documents ({limit_key} {limit})" if limit is not None and read >= limit else \
        f"its {read} documents (all it has, after dropping duplicates and empty texts)"
    raise UserError(f"the corpus {corpus!r} gives {', '.join(empty)} no documents: of {first}, {got} (each document's split comes "
                    f"from a hash of its id, in the proportions {shares} of split_fractions). Every split needs documents. {fix}")


def check_dataset(config) -> None:
    """``nsr dataset``'s inputs (a ``DatasetConfig``), before the model is loaded: the model, the neurons, the tokenizer and
    the report tokens, and documents in every split."""
    model_config = load_model_config(config.model, revision=config.model_revision)
    check_neurons(model_config, config.neurons, config.model)
    dataset_report_tokens(load_tokenizer(config.model, revision=config.model_revision), config.num_bins, config.report_tokens)
    check_documents_per_split(config.corpus, text_field=config.text_field, id_field=config.id_field, limit=config.max_documents,
                              seed=config.split_seed, fractions=config.split_fractions, limit_key="max_documents")


def check_scan(config) -> None:
    """``nsr scan``'s inputs (a ``ScanConfig``), before the model is loaded: the model, the layers and the tokenizer."""
    model_config = load_model_config(config.model)
    check_layers(model_config, config.layers, config.model)
    load_tokenizer(config.model)
