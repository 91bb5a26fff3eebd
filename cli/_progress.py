"""Extraction progress: a Rich bar on a terminal, plain log lines otherwise; and the final summary."""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from featurestore.pipelines.extract import ExtractReport, PlannedSlide, SlideOutcome


class ExtractProgress:
    """Slides done / total, tiles, tiles/s and ETA."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.tiles = 0
        self.done = 0
        self.total = 0
        self.t0 = time.perf_counter()
        self.bar = Progress(TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=console, disable=not self.live)
        self.task = self.bar.add_task("slides", total=None, rate="")

    def __enter__(self) -> Self:
        self.bar.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.bar.__exit__(exc_type, exc, tb)

    def start(self, n_slides: int) -> None:
        self.total = n_slides
        self.t0 = time.perf_counter()
        self.bar.update(self.task, total=n_slides)
        if not self.live:
            self.console.print(f"extract: {n_slides} slides")

    def advance(self, outcome: SlideOutcome) -> None:
        self.done += 1
        self.tiles += outcome.tiles
        rate = self.tiles / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, advance=1, rate=f"{self.tiles} tiles  {rate:.1f} tiles/s")
        if not self.live:
            detail = outcome.error.splitlines()[0] if outcome.error else f"{outcome.tiles} tiles"
            self.console.print(f"[{self.done}/{self.total}] {outcome.status:7} {Path(outcome.path).name}: {detail}"
                               f"  ({rate:.1f} tiles/s)", highlight=False)


def print_summary(report: ExtractReport, store: Path, console: Console) -> None:
    counts = {s: sum(o.status == s for o in report.outcomes) for s in ("done", "skipped", "failed")}
    rate = report.tiles / max(report.wall_seconds, 1e-9)
    table = Table("slides", "done", "skipped", "failed", "tiles", "tiles/s", "wall s", title="extract summary")
    table.add_row(str(len(report.outcomes)), str(counts["done"]), str(counts["skipped"]), str(counts["failed"]),
                  str(report.tiles), f"{rate:.1f}", f"{report.wall_seconds:.1f}")
    console.print(table)
    for dup, original in report.duplicates:
        console.print(f"duplicate file: {dup} is the same slide as {original} (extracted once)")
    for m in report.missing:
        console.print(f"[yellow]not found[/yellow]: {m}")
    for o in report.failed:
        console.print(f"[red]failed[/red]: {o.error.splitlines()[0]}", highlight=False)
    console.print(f"store: {store}")


def print_dry_run(plan: list[PlannedSlide], console: Console) -> None:
    table = Table("slide", "µm/px", "tiles", "problem", title="dry run: nothing is read or written")
    for p in plan:
        table.add_row(Path(p.path).name, f"{p.mpp:.3f}" if p.mpp else "-", str(p.tiles), p.error)
    console.print(table)
    console.print(f"{len(plan)} slides, {sum(p.tiles for p in plan)} tiles")
