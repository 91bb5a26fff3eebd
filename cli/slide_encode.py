"""``fs slide-encode``: slide embeddings from cached tile embeddings (TITAN, PRISM, CHIEF, FEATHER,
MADELEINE, Prov-GigaPath, mean).

``register(app)`` adds the command; ``pipelines.slide_encode`` does the work.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from featurestore.cli._common import StoreOpt, console, friendly
from featurestore.cli._options import Device
from featurestore.encoders.slide import list_slide_encoders


@friendly
def slide_encode(
    store: StoreOpt,
    tiles: Annotated[str, typer.Option("--tiles", "-t", help="Tile embedding set: encoder name, view name or set "
                                                              "id.")],
    encoder: Annotated[str, typer.Option("--encoder", "-e", help=f"Slide encoder: "
                                                                  f"{', '.join(list_slide_encoders())}.")],
    weights: Annotated[Path | None, typer.Option(help="Local checkpoint (or folder holding it) of the slide "
                                                      "encoder.")] = None,
    device: Device = "auto",
) -> None:
    """Compute one embedding per slide from its cached tile embeddings and commit them as a slide set.

    No slide file is read and no tile encoder runs. The tile set must be the one the slide encoder was
    trained on (tile encoder, tile size, µm/px); otherwise nothing runs and the fs extract command that
    makes the right tiles is named. Safe to re-run: slides already encoded from their current bag are skipped.
    """
    from featurestore.devices import resolve_device
    from featurestore.pipelines.slide_encode import run_slide_encode

    report = run_slide_encode(store, tiles, encoder, weights=weights, device=str(resolve_device(device)),
                              command="fs " + " ".join(sys.argv[1:]))
    console.print(f"{report.encoder} over {report.tiles_encoder}: encoded {len(report.encoded)} slides, "
                  f"{len(report.skipped)} already done, in {report.seconds:.1f} s; slide set {report.set_id} "
                  f"(search with fs search --slide ID -m {report.encoder}:{report.tiles_encoder})", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("slide-encode")(slide_encode)
