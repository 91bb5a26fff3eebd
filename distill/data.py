"""Bags from the store, one slide at a time, padded into batches with masks.

``bags(store, model, label=..., slides=...)`` is the notebook entry: a torch ``Dataset`` of
``SlideBag`` records (features, level-0 coordinates and tile ids aligned row by row, in
tile_index order), batched for a ``DataLoader`` by ``collate_bags``.

``BagReader`` reads one embedding set through a pinned snapshot's public reads (bag sizes, tile
rows, lazily-read bag arrays): a slide's rows (all, or a random subset when training with a tile
cap) come straight from its array. Nothing beyond the current batch and an optional size-bounded
cache is held in memory, so a cohort of any size trains in bounded memory. Subsets are drawn from
(seed, epoch, slide), so a run is reproducible whatever the order or the number of loader workers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from torch.utils.data import Dataset

from featurestore.index import is_slide_set, read_slide_set, slide_set
from featurestore.schemas import BagNotFoundError, EmbeddingSet, InvalidArgumentError
from featurestore.store import Snapshot, Store

if TYPE_CHECKING:
    import zarr


class BagReader:
    """Random access to the bags of one embedding set.

    The reader pins one store snapshot for its whole life (``store`` may be that snapshot), so a
    training run sees one version of every bag even while an extraction commits. Array handles are
    kept (they hold metadata, not data) so later epochs skip re-opening.

    ``cache_bytes`` > 0 keeps decoded bags (in their stored dtype) and their tiles' coordinates and
    ids in a least-recently-used cache of that size: a small cohort is then read from disk once per
    run, a large one streams as before. Each data-loader worker holds its own cache.
    """

    def __init__(self, store: Store | Snapshot, es: EmbeddingSet, *, cache_bytes: int = 0) -> None:
        self.snapshot = store.snapshot() if isinstance(store, Store) else store
        self.es = es
        self._sizes = self.snapshot.bag_sizes(es)
        self._arrays: dict[str, zarr.Array] = {}
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._cache_budget = cache_bytes
        self._cache_used = 0

    @property
    def slide_ids(self) -> list[str]:
        return list(self._sizes)

    @property
    def name(self) -> str:
        return self.es.encoder_name

    @property
    def dim(self) -> int:
        return self.es.embed_dim

    def n_tiles(self, slide_id: str) -> int:
        try:
            return self._sizes[slide_id]
        except KeyError as err:
            raise BagNotFoundError(f"{self.snapshot.root}: slide {slide_id} has no embeddings in set {self.es.id} "
                                   f"({self.es.encoder_name})") from err

    def features(self, slide_id: str, rows: np.ndarray | None = None) -> np.ndarray:
        """``(n, dim)`` float32 embeddings in tile_index order (view 0 of multi-view sets); ``rows`` selects tiles."""
        data = self._cached((slide_id, "features"))
        if data is None:
            array = self._arrays.get(slide_id)
            if array is None:
                self.n_tiles(slide_id)
                array = self._arrays[slide_id] = self.snapshot.bag_array(self.es, slide_id)
            if self._fits(array.nbytes):
                data = self._remember((slide_id, "features"), array[...])
            else:
                data = array[...] if rows is None else array.get_orthogonal_selection((rows,))
                rows = None
        data = data if rows is None else data[rows]
        return np.asarray(data[:, 0] if data.ndim == 3 else data, dtype=np.float32)

    def xy(self, slide_id: str) -> np.ndarray:
        """``(n, 2)`` level-0 pixel coordinates (x, y) of the tiles' top-left corners, in tile_index order."""
        return self._tiles(slide_id)[:, :2]

    def tile_ids(self, slide_id: str) -> np.ndarray:
        """``(n,)`` tile ids in tile_index order."""
        return self._tiles(slide_id)[:, 2]

    def _tiles(self, slide_id: str) -> np.ndarray:
        """x, y, tile_id of every tile as one ``(n, 3)`` int64 array, in tile_index order."""
        found = self._cached((slide_id, "tiles"))
        if found is None:
            self.n_tiles(slide_id)
            tiles = self.snapshot.read_tiles(self.es.tiling_id, slide_id, columns=["x", "y", "tile_id"])
            found = np.stack([tiles.column(c).to_numpy() for c in ("x", "y", "tile_id")], 1)
            if self._fits(found.nbytes):
                self._remember((slide_id, "tiles"), found)
        return found

    def _fits(self, nbytes: int) -> bool:
        return 0 < nbytes <= self._cache_budget

    def _cached(self, key: tuple[str, str]) -> np.ndarray | None:
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
        return found

    def _remember(self, key: tuple[str, str], data: np.ndarray) -> np.ndarray:
        while self._cache and self._cache_used + data.nbytes > self._cache_budget:
            self._cache_used -= self._cache.popitem(last=False)[1].nbytes
        self._cache[key] = data
        self._cache_used += data.nbytes
        return data


class ArrayBags:
    """Bags held in memory, read like a :class:`BagReader`: embeddings computed in this process (a
    student's, during ``fs distill``) go through the same MIL code as stored ones. Without
    ``tile_ids`` its bags carry none."""

    def __init__(self, name: str, bags: dict[str, np.ndarray], xy: dict[str, np.ndarray],
                 tile_ids: dict[str, np.ndarray] | None = None) -> None:
        self.name = name
        self._bags = {s: np.asarray(b, np.float32) for s, b in bags.items()}
        self._xy = xy
        self._tile_ids = tile_ids
        self.dim = next(iter(self._bags.values())).shape[1]

    @property
    def slide_ids(self) -> list[str]:
        return sorted(self._bags)

    def n_tiles(self, slide_id: str) -> int:
        return len(self._bags[slide_id])

    def features(self, slide_id: str, rows: np.ndarray | None = None) -> np.ndarray:
        bag = self._bags[slide_id]
        return bag if rows is None else bag[rows]

    def xy(self, slide_id: str) -> np.ndarray:
        return self._xy[slide_id]

    def tile_ids(self, slide_id: str) -> np.ndarray | None:
        return None if self._tile_ids is None else self._tile_ids[slide_id]


BagSource = BagReader | ArrayBags


class SlideSetBags(ArrayBags):
    """A slide embedding set (``fs slide-encode``, e.g. ``titan:conch-v1.5``) as bags of one vector per slide.

    Every MIL head then trains on slide embeddings unchanged: attention over a bag of one is that
    vector, and mean pooling returns it. The single row sits at the slide's origin and has no tile id.
    """

    def __init__(self, store: Store | Snapshot, model: str) -> None:
        self.slide_set = slide_set(store, model)
        ids, vectors, _ = read_slide_set(store, self.slide_set)
        origin = np.zeros((1, 2), np.int64)
        super().__init__(self.slide_set.name, {sid: vectors[i:i + 1] for i, sid in enumerate(ids)},
                         dict.fromkeys(ids, origin))


def open_bags(store: Store | Snapshot, model: str, *, cache_bytes: int = 0) -> BagReader | SlideSetBags:
    """The bags ``model`` names: a tile embedding set's (encoder name, view name or set id), or a slide
    embedding set's bags of one vector (``<slide encoder>:<tile encoder>``)."""
    if is_slide_set(store, model):
        return SlideSetBags(store, model)
    return BagReader(store, store.embedding_set(model), cache_bytes=cache_bytes)


def source_record(reader: BagSource) -> dict[str, object]:
    """What a run's config records of the bags it trained on (in-memory bags: their name and width)."""
    if isinstance(reader, BagReader):
        return reader.es.to_json_dict() | {"set_id": reader.es.id}
    if isinstance(reader, SlideSetBags):
        ss = reader.slide_set
        return {"slide_set": ss.name, "set_id": ss.set_id, "encoder_id": ss.encoder_id, "encoder_name": ss.encoder,
                "tiles_set_id": ss.tiles_set_id, "tiling_id": ss.tiling_id, "embed_dim": ss.embed_dim}
    return {"encoder_name": reader.name, "embed_dim": reader.dim}


def grid_positions(xy: np.ndarray) -> np.ndarray:
    """Integer (column, row) of each tile on the slide's tile grid.

    The grid step is the greatest common divisor of the offsets from the top-left tile, which is
    the tiling stride for any regular grid (with or without overlap) and needs no slide metadata.
    """
    offset = xy - xy.min(0)
    step = np.gcd.reduce(offset, axis=0)
    return offset // np.where(step == 0, 1, step)


@dataclass(frozen=True, eq=False)
class SlideBag:
    """One slide's bag: row i of ``features``, ``coords``, ``tile_ids`` and ``grid`` is the same tile.

    Rows follow the tiles' tile_index (not tile_id); a ``max_tiles`` subset keeps that order.
    """

    slide_id: str
    features: Tensor
    """(n, D) float32 embeddings (view 0 of a multi-view set)."""
    coords: Tensor
    """(n, 2) int64 level-0 pixel x, y of each tile's top-left corner, as in the tiles table."""
    tile_ids: Tensor | None
    """(n,) int64 tile ids; None only for in-memory bags made without them."""
    target: Tensor | None
    """This slide's row of the dataset's targets; None when the dataset has none (inference)."""
    index: int
    """Position in the dataset."""
    grid: Tensor | None = None
    """(n, 2) int64 column, row on the slide's tile grid, when the dataset was made with grid positions."""


@dataclass(frozen=True, eq=False)
class BagBatch:
    """Padded bags from ``collate_bags``; real tiles come first in every row of ``mask``.

    ``x`` (B, N, D); ``mask`` (B, N); ``coords`` (B, N, 2) tile-grid positions for heads that need them
    (``SlideBag.grid``) or None; ``y`` (B, ...) stacked targets or None; ``index`` (B,) dataset
    positions; ``slide_ids``; ``tile_ids`` (B, N) padded with -1, or None.
    """

    x: Tensor
    mask: Tensor
    coords: Tensor | None
    y: Tensor | None
    index: Tensor
    slide_ids: tuple[str, ...]
    tile_ids: Tensor | None

    def to(self, device: torch.device) -> BagBatch:
        """The tensors a head reads on ``device``; ``index`` and ``tile_ids`` stay where they are."""
        return BagBatch(self.x.to(device, non_blocking=True), self.mask.to(device),
                        None if self.coords is None else self.coords.to(device),
                        None if self.y is None else self.y.to(device), self.index, self.slide_ids, self.tile_ids)


class BagDataset(Dataset):
    """Slides of a cohort as ``SlideBag`` items, read on demand; batch them with ``collate_bags``.

    ``targets`` has one row per slide (None for inference). With ``max_tiles`` a bag larger than the
    cap yields a random subset of that size, drawn anew each epoch (``set_epoch``) but reproducibly;
    rows stay in tile order. Evaluation uses no cap. ``coords`` adds each bag's tile-grid positions
    (``SlideBag.grid``, ``BagBatch.coords``) for heads that need them.
    """

    def __init__(self, reader: BagSource, slide_ids: Sequence[str], targets: np.ndarray | None = None, *,
                 max_tiles: int | None = None, coords: bool = False, seed: int = 0) -> None:
        if isinstance(slide_ids, str):
            raise InvalidArgumentError(f"slide_ids must be a list of slide ids, got the string {slide_ids!r:.60}")
        self.slide_ids = list(slide_ids)
        known = set(reader.slide_ids)
        missing = [s for s in self.slide_ids if s not in known]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise BagNotFoundError(f"{len(missing)} of the {len(self.slide_ids)} slides have no bag in {reader.name}: "
                                   f"{', '.join(map(str, missing[:5]))}{more}; choose among reader.slide_ids")
        self.targets = None if targets is None else np.asarray(targets, np.float32)
        if self.targets is not None and len(self.targets) != len(self.slide_ids):
            raise InvalidArgumentError(f"targets has {len(self.targets)} rows for {len(self.slide_ids)} slides; "
                                       "give one row per slide, in the order of slide_ids")
        if max_tiles is not None and (not isinstance(max_tiles, int) or max_tiles < 1):
            raise InvalidArgumentError(f"max_tiles must be a whole number >= 1 or None (every tile), got {max_tiles!r}")
        if not isinstance(seed, int) or seed < 0:
            raise InvalidArgumentError(f"seed must be a whole number >= 0, got {seed!r}")
        self.reader = reader
        self.max_tiles = max_tiles
        self.coords = coords
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, i: int) -> SlideBag:
        sid = self.slide_ids[i]
        n = self.reader.n_tiles(sid)
        rows = None
        if self.max_tiles is not None and n > self.max_tiles:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            rows = np.sort(rng.choice(n, self.max_tiles, replace=False))

        def pick(every: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(every if rows is None else every[rows]))

        xy = self.reader.xy(sid)
        ids = self.reader.tile_ids(sid)
        return SlideBag(slide_id=sid, features=torch.from_numpy(self.reader.features(sid, rows)), coords=pick(xy),
                        tile_ids=None if ids is None else pick(ids),
                        target=None if self.targets is None else torch.as_tensor(self.targets[i]), index=i,
                        grid=pick(grid_positions(xy)) if self.coords else None)


def collate_bags(items: Sequence[SlideBag]) -> BagBatch:
    """Pad ``SlideBag`` items to the longest one: ``DataLoader(dataset, batch_size=B, collate_fn=collate_bags)``."""
    if not items:
        raise InvalidArgumentError("collate_bags needs at least one bag")
    n = max(item.features.shape[0] for item in items)
    x = torch.zeros(len(items), n, items[0].features.shape[1])
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    grid = torch.zeros(len(items), n, 2, dtype=torch.long) if items[0].grid is not None else None
    tile_ids = torch.full((len(items), n), -1, dtype=torch.long) if items[0].tile_ids is not None else None
    for b, item in enumerate(items):
        rows = item.features.shape[0]
        x[b, :rows] = item.features
        mask[b, :rows] = True
        if grid is not None:
            grid[b, :rows] = item.grid
        if tile_ids is not None:
            tile_ids[b, :rows] = item.tile_ids
    with_target = [item.target is not None for item in items]
    if any(with_target) and not all(with_target):
        raise InvalidArgumentError("collate_bags got bags with and without targets; batch bags of one dataset")
    y = torch.stack([item.target for item in items]) if all(with_target) else None
    return BagBatch(x, mask, grid, y, torch.tensor([item.index for item in items]),
                    tuple(item.slide_id for item in items), tile_ids)


def bags(store: Store | Snapshot, model: str, label: str | None = None, slides: Sequence[str] | None = None, *,
         max_tiles: int | None = None, grid: bool = False, seed: int = 0, cache_bytes: int = 0) -> BagDataset:
    """A torch ``Dataset`` of one embedding set's bags, as ``SlideBag`` records; batch with ``collate_bags``.

    ``model``: encoder name, SQL view name or set id, or a slide embedding set of ``fs slide-encode``
    (``<slide encoder>:<tile encoder>``, bags of one vector: see ``SlideSetBags``). ``label``: a
    numeric or boolean column of the labels table whose value becomes each bag's ``target`` (None for
    inference: targets are None).
    ``slides``: a subset of the set's slide ids, kept in the order given (default: every slide of
    the set, by slide id). ``max_tiles`` caps a bag by a random, epoch-seeded subset (``set_epoch``);
    ``grid`` adds tile-grid positions for heads that need them; ``cache_bytes`` keeps that much of
    decoded bags in memory. The dataset reads one snapshot: bags committed later are not in it.
    """
    if not isinstance(store, Store | Snapshot):
        raise InvalidArgumentError(f"store must be a Store or Snapshot (featurestore.open(path)), "
                                   f"got {type(store).__name__}")
    if not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise InvalidArgumentError(f"cache_bytes must be a whole number of bytes >= 0, got {cache_bytes!r}")
    snapshot = store.snapshot() if isinstance(store, Store) else store
    reader = open_bags(snapshot, model, cache_bytes=cache_bytes)
    if isinstance(reader, BagReader):
        ids = snapshot.bag_slide_ids(reader.es, slides)
    else:
        ids = reader.slide_ids if slides is None else slides
    targets = None if label is None else _label_targets(snapshot, label, ids)
    return BagDataset(reader, ids, targets, max_tiles=max_tiles, coords=grid, seed=seed)


def _label_targets(snapshot: Snapshot, label: str, slide_ids: list[str]) -> np.ndarray:
    """``label``'s value for each slide, as float32; every slide must have one."""
    if not isinstance(label, str):
        raise InvalidArgumentError(f"label must be the name of a label column (str) or None, got {label!r}")
    columns = [c for c in snapshot.sql("SELECT * FROM labels LIMIT 0").column_names
               if c not in ("slide_id", "commit_id")]
    if label not in columns:
        raise InvalidArgumentError(f"label: no label column {label!r}; the labels table has "
                                   f"{', '.join(columns) or 'none (import some with fs labels import)'}")
    quoted = '"' + label.replace('"', '""') + '"'
    table = snapshot.sql(f"SELECT slide_id, {quoted} AS target FROM labels")
    kind = table.schema.field("target").type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise InvalidArgumentError(f"label {label!r} holds {kind} values, but a target must be a number; choose a "
                                   "numeric or boolean column, or pass your own targets to "
                                   "BagDataset(BagReader(store, es), slide_ids, targets)")
    values = dict(zip(table.column("slide_id").to_pylist(), table.column("target").to_pylist(), strict=True))
    missing = [s for s in slide_ids if values.get(s) is None]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InvalidArgumentError(f"label {label!r} has no value for {len(missing)} of the {len(slide_ids)} slides: "
                                   f"{', '.join(missing[:5])}{more}; pass slides= without them, or import their labels")
    return np.array([values[s] for s in slide_ids], np.float32)
