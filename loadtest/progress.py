"""Live progress bar (rich) fed by the runner's per-request callback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loadtest.record import RequestRecord
from loadtest.runner import OnDone


@contextmanager
def progress_bar(total: int | None, label: str, enabled: bool = True) -> Iterator[OnDone]:
    """Yields the runner's `on_done` callback; shows done/total, failures and elapsed time.

    `total` None (a duration-bound run) shows a count without a bar's end.
    """
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn())
    console = Console(stderr=True)
    with Progress(*columns, console=console, disable=not enabled, transient=False) as bar:
        task = bar.add_task(label, total=total, failed=0)
        failed = 0

        def on_done(record: RequestRecord) -> None:
            nonlocal failed
            failed += not record.ok
            bar.update(task, advance=1, failed=failed)

        yield on_done
