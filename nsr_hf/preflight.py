"""Every check of an ``nsr train`` run that needs no model weights, run before the model is loaded.

``run_train`` calls ``check_train(config)`` first (``nsr sweep`` calls ``check_sweep`` once, before its first run), so that a
mistake costs seconds, not a scan, a dataset and a training. From the model's config and tokenizer alone (never its
weights): the model's name and architecture, the neuron named by ``neuron``, the scanned ``layers``, ``read_layer``
(within the model's blocks, and not before the target neuron's layer: a head that reads a block before the neuron is
computed cannot report it), the report tokens of the token head, and the tokenizer itself. From the corpus's document ids
alone: documents in every split (``nsr_hf.data.preflight``). From a given ``dataset``'s folder: that it loads, that it has
rows in every split, and that it was built for the neuron ``neuron`` names (a dataset for 4.7 with ``--neuron 3.100``
would train 4.7).

What needs the model stays where it is: the scan (which neuron ``auto`` becomes, so ``read_layer`` against a scanned neuron is
checked when the predictor is built) and a split that ends with no rows because its texts are too short for ``position``
(the dataset generator refuses it before saving).
"""
from __future__ import annotations

from nsr_hf.architectures import num_layers
from nsr_hf.capture import Neuron
from nsr_hf.data.preflight import check_documents_per_split, check_layers, check_neurons, dataset_report_tokens
from nsr_hf.data.storage import load_activation_dataset
from nsr_hf.errors import UserError
from nsr_hf.modeling.heads import head_class
from nsr_hf.models import load_model_config, load_tokenizer
from nsr_hf.training.config import TrainConfig


def check_train(config: TrainConfig) -> None:
    """Refuse, before the model is loaded, every mistake in ``config`` that its model's config, its tokenizer, its corpus's
    document ids or its ``dataset`` folder reveal (module docstring). Each is a ``UserError`` that names the key and the fix."""
    model_config = load_model_config(config.model)
    tokenizer = load_tokenizer(config.model)
    check_layers(model_config, config.layers, config.model)
    if config.dataset:
        neurons, transform = given_dataset(config, model_config)
    else:
        choice = config.neuron_choice()
        neurons = check_neurons(model_config, [choice], config.model) if isinstance(choice, str) else None
        transform = None
        dataset_report_tokens(tokenizer, config.num_bins)  # the dataset this run builds maps its bins to these
        check_documents_per_split(config.corpus, text_field=config.text_field, limit=config.dataset_documents, seed=config.split_seed,
                                  fractions=config.split_fractions, limit_key="dataset_documents")
    check_read_layer(config, num_layers(model_config), neurons)
    check_head_tokens(config, tokenizer, neurons, transform)


def given_dataset(config: TrainConfig, model_config) -> tuple[list[Neuron], dict]:
    """(the neurons, the label transform) of ``config.dataset``, loaded (a folder that is not a dataset, or one with an empty
    split, is refused by ``load_activation_dataset``), its neurons checked against the model and against ``neuron``."""
    _, metadata = load_activation_dataset(config.dataset)
    names = list(metadata.get("neurons") or [])
    given = str(config.neuron).strip()
    if given != "auto":
        choice = config.neuron_choice()
        if isinstance(choice, int):
            raise UserError(f"neuron {choice} is a scan rank, but --dataset {config.dataset!r} fixes the neuron(s) ({', '.join(names)}): "
                            "leave neuron at auto to train the dataset's, or drop --dataset to scan.")
        if [choice] != names:
            held = ", ".join(names)
            raise UserError(f"--neuron {choice} but the dataset {config.dataset!r} was built for neuron(s) {held}: a run trains the "
                            f"dataset's neurons. Leave neuron at auto (or name {held}) to train those, or build a dataset for {choice} "
                            f"(drop --dataset, or nsr dataset --neurons {choice}).")
    neurons = check_neurons(model_config, names, config.model)
    return neurons, metadata.get("transform") or {}


def check_read_layer(config: TrainConfig, depth: int, neurons: list[Neuron] | None) -> None:
    """An absolute ``read_layer`` must be a block of the model and at or after the target neurons' layer (a head reading an
    earlier block reads a representation the neuron has not yet been computed in). ``target+K`` is both by construction."""
    rule = config.read_layer_rule()
    if rule is None or rule[0] != "abs":
        return
    layer = rule[1]
    if layer >= depth:
        raise UserError(f"read_layer {layer} is not a block of the model {config.model!r}, which has blocks 0..{depth - 1}: give one of "
                        "those, 'target+K' (K blocks after the target neuron's), or none (the last block).")
    later = [n for n in neurons or () if n.layer > layer]
    if later:
        raise UserError(f"read_layer {layer} is before the layer of the target neuron {later[0]} (layer {later[0].layer}): the head would "
                        f"read block {layer}, where the neuron is not yet computed, so it cannot report it. Read block {later[0].layer} or "
                        "later (e.g. read_layer target+2, or none for the last block).")
    if neurons is None and config.layers and min(config.layers) > layer:
        raise UserError(f"read_layer {layer} is before every scanned layer ({', '.join(map(str, config.layers))}): the head would read a "
                        "block before the chosen neuron is computed. Read a later block (e.g. read_layer target+2, or none for the last).")


def check_head_tokens(config: TrainConfig, tokenizer, neurons: list[Neuron] | None, transform: dict | None) -> None:
    """What the head takes from the tokenizer (the token head: one report token per bin, and its prompt), checked as the
    predictor will check it, with the bins it will have: a given dataset's own (or ``num_bins`` when the run refits them
    into another number), else ``num_bins`` and the tokens the built dataset maps them to."""
    head = head_class(config.head_type)
    if not head.has_bins:
        return
    if transform:
        have = (transform.get("bin_strategy", "quantile"), len(transform["bin_edges"][0]) - 1)
        refit = config.bin_strategy is not None and have != (config.bin_strategy, config.num_bins) and config.num_bins != have[1]
        num_bins = config.num_bins if refit else have[1]
        tokens = None if refit else transform.get("report_tokens")
    else:
        num_bins = config.num_bins
        tokens = dataset_report_tokens(tokenizer, num_bins)
    try:
        head.prepare(tokenizer=tokenizer, neurons=[str(n) for n in neurons] if neurons else ["0.0"], num_bins=num_bins,
                     label_transform={"bin_edges": [[0.0] * (num_bins + 1)], "report_tokens": tokens}, prompt_suffix=config.prompt_suffix)
    except UserError:
        raise
    except ValueError as err:
        raise UserError(f"head_type {config.head_type} with {num_bins} bins: {err} With nsr train: use num_bins 10 or fewer (the digits "
                        "are the report tokens), or head_type classification for more bins.") from None


def check_sweep(values: dict, neurons: list[str] | None = None, datasets: dict | None = None) -> None:
    """Once, before a sweep's first run: ``check_train`` of the runs it will start (``values``: the recipe's ``TrainConfig``
    values; ``neurons``: the neurons named, else the scan chooses; ``datasets``: each neuron's dataset, from another sweep),
    so that a mistake every run would hit is one line, not one failed run after another."""
    if datasets:
        runs = [{"neuron": neuron, "dataset": str(path)} for neuron, path in datasets.items()]
    else:
        runs = [{"neuron": neuron} for neuron in neurons or ["auto"]]
    for run in runs:
        check_train(TrainConfig(**{**values, **run}))
