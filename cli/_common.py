"""What every command shares: the store option, one-line errors, and result printing."""

from __future__ import annotations

import functools
import json
import sys
import warnings
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import typer
from rich.console import Console
from rich.table import Table

from featurestore.schemas import FsError

console = Console()
err_console = Console(stderr=True)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


warnings.showwarning = _one_line_warning

StoreOpt = Annotated[Path, typer.Option("--store", "-s", envvar="FS_STORE", help="Store directory (or $FS_STORE).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace output files that already exist.")]


def new_output(path: Path | None, overwrite: bool) -> None:
    """Refuse to replace a user's file unless asked; checked before any work."""
    if path is None:
        return
    if path.is_dir():
        raise FsError(f"{path}: is a directory; give a file name")
    if path.exists() and not overwrite:
        raise FsError(f"{path}: exists; choose another name or pass --overwrite")


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


P = ParamSpec("P")
R = TypeVar("R")


def friendly(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn our errors into one red line and exit code 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except FsError as err:
            err_console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from err

    return wrapper


def _cell(value: Any) -> str:
    if isinstance(value, list):
        head = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value[:4])
        return f"[{head}{', …' if len(value) > 4 else ''}] ({len(value)})"
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def _flatten_nested(table: pa.Table) -> pa.Table:
    """CSV has no arrays: write vectors and lists as JSON text in their cell."""
    for i, f in enumerate(table.schema):
        if pa.types.is_nested(f.type):
            text = pa.array([None if v is None else json.dumps(v) for v in table.column(i).to_pylist()])
            table = table.set_column(i, f.name, text)
    return table


def print_table(table: pa.Table, fmt: OutputFormat, output: Path | None, *, title: str | None = None,
                max_rows: int = 200) -> None:
    """Print or save an Arrow table; a rich table on a terminal, machine formats otherwise."""
    if fmt is OutputFormat.parquet:
        if output is None:
            raise typer.BadParameter("--format parquet needs --output FILE.parquet")
        pq.write_table(table, output)
        err_console.print(f"wrote {table.num_rows} rows to {output}")
        return
    if fmt is OutputFormat.csv:
        flat = _flatten_nested(table)
        if output:
            pacsv.write_csv(flat, output)
        else:
            sink = pa.BufferOutputStream()
            pacsv.write_csv(flat, sink)
            sys.stdout.write(sink.getvalue().to_pybytes().decode())
        return
    if fmt is OutputFormat.json:
        text = json.dumps(table.to_pylist(), default=str, indent=1)
        if output:
            output.write_text(text + "\n")
        else:
            sys.stdout.write(text + "\n")
        return
    view = Table(title=title, show_lines=False)
    for name in table.column_names:
        view.add_column(name, overflow="fold")
    for row in table.slice(0, max_rows).to_pylist():
        view.add_row(*(_cell(v) for v in row.values()))
    console.print(view)
    if table.num_rows > max_rows:
        console.print(f"… {table.num_rows - max_rows} more rows (use --format csv/json/parquet for all)")
