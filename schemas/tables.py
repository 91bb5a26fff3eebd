"""Arrow schemas of the store's tables, derived from the records so they cannot drift.

Each stored table carries the record's fields, the record's id column when it
has one (``tiling_id``, ``encoder_id``, ``set_id``), and ``commit_id``: the
commit that wrote the row, which is how the store resolves re-written slides.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from datetime import datetime
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa

from featurestore.schemas._record import Record
from featurestore.schemas.errors import InvalidRecordError
from featurestore.schemas.records import (
    Bag,
    EmbeddingSet,
    EncoderSpec,
    Failure,
    Run,
    Slide,
    SlideTiling,
    Tile,
    TilingSpec,
)

_SCALARS: dict[Any, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    datetime: pa.timestamp("us", tz="UTC"),
}

ID_COLUMNS: dict[type[Record], str] = {TilingSpec: "tiling_id", EncoderSpec: "encoder_id", EmbeddingSet: "set_id"}
"""Records whose id is derived from content get it as an explicit column."""

TABLES: dict[str, type[Record]] = {
    "slides": Slide,
    "tilings": TilingSpec,
    "tiles": Tile,
    "encoders": EncoderSpec,
    "embedding_sets": EmbeddingSet,
    "slide_tilings": SlideTiling,
    "bags": Bag,
    "runs": Run,
    "failures": Failure,
}
"""Every record table of the store, by name. Labels are free-form and not listed."""


LABELS_SCHEMA = pa.schema([pa.field("slide_id", pa.string(), nullable=False)])
"""Labels hold ``slide_id`` plus any columns of the imported CSV."""

PREDICTIONS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string()), pa.field("slide_id", pa.string()), pa.field("seed", pa.int64()),
    pa.field("fold", pa.int64()), pa.field("set_id", pa.string()), pa.field("model", pa.string()),
    pa.field("task", pa.string()), pa.field("head", pa.string()), pa.field("held_out", pa.bool_()),
    pa.field("n_tiles", pa.int64()), pa.field("logits", pa.list_(pa.float32())), pa.field("score", pa.float64()),
    pa.field("embedding", pa.list_(pa.float32())),
])
"""Outputs of a trained slide head (``fs predict``): the soft targets of logit distillation.

``run_id`` is the training run, (``seed``, ``fold``) the model within it, ``held_out`` whether the
slide was outside that model's training and validation sets."""

SLIDE_EMBEDDINGS_SCHEMA = pa.schema([
    ("set_id", pa.string()), ("slide_id", pa.string()), ("bag_commit_id", pa.string()), ("n_tiles", pa.int64()),
    ("embedding", pa.list_(pa.float32())),
])
"""One row per indexed bag (written by ``fs index build``): the unit-length mean of the slide's unit tile
vectors, for slide-level search. A list column: any dim fits."""

IMPORTS_SCHEMA = pa.schema([
    ("slide_id", pa.string()), ("set_id", pa.string()), ("encoder_id", pa.string()), ("tiling_id", pa.string()),
    ("layout", pa.string()), ("source_path", pa.string()), ("source_sha256", pa.string()),
    ("source_bytes", pa.int64()), ("attrs_json", pa.string()), ("coords_dtype", pa.string()),
    ("source_coords", pa.list_(pa.float64())), ("slide_from", pa.string()), ("bag_commit_id", pa.string()),
    ("run_id", pa.string()), ("imported_at", pa.timestamp("us", tz="UTC")),
])
"""Provenance of ``fs import``: one row per imported feature file; ``source_coords`` (flattened n × 2)
only when they are not level-0 pixels."""

ANNOTATIONS_SCHEMA = pa.schema([
    ("slide_id", pa.string()), ("class_name", pa.string()), ("geometry", pa.string()), ("area", pa.float64()),
    ("source_path", pa.string()), ("source_sha256", pa.string()), ("imported_at", pa.timestamp("us", tz="UTC")),
])
"""Annotations drawn on a slide (``fs annotations import``): one row per class, ``geometry`` the union of
its shapes as GeoJSON in level-0 pixels, ``area`` in level-0 px². A slide's latest import replaces all of
its rows."""

TILE_ANNOTATIONS_SCHEMA = pa.schema([
    ("slide_id", pa.string()), ("tiling_id", pa.string()), ("tile_index", pa.int64()), ("tile_id", pa.int64()),
    ("class_name", pa.string()), ("overlap", pa.float64()),
])
"""Each tile's overlap with each annotation class: the fraction of the tile's area inside the class,
rows only where it is above zero. The latest commit of a (slide, tiling) replaces all of its rows."""

SLIDE_FEATURES_SCHEMA = pa.schema([
    ("set_id", pa.string()), ("slide_id", pa.string()), ("encoder", pa.string()), ("encoder_id", pa.string()),
    ("tiles_set_id", pa.string()), ("bag_commit_id", pa.string()), ("n_tiles", pa.int64()),
    ("embedding", pa.list_(pa.float32())),
])
"""Slide embeddings computed by a slide encoder from one tile embedding set (``fs slide-encode``):
``tiles_set_id`` the input set, ``bag_commit_id`` the commit of the bag it read."""

FREE_TABLES: dict[str, pa.Schema] = {"labels": LABELS_SCHEMA, "predictions": PREDICTIONS_SCHEMA,
                                     "slide_embeddings": SLIDE_EMBEDDINGS_SCHEMA, "imports": IMPORTS_SCHEMA,
                                     "annotations": ANNOTATIONS_SCHEMA, "tile_annotations": TILE_ANNOTATIONS_SCHEMA,
                                     "slide_features": SLIDE_FEATURES_SCHEMA}
"""Tables written as Arrow tables rather than records (their schema is open or columnar)."""


@dataclasses.dataclass(frozen=True)
class TileQuality:
    """Quality measures of a slide's tiles, one value per tile in tile order (see ``Tile``)."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("sharpness", "pen_fraction", "background_fraction")
    sharpness: np.ndarray
    pen_fraction: np.ndarray
    background_fraction: np.ndarray

    def __len__(self) -> int:
        return len(self.sharpness)

    def take(self, index: np.ndarray) -> TileQuality:
        return TileQuality(*(np.asarray(getattr(self, c))[index] for c in self.COLUMNS))

    @staticmethod
    def concat(parts: list[TileQuality]) -> TileQuality:
        return TileQuality(*(np.concatenate([np.asarray(getattr(p, c), np.float64) for p in parts])
                             if parts else np.empty(0) for c in TileQuality.COLUMNS))


def _arrow_type(hint: Any) -> tuple[pa.DataType, bool]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        (inner,) = [a for a in args if a is not type(None)]
        return _arrow_type(inner)[0], True
    if origin is Literal:
        return _SCALARS[type(args[0])], False
    if origin is tuple:
        return pa.list_(_SCALARS[args[0]]), False
    return _SCALARS[hint], False


def arrow_schema(cls: type[Record]) -> pa.Schema:
    """The Arrow schema of ``cls``'s table (without ``commit_id``)."""
    hints = typing.get_type_hints(cls)
    fields = []
    if cls in ID_COLUMNS:
        fields.append(pa.field(ID_COLUMNS[cls], pa.string(), nullable=False))
    for f in dataclasses.fields(cls):
        dtype, nullable = _arrow_type(hints[f.name])
        fields.append(pa.field(f.name, dtype, nullable=nullable))
    if cls is Tile:
        fields.append(pa.field("tile_id", pa.int64(), nullable=False))
    return pa.schema(fields)


def stored_schema(cls: type[Record]) -> pa.Schema:
    """The schema as written to Parquet: the record's columns plus ``commit_id``."""
    return arrow_schema(cls).append(pa.field("commit_id", pa.string(), nullable=False))


def to_row(record: Record) -> dict[str, Any]:
    """A record as one table row, with its derived id column(s)."""
    row = record.to_dict()
    cls = type(record)
    if cls in ID_COLUMNS:
        row = {ID_COLUMNS[cls]: record.id, **row}  # type: ignore[attr-defined]
    if cls is Tile:
        row["tile_id"] = record.tile_id  # type: ignore[attr-defined]
    return row


def from_row(cls: type[Record], row: dict[str, Any]) -> Record:
    """Rebuild a record from a table row; a stored id that no longer matches the content is an error."""
    # A null in a column added by a later format means "written before it existed": take the default.
    later = {f.name for f in dataclasses.fields(cls) if f.default not in (None, dataclasses.MISSING)}
    data = {k: v for k, v in row.items() if k not in ("commit_id", "tile_id") and not (v is None and k in later)}
    stored_id = data.pop(ID_COLUMNS[cls], None) if cls in ID_COLUMNS else None
    record = cls.from_dict(data)
    if stored_id is not None and stored_id != record.id:  # type: ignore[attr-defined]
        raise InvalidRecordError(f"{cls.__name__}: stored id {stored_id} does not match its content "
                                 f"({record.id}); the row was edited or written by other code")  # type: ignore[attr-defined]
    return record


def to_table(records: list[Record], cls: type[Record], commit_id: str) -> pa.Table:
    """Records of one class as an Arrow table in the stored schema."""
    rows = [to_row(r) | {"commit_id": commit_id} for r in records]
    return pa.Table.from_pylist(rows, schema=stored_schema(cls))
