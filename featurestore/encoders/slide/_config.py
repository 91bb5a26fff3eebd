"""The frozen description of one slide encoder and the tiles it was trained on: light, no torch."""

from __future__ import annotations

from dataclasses import dataclass

from featurestore.schemas.errors import ModelError


@dataclass(frozen=True)
class TileContract:
    """The tiles a slide encoder was pretrained on, which its input must reproduce.

    ``tile_encoder`` is a teacher name of ``fs models``; ``tile_size`` px at ``mpp`` µm/px is the
    tiling ``fs extract --mpp MPP --tile-size SIZE`` cuts. ``coords`` says the encoder reads each
    tile's level-0 (x, y) position besides its feature vector.
    """

    tile_encoder: str
    embed_dim: int
    tile_size: int
    mpp: float
    coords: bool = False

    def extract_command(self) -> str:
        return f"fs extract SLIDES -s STORE --model {self.tile_encoder} --mpp {self.mpp:g} --tile-size {self.tile_size}"


@dataclass(frozen=True)
class SlideEncoderConfig:
    """Everything needed to rebuild one slide encoder from its checkpoint.

    ``builder`` and ``checkpoint_filter`` are ``module:function`` references imported only when the
    encoder is built. ``weights_filename`` is looked up in Hugging Face repo ``hub_id``, inside the
    installed ``package``, or taken from ``--weights``, exactly as for teachers; no
    ``weights_filename`` means the encoder has no weights (mean pooling). ``contract`` is None when
    any tile embedding set is accepted; ``embed_dim`` None means the tile embeddings' own width.
    """

    name: str
    builder: str
    embed_dim: int | None
    contract: TileContract | None
    hub_id: str | None = None
    weights_filename: str | None = None
    package: str | None = None
    checkpoint_filter: str | None = None
    license: str = ""
    version: str = "1"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for ref in filter(None, (self.builder, self.checkpoint_filter)):
            if ref.count(":") != 1 or ref.startswith(":") or ref.endswith(":"):
                raise ModelError(f"slide encoder config {self.name!r}: {ref!r} must be a 'module:function' reference")
        if self.embed_dim is not None and self.embed_dim <= 0:
            raise ModelError(f"slide encoder config {self.name!r}: embed_dim must be > 0")
        if self.hub_id and not self.weights_filename:
            raise ModelError(f"slide encoder config {self.name!r}: hub_id needs weights_filename")
