"""Where a command's time goes: wall seconds of its stages (``metrics.json`` ``stage_seconds``, ``benchmarks/pipeline.py``).

    with stage_clock() as seconds:          # the command (``run_train``) collects ...
        with timed("dataset"):              # ... what its stages, at any depth of the call, time
            ...
    seconds  # {"dataset": 29.4, "evaluation": 120.3, "evaluation/baselines": 80.1, ...}

A stage inside another is named ``outer/inner`` (its seconds are part of the outer stage's too); a stage run twice adds
up. Outside a ``stage_clock`` block ``timed`` measures nothing and costs nothing, so library code times its stages freely.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

_CLOCKS: list[tuple[dict[str, float], list[str]]] = []  # (seconds by stage, the stages open now), innermost clock last


@contextmanager
def stage_clock() -> Iterator[dict[str, float]]:
    """Collect the seconds of every ``timed`` stage run inside the block, into the dict it yields (in the order the stages
    started)."""
    seconds: dict[str, float] = {}
    _CLOCKS.append((seconds, []))
    try:
        yield seconds
    finally:
        _CLOCKS.pop()


@contextmanager
def timed(stage: str) -> Iterator[None]:
    """Add the wall seconds of the block to ``stage`` in the innermost ``stage_clock`` (nothing when there is none)."""
    if not _CLOCKS:
        yield
        return
    seconds, open_stages = _CLOCKS[-1]
    open_stages.append(stage)
    name = "/".join(open_stages)
    seconds.setdefault(name, 0.0)
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = round(seconds[name] + time.perf_counter() - start, 3)
        open_stages.pop()
