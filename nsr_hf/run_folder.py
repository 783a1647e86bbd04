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
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    results, with or without ``overwrite``. ``fix``: the command to suggest, e.g. ``"pass --overwrite"``."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise UserError(f"output_dir {str(folder)!r} is a file: give a folder (a new or empty one) for {what}.")
    if is_empty(path):
        return
    if finished:
        if overwrite:
            return
        raise UserError(f"{path} already holds {what} that finished. Nothing was changed: choose another output_dir, "
                        f"or {fix or 'pass --overwrite'} to replace it once the new run succeeds.")
    if overwrite:
        raise UserError(f"{path} holds files that are not {what}: --overwrite only replaces finished results of this command. "
                        "Choose a new or empty output_dir.")


def restore_interrupted_swap(folder: str | os.PathLike) -> None:
    """Put back a folder that a crash left under its ``.old`` name in the middle of a swap (the new one never arrived)."""
    path = Path(folder)
    if path.exists() or not path.parent.is_dir():
        return
    olds = sorted(path.parent.glob(f"{OLD_PREFIX}{path.name}-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.rename(olds[-1], path)


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
