"""A rich progress bar that the load run updates a few times a second (never per request)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)


@contextmanager
def progress_bar(
    requests: int | None, duration: float | None, *, disable: bool = False
) -> Iterator[Callable[[int, float], None]]:
    """Yield ``update(done, elapsed_s)``; the bar tracks requests, or time when only timed."""
    by_time = requests is None
    total = float(duration or 0) if by_time else float(requests or 0)
    columns = [
        TextColumn("[bold]load"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>9} req/s"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, transient=True, disable=disable) as bar:
        task = bar.add_task("load", total=total, rate="-")

        def update(done: int, elapsed: float) -> None:
            rate = f"{done / elapsed:,.0f}" if elapsed > 0 else "-"
            bar.update(task, completed=min(elapsed, total) if by_time else done, rate=rate)

        yield update
