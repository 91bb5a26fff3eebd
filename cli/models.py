"""``fs models``: the teacher catalogue, with each model's embedding, preprocessing, licence and access."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
import typer

from featurestore.cli._common import OutputFormat, OverwriteOpt, console, friendly, new_output, print_table
from featurestore.encoders import TeacherConfig, list_teachers, teacher_config
from featurestore.encoders.catalogue import access

GATED_HINT = ("gated: accept the model's terms on its Hugging Face page and set HF_TOKEN, "
              "or pass fs extract --weights NAME=PATH")


@friendly
def models(fmt: Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format.")] = OutputFormat.table,
           output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to a file.")] = None,
           overwrite: OverwriteOpt = False) -> None:
    """List the teachers `fs extract -m NAME` accepts (besides timm:, local: and student: names)."""
    new_output(output, overwrite)
    rows = [catalogue_row(teacher_config(name)) for name in list_teachers()]
    print_table(pa.Table.from_pylist(rows), fmt, output, title="teachers")
    if fmt is OutputFormat.table and output is None:
        console.print(GATED_HINT, highlight=False)


def catalogue_row(config: TeacherConfig) -> dict[str, Any]:
    """One display row: what the embedding is, how tiles are prepared, and where the weights come from."""
    resize = "" if config.resize_to == config.input_size else f"resize {config.resize_to}, "
    weights = (f"hf://{config.hub_id}/{config.weights_filename}" if config.hub_id
               else f"package {config.package}" if config.package else config.weights_filename or "seeded")
    return {"name": config.name, "dim": config.embed_dim, "pooling": config.pooling,
            "input": f"{resize}{config.input_size} px {config.interpolation}", "dtype": config.dtype,
            "license": config.license or "-", "access": access(config), "weights": weights}


def register(app: typer.Typer) -> None:
    app.command("models")(models)
