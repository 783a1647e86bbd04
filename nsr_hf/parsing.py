"""One parser for every command: ``[recipe.yaml] [--key value ...]`` into the command's config dataclasses.

``RecipeParser`` is ``transformers.HfArgumentParser`` extended the way TRL's ``TrlParser`` is: a flat YAML recipe
gives values, the command line overrides them (dataclass defaults < recipe < command line), and each value is read
by the field's own type, so a recipe and the command line are one language::

    parser = RecipeParser(TrainConfig, prog="nsr train")
    (config,) = parser.parse(["recipes/quickstart.yaml", "--learning_rate", "3e-4"])

What users rely on, kept here once for every command:

- an unknown key (in the recipe or on the command line) is an error that lists the valid keys;
- a recipe's values are read as if written on the command line, so PyYAML's ``2e-5`` (a string to YAML) is a number;
- a YAML number given to a text field is refused (``neuron: 12.340`` would be the neuron 12.34): quote it;
- ``none`` / ``null`` / ``~`` / an empty value unsets an optional field; a list is ``--key a b c`` or ``--key a,b,c``;
- a recipe that is not a mapping is a clear error, and so is any value the field's type refuses (naming the field).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Iterable
from enum import Enum
from pathlib import Path

from transformers import HfArgumentParser

from nsr_hf.errors import MissingPathError, UserError

NONE_WORDS = ("none", "null", "~", "")
RECIPES_FOLDER = "recipes"


def shipped_recipe(name: str) -> Path:
    """The path of a recipe shipped with nsr_hf (``recipes/<name>``): beside the package in a source checkout or an
    editable install, else where ``pip install`` put the package data (``<prefix>/share/nsr_hf/recipes``)."""
    here = Path(__file__).resolve().parent
    for folder in (here.parent / RECIPES_FOLDER, Path(sys.prefix) / "share" / "nsr_hf" / RECIPES_FOLDER):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"The recipe {name!r} is neither in {here.parent / RECIPES_FOLDER} nor in the installed package data "
                            f"({Path(sys.prefix) / 'share' / 'nsr_hf' / RECIPES_FOLDER}): reinstall nsr_hf (pip install -e .).")


def load_recipe(path: str | os.PathLike) -> dict:
    """The recipe's values: a flat YAML mapping of config fields (not yet checked or typed)."""
    import yaml

    if Path(path).is_dir():
        raise UserError(f"recipe {str(path)!r} is a folder: give a YAML file of config keys (e.g. recipes/quickstart.yaml).")
    if not Path(path).is_file():
        raise MissingPathError(f"recipe {str(path)!r} not found: a first word that does not start with -- is read as a YAML recipe; "
                        "check its path, or give only --key value flags.")
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"recipe {str(path)!r} is not valid YAML ({problem}{where}): a recipe is one 'key: value' per line; "
                        "quote values that hold ':' or '#'.") from None
    if data is None:  # an empty file, or only comments: running the defaults instead would start the full default run
        raise UserError(f"the recipe {str(path)!r} is empty (no 'key: value' line, only blank lines or comments): write the keys it "
                        "sets (e.g. recipes/quickstart.yaml), or leave the recipe out and give --key value flags.")
    if not isinstance(data, dict):  # a ValueError, as for every other mistake in a recipe: the commands report those
        raise ValueError(  # noqa: TRY004
            f"{path}: a recipe is a flat mapping of config fields (key: value per line), got {type(data).__name__}.")
    return data


def _is_optional(annotation) -> bool:
    origin = typing.get_origin(annotation)
    return (origin is typing.Union or origin is getattr(types, "UnionType", None)) and type(None) in typing.get_args(annotation)


def _is_list(annotation) -> bool:
    if _is_optional(annotation):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) is list


def _is_text(annotation) -> bool:
    return annotation is str or (_is_optional(annotation) and set(typing.get_args(annotation)) == {str, type(None)})


def _or_none(read):
    """The field's own reader, with ``none`` / ``null`` / ``~`` / empty meaning unset."""
    def read_or_none(text):
        return None if isinstance(text, str) and text.strip().lower() in NONE_WORDS else read(text)
    read_or_none.__name__ = getattr(read, "__name__", "value")  # argparse names the type in its errors
    return read_or_none


class RecipeParser(HfArgumentParser):
    """``HfArgumentParser`` that reads ``[recipe.yaml] [--key value ...]`` into its dataclasses.

    ``skip``: fields of the later dataclasses that an earlier one already declares (e.g. the sweep's ``output_dir``)
    are left out of the command line; ``parse`` builds each dataclass from the values given for its own fields, so
    every default is the dataclass's own and ``__post_init__`` validates the result.
    """

    def __init__(self, dataclass_types, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --seed must never be read as an abbreviation of --seeds
        self._hints: dict[str, object] = {}
        self._owners: list[tuple[type, list[str]]] = []
        super().__init__(dataclass_types, **kwargs)
        for action in self._actions:
            hint = self._hints.get(action.dest)
            if hint is not None and _is_optional(hint) and action.type is not None:
                action.type = _or_none(action.type)

    def _add_dataclass_arguments(self, dtype):
        taken = set(self._hints)
        hints = typing.get_type_hints(dtype)
        own = [f for f in dataclasses.fields(dtype) if f.init and f.name not in taken]
        self._owners.append((dtype, [f.name for f in own]))
        self._hints.update({f.name: hints[f.name] for f in own})
        parser = self.add_argument_group(dtype._argument_group_name) if hasattr(dtype, "_argument_group_name") else self
        # the options a library class brings (TrainingArguments' hundred) are listed after the command's own, in a group
        library = {f.name: base for base in reversed(dtype.__mro__[1:]) if dataclasses.is_dataclass(base)
                   and not base.__module__.startswith("nsr_hf") for f in dataclasses.fields(base)}
        redeclared = set(vars(dtype).get("__annotations__", {}))
        inherited = [f for f in own if f.name in library and f.name not in redeclared]
        groups = {}
        for f in [f for f in own if f not in inherited] + inherited:
            f.type = hints[f.name]
            if f in inherited:
                base = library[f.name]
                name = f"{base.__name__} (the {base.__module__.split('.')[0]} options, validated and documented there)"
                parser = groups.get(name) or groups.setdefault(name, self.add_argument_group(name))
            self._parse_dataclass_field(parser, f)

    # -- what a user may write

    def keys(self) -> list[str]:
        """Every key a recipe or the command line may set."""
        return list(self._hints)

    def _check_keys(self, keys: Iterable[str], where: str) -> None:
        options = {s[2:] for a in self._actions for s in a.option_strings if s.startswith("--")}
        unknown = [k for k in keys if k not in options]
        if unknown:
            raise ValueError(f"Unknown key(s) {sorted(unknown)} in {where}. Valid keys: {', '.join(self.keys())}.")

    def error(self, message):  # argparse would exit: a command reports the error as its own
        raise ValueError(message)

    # -- from a recipe mapping to command-line words

    def mapping_to_args(self, values: dict, where: str) -> list[str]:
        """``--key value`` words that say what ``values`` (a recipe's mapping) says, checked key by key."""
        self._check_keys(values, where)
        words = []
        for key, value in values.items():
            hint = self._hints.get(key.replace("-", "_"))
            if isinstance(value, float) and _is_text(hint):
                if key == "neuron":  # YAML reads 12.340 as the float 12.34: the neuron would silently become 12.34
                    raise ValueError(f"neuron: write a neuron as a quoted string ('12.340'): YAML read {value!r} as a number.")
                raise ValueError(f"{key}: write {value!r} as a quoted string in {where}: YAML read it as a number.")
            if isinstance(value, (list, tuple)):
                items = list(value)
            elif isinstance(value, str) and _is_list(hint) and value.strip().lower() not in NONE_WORDS:
                items = value.replace(",", " ").split()  # a list written as one string: "0.8, 0.1, 0.1"
            else:
                items = [value]
            if not items:
                raise ValueError(f"{key}: an empty list in {where}; leave the key out, or write null to unset it.")
            words += [f"--{key}", *(self._word(item) for item in items)]
        return words

    @staticmethod
    def _word(value) -> str:
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, dict):
            return json.dumps(value)
        if isinstance(value, Enum):
            return str(value.value)
        return str(value)

    def _split_lists(self, args: list[str]) -> list[str]:
        """``--key a,b,c`` as ``--key a b c`` for list fields."""
        words, key = [], None
        for word in args:
            if word.startswith("--"):
                name, eq, value = word[2:].partition("=")
                key = name.replace("-", "_")
                if eq and _is_list(self._hints.get(key)):
                    words += [f"--{name}", *[v for v in value.split(",") if v]]
                    continue
            elif key is not None and _is_list(self._hints.get(key)) and "," in word:
                words += [v for v in word.split(",") if v]
                continue
            words.append(word)
        return words

    # -- parsing

    def given_values(self, args: list[str], where: str = "the command line") -> list[dict]:
        """For each dataclass, the values that ``args`` (``[recipe.yaml] [--key value ...]``) set, typed by its fields."""
        args = list(args)
        recipe: list[str] = []
        if args and not args[0].startswith("-"):
            recipe = self.mapping_to_args(load_recipe(args[0]), args[0])
            args = args[1:]
        self._check_keys([a[2:].partition("=")[0] for a in args if a.startswith("--")], where)
        return self._parse_words(recipe + self._split_lists(args), where)

    def _parse_words(self, words: list[str], where: str) -> list[dict]:
        saved = {action: action.default for action in self._actions}
        for action in self._actions:  # only what the recipe or the command line says: the dataclass keeps its defaults
            action.default = argparse.SUPPRESS
        try:
            namespace, rest = self.parse_known_args(words)
        finally:
            for action, default in saved.items():
                action.default = default
        if rest:
            raise ValueError(f"Unexpected value(s) {rest} in {where}: every value follows its --key.")
        given = vars(namespace)
        for key, value in given.items():
            if isinstance(value, list) and value == [None]:  # --layers none
                given[key] = None
            elif isinstance(value, Enum):  # a Trainer option with choices: its plain value, as a recipe writes it
                given[key] = value.value
        return [{name: given[name] for name in names if name in given} for _, names in self._owners]

    def parse(self, args: list[str], where: str = "the command line") -> tuple:
        """The dataclasses, each built from its defaults and what ``args`` set (``__post_init__`` validates)."""
        return tuple(dtype(**values) for (dtype, _), values in zip(self._owners, self.given_values(args, where)))

    def read_mapping(self, values: dict, where: str) -> list[dict]:
        """``given_values`` of a mapping (a recipe's values, or overrides as a dict)."""
        return self._parse_words(self.mapping_to_args(values, where), where)

    def help_with(self, values: dict | None = None) -> str:
        """The ``--help`` text, showing ``values`` (e.g. a recipe's) as the defaults."""
        if values:
            saved = {action: action.default for action in self._actions}
            for action in self._actions:
                if action.dest in values:
                    action.default = values[action.dest]
            try:
                return self.format_help()
            finally:
                for action, default in saved.items():
                    action.default = default
        return self.format_help()
