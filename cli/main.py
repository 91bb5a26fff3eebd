"""The ``fs`` command. It parses and prints; the work happens in ``featurestore`` and ``pipelines``."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from featurestore.cli._common import OutputFormat, OverwriteOpt, StoreOpt, console, friendly, new_output, print_table
from featurestore.cli._options import Device
from featurestore.slides import READERS
from featurestore.slides.quality import DEFAULT_LIMITS, parse_limits
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
    console.print(f"version {s.version}  commits since the last checkpoint {s.commits_since_checkpoint}")
    for damage in s.damaged:
        console.print(f"[red]damaged[/red]: {damage}; run `fs verify -s {s.path}`", highlight=False)
    if s.tilings:
        view = Table("tiling", "tile", "slides", "tiles", "pixels cached", title="tilings")
        for t in s.tilings:
            view.add_row(t.tiling_id, t.description, str(t.slides), str(t.tiles), f"{t.slides_with_pixels} slides")
        console.print(view)
    if s.embedding_sets:
        view = Table("SQL view", "encoder", "slides", "tiles", title="embedding sets")
        for e in s.embedding_sets:
            view.add_row(e.view, e.description, str(e.slides), str(e.tiles))
        console.print(view)


@app.command()
@friendly
def sql(query: Annotated[str, typer.Argument(help="One read-only SELECT over the store's views.")],
        store: StoreOpt,
        fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = OutputFormat.table,
        output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to a file.")] = None,
        overwrite: OverwriteOpt = False) -> None:
    """Query the store with DuckDB (read-only).

    Views: slides, tiles, labels, encoders, embedding_sets, tilings, slide_tilings, bags, runs, failures,
    emb_<model> per embedding set with the tile vector as FLOAT[dim] in column `embedding`, and
    slide_emb_<model> with each slide's mean embedding.
    """
    new_output(output, overwrite)
    print_table(Store.open(store, read_only=True).sql(query), fmt, output)


@labels_app.command("import")
@friendly
def labels_import(csv: Annotated[Path, typer.Argument(help="Labels CSV with a header row.")], store: StoreOpt,
                  key_column: Annotated[str | None, typer.Option(
                      "--key-column", "--key", help="Column naming the slide: its slide id, file name or file stem "
                      "(default: the first of slide_id, filename, slide, wsi, file, path).")] = None,
                  skip_unknown: Annotated[bool, typer.Option(
                      "--skip-unknown", help="Import the other rows when some name no slide in the store.")]
                  = False) -> None:
    """Attach label columns to slides. Columns in the file replace those of its slides; others are kept."""
    report = Store.open(store).import_labels(csv, key_column, skip_unknown=skip_unknown)
    console.print(f"imported labels for {report.rows} slides from {csv}"
                  + (f"; skipped {report.skipped} rows naming no slide in the store" if report.skipped else ""))


Reader = StrEnum("Reader", {name: name for name in READERS})
"""Slide reader backends, from the registry in featurestore.slides."""


@slides_app.command("add")
@friendly
def slides_add(paths: Annotated[list[Path], typer.Argument(help="Slide files, folders or globs.")],
               store: StoreOpt,
               reader: Annotated[Reader, typer.Option(help="Slide reader backend; auto picks one by each file's "
                                                      "content.")] = Reader.auto,
               assume_mpp: Annotated[float | None, typer.Option(help="µm/px for slides whose files have none.")]
               = None) -> None:
    """Register slides (metadata only) so labels can be attached before extraction."""
    from featurestore.pipelines.register import add_slides

    report = add_slides(Store.open_or_create(store), list(paths), reader=reader.value, assume_mpp=assume_mpp)
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
    from featurestore.pipelines.demo import make_cohort

    cohort = make_cohort(out, n_slides, size=size, seed=seed)
    console.print(f"wrote {len(cohort.slides)} slides to {out / 'slides'} and labels to {cohort.labels_csv}")


_QUALITY_DEFAULTS = ",".join(f"{name}={value:g}" for name, value in DEFAULT_LIMITS.items())


class Tissue(StrEnum):
    otsu = "otsu"
    grandqc = "grandqc"
    hest = "hest"
    none = "none"


class Edge(StrEnum):
    pad = "pad"
    drop = "drop"


@app.command()
@friendly
def extract(
    paths: Annotated[list[str], typer.Argument(help="Slide files, folders (recursive) or globs.")],
    store: StoreOpt,
    model: Annotated[list[str], typer.Option("--model", "-m", help="Teacher name; repeat for several.")],
    weights: Annotated[list[str] | None, typer.Option(help="NAME=PATH local weights for a teacher.")] = None,
    mpp: Annotated[float, typer.Option(help="Target µm/px of the teacher tiles.")] = 0.5,
    tile_size: Annotated[int, typer.Option(help="Tile edge in px at --mpp.")] = 224,
    overlap: Annotated[int, typer.Option(help="Overlap between tiles in px at --mpp.")] = 0,
    min_tissue: Annotated[float, typer.Option(help="Minimum tissue fraction of a kept tile.")] = 0.25,
    tissue: Annotated[Tissue, typer.Option(help="Tissue detection: otsu (saturation), grandqc or hest (deep "
                                           "segmenters, weights from --tissue-weights or the hub cache), or none "
                                           "to tile everything.")] = Tissue.otsu,
    tissue_weights: Annotated[str | None, typer.Option(help="Checkpoint (or folder holding it) of the --tissue "
                                                       "grandqc/hest segmenter.")] = None,
    edge: Annotated[Edge, typer.Option(help="Edge tiles: pad with white, or drop.")] = Edge.pad,
    min_quality: Annotated[str | None, typer.Option(help="Drop tiles outside these quality limits before they are "
                                                    f"embedded: 'default' ({_QUALITY_DEFAULTS}) or NAME=VALUE pairs, "
                                                    "e.g. sharpness=30,pen=0.1 (sharpness: variance of the "
                                                    "Laplacian, at least; pen, background: fractions, at most). "
                                                    "Every tile's measures are in the tiles table either way.")]
    = None,
    reader: Annotated[Reader, typer.Option(help="Slide reader backend; auto picks one by each file's content "
                                           "(DICOM, CZI, OME-TIFF, TIFF, PNG/JPEG).")] = Reader.auto,
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 64,
    read_workers: Annotated[int, typer.Option(help="Threads reading tiles ahead of compute.")] = 4,
    workers: Annotated[int, typer.Option(help="Local Dask worker processes (0: in this process).")] = 0,
    scheduler: Annotated[str | None, typer.Option(help="Existing Dask scheduler, e.g. tcp://host:8786.")]
    = None,
    cache_pixels: Annotated[list[str] | None, typer.Option(help="Store tile pixels SIZE@MPP; repeatable.")]
    = None,
    assume_mpp: Annotated[float | None, typer.Option(help="µm/px for slides whose files have none.")] = None,
    float32: Annotated[bool, typer.Option("--float32", help="Store float32 instead of float16.")] = False,
    teacher_views: Annotated[int, typer.Option(help="Also embed dihedral views 1..K-1 of each tile (K ≤ 8).")]
    = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List slides and tile counts; load no model.")]
    = False,
    geojson: Annotated[bool, typer.Option("--geojson", help="Also write <store>/qc/<slide_id>.geojson: tissue "
                                          "contours and the tile grid, for QuPath (drag it onto the slide).")]
    = False,
) -> None:
    """Tile slides and store teacher embeddings (stage one). Safe to re-run: finished work is skipped."""
    import sys

    from featurestore.cli._progress import ExtractProgress, print_dry_run, print_summary
    from featurestore.pipelines.extract import ExtractOptions, PixelSpec, dry_run_counts, run_extract
    from featurestore.schemas import TilingSpec

    limits = parse_limits(min_quality) if min_quality is not None else {}
    tiling = TilingSpec(target_mpp=mpp, tile_size=tile_size, overlap=overlap, tissue_method=tissue.value,
                        min_tissue=min_tissue, edge=edge.value, **limits)
    try:
        pixel_specs = tuple(PixelSpec.parse(p) for p in cache_pixels or [])
        weight_map = dict(w.split("=", 1) for w in weights or [])
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    opts = ExtractOptions(models=tuple(model), tiling=tiling, weights=weight_map, reader=reader.value,
                          device=device, batch_size=batch_size, read_workers=read_workers,
                          cache_pixels=pixel_specs, assume_mpp=assume_mpp, dtype="float32" if float32 else "float16",
                          teacher_views=teacher_views, tissue_weights=tissue_weights, geojson=geojson)
    if dry_run:
        print_dry_run(dry_run_counts(paths, opts), console)
        if tiling.filters_quality:
            console.print("tile counts are before --min-quality: tiles are measured as they are read")
        return
    with ExtractProgress(console) as progress:
        report = run_extract(paths, store, opts, workers=workers, scheduler=scheduler,
                             command="fs " + " ".join(sys.argv[1:]), on_start=progress.start,
                             on_outcome=progress.advance)
    print_summary(report, store, console)
    if report.failed:
        raise typer.Exit(1)


def _register_subcommands() -> None:
    """Commands of the other packages, each module adding its own (kept out of this file's imports)."""
    from featurestore.cli import annotations, distill, maintenance, models, search, slide_encode, train, view, xcohort

    annotations.register(app)
    distill.register(app)
    maintenance.register(app)
    models.register(app)
    search.register(app)
    slide_encode.register(app)
    train.register(app)
    view.register(app)
    xcohort.register(app)


_register_subcommands()
