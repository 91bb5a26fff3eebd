"""The store: typed records in Parquet, dense arrays in Zarr, an ordered commit log, SQL through DuckDB.

Writes go through ``Transaction`` (one atomic commit per slide, visible once its log entry exists).
Reads go through a ``Snapshot``: the newest checkpoint plus the commits after it, resolved once,
so opening and querying cost O(checkpoint + commits since), not O(history).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self, overload

import numpy as np
import pyarrow as pa

from featurestore.schemas import (
    Bag,
    EmbeddingSet,
    EncoderSpec,
    Failure,
    InvalidRecordError,
    ReadOnlyError,
    Run,
    Slide,
    SlideTiling,
    StoreExistsError,
    TileQuality,
    TilingSpec,
    stored_schema,
    tile_id,
)
from featurestore.schemas import Tile as TileRecord
from featurestore.store import _checkpoint, _log, _maintenance, _sql
from featurestore.store._commit import Transaction
from featurestore.store._labels import LabelsImport, read_labels
from featurestore.store._layout import (
    CHECKPOINTS,
    COMMITS,
    GENESIS,
    LOG,
    MARKER,
    STAGING,
    check_marker,
    migrated_from,
    write_marker,
)
from featurestore.store._snapshot import Resolver
from featurestore.store.snapshot import TILE_COLUMNS, Snapshot, StoreInfo

if TYPE_CHECKING:
    import pandas as pd
    import zarr

CHECKPOINT_EVERY = 100
"""A writer whose commit lands on a multiple of this version folds the tables into a checkpoint."""


class StoreDamageWarning(UserWarning):
    """A commit's table files are damaged, so reads leave that commit out."""


def tiles_table(slide_id: str, tiling_id: str, x: np.ndarray, y: np.ndarray, level: int, read_size: int,
                tissue_fraction: np.ndarray, quality: TileQuality | None = None) -> pa.Table:
    """Build a slide's tiles table column-wise (a slide can have 100k tiles; no per-row records).

    ``quality`` holds the tiles' measures in the same order; without it they are null.
    """
    n = len(x)
    ids = np.fromiter((tile_id(slide_id, tiling_id, i) for i in range(n)), dtype=np.int64, count=n)
    schema = stored_schema(TileRecord).remove(stored_schema(TileRecord).get_field_index("commit_id"))
    if quality is not None and len(quality) != n:
        raise InvalidRecordError(f"slide {slide_id}: {len(quality)} quality rows for {n} tiles")
    measures = {name: pa.nulls(n, pa.float64()) if quality is None else np.asarray(getattr(quality, name), np.float64)
                for name in TileQuality.COLUMNS}
    return pa.table({
        "slide_id": pa.array([slide_id] * n, pa.string()),
        "tiling_id": pa.array([tiling_id] * n, pa.string()),
        "tile_index": np.arange(n, dtype=np.int64),
        "x": np.asarray(x, np.int64), "y": np.asarray(y, np.int64),
        "level": np.full(n, level, np.int64), "read_size": np.full(n, read_size, np.int64),
        "tissue_fraction": np.asarray(tissue_fraction, np.float64),
        **measures,
        "tile_id": ids,
    }, schema=schema)


@dataclass(frozen=True)
class TiledPixels:
    """Tiles and their pixels on a further tiling of the same slide (e.g. a lower magnification)."""

    tiling: TilingSpec
    tiles: pa.Table
    pixels: np.ndarray


@dataclass(frozen=True)
class SlideCommit:
    """Everything extraction produces for one slide and one tiling, committed as one unit.

    ``tiles`` may be None when the slide was already tiled with this tiling (adding a model
    to an existing store); ``embeddings`` maps each encoder to an (n, dim) or (n, views, dim) array.
    """

    slide: Slide
    tiling: TilingSpec
    tiles: pa.Table | None
    embeddings: dict[EncoderSpec, np.ndarray] = field(default_factory=dict)
    pixels: np.ndarray | None = None
    dtype: str = "float16"
    extra: tuple[TiledPixels, ...] = ()
    tables: Callable[[str], dict[str, pa.Table]] | None = None
    """More rows for the same commit, built from its commit id (e.g. import provenance naming the bag)."""


class Store:
    """A feature store directory. Use ``Store.create`` or ``Store.open``; both are cheap.

    ``Store.open`` gives a writable handle (pipelines write through it); in a notebook use
    ``featurestore.open``, read-only unless asked. Read methods each use the newest snapshot;
    keep ``store.snapshot()`` for reads that must agree.
    """

    def __init__(self, root: Path, *, read_only: bool) -> None:
        self.root = Path(root)
        self.read_only = read_only
        self._resolver = Resolver(self.root, migrated=migrated_from(self.root) is not None)
        self._snapshot: Snapshot | None = None
        self._known_ids: set[str] | None = None
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r}, read_only={self.read_only}) at {self.info().summary()}"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Drop cached snapshots and their DuckDB connections."""
        self._snapshot = None

    @classmethod
    def create(cls, path: str | Path) -> Store:
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise StoreExistsError(f"{root}: is a file; choose a new or empty directory for the store")
        if (root / MARKER).exists():
            raise StoreExistsError(f"{root}: a store already exists here; open it instead (fs info {root})")
        if root.exists() and any(root.iterdir()):
            raise StoreExistsError(f"{root}: directory is not empty; choose a new or empty directory")
        for sub in (COMMITS, STAGING, LOG, CHECKPOINTS):
            (root / sub).mkdir(parents=True, exist_ok=True)
        with Transaction(root, lambda: -1, commit_id=GENESIS) as genesis:
            for name in _sql.table_names():
                genesis.add_table(name, _sql.table_schema(name).empty_table())
        write_marker(root)
        return cls(root, read_only=False)

    @classmethod
    def open(cls, path: str | Path, *, read_only: bool = False) -> Store:
        root = Path(path)
        check_marker(root)
        return cls(root, read_only=read_only)

    @classmethod
    def open_or_create(cls, path: str | Path) -> Store:
        root = Path(path)
        return cls.open(root) if (root / MARKER).exists() else cls.create(root)

    # --- snapshots ---------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The store as of the newest published version; costs a few ``stat`` calls when nothing changed."""
        version = self._resolver.latest()
        if self._snapshot is None or self._snapshot.version != version:
            self._snapshot = Snapshot(self._resolver.resolve(version))
            for entry, damage in self._snapshot.state.damaged:
                if entry.commit_id not in self._warned:
                    self._warned.add(entry.commit_id)
                    slides = ", ".join(entry.slides[:3]) or "none"
                    warnings.warn(f"{damage.path}: {damage.problem} — commit {entry.commit_id} (slides {slides}) "
                                  f"is left out of every read; run `fs verify -s {self.root}` for the fix",
                                  StoreDamageWarning, stacklevel=2)
        return self._snapshot

    @property
    def version(self) -> int:
        return self.snapshot().version

    # --- reads (each on the newest snapshot) -------------------------------------------------

    @overload
    def sql(self, query: str, params: Sequence | dict | None = None, *,
            pandas: Literal[False] = False) -> pa.Table: ...

    @overload
    def sql(self, query: str, params: Sequence | dict | None = None, *, pandas: Literal[True]) -> pd.DataFrame: ...

    def sql(self, query: str, params: Sequence | dict | None = None, *,
            pandas: bool = False) -> pa.Table | pd.DataFrame:
        """One read-only SQL statement over the newest snapshot; see ``Snapshot.sql``."""
        return self.snapshot().sql(query, params, pandas=pandas)

    def tiles(self, model: str, slides: Sequence[str] | None = None, *,
              columns: Sequence[str] = TILE_COLUMNS) -> pa.Table:
        """Tile rows of an embedding set with their embeddings; see ``Snapshot.tiles``."""
        return self.snapshot().tiles(model, slides, columns=columns)

    def slides(self) -> list[Slide]:
        return self.snapshot().slides()

    def tilings(self) -> list[TilingSpec]:
        return self.snapshot().tilings()

    def encoders(self) -> list[EncoderSpec]:
        return self.snapshot().encoders()

    def embedding_sets(self) -> list[EmbeddingSet]:
        return self.snapshot().embedding_sets()

    def failures(self) -> list[Failure]:
        return self.snapshot().failures()

    def runs(self) -> list[Run]:
        return self.snapshot().runs()

    def view_names(self) -> dict[str, EmbeddingSet]:
        return self.snapshot().view_names()

    def embedding_set(self, model: str) -> EmbeddingSet:
        return self.snapshot().embedding_set(model)

    def progress(self, tiling_id: str) -> dict[str, frozenset[str]]:
        return self.snapshot().progress(tiling_id)

    def read_tiles(self, tiling_id: str, slide_id: str) -> pa.Table:
        return self.snapshot().read_tiles(tiling_id, slide_id)

    def read_bag(self, es: EmbeddingSet, slide_id: str) -> np.ndarray:
        return self.snapshot().read_bag(es, slide_id)

    def bag_array(self, es: EmbeddingSet, slide_id: str) -> zarr.Array:
        return self.snapshot().bag_array(es, slide_id)

    def read_pixels(self, tiling_id: str, slide_id: str, indices: np.ndarray | None = None) -> np.ndarray:
        return self.snapshot().read_pixels(tiling_id, slide_id, indices)

    def read_by_tile_ids(self, es: EmbeddingSet, tile_ids: list[int] | np.ndarray) -> np.ndarray:
        return self.snapshot().read_by_tile_ids(es, tile_ids)

    def iter_bags(self, es: EmbeddingSet) -> Iterator[tuple[str, pa.Table, np.ndarray]]:
        """Stream (slide_id, tiles, embeddings) of one snapshot, one slide in memory at a time."""
        return self.snapshot().iter_bags(es)

    def info(self) -> StoreInfo:
        return self.snapshot().info()

    # --- writing -----------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{self.root}: store was opened read-only; open it with read_only=False to write")

    def transaction(self) -> Transaction:
        self._writable()
        return Transaction(self.root, self._resolver.latest, self._after_publish)

    def _after_publish(self, entry: _log.LogEntry) -> None:
        self._resolver.known = max(self._resolver.known, entry.version)
        if entry.version % CHECKPOINT_EVERY == 0:
            try:
                self.checkpoint(entry.version)
            except Exception as err:  # noqa: BLE001 - the commit is published; a checkpoint is an optimisation.
                warnings.warn(f"{self.root}: checkpoint at version {entry.version} failed ({err}); "
                              "reads stay correct, `fs compact` retries", stacklevel=2)

    def register(self, *records: Slide | TilingSpec | EncoderSpec | EmbeddingSet | Run | Failure) -> None:
        """Commit catalogue records (idempotent: re-registering the same record is harmless)."""
        with self.transaction() as txn:
            txn.add(*records)

    def commit_slide(self, item: SlideCommit) -> str:
        """Write one slide's tiles, embeddings and pixels as a single atomic commit; return its id."""
        self._writable()
        n = self._n_tiles(item)
        sets = []
        for spec, emb in item.embeddings.items():
            if emb.shape[0] != n or emb.shape[-1] != spec.embed_dim:
                raise InvalidRecordError(f"{item.slide.path}: {spec.name} embeddings have shape {emb.shape}; "
                                         f"expected ({n}, ..., {spec.embed_dim}) to match the tiles")
            views = emb.shape[1] if emb.ndim == 3 else 1
            sets.append((EmbeddingSet(item.tiling.id, spec.id, spec.name, spec.embed_dim, item.dtype, views), emb))
        layers = [TiledPixels(item.tiling, item.tiles, item.pixels)] if item.tiles is not None else []
        layers += item.extra
        for layer in layers:
            if layer.pixels is not None and layer.pixels.shape[0] != layer.tiles.num_rows:
                raise InvalidRecordError(f"{item.slide.path}: {layer.pixels.shape[0]} tile images for "
                                         f"{layer.tiles.num_rows} tiles of tiling {layer.tiling.id}")
        with self.transaction() as txn:
            txn.add(item.slide, *self._unknown([item.tiling, *(x.tiling for x in item.extra), *item.embeddings,
                                                *(s for s, _ in sets)]))
            if layers:
                txn.add_table("tiles", pa.concat_tables([x.tiles for x in layers]))
            for layer in layers:
                txn.add(SlideTiling(item.slide.slide_id, layer.tiling.id, layer.tiles.num_rows,
                                    layer.pixels is not None))
                if layer.pixels is not None:
                    txn.write_pixels(layer.tiling.id, layer.pixels)
            for es, emb in sets:
                txn.write_embeddings(es.id, emb.astype(es.dtype, copy=False))
                txn.add(Bag(es.id, item.slide.slide_id, n))
            for name, table in (item.tables(txn.commit_id) if item.tables else {}).items():
                txn.add_table(name, table)
            return txn.commit_id

    def _unknown(self, records: list[TilingSpec | EncoderSpec | EmbeddingSet]) -> list:
        """Catalogue records not yet in the store, so each slide commit does not repeat them."""
        if self._known_ids is None:
            self._known_ids = set(self.snapshot()._tables(
                "SELECT tiling_id FROM tilings UNION ALL SELECT encoder_id FROM encoders "
                "UNION ALL SELECT set_id FROM embedding_sets").column(0).to_pylist())
        new = [r for r in records if r.id not in self._known_ids]
        self._known_ids.update(r.id for r in new)
        return new

    def _n_tiles(self, item: SlideCommit) -> int:
        if item.tiles is not None:
            if item.tiles.num_rows == 0:
                raise InvalidRecordError(f"{item.slide.path}: no tiles to commit; record a failure instead")
            return item.tiles.num_rows
        n = self.snapshot().n_tiles(item.slide.slide_id, item.tiling.id)
        if n is None:
            raise InvalidRecordError(f"{item.slide.path}: not yet tiled with tiling {item.tiling.id}; "
                                     "commit its tiles first")
        return n

    def import_labels(self, csv_path: str | Path, key: str | None = None, *,
                      skip_unknown: bool = False) -> LabelsImport:
        """Store a labels CSV joined to slides by the ``key`` column (default: the first of ``KEY_COLUMNS``).

        Columns the file brings replace those of its slides; their other label columns stay. Nothing is
        written unless every cell decodes and fits its column and every row names a slide (rows naming
        no slide are left out and counted with ``skip_unknown``).
        """
        self._writable()
        snap = self.snapshot()
        labels = read_labels(Path(csv_path), key, snap._tables("SELECT slide_id, path FROM slides"),
                             snap._tables("SELECT * EXCLUDE (commit_id) FROM labels"), skip_unknown=skip_unknown)
        if labels.table.num_rows:
            with self.transaction() as txn:
                txn.add_table("labels", labels.table)
        return labels

    # --- maintenance -------------------------------------------------------------------------

    def checkpoint(self, version: int | None = None) -> int | None:
        """Fold the tables at ``version`` (default: newest) into a checkpoint; return its version."""
        self._writable()
        ckpt = _checkpoint.write(self._resolver.resolve(version))
        return None if ckpt is None else ckpt.version

    def compact(self) -> _maintenance.CompactReport:
        """Checkpoint now and merge every tile part into one (``fs compact``)."""
        self._writable()
        return _maintenance.compact(self.root, self._resolver)

    def verify(self, *, deep: bool = False) -> _maintenance.VerifyReport:
        """Check every live commit's files (sizes; checksums with ``deep``); see ``fs verify``."""
        return _maintenance.verify(self.root, self._resolver, deep=deep)

    def drop_commits(self, commit_ids: list[str]) -> int:
        """Leave damaged commits out of every later snapshot (their slides revert or disappear)."""
        self._writable()
        version = _maintenance.drop(self.root, self._resolver, commit_ids)
        self._known_ids = None
        return version

    def vacuum(self, older_than_s: float = 7 * 24 * 3600) -> _maintenance.VacuumReport:
        """Delete what no snapshot younger than ``older_than_s`` can use; see ``fs vacuum``."""
        self._writable()
        return _maintenance.vacuum(self.root, self._resolver, older_than_s)
