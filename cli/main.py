"""The ``fs`` command. It parses and prints; the work happens in ``featurestore`` and ``pipelines``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli._common import OutputFormat, StoreOpt, console, friendly, print_table
from featurestore.store import Store

app = typer.Typer(help="Cached-feature store for computational pathology: extract once, distil many times.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
labels_app = typer.Typer(help="Slide-level labels (patient, class, grade, survival, split...).", no_args_is_help=True)
slides_app = typer.Typer(help="Register and list slides.", no_args_is_help=True)
app.add_typer(labels_app, name="labels")
app.add_typer(slides_app, name="slides")


@app.command()
@friendly
def init(store: Annotated[Path, typer.Argument(help="New store directory.")]) -> None:
    """Create an empty store."""
    Store.create(store)
    console.print(f"created store at {store}")


@app.command()
@friendly
def info(store: StoreOpt) -> None:
    """Slides, tiles, encoders, embedding sets, bytes on disk and failures."""
    s = Store.open(store, read_only=True).info()
    console.print(f"[bold]{s.path}[/bold]  {s.bytes_on_disk / 2**20:.1f} MiB on disk")
    console.print(f"slides {s.slides}  tiles {s.tiles}  labelled {s.labelled_slides}  failures {s.failures}"
                  + (f"  unfinished transactions {s.staging}" if s.staging else ""))
    if s.embedding_sets:
        view = Table("SQL view", "encoder", "slides", "tiles", title="embedding sets")
        for name, desc, n_slides, n_tiles in s.embedding_sets:
            view.add_row(name, desc, str(n_slides), str(n_tiles))
        console.print(view)


@app.command()
@friendly
def sql(query: Annotated[str, typer.Argument(help="One read-only SELECT over the store's views.")],
        store: StoreOpt,
        fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = OutputFormat.table,
        output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to a file.")] = None) -> None:
    """Query the store with DuckDB (read-only).

    Views: slides, tiles, labels, encoders, embedding_sets, tilings, slide_tilings, bags, runs, failures,
    and emb_<model> per embedding set with the tile vector as FLOAT[dim] in column `embedding`.
    """
    print_table(Store.open(store, read_only=True).sql(query), fmt, output)


@labels_app.command("import")
@friendly
def labels_import(csv: Annotated[Path, typer.Argument(help="Labels CSV with a header row.")], store: StoreOpt,
                  key: Annotated[str, typer.Option(help="Column matching slides: filename or slide_id.")]
                  = "filename") -> None:
    """Store any label columns, joined to slides by file name or slide id; all rows must match."""
    if key not in ("filename", "slide_id"):
        raise typer.BadParameter(f"--key must be filename or slide_id, got {key!r}")
    n = Store.open(store).import_labels(csv, key)  # type: ignore[arg-type]
    console.print(f"imported labels for {n} slides from {csv}")


@slides_app.command("add")
@friendly
def slides_add(paths: Annotated[list[Path], typer.Argument(help="Slide files, folders or globs.")],
               store: StoreOpt,
               reader: Annotated[str, typer.Option(help="auto, cucim or openslide.")] = "auto",
               assume_mpp: Annotated[float | None, typer.Option(help="µm/px for slides whose files have none.")]
               = None) -> None:
    """Register slides (metadata only) so labels can be attached before extraction."""
    from pipelines.register import add_slides

    report = add_slides(Store.open_or_create(store), list(paths), reader=reader, assume_mpp=assume_mpp)
    console.print(f"added {len(report.added)} slides, {len(report.known)} already known, "
                  f"{len(report.duplicates)} duplicate files, {len(report.failures)} failures")
    for dup, original in report.duplicates:
        console.print(f"  duplicate: {dup} is the same slide as {original}")
    for f in report.failures:
        console.print(f"  [red]failed[/red]: {f.message}", highlight=False)
    for m in report.missing:
        console.print(f"  [yellow]not found[/yellow]: {m}")
    if report.failures:
        raise typer.Exit(1)


@slides_app.command("list")
@friendly
def slides_list(store: StoreOpt) -> None:
    """List registered slides."""
    print_table(Store.open(store, read_only=True).sql(
        "SELECT slide_id, path, vendor, width, height, mpp_x, mpp_assumed, level_count FROM slides ORDER BY path"),
        OutputFormat.table, None)


@app.command("demo-cohort")
@friendly
def demo_cohort(out: Annotated[Path, typer.Argument(help="Directory for slides/ and labels.csv.")],
                n_slides: Annotated[int, typer.Option(help="Number of slides.")] = 8,
                size: Annotated[int, typer.Option(help="Level-0 edge in pixels.")] = 4096,
                seed: Annotated[int, typer.Option(help="Random seed.")] = 0) -> None:
    """Generate a synthetic H&E cohort (pyramidal TIFFs with µm/px) and its labels CSV."""
    from pipelines.demo import make_cohort

    cohort = make_cohort(out, n_slides, size=size, seed=seed)
    console.print(f"wrote {len(cohort.slides)} slides to {out / 'slides'} and labels to {cohort.labels_csv}")
