"""What every command group shares: list flags parsed one way, and defaults shown as the flags spell them.

Defaults live in the library's dataclasses; a command reads them as class attributes (``EvalConfig.crops``) and
:func:`join` / :func:`span` turn a tuple default into the flag's text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dynres.errors import ConfigError

RANGE_STEP = 56  # "112..448" without a step: the paper grid's step


def parse_list(text: str | None, kind: type = int, flag: str = "list") -> tuple | None:
    """``'a,b,c'`` as a tuple of ``kind`` (int, float or str); ints also take ``'112..448:56'`` (inclusive, with a
    step). None or blank text is None (the flag was not given)."""
    if text is None or not text.strip():
        return None
    try:
        if kind is int and ".." in text:
            lo, rest = text.split("..")
            hi, _, step = rest.partition(":")
            return tuple(range(int(lo), int(hi) + 1, int(step or RANGE_STEP)))
        return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        example = "'112,168' or '112..448:56'" if kind is int else "'a,b,c'"
        raise ConfigError(flag, f"cannot parse {text!r}: use {example}") from None


def parse_pairs(text: str | None, flag: str) -> tuple[tuple[float, float], ...] | None:
    """``'a,c;a,c'`` as float pairs (a recalibration: one (a, c) per grid resolution). None or blank: None."""
    if text is None or not text.strip():
        return None
    pairs = [parse_list(part, float, flag) for part in text.split(";") if part.strip()]
    if not all(p is not None and len(p) == 2 for p in pairs):
        raise ConfigError(flag, f"cannot parse {text!r}: use 'a,c;a,c;...' (one pair per grid resolution)")
    return tuple((p[0], p[1]) for p in pairs)


def join(values: Sequence) -> str:
    """A tuple default as a list flag spells it: ``(0.25, 1.0)`` -> ``'0.25,1.0'``."""
    return ",".join(str(v) for v in values)


def span(values: Sequence[int]) -> str:
    """An evenly spaced int default as a range flag: ``(112, 168, 224)`` -> ``'112..224:56'`` (else :func:`join`)."""
    steps = {b - a for a, b in zip(values, values[1:])}
    if len(values) < 3 or len(steps) != 1 or min(steps) < 1:
        return join(values)
    return f"{values[0]}..{values[-1]}:{steps.pop()}"


def path_text(path: Path | None) -> str | None:
    """A path flag as the library's string setting (None stays None)."""
    return str(path) if path else None
