"""Students trained by ``fs distill`` as encoders: ``student:<RUN_DIR>``.

A run directory holds everything needed to run its student like any teacher::

    RUN_DIR/student.json          architecture, preprocessing and output width (below)
    RUN_DIR/student.safetensors   state dict of ``StudentEncoder`` (timm backbone + optional projection)

``student.json``::

    {
      "name": "student:run1",            encoder name in the store          (default student:<dir name>)
      "arch": "mobilenetv3_small_100",   timm architecture, built with num_classes=0
      "kwargs": {},                      more timm.create_model arguments (img_size for ViTs)
      "input_size": 112,                 the tile is resized (bilinear, antialiased) to this square
      "mean": [...], "std": [...],       normalisation of [0, 1] pixels
      "projection": 1280,                width of the head into the teacher's space, or null
      "embed_dim": 1280,                 output width: projection, else the backbone's pooled width
      "tile_size": 224, "mpp": 0.5,      the cached tiles it was trained on: extract with --tile-size/--mpp
      "version": "<run id>"
    }

With a projection the student's embeddings live in its primary teacher's space, so heads,
SQL and search built on teacher embeddings apply to them unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from featurestore.encoders._config import TeacherConfig
from featurestore.encoders.generic import read_json_config, timm_backbone
from featurestore.schemas.errors import ModelError

SIDECAR = "student.json"
WEIGHTS = "student.safetensors"
BUILDER = "featurestore.encoders.student:student_encoder"
_REQUIRED = ("arch", "input_size", "mean", "std", "embed_dim")
_OPTIONAL = ("name", "kwargs", "projection", "tile_size", "mpp", "version")


class StudentEncoder(nn.Module):
    """A timm backbone's pooled features, optionally projected into the primary teacher's space.

    ``num_features``/``head_hidden_size`` give the output width the ``Teacher`` wrapper checks.
    """

    def __init__(self, backbone: nn.Module, projection: int | None = None) -> None:
        super().__init__()
        width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.backbone = backbone
        self.projection = nn.Linear(width, projection) if projection else None
        self.num_features = self.head_hidden_size = projection or width

    def forward(self, x: Tensor) -> Tensor:
        z = self.backbone(x)
        return z if self.projection is None else self.projection(z)


def read_sidecar(run_dir: Path) -> dict[str, Any]:
    """``RUN_DIR/student.json`` checked for the keys above; one-line errors name the file and the fix."""
    sidecar = run_dir / SIDECAR
    if not sidecar.is_file():
        raise ModelError(f"student:{run_dir}: no {sidecar}; pass a run directory written by fs distill --out")
    return read_json_config(f"student:{run_dir}", sidecar, _REQUIRED, _OPTIONAL, "re-run fs distill")


def student_config(location: str) -> TeacherConfig:
    """Config of ``student:<RUN_DIR>``; the weights file is the run's ``student.safetensors``."""
    run_dir = Path(location).expanduser().resolve()
    spec = read_sidecar(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise ModelError(f"student:{location}: no weights {weights}; the run did not finish, run fs distill again")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("kwargs", {}).items()}
    return TeacherConfig(
        name=spec.get("name", f"student:{run_dir.name}"), builder=BUILDER, embed_dim=int(spec["embed_dim"]),
        input_size=int(spec["input_size"]), interpolation="bilinear", mean=tuple(spec["mean"]),
        std=tuple(spec["std"]), pooling="pooler", weights_filename=str(weights), license="",
        version=str(spec.get("version", "1")), arch=spec["arch"], arch_kwargs=tuple(sorted(kwargs.items())))


def student_encoder(config: TeacherConfig) -> StudentEncoder:
    """Backbone from ``config.arch`` and the projection width recorded next to the weights."""
    spec = read_sidecar(Path(config.weights_filename).parent)
    return StudentEncoder(timm_backbone(config), spec.get("projection"))
