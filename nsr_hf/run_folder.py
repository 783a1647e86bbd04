"""Write order that never loses work: a command's results appear complete or not at all, and replace earlier ones only
once the new ones exist.

Every command that writes a folder of results (``nsr scan``, ``nsr dataset``, ``nsr train``, ``nsr evaluate``) goes
through two rules:

- ``refuse_finished``: a folder that already holds finished results is refused unless the user passes ``--overwrite``
  (a folder holding something else is refused even then: ``--output_dir .`` must never replace a working directory).
- ``written_atomically``: the new results are written into a temporary sibling folder, which replaces the old folder
  only when the work succeeded. A failure or an interruption leaves the old folder as it was; a crash between the two
  renames of the swap leaves the old folder under a ``.old`` name, which the next call puts back.

    >>> refuse_finished(out, "a scan", finished=(out / "scan.json").exists(), overwrite=config.overwrite, fix="nsr scan --overwrite")
    >>> with written_atomically(out) as tmp:
    ...     write_everything(tmp)
    # out now holds exactly what write_everything wrote
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nsr_hf.errors import UserError

TMP_PREFIX = ".tmp-"  # sibling folders being written: ``.tmp-<name>-XXXX``
OLD_PREFIX = ".old-"  # a replaced folder while the swap is under way: ``.old-<name>-XXXX``


def is_empty(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is missing or holds nothing."""
    path = Path(folder)
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def refuse_finished(folder: str | os.PathLike, what: str, *, finished: bool, overwrite: bool, fix: str = "") -> None:
    """Refuse to write ``what`` (e.g. ``"a scan"``) into ``folder`` when that would replace something.

    ``finished``: whether ``folder`` holds finished results of this command (the caller knows their marker file).
    Allowed: a missing or empty folder, and finished results with ``overwrite`` (they are replaced once the new ones
    succeed). Refused: finished results without ``overwrite``; a file; a non-empty folder that is not this command's
    results, with or without ``overwrite`` (writing there would replace the user's files). ``fix``: the command to
    suggest, e.g. ``"pass --overwrite"``."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        # the words of nsr_hf.errors for a file where a folder belongs, so that every command says the same
        raise UserError(f"{str(folder)!r} is a file, where a folder belongs: give a folder's path (or move the file away).")
    if path.exists() and (path.resolve() == Path.cwd() or path.resolve() in Path.cwd().parents):
        # the swap would move the folder the user works in (and everything in it) aside, then delete it
        raise UserError(f"output_dir {str(folder)!r} is the current folder or holds it: give a new folder for {what} "
                        "(e.g. outputs/<name>). Nothing was changed.")
    if is_empty(path):
        return
    if finished:
        if overwrite:
            return
        raise UserError(f"{path} already holds {what} that finished. Nothing was changed: choose another output_dir, "
                        f"or {fix or 'pass --overwrite'} to replace it once the new run succeeds.")
    # a folder of other files (a working directory, another command's results) is never replaced: the swap would delete them
    raise UserError(f"{path} holds files that are not {what}: choose a new or empty output_dir (--overwrite only replaces "
                    "finished results of this command). Nothing was changed.")


def restore_interrupted_swap(folder: str | os.PathLike) -> None:
    """Put back a folder that a crash left under its ``.old`` name in the middle of a swap (the new one never arrived)."""
    path = Path(folder)
    if path.exists() or not path.parent.is_dir():
        return
    olds = sorted(path.parent.glob(f"{OLD_PREFIX}{path.name}-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        try:
            os.rename(olds[-1], path)
        except FileNotFoundError:  # another process of the same launch put it back first
            pass


def work_folder(folder: str | os.PathLike, tag: str) -> Path:
    """A fixed sibling of ``folder`` (``.tmp-<name>-<tag>``) for work that a rerun of the same command resumes, e.g. the
    shards of ``nsr dataset --overwrite`` while the old dataset stays in place. Not created here. ``tag`` must not be 8
    characters long: that is the shape of the leftovers ``remove_leftovers`` deletes."""
    if len(tag) == 8:
        raise ValueError(f"work folder tag {tag!r}: 8 characters would be taken for a leftover temporary folder; use another length.")
    path = Path(folder)
    return path.parent / f"{TMP_PREFIX}{path.name}-{tag}"


@contextmanager
def written_atomically(folder: str | os.PathLike, keep_on_error: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``folder``; when the block succeeds it becomes ``folder`` (the old one, if any,
    is deleted only after the new one is in place). When the block raises (or is interrupted) ``folder`` is untouched and
    the temporary folder is deleted, unless ``keep_on_error``."""
    path = Path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_swap(path)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, path)
    remove_leftovers(path)


def remove_leftovers(folder: str | os.PathLike) -> None:
    """Delete what earlier writes of ``folder`` that were killed (kill -9, a power cut) left beside it: their temporary
    folders (``.tmp-<name>-`` and mkdtemp's 8 characters; a ``work_folder`` has a longer or shorter tag and is kept) and
    old folders whose swap was not finished. Called once a new ``folder`` is in place, which supersedes them all."""
    path = Path(folder)
    leftover = re.compile(rf"({re.escape(TMP_PREFIX)}|{re.escape(OLD_PREFIX)}){re.escape(path.name)}-[a-z0-9_]{{8}}")
    for entry in path.parent.iterdir():
        if entry.is_dir() and leftover.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True)


def replace_folder(new: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Make ``new`` (a folder beside ``folder``) become ``folder``; the old ``folder`` is removed after the swap."""
    new, path = Path(new), Path(folder)
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{OLD_PREFIX}{path.name}-", dir=path.parent))
        os.rmdir(old)  # only its unique name is wanted
        os.rename(path, old)
    os.rename(new, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder: a reader sees the old file or the new one,
    never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class FinishedStages:
    """The finished stages of a long command, kept beside its output folder (``.tmp-<name>-stages``) until the output is
    written, so that a rerun of the same command after an interruption (Ctrl-C, kill -9) continues from them.

    ``key``: what decides every stage's result (its configuration and inputs); kept stages of another key are dropped.
    ``None``: nothing is kept (every stage is computed). A stage's value is stored with ``pickle`` (it holds numpy arrays and
    must come back bit for bit); the folder is this command's own scratch space, never an output.

    >>> stages = FinishedStages(out, key)
    >>> predictions = stages.get("predictions", lambda: predict(rows))   # read back by a rerun instead of computed
    >>> stages.clear()                                                   # once the output is written
    """

    def __init__(self, folder: str | os.PathLike, key: str | None):
        self.folder = None if key is None else work_folder(folder, "stages")
        self.resumed: list[str] = []
        if self.folder is None:
            return
        key_file = self.folder / "key.txt"
        if self.folder.exists() and not (key_file.is_file() and key_file.read_text() == key):
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomically(key_file, key)

    def get(self, name: str, compute: Callable[[], Any]) -> Any:
        """The value of stage ``name``: read back when a previous run finished it, else ``compute()``d and kept."""
        if self.folder is None:
            return compute()
        path = self.folder / f"{name}.pkl"
        if path.is_file():
            self.resumed.append(name)
            return pickle.loads(path.read_bytes())
        value = compute()
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=self.folder)
        with os.fdopen(fd, "wb") as handle:
            pickle.dump(value, handle)
        os.replace(tmp, path)  # a stage is kept whole or not at all
        return value

    def clear(self) -> None:
        """Drop the kept stages (the output they were for is written)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def rename_recorded_paths(folder: str | os.PathLike, final: str | os.PathLike) -> list[Path]:
    """Make every text file under ``folder`` name ``final`` where it names ``folder`` (its path as given and resolved):
    results written beside their final place (``written_atomically``, ``nsr train --overwrite``) record the paths they
    were written to, in configs, cards and reports; these must name where the results will live. Binary files are left
    as they are (their size fields would break). Returns the files changed."""
    folder, final = Path(folder), Path(final)
    pairs = [(str(folder), str(final))]
    if str(folder.resolve()) != str(folder):
        pairs.append((str(folder.resolve()), str(final.resolve())))
    changed = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        if b"\0" in data or not any(old.encode() in data for old, _ in pairs):
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        for old, new in sorted(pairs, key=lambda pair: -len(pair[0])):  # the longer (resolved) form first
            text = text.replace(old, new)
        write_text_atomically(path, text)
        changed.append(path)
    return changed
