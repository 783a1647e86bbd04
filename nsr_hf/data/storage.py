"""Saving, pushing and loading activation datasets: the ``save_to_disk`` folder, a folder in the Hub's layout, a Hub
repo; each with our metadata (``METADATA_KEY``) in the card and in each split's ``info.description``.

    dd, meta = load_activation_dataset("out/ds")          # or a Hub id, or a folder in the Hub's layout
    transform = LabelTransform.from_dict(meta["transform"])
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from nsr_hf.data.card import METADATA_KEY, card_from_yaml, card_parts, dataset_card, merge_card_metadata
from nsr_hf.data.columns import validate_columns
from nsr_hf.errors import UserError, first_line, hub_failure, looks_local

HUB_SHARD_BYTES = 500 << 20  # datasets' default max_shard_size for push_to_hub


def metadata_of(dataset_dict) -> dict:
    """Our metadata from the first split whose ``info.description`` holds it (``{}`` when none does)."""
    for ds in dataset_dict.values():
        try:
            return json.loads(ds.info.description or "")[METADATA_KEY]
        except (ValueError, KeyError, TypeError):
            continue
    return {}


def save_hub_layout(dataset_dict, folder: "str | os.PathLike", card=None, max_shard_size: int = HUB_SHARD_BYTES) -> Path:
    """Write ``dataset_dict`` as ``push_to_hub`` lays it out in a repo: ``data/<split>-XXXXX-of-YYYYY.parquet`` and a
    README.md whose YAML has ``configs`` and ``dataset_info`` merged with ``card``'s (default: the card made from
    the datasets' metadata). ``datasets.load_dataset(folder)`` then loads it like the Hub repo."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for old in (folder / "data").glob("*.parquet"):
        old.unlink()
    if card is None:
        card = dataset_card(metadata_of(dataset_dict))
    ours, body = card_parts(card)
    info = DatasetInfo(config_name="default", splits=SplitDict(), download_size=0, dataset_size=0)
    for split, ds in dataset_dict.items():
        info.features = ds.features
        nbytes = ds.data.nbytes
        num_shards = max(1, math.ceil(nbytes / max_shard_size))
        for index in range(num_shards):
            path = folder / "data" / f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
            ds.shard(num_shards=num_shards, index=index, contiguous=True).to_parquet(str(path))
            info.download_size += path.stat().st_size
        info.splits.add(SplitInfo(name=split, num_bytes=nbytes, num_examples=len(ds)))
        info.dataset_size += nbytes
    info.size_in_bytes = info.download_size + info.dataset_size
    auto = DatasetCardData()
    DatasetInfosDict({"default": info}).to_dataset_card_data(auto)
    MetadataConfigs({"default": {"data_files": [{"split": s, "path": f"data/{s}-*"} for s in dataset_dict]}}).to_dataset_card_data(auto)
    card_from_yaml(merge_card_metadata(auto.to_dict(), ours), body).save(folder / "README.md")
    return folder


def push_to_hub(dataset_dict, repo_id: str, card=None, *, private: bool = False, token: Optional[str] = None,
                commit_message: str = "Upload nsr_hf activation dataset"):
    """``DatasetDict.push_to_hub``, then the card: the auto-written one is loaded, our YAML merged into it
    (``merge_card_metadata``: its ``configs``/``dataset_info`` kept) and its text replaced by ours."""
    from huggingface_hub import DatasetCard

    if card is None:
        card = dataset_card(metadata_of(dataset_dict))
    ours, body = card_parts(card)
    dataset_dict.push_to_hub(repo_id, private=private, token=token, commit_message=commit_message)
    auto = DatasetCard.load(repo_id, repo_type="dataset", token=token)
    merged = card_from_yaml(merge_card_metadata(auto.data.to_dict(), ours), body)
    merged.push_to_hub(repo_id, repo_type="dataset", token=token, commit_message="Dataset card (nsr_hf provenance and label transform)")
    return merged


def read_metadata(path: "str | os.PathLike", dataset_dict=None) -> dict:
    """Our ``nsr_hf`` block from the README.md in ``path``, else from the splits' ``info.description``."""
    readme = Path(path) / "README.md"
    if readme.exists():
        from huggingface_hub import DatasetCard

        data = DatasetCard.load(readme).data.to_dict()
        if METADATA_KEY in data:
            return data[METADATA_KEY]
    return metadata_of(dataset_dict) if dataset_dict is not None else {}


def saved_splits_without_rows(path: "str | os.PathLike") -> list[str]:
    """The splits of a ``save_to_disk`` folder that hold no rows (no data file: ``datasets`` cannot load such a split)."""
    path = Path(path)
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        folders = {split: path / split for split in splits}
    else:
        folders = {"train": path}
    empty = []
    for split, folder in folders.items():
        try:
            state = json.loads((folder / "state.json").read_text())
        except (OSError, ValueError):
            continue  # not ours to judge: load_from_disk names what is missing
        if not state.get("_data_files"):
            empty.append(split)
    return empty


def refuse_empty_splits(path: Path, name) -> None:
    """A ``UserError`` naming the splits of the dataset in ``path`` that have no rows (``datasets`` fails on them with an
    ``IndexError``), and how to build it again."""
    empty = saved_splits_without_rows(path)
    if empty:
        raise UserError(f"dataset {str(name)!r} has no rows in split(s) {', '.join(empty)}: a split without rows cannot be "
                        "loaded or used. Build it again with more documents (nsr dataset --max_documents, or "
                        "nsr train --dataset_documents; a larger corpus) and --overwrite.")


def load_activation_dataset(path_or_repo_id: "str | os.PathLike", *, cache_dir: Optional[str] = None,
                            revision: Optional[str] = None, token: Optional[str] = None):
    """``(DatasetDict, metadata)`` from a ``save_to_disk`` folder, a local folder in the Hub's layout, or a Hub id.

    >>> dd, meta = load_activation_dataset("outputs/dataset")
    >>> transform = LabelTransform.from_dict(meta["transform"])

    The columns are checked (a missing one is named) and so is the presence of our metadata.
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = Path(path_or_repo_id).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        refuse_empty_splits(path, path_or_repo_id)
        loaded = load_from_disk(str(path))
        dataset_dict = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
        metadata = read_metadata(path, dataset_dict)
    elif path.is_dir():
        try:
            dataset_dict = load_dataset(str(path), cache_dir=cache_dir)
        except (ValueError, FileNotFoundError) as err:  # datasets' words for a folder it cannot read as a dataset
            inner = next((str(p.parent) for p in sorted(path.glob("*/dataset_dict.json"))), None)
            if inner:  # a train run's folder: its dataset is inside
                raise UserError(f"{str(path_or_repo_id)!r} is a folder but not a dataset: did you mean {inner!r}, the dataset "
                                "inside it?") from err
            raise UserError(f"{str(path_or_repo_id)!r} is a folder but not a dataset ({first_line(err)}): give the folder nsr dataset "
                            "(or nsr train, as <output_dir>/dataset) wrote.") from err
        metadata = read_metadata(path)
    elif path.exists() or looks_local(path_or_repo_id):  # a path that is not there is never tried as a Hub id
        raise FileNotFoundError(f"{str(path_or_repo_id)!r} is not a dataset folder (save_to_disk or Hub layout): check the path; "
                                "nsr dataset writes one (and nsr train, as <output_dir>/dataset).")
    else:
        from huggingface_hub import DatasetCard

        try:
            dataset_dict = load_dataset(str(path_or_repo_id), cache_dir=cache_dir, revision=revision, token=token)
            metadata = DatasetCard.load(str(path_or_repo_id), repo_type="dataset", token=token).data.to_dict().get(METADATA_KEY, {})
        except (ConnectionError, OSError) as err:  # offline, not on the Hub, no connection
            raise hub_failure("dataset", str(path_or_repo_id), err) from err
    if isinstance(dataset_dict, Dataset):
        dataset_dict = DatasetDict({"train": dataset_dict})
    validate_columns(dataset_dict, (metadata or {}).get("layout"))
    if not metadata:
        raise ValueError(f"{path_or_repo_id}: no '{METADATA_KEY}' metadata in its README.md card or dataset info; "
                         "the label transform and provenance are unknown (was it made by `nsr dataset`?)")
    return dataset_dict, metadata
