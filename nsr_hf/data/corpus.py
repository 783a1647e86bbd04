"""Text sources behind one interface, each yielding documents with a stable id.

    EmbeddedCorpus()                        Python's own documentation: pydoc topics + stdlib docstrings (offline)
    FileCorpus("notes.jsonl", text_field="body")   local .txt / .jsonl / .json / .csv / .parquet
    HubCorpus("wikitext", "wikitext-2-raw-v1")     an HF datasets dataset (streamed)
    SyntheticCorpus(model, tokenizer)       texts sampled from the base model itself (seeded)
    load_corpus("embedded" | path | "synthetic" | "hub:NAME[:CONFIG[:SPLIT]]")

Every source iterates deterministically and can be iterated again with the same result. Exact duplicates
are dropped by ``deduplicate``; ``split_of`` puts each document in train/validation/test from a hash of
its id, so the assignment does not depend on order, on the other documents, or on the process.
"""
from __future__ import annotations

import ast
import csv
import functools
import gc
import hashlib
import inspect
import itertools
import json
import os
import re
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nsr_hf.errors import UserTypeError
from nsr_hf.models import model_provenance

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
FILE_FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TXT_MODES = ("line", "paragraph", "file")

DEFAULT_PROMPTS = (
    "The history of the city begins",
    "In this tutorial we will learn how to",
    "def fibonacci(n):",
    "Dear customer, thank you for",
    "The results of the experiment showed that",
    "Once upon a time, in a small village,",
    "The recipe calls for two cups of",
    "BREAKING NEWS:",
    "Q: What is the capital of France?\nA:",
    "The main difference between a list and a tuple is",
    "1. Preheat the oven.\n2.",
    "Scientists have discovered a new species of",
)


@dataclass(frozen=True)
class Document:
    """One text with an id that stays the same across runs and machines (for the same source)."""

    doc_id: str
    text: str


class TextSource:
    """Base class of all sources: iterate it for ``Document``s; ``describe()`` says where they came from.

    Subclasses implement ``_documents()``; ``limit`` (max documents, before deduplication) applies to all.
    """

    kind = "source"

    def __init__(self, name: str, limit: int | None = None):
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        self.name = name
        self.limit = limit

    def _documents(self) -> Iterator[Document]:
        raise NotImplementedError

    def _provenance(self) -> dict:
        return {}

    def __iter__(self) -> Iterator[Document]:
        return itertools.islice(self._documents(), self.limit)

    def describe(self) -> dict:
        """JSON-serialisable provenance (kind, name, parameters) for dataset cards."""
        return {"kind": self.kind, "name": self.name, "limit": self.limit, **self._provenance()}

    def iter_documents(self, limit: int | None = None, dedup: bool = True) -> Iterator[Document]:
        """The documents, exact duplicates and empty texts dropped (``dedup``), at most ``limit`` of them."""
        docs = deduplicate(self) if dedup else iter(self)
        return itertools.islice(docs, limit)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


# ----------------------------------------------------------------------------------------------------------
# Embedded corpus: Python's own documentation


# Directories of the stdlib whose docstrings are not documentation prose, or whose files are test data,
# generated code (encodings: ~100 near-identical codec stubs) or not the stdlib at all (site-packages).
_STDLIB_SKIP = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "tkinter",
    "turtledemo", "ensurepip", "venv", "__pycache__", "encodings", "lib-dynload", "pydoc_data", "__phello__",
})
_RULE = re.compile(r"[*=\-~^#+`]{3,}")  # heading underlines in the pydoc topics ("*****", "=====")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?\s")


def _paragraphs(text: str) -> list[str]:
    """Cleaned paragraphs of a docstring or topic: dedented, doctest blocks dropped, whitespace collapsed."""
    paragraphs, current, in_doctest = [], [], False
    for line in inspect.cleandoc(text).splitlines() + [""]:
        stripped = line.strip()
        if not stripped:  # a blank line ends a paragraph and a doctest block
            if current:
                paragraphs.append(" ".join(" ".join(current).split()))
            current, in_doctest = [], False
            continue
        if stripped.startswith(">>>"):
            in_doctest = True
        # Drop the whole doctest block: prompts, "..." continuations and the expected output after them
        # (the output runs until the next blank line in doctest's own format).
        if in_doctest or _RULE.fullmatch(stripped):
            continue
        current.append(stripped)
    return paragraphs


def _cut(paragraph: str, max_chars: int) -> Iterator[str]:
    """Cut an overlong paragraph into pieces of at most ``max_chars``: at a sentence end, else a space."""
    while len(paragraph) > max_chars:
        window = paragraph[: max_chars + 1]
        ends = [m.start() + 1 for m in _SENTENCE_END.finditer(window)]
        cut = ends[-1] if ends and ends[-1] >= max_chars // 2 else window.rfind(" ")
        if cut <= 0:  # one very long word (a URL, a hex string): cut it anyway
            cut = max_chars
        yield paragraph[:cut].strip()
        paragraph = paragraph[cut:].strip()
    if paragraph:
        yield paragraph


def _passages(text: str, max_chars: int, min_words: int) -> list[str]:
    """Passages of at most ``max_chars``, made of whole paragraphs where possible, with >= ``min_words`` words."""
    pieces = [piece for p in _paragraphs(text) for piece in _cut(p, max_chars)]
    passages, current = [], ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > max_chars:
            passages.append(current)
            current = piece
        else:
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        passages.append(current)
    return [p for p in passages if len(p.split()) >= min_words]


def _stdlib_files() -> Iterator[tuple[str, Path]]:
    """``(module name, path)`` of the stdlib's ``.py`` files, in sorted order, without importing any of them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP and not d.startswith("config-"))
        for file in sorted(files):
            if not file.endswith(".py") or file.startswith("_sysconfigdata"):
                continue
            path = Path(folder) / file
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def _docstrings(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    """``(qualified name, docstring)`` of a module and its classes, functions and methods, in source order.

    Only statement bodies are visited (not expressions), which keeps this cheap; functions nested in
    functions are skipped (implementation details). Names defined twice (``if``/``else`` branches,
    property setters) get ``[2]``, ``[3]``... so ids stay unique.
    """
    seen: Counter[str] = Counter()

    def visit(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = f"{prefix}.{node.name}"
                seen[qualname] += 1
                unique = qualname if seen[qualname] == 1 else f"{qualname}[{seen[qualname]}]"
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    yield unique, doc
                if isinstance(node, ast.ClassDef):
                    yield from visit(node.body, unique)
            else:  # definitions inside if/try/with blocks at module or class level
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, None) or ():
                        if isinstance(child, ast.ExceptHandler):
                            yield from visit(child.body, prefix)
                        elif isinstance(child, ast.stmt):
                            yield from visit([child], prefix)

    doc = ast.get_docstring(tree, clean=False)
    if doc:
        yield module, doc
    yield from visit(tree.body, module)


@functools.lru_cache(maxsize=4)
def _embedded_documents(max_chars: int, min_words: int, include: tuple[str, ...]) -> tuple[Document, ...]:
    """All embedded passages, built once per process and parameters (parsing the stdlib takes a second or two)."""
    docs, digests = [], set()

    def add(doc_id: str, text: str) -> None:
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if digest not in digests:  # the same docstring is often repeated (overrides, aliases)
            digests.add(digest)
            docs.append(Document(doc_id, text))

    if "topics" in include:
        from pydoc_data.topics import topics  # plain data: a dict of topic -> text

        for topic in sorted(topics):
            for i, passage in enumerate(_passages(topics[topic], max_chars, min_words)):
                add(f"pydoc:topic:{topic}:{i}", passage)
    if "docstrings" in include:
        for module, path in _stdlib_files():
            # Parsing is most of the cost. Its millions of short-lived, acyclic nodes trigger the cyclic
            # GC over and over for nothing: pausing it around the parse roughly halves the time.
            was_enabled = gc.isenabled()
            gc.disable()
            try:
                tree = ast.parse(path.read_bytes())  # bytes: ast honours the file's coding cookie
            except (SyntaxError, ValueError, OSError):
                continue
            finally:
                if was_enabled:
                    gc.enable()
            for qualname, doc in _docstrings(tree, module):
                for i, passage in enumerate(_passages(doc, max_chars, min_words)):
                    add(f"stdlib:{qualname}:{i}", passage)
            del tree  # one tree alive at a time
    return tuple(docs)


class EmbeddedCorpus(TextSource):
    """Python's bundled documentation, offline and deterministic for a given Python version.

    Passages come from ``pydoc_data.topics`` (the language reference topics behind ``help()``) and from
    the docstrings of the standard library's modules, classes and functions, read by parsing the source
    files with ``ast`` (never importing them: ``antigravity`` opens a browser, ``this`` prints).
    Ids: ``pydoc:topic:<topic>:<i>`` and ``stdlib:<module.Qualname>:<i>``.
    """

    kind = "embedded"
    PARTS = ("topics", "docstrings")

    def __init__(self, max_chars: int = 1000, min_words: int = 8, include: Sequence[str] = PARTS, limit: int | None = None):
        super().__init__("embedded", limit)
        include = (include,) if isinstance(include, str) else tuple(include)
        unknown = sorted(set(include) - set(self.PARTS))
        if unknown:
            raise ValueError(f"unknown parts {unknown}; choose from {list(self.PARTS)}")
        if max_chars < 1 or min_words < 0:
            raise ValueError(f"need max_chars >= 1 and min_words >= 0, got {max_chars}, {min_words}")
        self.max_chars, self.min_words = max_chars, min_words
        self.include = tuple(p for p in self.PARTS if p in include)  # canonical order: one cache entry

    def _documents(self) -> Iterator[Document]:
        return iter(_embedded_documents(self.max_chars, self.min_words, self.include))

    def _provenance(self) -> dict:
        return {
            "python_version": ".".join(map(str, sys.version_info[:3])),  # the text depends on it
            "include": list(self.include),
            "max_chars": self.max_chars,
            "min_words": self.min_words,
        }


# ----------------------------------------------------------------------------------------------------------
# Rows from files and datasets


def _missing_field(field: str, columns: Iterable[str], where: str) -> ValueError:
    return ValueError(f"{where}: no field {field!r}; the fields are {sorted(columns)}")


def _row_documents(rows: Iterable[dict], text_field: str, id_field: str | None, id_prefix: str, where: str) -> Iterator[Document]:
    """Documents from dict rows. Ids: the ``id_field`` value, else ``<id_prefix>:<row index>`` (empties skipped
    but counted, so ids do not shift when a row's text is blank)."""
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"{where}: row {index} is a {type(row).__name__}, not an object with fields")
        for field in (text_field, id_field):
            if field is not None and field not in row:
                raise _missing_field(field, row, f"{where} row {index}")
        text = row[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise UserTypeError(f"{where} row {index}: field {text_field!r} holds a {type(text).__name__}, not a string: name the "
                                "field that holds the text with --text_field.")
        text = text.strip()
        if not text:
            continue
        if id_field is None:
            doc_id = f"{id_prefix}:{index}"
        elif row[id_field] is None:
            raise ValueError(f"{where} row {index}: id field {id_field!r} is empty")
        else:
            doc_id = str(row[id_field])
        yield Document(doc_id, text)


class FileCorpus(TextSource):
    """Documents from a local ``.txt``, ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file.

    ``.txt``: one document per line, per blank-line separated paragraph (default) or for the whole file
    (``txt_mode``). Other formats: the ``text_field`` column, ids from ``id_field`` when given, else
    ``<filename>:<row index>``. Rows whose text is null or blank are skipped; non-string text is an error.

    Every format is read as a stream (bounded memory) except ``.json`` arrays. We use the standard
    library for txt/jsonl/csv (exact strings: no type inference turning a "123" text into an int) and
    pyarrow for parquet (batched reads), rather than ``datasets``, which is slower to import and to start.
    """

    kind = "file"

    def __init__(self, path: str | os.PathLike, text_field: str = "text", id_field: str | None = None,
                 txt_mode: str = "paragraph", limit: int | None = None):
        self.path = Path(path)
        super().__init__(self.path.name, limit)
        if not self.path.is_file():
            raise FileNotFoundError(f"corpus file not found: {str(self.path)!r}")
        self.format = FILE_FORMATS.get(self.path.suffix.lower())
        if self.format is None:
            raise ValueError(f"unsupported corpus file {self.path.name!r}; supported extensions: {sorted(FILE_FORMATS)}")
        if txt_mode not in TXT_MODES:
            raise ValueError(f"txt_mode must be one of {TXT_MODES}, got {txt_mode!r}")
        self.text_field, self.id_field, self.txt_mode = text_field, id_field, txt_mode

    def _documents(self) -> Iterator[Document]:
        if self.format == "txt":
            return self._txt()
        rows = {"jsonl": self._jsonl_rows, "json": self._json_rows, "csv": self._csv_rows, "parquet": self._parquet_rows}[self.format]()
        return _row_documents(rows, self.text_field, self.id_field, self.path.name, self.path.name)

    def _txt(self) -> Iterator[Document]:
        with open(self.path, encoding="utf-8") as f:
            if self.txt_mode == "file":
                texts = [f.read()]
            elif self.txt_mode == "line":
                texts = f  # ids are line numbers (0-based), blank lines included in the count
            else:
                texts = ("".join(group) for blank, group in itertools.groupby(f, key=lambda line: not line.strip()) if not blank)
            for index, text in enumerate(texts):
                if text.strip():
                    yield Document(f"{self.path.name}:{index}", text.strip())

    def _jsonl_rows(self) -> Iterator[dict]:
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{self.path.name} line {number}: not valid JSON ({e})") from None

    def _json_rows(self) -> Iterator[dict]:
        # Many ".json" files are JSON Lines; a real JSON document must be an array of objects.
        with open(self.path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        if not head.startswith("["):
            yield from self._jsonl_rows()
            return
        with open(self.path, encoding="utf-8") as f:
            yield from json.load(f)

    def _csv_rows(self) -> Iterator[dict]:
        # Documents can be longer than csv's default 128 KiB field limit.
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with open(self.path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            for field in (self.text_field, self.id_field):
                if field is not None and field not in columns:
                    raise _missing_field(field, columns, self.path.name)
            yield from reader

    def _parquet_rows(self) -> Iterator[dict]:
        import pyarrow.parquet as pq

        file = pq.ParquetFile(self.path)
        columns = file.schema_arrow.names
        wanted = [f for f in (self.text_field, self.id_field) if f is not None]
        for field in wanted:
            if field not in columns:
                raise _missing_field(field, columns, self.path.name)
        for batch in file.iter_batches(batch_size=1024, columns=list(dict.fromkeys(wanted))):
            yield from batch.to_pylist()

    def _provenance(self) -> dict:
        if self.format == "txt":
            return {"path": str(self.path), "format": "txt", "txt_mode": self.txt_mode}
        return {"path": str(self.path), "format": self.format, "text_field": self.text_field, "id_field": self.id_field}


class HubCorpus(TextSource):
    """A dataset loaded with ``datasets.load_dataset(name, config, split=split, streaming=streaming)``.

    ``name`` is a Hub id or anything ``load_dataset`` accepts (a local folder of data files, too).
    Ids: the ``id_field`` value when given, else ``<name>/<config or "default">/<split>:<row index>``.
    """

    kind = "hub"

    def __init__(self, name: str, config: str | None = None, split: str = "train", text_field: str = "text",
                 id_field: str | None = None, streaming: bool = True, limit: int | None = None):
        super().__init__(name, limit)
        self.config, self.split, self.streaming = config, split, streaming
        self.text_field, self.id_field = text_field, id_field
        self._dataset = None

    def dataset(self):
        """The underlying ``datasets`` object, loaded on first use (a streamed dataset can be iterated again)."""
        if self._dataset is None:
            import datasets

            self._dataset = datasets.load_dataset(self.name, self.config, split=self.split, streaming=self.streaming)
        return self._dataset

    def _documents(self) -> Iterator[Document]:
        dataset = self.dataset()
        where = f"dataset {self.name!r} ({self.config or 'default'}/{self.split})"
        columns = dataset.column_names  # None for some streamed datasets: then the first row tells
        for field in (self.text_field, self.id_field):
            if columns is not None and field is not None and field not in columns:
                raise _missing_field(field, columns, where)
        prefix = f"{self.name}/{self.config or 'default'}/{self.split}"
        return _row_documents(dataset, self.text_field, self.id_field, prefix, where)

    def _provenance(self) -> dict:
        return {"config": self.config, "split": self.split, "text_field": self.text_field,
                "id_field": self.id_field, "streaming": self.streaming}


# ----------------------------------------------------------------------------------------------------------
# Synthetic corpus: the base model's own samples


def _derived_seed(*parts: object) -> int:
    """A seed per (seed, prompt, sample): adding prompts or samples does not change the others' texts."""
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "big") >> 1


class SyntheticCorpus(TextSource):
    """Texts sampled from the base model from seed prompts: text = prompt + sampled continuation.

    Each sample is generated alone (no padding to get wrong) under its own seed derived from
    ``(seed, prompt index, sample index)``, inside ``torch.random.fork_rng`` so the caller's RNG state
    is untouched. The same call gives the same texts on the same device and library versions.
    Ids: ``synthetic:<seed>:<prompt index>:<sample index>``.
    """

    kind = "synthetic"

    def __init__(self, model, tokenizer, prompts: Sequence[str] = DEFAULT_PROMPTS, samples_per_prompt: int = 2,
                 max_new_tokens: int = 48, temperature: float = 1.0, top_k: int = 50, seed: int = 0, limit: int | None = None):
        super().__init__("synthetic", limit)
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or samples_per_prompt < 1 or max_new_tokens < 1 or temperature <= 0:
            raise ValueError("need at least one prompt, samples_per_prompt >= 1, max_new_tokens >= 1 and temperature > 0")
        self.model, self.tokenizer, self.prompts = model, tokenizer, tuple(prompts)
        self.samples_per_prompt, self.max_new_tokens = samples_per_prompt, max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed

    def _documents(self) -> Iterator[Document]:
        import torch

        device = self.model.device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for i, prompt in enumerate(self.prompts):
            encoded = self.tokenizer(prompt, return_tensors="pt")
            inputs = {k: encoded[k].to(device) for k in ("input_ids", "attention_mask")}
            for j in range(self.samples_per_prompt):
                with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                    torch.manual_seed(_derived_seed(self.seed, i, j))
                    # top_p=1.0 explicitly: a model's generation_config may set its own nucleus sampling.
                    output = self.model.generate(
                        **inputs, do_sample=True, temperature=self.temperature, top_k=self.top_k, top_p=1.0,
                        max_new_tokens=self.max_new_tokens, pad_token_id=pad_id,
                    )
                continuation = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                yield Document(f"synthetic:{self.seed}:{i}:{j}", (prompt + continuation).strip())

    def _provenance(self) -> dict:
        return {"model": model_provenance(self.model), "prompts": list(self.prompts), "samples_per_prompt": self.samples_per_prompt,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k, "seed": self.seed}


# ----------------------------------------------------------------------------------------------------------
# Deduplication and splits


def deduplicate(docs: Iterable[Document]) -> Iterator[Document]:
    """Drop empty texts and exact duplicates (same text after ``strip()``), keeping the first.

    Remembers 16-byte digests rather than texts, so memory stays small for large corpora.
    """
    seen: set[bytes] = set()
    for doc in docs:
        text = doc.text.strip()
        if not text:
            continue
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if digest not in seen:
            seen.add(digest)
            yield doc


def check_fractions(fractions: Sequence[float], name: str = "fractions") -> tuple[float, float, float]:
    """``fractions`` of train, validation and test as floats, or a ValueError that names ``name`` (the config key)."""
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        values = ()
    if len(values) != len(SPLITS) or any(not 0 <= f <= 1 for f in values) or abs(sum(values) - 1) > 1e-6:
        raise ValueError(f"{name} must be {len(SPLITS)} numbers in [0, 1] for {list(SPLITS)} that sum to 1, got {fractions}")
    return values


def split_of(doc_id: str, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """``"train"``, ``"validation"`` or ``"test"`` for a document id: a hash of ``f"{seed}:{doc_id}"``
    mapped into [0, 1) and compared with the cumulative fractions. Deterministic and order-independent
    (hashlib, not Python's per-process salted ``hash``)."""
    fractions = check_fractions(fractions)
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    cumulative = 0.0
    for name, fraction in zip(SPLITS, fractions):
        cumulative += fraction
        if u < cumulative:
            return name
    return next(name for name, f in reversed(list(zip(SPLITS, fractions))) if f > 0)  # rounding at the top


def split_documents(docs: Iterable[Document], seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, list[Document]]:
    """Deduplicate ``docs`` and group them by ``split_of``: ``{"train": [...], "validation": [...], "test": [...]}``.
    Deduplication first, so one text never lands in two splits."""
    fractions = check_fractions(fractions)
    splits: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for doc in deduplicate(docs):
        splits[split_of(doc.doc_id, seed, fractions)].append(doc)
    return splits


def documents_per_split(docs: Iterable[Document], seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                        enough: int | None = None) -> dict[str, int]:
    """How many of ``docs`` (deduplicated, as a dataset reads them) each split gets, from their ids alone (no model).
    With ``enough``, stops reading once every split has that many: a check that each split gets documents then reads
    only the start of a large corpus. ``{"train": 8, "validation": 2, "test": 0}``."""
    fractions = check_fractions(fractions)
    counts = dict.fromkeys(SPLITS, 0)
    for doc in deduplicate(docs):
        counts[split_of(doc.doc_id, seed, fractions)] += 1
        if enough is not None and min(counts.values()) >= enough:
            break
    return counts


# ----------------------------------------------------------------------------------------------------------
# Resolving a source from a string


def _looks_like_path(spec: str) -> bool:
    """A string meant as a local file: a known extension, or a path form that no Hub id has
    (absolute, ``./``, ``~``, or more than one separator: Hub ids are ``name`` or ``owner/name``)."""
    return (
        Path(spec).suffix.lower() in FILE_FORMATS
        or spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1
        or (os.sep != "/" and os.sep in spec)
    )


def load_corpus(spec: str | os.PathLike | TextSource, *, text_field: str = "text", id_field: str | None = None,
                model=None, tokenizer=None, **kwargs) -> TextSource:
    """A text source from a spec string (a ``TextSource`` is returned as is).

    ``"embedded"`` / ``"pydoc"``: ``EmbeddedCorpus(**kwargs)``; an existing file: ``FileCorpus``;
    ``"synthetic"``: ``SyntheticCorpus(model, tokenizer, **kwargs)``; ``"hub:NAME[:CONFIG[:SPLIT]]"``,
    an existing folder or any other string: ``HubCorpus``. A string that looks like a file path but does
    not exist raises ``FileNotFoundError`` instead of becoming a Hub lookup.
    """
    if isinstance(spec, TextSource):
        return spec
    spec = os.fspath(spec)
    if spec in ("embedded", "pydoc"):
        return EmbeddedCorpus(**kwargs)
    if spec == "synthetic":
        if model is None or tokenizer is None:
            raise ValueError("the synthetic corpus samples from the base model: pass model= and tokenizer=")
        return SyntheticCorpus(model, tokenizer, **kwargs)
    if spec.startswith("hub:"):
        name, config, split = (spec[len("hub:"):].split(":") + [None, None])[:3]
        if not name:
            raise ValueError(f"no dataset name in {spec!r}; expected hub:NAME[:CONFIG[:SPLIT]]")
        kwargs = {**kwargs, **({"config": config} if config else {}), **({"split": split} if split else {})}
        return HubCorpus(name, text_field=text_field, id_field=id_field, **kwargs)
    path = Path(spec).expanduser()
    if path.is_file():
        return FileCorpus(path, text_field=text_field, id_field=id_field, **kwargs)
    if path.is_dir():  # a folder of data files: load_dataset infers the format, as for a Hub repo
        return HubCorpus(str(path), text_field=text_field, id_field=id_field, **kwargs)
    if _looks_like_path(spec):
        raise FileNotFoundError(f"corpus file not found: {spec!r} (for a Hub dataset, write 'hub:{spec}')")
    return HubCorpus(spec, text_field=text_field, id_field=id_field, **kwargs)
