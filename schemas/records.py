"""The data model: every table of the store is a list of one of these records.

Records are frozen and validated on construction. Records that name a
configuration (tiling, encoder, embedding set) derive their id from a hash of
their canonical form, so the same configuration always maps to the same id and
therefore to the same tiles and arrays.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Literal

from featurestore.schemas._record import Record, content_id, require, utcnow

FORMAT_VERSION = 3
"""Store format version written by this code; newer stores are refused, older ones need `fs migrate`."""

TissueMethod = Literal["otsu", "grandqc", "hest", "none"]
EdgePolicy = Literal["pad", "drop"]
Pooling = Literal["cls", "mean", "cls+mean", "pooler"]
StoreDtype = Literal["float16", "float32"]


def _positive(x: float) -> bool:
    return x > 0


@dataclass(frozen=True, slots=True)
class Slide(Record):
    """One whole-slide image, identified by content rather than by path.

    ``slide_id`` is a fingerprint of the file's bytes (see ``pipelines``'s slide
    discovery), so a renamed or moved slide keeps its id and a copy is a duplicate.
    ``mpp_assumed`` is true when µm/px came from ``--assume-mpp``, not the file.
    """

    KIND: ClassVar[str] = "slide"
    slide_id: str
    path: str
    bytes: int
    vendor: str
    width: int
    height: int
    mpp_x: float
    mpp_y: float
    objective_power: float | None
    level_count: int
    mpp_assumed: bool = False
    added_at: datetime = field(default_factory=utcnow)

    def validate(self) -> None:
        require(len(self.slide_id) >= 16, "Slide.slide_id", f"fingerprint too short: {self.slide_id!r}")
        require(self.bytes > 0, "Slide.bytes", f"must be > 0, got {self.bytes} for {self.path}")
        require(self.width > 0 and self.height > 0, "Slide", f"bad size {self.width}x{self.height}: {self.path}")
        require(_positive(self.mpp_x) and _positive(self.mpp_y), "Slide.mpp", f"µm/px must be > 0: {self.path}")
        require(self.level_count >= 1, "Slide.level_count", f"must be >= 1: {self.path}")


QUALITY_DEFAULTS = {"min_sharpness": 0.0, "max_pen": 1.0, "max_background": 1.0}
"""``TilingSpec``'s quality limits that keep every tile."""


@dataclass(frozen=True, slots=True)
class TilingSpec(Record):
    """How tiles are cut: physical size (µm/px × px), overlap, tissue detection, edges.

    Tissue detection runs on a thumbnail at ``thumbnail_mpp``: HSV saturation,
    Otsu threshold (never below ``saturation_floor`` on a 0–255 scale), closing
    with a disk of ``close_um`` µm, hole filling, and removal of objects smaller
    than ``min_object_um2``. A tile is kept when its tissue fraction is at least
    ``min_tissue``. Edge tiles are padded with background (``pad``) or dropped.
    """

    KIND: ClassVar[str] = "tiling"
    target_mpp: float
    tile_size: int
    overlap: int = 0
    tissue_method: TissueMethod = "otsu"
    thumbnail_mpp: float = 8.0
    saturation_floor: int = 15
    close_um: float = 32.0
    min_object_um2: float = 20000.0
    min_tissue: float = 0.25
    edge: EdgePolicy = "pad"
    min_sharpness: float = 0.0
    max_pen: float = 1.0
    max_background: float = 1.0

    def validate(self) -> None:
        require(_positive(self.target_mpp), "TilingSpec.target_mpp", f"must be > 0, got {self.target_mpp}")
        require(self.tile_size >= 8, "TilingSpec.tile_size", f"must be >= 8 px, got {self.tile_size}")
        require(0 <= self.overlap < self.tile_size, "TilingSpec.overlap",
                f"must be in [0, tile_size), got {self.overlap}")
        require(self.tissue_method in ("otsu", "grandqc", "hest", "none"), "TilingSpec.tissue_method",
                f"choose 'otsu', 'grandqc', 'hest' or 'none', got {self.tissue_method!r}")
        require(0.0 <= self.min_tissue <= 1.0, "TilingSpec.min_tissue", f"must be in [0, 1], got {self.min_tissue}")
        require(self.edge in ("pad", "drop"), "TilingSpec.edge", "choose 'pad' or 'drop'")
        require(_positive(self.thumbnail_mpp), "TilingSpec.thumbnail_mpp", "must be > 0")
        require(self.min_sharpness >= 0.0, "TilingSpec.min_sharpness", f"must be >= 0, got {self.min_sharpness}")
        for name in ("max_pen", "max_background"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"TilingSpec.{name}", f"must be in [0, 1], got {value}")

    @property
    def id(self) -> str:
        payload = self.to_dict()
        for name, default in QUALITY_DEFAULTS.items():
            if payload[name] == default:
                del payload[name]
        return content_id(payload)

    @property
    def filters_quality(self) -> bool:
        """Whether the quality limits can drop a tile."""
        return any(getattr(self, name) != default for name, default in QUALITY_DEFAULTS.items())

    @property
    def stride(self) -> int:
        """Step between tile origins, in target-resolution pixels."""
        return self.tile_size - self.overlap


def tile_id(slide_id: str, tiling_id: str, tile_index: int) -> int:
    """Globally unique, deterministic int64 (63-bit, non-negative) tile id, usable as a FAISS id."""
    digest = hashlib.blake2b(f"{slide_id}/{tiling_id}/{tile_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True, slots=True)
class Tile(Record):
    """One tile: where it is at level 0 and how it was read.

    ``read_size`` is the square edge read at ``level`` before resizing to the
    tiling's ``tile_size``; ``x``/``y`` are level-0 pixel coordinates of its
    top-left corner.

    Quality measures, on the tile as the encoder sees it (None where a tile was never read, e.g.
    imported features): ``sharpness`` is the variance of the Laplacian of its grey levels (0-255;
    low means blurred or empty), ``pen_fraction`` the share of pixels in ink colours, and
    ``background_fraction`` the share of bright, unstained pixels.
    """

    KIND: ClassVar[str] = "tile"
    slide_id: str
    tiling_id: str
    tile_index: int
    x: int
    y: int
    level: int
    read_size: int
    tissue_fraction: float
    sharpness: float | None = None
    pen_fraction: float | None = None
    background_fraction: float | None = None

    def validate(self) -> None:
        require(self.tile_index >= 0, "Tile.tile_index", f"must be >= 0, got {self.tile_index}")
        require(self.level >= 0 and self.read_size > 0, "Tile", f"bad read level/size {self.level}/{self.read_size}")
        require(0.0 <= self.tissue_fraction <= 1.0, "Tile.tissue_fraction", f"out of [0,1]: {self.tissue_fraction}")
        require(self.sharpness is None or self.sharpness >= 0.0, "Tile.sharpness", f"must be >= 0: {self.sharpness}")
        for name in ("pen_fraction", "background_fraction"):
            value = getattr(self, name)
            require(value is None or 0.0 <= value <= 1.0, f"Tile.{name}", f"out of [0,1]: {value}")

    @property
    def tile_id(self) -> int:
        return tile_id(self.slide_id, self.tiling_id, self.tile_index)


@dataclass(frozen=True, slots=True)
class EncoderSpec(Record):
    """Which model, weights and preprocessing produced an embedding.

    ``weights_sha256`` is the hash of the weights actually loaded, so two arrays
    made by different checkpoints of one architecture never share an id.
    """

    KIND: ClassVar[str] = "encoder"
    name: str
    version: str
    weights_sha256: str
    embed_dim: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pooling: Pooling
    dtype: str = "float32"
    source: str = ""
    license: str = ""

    def validate(self) -> None:
        require(bool(self.name), "EncoderSpec.name", "must not be empty")
        require(self.embed_dim > 0, "EncoderSpec.embed_dim", f"must be > 0, got {self.embed_dim}")
        require(self.input_size > 0, "EncoderSpec.input_size", f"must be > 0, got {self.input_size}")
        require(len(self.mean) == 3 and len(self.std) == 3, "EncoderSpec", "mean and std need 3 channels")
        require(all(s > 0 for s in self.std), "EncoderSpec.std", "must be > 0")
        require(self.pooling in ("cls", "mean", "cls+mean", "pooler"), "EncoderSpec.pooling",
                f"unknown pooling {self.pooling!r}; choose cls, mean, cls+mean or pooler")
        require(len(self.weights_sha256) == 64, "EncoderSpec.weights_sha256", "must be a sha256 hex digest")

    @property
    def id(self) -> str:
        return content_id(self.to_dict())


@dataclass(frozen=True, slots=True)
class EmbeddingSet(Record):
    """Embeddings of one encoder over one tiling, stored as ``dtype`` with ``views`` per tile.

    ``views`` > 1 means K augmented teacher views per tile (shape n × K × dim).
    """

    KIND: ClassVar[str] = "embedding_set"
    tiling_id: str
    encoder_id: str
    encoder_name: str
    embed_dim: int
    dtype: StoreDtype = "float16"
    views: int = 1
    created_at: datetime = field(default_factory=utcnow)

    def validate(self) -> None:
        require(self.dtype in ("float16", "float32"), "EmbeddingSet.dtype", "choose float16 or float32")
        require(self.embed_dim > 0 and self.views >= 1, "EmbeddingSet", "embed_dim and views must be >= 1")

    @property
    def id(self) -> str:
        return content_id({"tiling": self.tiling_id, "encoder": self.encoder_id, "dtype": self.dtype,
                           "views": self.views})


@dataclass(frozen=True, slots=True)
class SlideTiling(Record):
    """A slide has been tiled with a tiling; its tiles (and pixels) live in the commit that wrote this row."""

    KIND: ClassVar[str] = "slide_tiling"
    slide_id: str
    tiling_id: str
    n_tiles: int
    pixels: bool


@dataclass(frozen=True, slots=True)
class Bag(Record):
    """One slide's embeddings in one embedding set; the array lives in the commit that wrote this row."""

    KIND: ClassVar[str] = "bag"
    set_id: str
    slide_id: str
    n_tiles: int


@dataclass(frozen=True, slots=True)
class Run(Record):
    """One invocation of a command that wrote to the store, for provenance and cost accounting."""

    KIND: ClassVar[str] = "run"
    run_id: str
    command: str
    versions: str
    host: str
    started_at: datetime
    finished_at: datetime | None = None
    wall_seconds: float = 0.0
    device_seconds: float = 0.0
    status: str = "running"


@dataclass(frozen=True, slots=True)
class Failure(Record):
    """A slide that could not be processed, and why; other slides carry on."""

    KIND: ClassVar[str] = "failure"
    slide_path: str
    stage: str
    error_type: str
    message: str
    slide_id: str | None = None
    run_id: str | None = None
    at: datetime = field(default_factory=utcnow)
