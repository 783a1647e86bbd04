"""Expected mistakes, and the one place every command reports them.

A user's mistake (a path that is not there, a model that is neither a folder nor reachable, a damaged file, broken
YAML, the Hub while offline) is not a bug: it gets one or two lines that say what was wrong and what to do, and the
exit code of a usage error (2). Anything else is a bug and keeps its traceback. Every entry point (``nsr <command>``,
``python nsr_hf/train.py``, ``nsr sweep``) runs its work inside ``error_boundary``::

    def main(argv):
        argv, debug = debug_requested(argv)
        return error_boundary("nsr train", lambda: run_train(parse(argv)), debug=debug)

``--debug`` on any command (or ``NSR_DEBUG=1``) shows the full traceback of an expected failure too.

Code that finds a mistake raises ``UserError`` (a ``ValueError``, so callers that catch those still do) with a message
that names the input and the fix; library errors that are always the user's (the Hub offline, a truncated safetensors
file, a folder where a file belongs) are recognised here, so that no loader has to catch them all.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

USAGE_ERROR = 2  # argparse's exit code for a bad command line; every expected failure uses it
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
DEBUG_FLAG = "--debug"
DEBUG_ENV = "NSR_DEBUG"


class UserError(ValueError):
    """A mistake in what the user gave (a path, a name, a file, an option), reported as its message alone.

    >>> raise UserError("model 'smollm2-135': no such folder. Did you mean 'smollm2-135m'?")
    """


class UserTypeError(UserError, TypeError):
    """A value of the wrong type in the user's input (a corpus field that holds numbers where text belongs); still a
    ``TypeError`` for code that catches those."""


class MissingPathError(UserError, FileNotFoundError):
    """A path the user gave that is not there; still a ``FileNotFoundError`` for code that catches those."""


def debug_requested(argv: list[str]) -> tuple[list[str], bool]:
    """(``argv`` without ``--debug``, whether tracebacks are wanted: ``--debug`` given or ``NSR_DEBUG`` set to 1/true/yes)."""
    words = [a for a in argv if a != DEBUG_FLAG]
    from_env = os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return words, from_env or len(words) != len(argv)


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off for this process (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def looks_local(name: str | os.PathLike) -> bool:
    """Whether ``name`` is meant as a path on this machine rather than a Hub id (``owner/name``, or a bare legacy id such as
    ``gpt2``): it exists, starts with ``.``, ``/`` or ``~``, has more than one ``/``, or its first part is a folder here
    (``out/nothere`` when ``out/`` exists)."""
    text = str(name)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        return True
    return "/" in text and Path(text.split("/")[0]).is_dir()


def require_folder(name: str | os.PathLike, what: str, fix: str) -> None:
    """Refuse a local-looking ``name`` that is not a folder, before anything tries it as a Hub id.

    ``what``: what the folder should hold (``"predictor"``); ``fix``: what to give instead."""
    path = Path(str(name)).expanduser()
    if path.is_dir() or not looks_local(name):
        return
    found = "is a file, not a folder" if path.exists() else f"is not a folder (no such path: {path.resolve()})"
    raise MissingPathError(f"{what} {str(name)!r} {found}. {fix}")


def hub_failure(what: str, name: str, err: BaseException, fix: str = "") -> UserError:
    """The ``UserError`` for ``name`` that is not a folder here and could not be had from the Hub (offline, not found,
    no connection): says which, and what to do (``fix``: a last hint of the caller's)."""
    if hub_offline():
        message = (f"{what} {name!r} is not a folder here and not in the Hugging Face cache, and the Hub is off (HF_HUB_OFFLINE=1): "
                   "give a local folder, or unset HF_HUB_OFFLINE to download it.")
    else:
        message = (f"{what} {name!r} is not a folder here, and the Hub did not give it ({first_line(err)}): check the id "
                   "(owner/name), your connection, and for a private repo your token (HF_TOKEN).")
    return UserError(f"{message} {fix}".strip())


def first_line(err: BaseException) -> str:
    """The first non-empty line of an error's message (library messages run to many lines)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _is_hub_error(err: BaseException) -> bool:
    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:  # huggingface_hub comes with transformers; without it no error can be its
        return isinstance(err, ConnectionError)
    return isinstance(err, (OfflineModeIsEnabled, LocalEntryNotFoundError, HfHubHTTPError, ConnectionError))


def _is_damaged_file(err: BaseException) -> bool:
    return type(err).__name__ in ("SafetensorError", "HeaderTooLarge", "HeaderTooSmall") or type(err).__module__.startswith("safetensors")


def explain(err: BaseException) -> str | None:
    """The message for an expected failure (a user's mistake), or ``None`` for an unexpected one (a bug: it keeps its
    traceback)."""
    if _is_hub_error(err):
        hint = ("The Hub is off (HF_HUB_OFFLINE=1): give local folders in place of Hub ids, or unset HF_HUB_OFFLINE to reach it."
                if hub_offline() else "Check the name (owner/name), your connection, and for a private repo your token (HF_TOKEN).")
        return f"the Hugging Face Hub could not be used ({first_line(err).rstrip('.')}). {hint}"
    if isinstance(err, IsADirectoryError):
        return f"{err.filename!r} is a folder, where a file belongs: give a file's path."
    if isinstance(err, NotADirectoryError):
        return f"{err.filename!r}: part of this path is a file, where a folder belongs: give a folder's path."
    if isinstance(err, FileExistsError) and err.filename and Path(err.filename).is_file():
        return f"{err.filename!r} is a file, where a folder belongs: give a folder's path (or move the file away)."
    if isinstance(err, PermissionError):
        return f"no permission to use {err.filename!r}: choose another path, or change its permissions."
    if isinstance(err, FileNotFoundError) and err.filename and not str(err).startswith(("'", '"')) and "[Errno" in str(err):
        return f"{err.filename!r} does not exist: check the path."
    if isinstance(err, (ValueError, FileNotFoundError, ImportError)):  # UserError too; the commands' validators raise these
        return str(err)
    if _is_damaged_file(err):
        return f"a safetensors file is damaged ({first_line(err)}): it was cut short or is not safetensors; save or download it again."
    if type(err).__module__.startswith("yaml"):
        return f"not valid YAML: {' '.join(str(err).split())}"
    return None


def _close_progress_bars() -> None:
    """End the progress bars a failure left open, so that the message starts on a line of its own."""
    progress = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(progress, "tqdm", None), "_instances", None) or ()):
        bar.close()


def error_boundary(prog: str, run: Callable[[], int | None], *, debug: bool = False) -> int:
    """Run a command's work and return its exit code: ``run()``'s (0 for ``None``); 2 with one line on stderr
    (``<prog>: error: <what was wrong>. <what to do>``) for an expected failure; 130 with "interrupted: rerun the same
    command to resume" for Ctrl-C. An unexpected failure, or any failure with ``debug``, raises with its traceback."""
    try:
        code = run()
    except KeyboardInterrupt:
        if debug:
            raise
        _close_progress_bars()
        print(f"{prog}: interrupted: rerun the same command to resume.", file=sys.stderr, flush=True)
        return INTERRUPTED
    except Exception as err:
        message = None if debug else explain(err)
        if message is None:
            raise
        _close_progress_bars()
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        for note in getattr(err, "__notes__", ()):  # what was kept and how to go on (e.g. a train run's saved predictor)
            print(f"{prog}: {note}", file=sys.stderr, flush=True)
        return USAGE_ERROR
    return 0 if code is None else int(code)
