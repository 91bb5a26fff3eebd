"""``fs annotations import``: QuPath GeoJSON annotations as per-class geometry and per-tile overlaps.

``register(app)`` adds the ``annotations`` group to the ``fs`` app; the work happens in
``pipelines.annotations``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from featurestore.cli._common import StoreOpt, console, friendly
from featurestore.schemas import FsError
from featurestore.store import Store

annotations_app = typer.Typer(help="Annotations drawn in QuPath, as tile labels (SQL: annotations, "
                                   "tile_annotations).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(annotations_app, name="annotations")


@annotations_app.command("import")
@friendly
def import_cmd(
    paths: Annotated[list[str], typer.Argument(help="QuPath GeoJSON exports (.geojson), folders or globs.")],
    store: StoreOpt,
    slide: Annotated[str | None, typer.Option(help="The slide of a single file: id, id prefix, path, file name or "
                                                   "stem (default: each file's stem, as QuPath names exports).")]
    = None,
) -> None:
    """Import annotations: each class's shapes, and every tile's overlap fraction with each class.

    A slide's import replaces its earlier one. Annotations without a class are imported as class
    'Unclassified'. Query them with fs sql (tables annotations, tile_annotations) or filter
    fs search with --in-class CLASS[:MIN_OVERLAP].
    """
    from featurestore.pipelines.annotations import import_annotations

    report = import_annotations(Store.open(store), list(paths), slide=slide)
    if not report.imported and len(report.failed) == 1:
        raise FsError(report.failed[0].message)
    for item in report.imported:
        classes = ", ".join(f"{name} ({area:.3g} px²)" for name, area in item.classes)
        skipped = f"; skipped {item.skipped_objects} point/line objects" if item.skipped_objects else ""
        console.print(f"{item.path}: slide {item.slide_id[:12]}: {classes}; {item.overlaps} tile overlaps over "
                      f"{item.tilings} tilings{skipped}", highlight=False, soft_wrap=True)
    console.print(f"imported {len(report.imported)} annotation files, {len(report.failed)} failed", highlight=False)
    for refused in report.failed:
        console.print(f"  [red]failed[/red]: {refused.message}", highlight=False, soft_wrap=True)
    if report.failed:
        raise typer.Exit(1)
