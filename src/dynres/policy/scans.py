"""How many scans of an image to read at a resolution: the ``ScanPolicy`` protocol and the forms it accepts.

The three concerns stay separate, as in FFCV: the store knows bytes, a *scans policy* says how many scans of an
image to read at a resolution, and ``decode`` turns the prefix into a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, Union, runtime_checkable


@runtime_checkable
class ScanPolicy(Protocol):
    """Anything that says how many scans of ``key`` to read for inference at ``resolution`` (None: all)."""

    def scans(self, key: str, resolution: int) -> int | None: ...


Scans = Union[None, int, Mapping[str, int], Callable[[str, int], Union[int, None]], ScanPolicy]


def scans_for(scans: Scans, key: str, resolution: int) -> int | None:
    """Resolve any accepted form of a scans policy for one image."""
    if scans is None or isinstance(scans, int):
        return scans
    if isinstance(scans, ScanPolicy):
        return scans.scans(key, resolution)
    if isinstance(scans, Mapping):
        return scans.get(key)
    return scans(key, resolution)
