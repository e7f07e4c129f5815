"""Progress display shared by every long-running step (rich, on stderr).

Library functions take ``progress: bool`` and call :func:`track`; the CLI decides whether to show it.
``DYNRES_NO_PROGRESS=1`` silences every bar (CI logs, tests).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
U = TypeVar("U")

# a message is one line in a log, whatever the width; markup only where a caller asks for it (``markup=True``,
# its data escaped): messages carry file names and run-file sections such as "[backbone]", which rich would
# otherwise take for style tags and drop
console = Console(stderr=True, soft_wrap=True, markup=False)


def enabled(progress: bool = True) -> bool:
    return progress and os.environ.get("DYNRES_NO_PROGRESS", "") in ("", "0")


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def track(items: Iterable[T], total: int | None, description: str, progress: bool = True) -> Iterator[T]:
    """Yield ``items`` while drawing a bar; a plain pass-through when progress is off."""
    if not enabled(progress):
        yield from items
        return
    with make_progress() as bar:
        task = bar.add_task(description, total=total, status="")
        for item in items:
            yield item
            bar.advance(task)


@contextlib.contextmanager
def status_bar(total: int, description: str, progress: bool = True) -> Iterator[Callable[..., None]]:
    """A bar the caller advances one step at a time, setting its status text (a loss, the setting just run);
    ``total=`` on a step changes the bar's length (work found to be longer than announced)."""
    if not enabled(progress):
        yield lambda status, total=None: None
        return
    with make_progress() as bar:
        task = bar.add_task(description, total=total, status="")
        yield lambda status, total=None: bar.update(task, advance=1, status=status, total=total)


def track_threads(fn: Callable[[T], U], items: Sequence[T], description: str, progress: bool = True) -> list[U]:
    """``[fn(x) for x in items]`` on one thread per core, in order, with a bar: for decoding many images (Pillow
    and torch release the GIL), where every result is kept anyway."""
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        return list(track(pool.map(fn, items), len(items), description, progress))


def log(message: str) -> None:
    if enabled():
        console.print(message)
