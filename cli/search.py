"""``fs index``, ``fs search``, ``fs import`` and ``fs export``: retrieval joined to SQL, and HDF5 interop.

``register(app)`` adds the commands to the ``fs`` app; the work happens in ``featurestore.index``
and ``pipelines.interop``.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from featurestore.cli._common import (
    OutputFormat,
    OverwriteOpt,
    StoreOpt,
    console,
    err_console,
    friendly,
    new_output,
    print_table,
)
from featurestore.index import EXACT_BELOW, KINDS, default_kind
from featurestore.pipelines.interop import LAYOUTS, ImportOptions, export_features, import_features
from featurestore.store import Store

index_app = typer.Typer(help="FAISS indexes of embedding sets, searched by fs search.", no_args_is_help=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Embedding set: encoder name, view name or set "
                                                               "id.")]


Kind = StrEnum("Kind", [(kind.replace("-", "_"), kind) for kind in KINDS])


class GroupBy(StrEnum):
    slide = "slide"


Layout = StrEnum("Layout", [(name, name) for name in LAYOUTS])


class FileFormat(StrEnum):
    h5 = "h5"


def _progress(label: str) -> Progress:
    """A transient bar on a terminal; nothing when output is piped (the summary line says it all)."""
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def register(app: typer.Typer) -> None:
    """Add ``index build|info``, ``search``, ``import`` and ``export`` to the ``fs`` app."""
    app.add_typer(index_app, name="index")
    app.command("search")(search_cmd)
    app.command("import")(import_cmd)
    app.command("export")(export_cmd)


@index_app.command("build")
@friendly
def index_build(
    store: StoreOpt,
    model: ModelOpt,
    kind: Annotated[Kind | None, typer.Option(help=f"Index kind; default by size: {default_kind(0)} (exact) below "
                                                   f"{EXACT_BELOW:,} vectors, {default_kind(EXACT_BELOW)} above.")]
    = None,
    gpu: Annotated[bool | None, typer.Option("--gpu/--cpu", help="Build on a GPU (default: when FAISS has "
                                                                 "one) or on the CPU.")] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build afresh instead of adding new slides.")]
    = False,
    nlist: Annotated[int | None, typer.Option(help="IVF lists (default 4·√n).")] = None,
    nprobe: Annotated[int | None, typer.Option(help="IVF lists scanned per query (default max(32, "
                                                    "nlist/32)).")] = None,
    pq_m: Annotated[int | None, typer.Option(help="PQ sub-quantizers, dividing dim (default dim/16).")]
    = None,
    pq_bits: Annotated[int | None, typer.Option(help="Bits per PQ code (default 8).")] = None,
    rerank: Annotated[int | None, typer.Option(help="IVF-PQ: re-score rerank·k candidates exactly "
                                                    "(default 10).")] = None,
    hnsw_m: Annotated[int | None, typer.Option(help="HNSW links per node (default 32).")] = None,
    ef_construction: Annotated[int | None, typer.Option(help="HNSW build breadth (default 80).")] = None,
    ef_search: Annotated[int | None, typer.Option(help="HNSW search breadth (default 128).")] = None,
) -> None:
    """Build the FAISS index of an embedding set, or add the slides extracted since (incremental)."""
    from featurestore.index import build_index

    with _progress("index") as progress:
        task = progress.add_task("slides", total=None)
        report = build_index(
            Store.open(store), model, kind=kind.value if kind else None, gpu=gpu, rebuild=rebuild,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            nlist=nlist, nprobe=nprobe, pq_m=pq_m, pq_bits=pq_bits, rerank=rerank, hnsw_m=hnsw_m,
            ef_construction=ef_construction, ef_search=ef_search)
    p = report.params
    layout = ", ".join(f"{k} {v}" for k, v in p.to_dict().items() if k != "kind")
    console.print(f"{report.action}: {report.encoder_name} index ({p.kind}{', ' + layout if layout else ''}) "
                  f"holds {report.n_vectors} vectors of {report.n_slides} slides; added "
                  f"{report.vectors_added} from {report.slides_added} slides on {report.device} in "
                  f"{report.seconds:.1f} s ({report.reason})", highlight=False)
    for note in report.notes:
        console.print(f"[yellow]note[/yellow]: {note}", highlight=False)


@index_app.command("info")
@friendly
def index_info(store: StoreOpt, model: ModelOpt) -> None:
    """Show an embedding set's index: layout, size, and whether it is up to date."""
    from featurestore.index import index_status

    manifest, status = index_status(Store.open(store, read_only=True), model)
    if manifest is None:
        console.print(f"no index for {model}; build it with `fs index build --model {model}`")
        raise typer.Exit(1)
    p = manifest.params
    console.print(f"[bold]{manifest.encoder_name}[/bold] (set {manifest.set_id}, {manifest.dim}-d): {p.kind} "
                  f"[{p.factory()}], {manifest.n_vectors} vectors of {len(manifest.bags)} slides")
    values = ", ".join(f"{k}={v}" for k, v in p.to_dict().items())
    console.print(f"parameters: {values}; built {manifest.built_at} on {manifest.device}, updated "
                  f"{manifest.updated_at}, faiss {manifest.faiss_version}", highlight=False)
    state = "[green]up to date[/green]" if status.fresh else f"[red]stale[/red]: {status.describe()}"
    fix = f"`fs index build --model {model}{' --rebuild' if status.file_missing else ''}`"
    console.print(f"status: {state}" + ("" if status.fresh else f"; run {fix}"))


@friendly
def search_cmd(
    store: StoreOpt,
    model: ModelOpt,
    tile: Annotated[int | None, typer.Option(help="Query: a tile id.")] = None,
    slide: Annotated[str | None, typer.Option(help="Query: a slide id; ranks slides by pooled vectors.")]
    = None,
    image: Annotated[Path | None, typer.Option(help="Query: an image tile, embedded by the set's teacher.")]
    = None,
    query: Annotated[str | None, typer.Option(help="Query: SQL returning one vector, e.g. SELECT embedding "
                                                   "FROM emb_uni WHERE tile_id = 1.")] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", help="Number of results.")] = 10,
    where: Annotated[str | None, typer.Option(help="SQL predicate over tiles t, slides s, labels l, e.g. "
                                                   "\"l.label = 1 AND t.x > 1000\".")] = None,
    in_class: Annotated[list[str] | None, typer.Option(
        "--in-class", help="Only tiles inside a QuPath annotation class (fs annotations import), at least MIN of "
                           "the tile if given: CLASS[:MIN], e.g. Tumor:0.5; repeat to require several.")] = None,
    group_by: Annotated[GroupBy | None, typer.Option(help="slide: each slide's best tile.")] = None,
    save: Annotated[Path | None, typer.Option(help="Write a contact sheet of the query and hits (PNG).")]
    = None,
    weights: Annotated[str | None, typer.Option(help="--image: local weights of the teacher.")] = None,
    device: Annotated[str, typer.Option(help="--image: auto, cpu or cuda[:N].")] = "auto",
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = OutputFormat.table,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write results to a file.")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Nearest tiles (or slides) by cosine similarity, with label columns; filter with --where."""
    queries = (("--tile", tile), ("--slide", slide), ("--image", image), ("--query", query))
    given = [name for name, v in queries if v is not None]
    if len(given) != 1:
        raise typer.BadParameter(f"give exactly one of --tile, --slide, --image, --query (got "
                                 f"{', '.join(given) or 'none'})")
    from featurestore.index import contact_sheet, embed_image, search

    new_output(output, overwrite)
    new_output(save, overwrite)
    s = Store.open(store, read_only=True)
    if in_class:
        if slide is not None:
            raise typer.BadParameter("--in-class selects tiles; a --slide search ranks whole slides (filter them "
                                     "with --where over slides s and labels l)")
        from featurestore.pipelines.annotations import class_predicate

        where = " AND ".join(f"({p})" for p in [where, *(class_predicate(s, c) for c in in_class)] if p)
    vector = None
    if image is not None:
        from featurestore.devices import resolve_device
        from featurestore.encoders import build_teacher

        teacher = build_teacher(s.embedding_set(model).encoder_name, weights=weights, device=resolve_device(device))
        vector = embed_image(s, model, image, teacher)
    results = search(s, model, tile_id=tile, slide_id=slide, vector=vector, query_sql=query, k=k, where=where,
                     group_by=group_by.value if group_by else None)
    print_table(results, fmt, output, title=f"{model}: top {k}")
    if save is not None:
        path = contact_sheet(s, model, results, save, query_tile=tile, query_image=image)
        err_console.print(f"wrote contact sheet {path}")


@friendly
def import_cmd(
    paths: Annotated[list[str], typer.Argument(help="Per-slide .h5 feature files, folders or globs.")],
    store: StoreOpt,
    layout: Annotated[Layout | None, typer.Option(help="Which tool wrote them (default: detected).")] = None,
    slides: Annotated[Path | None, typer.Option(help="Folder with the slide files, found by file stem.")]
    = None,
    model_name: Annotated[str | None, typer.Option(help="Encoder name (default: from the files).")] = None,
    assume_mpp: Annotated[float | None, typer.Option(help="Level-0 µm/px when no slide file says it.")]
    = None,
    patch_size: Annotated[int | None, typer.Option(help="CLAM files without attributes: patch edge (px).")]
    = None,
    patch_level: Annotated[int | None, typer.Option(help="CLAM files without attributes: patch level.")]
    = None,
) -> None:
    """Import TRIDENT, CLAM or STAMP HDF5 feature files as slides, tiles and an embedding set."""
    opts = ImportOptions(layout=layout.value if layout else None, slides_dir=slides, model_name=model_name,
                         assume_mpp=assume_mpp, patch_size=patch_size, patch_level=patch_level)
    with _progress("import") as progress:
        task = progress.add_task("files", total=None)
        command = "fs " + " ".join(sys.argv[1:])
        report = import_features(Store.open_or_create(store), paths, opts, command=command,
                                 on_file=lambda _: progress.advance(task))
    models = sorted({f.encoder for f in report.imported})
    console.print(f"imported {len(report.imported)} files ({sum(f.tiles for f in report.imported)} tiles) as "
                  f"{', '.join(models) or 'nothing new'}; {len(report.skipped)} already imported, "
                  f"{len(report.failed)} failed (run {report.run_id})", highlight=False)
    for f in report.failed:
        console.print(f"  [red]failed[/red]: {f.message}", highlight=False)
    if report.failed:
        raise typer.Exit(1)


@friendly
def export_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder for one <slide>.h5 per slide.")],
    store: StoreOpt,
    model: ModelOpt,
    layout: Annotated[Layout, typer.Option(help="Which tool's layout to write.")],
    fmt: Annotated[FileFormat, typer.Option("--format", help="File format.")] = FileFormat.h5,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing <slide>.h5 files.")] = False,
) -> None:
    """Write an embedding set as per-slide HDF5 files that TRIDENT, CLAM or STAMP code reads."""
    report = export_features(Store.open(store, read_only=True), model, out_dir, layout.value, overwrite=overwrite)
    console.print(f"wrote {len(report.files)} {fmt.value} files ({layout.value} layout) to {out_dir}; "
                  f"{report.verbatim} exactly as imported", highlight=False)
    for r in report.renamed:
        console.print(f"  two slides share a name: slide {r.slide_id} written as {r.stem}.h5", highlight=False)
