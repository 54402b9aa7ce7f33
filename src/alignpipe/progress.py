"""One progress-bar style for every long stage (generation, judging, training)."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from alignpipe import distributed


def progress(transient: bool = False) -> Progress:
    """A progress bar; shown by the main process only when several processes run one recipe."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), transient=transient, disable=not distributed.is_main(),
    )
