"""Bags from the store, one slide at a time, padded into batches with masks.

``BagReader`` resolves where every slide's array and tiles live with one SQL query, then reads a
slide's rows (all, or a random subset when training with a tile cap) straight from its Zarr array.
Nothing beyond the current batch and an optional size-bounded cache is held in memory, so a
cohort of any size trains in bounded memory. Subsets are drawn from (seed, epoch, slide), so a
run is reproducible whatever the order or the number of loader workers.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from torch import Tensor
from torch.utils.data import Dataset

from featurestore.schemas import EmbeddingSet
from featurestore.store import Store


class BagReader:
    """Random access to the bags of one embedding set.

    The reader pins one store snapshot for its whole life, so a training run sees one version of
    every bag even while an extraction commits. Array handles are kept (they hold metadata, not
    data) so later epochs skip re-opening.

    ``cache_bytes`` > 0 keeps decoded bags (in their stored dtype) in a least-recently-used cache
    of that size: a small cohort is then read from disk once per run, a large one streams as
    before. Each data-loader worker holds its own cache.
    """

    def __init__(self, store: Store, es: EmbeddingSet, *, cache_bytes: int = 0) -> None:
        self.store = store
        self.snapshot = store.snapshot()
        self.es = es
        # The snapshot's location map (a bag has as many rows as its slide has tiles): no SQL per reader.
        self._where = {sid: self.snapshot.n_tiles(sid, es.tiling_id) for sid in self.snapshot.bag_commits(es)}
        self._arrays: dict[str, zarr.Array] = {}
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_budget = cache_bytes
        self._cache_used = 0

    @property
    def slide_ids(self) -> list[str]:
        return list(self._where)

    @property
    def name(self) -> str:
        return self.es.encoder_name

    @property
    def dim(self) -> int:
        return self.es.embed_dim

    def n_tiles(self, slide_id: str) -> int:
        return self._location(slide_id)

    def features(self, slide_id: str, rows: np.ndarray | None = None) -> np.ndarray:
        """``(n, dim)`` float32 embeddings in tile_index order (view 0 of multi-view sets); ``rows`` selects tiles."""
        cached = self._cache.get(slide_id)
        if cached is not None:
            self._cache.move_to_end(slide_id)
            data = cached if rows is None else cached[rows]
        else:
            array = self._arrays.get(slide_id)
            if array is None:
                self._location(slide_id)
                array = self._arrays[slide_id] = self.snapshot.bag_array(self.es, slide_id)
            if self._cache_budget and array.nbytes <= self._cache_budget:
                data = self._remember(slide_id, array[...])
                data = data if rows is None else data[rows]
            else:
                data = array[...] if rows is None else array.get_orthogonal_selection((rows,))
        return np.asarray(data[:, 0] if data.ndim == 3 else data, dtype=np.float32)

    def _remember(self, slide_id: str, data: np.ndarray) -> np.ndarray:
        while self._cache and self._cache_used + data.nbytes > self._cache_budget:
            self._cache_used -= self._cache.popitem(last=False)[1].nbytes
        self._cache[slide_id] = data
        self._cache_used += data.nbytes
        return data

    def xy(self, slide_id: str) -> np.ndarray:
        """``(n, 2)`` level-0 pixel coordinates (x, y) of the tiles' top-left corners, in tile_index order."""
        self._location(slide_id)
        tiles = self.snapshot.read_tiles(self.es.tiling_id, slide_id, columns=["x", "y"])
        return np.stack([tiles.column("x").to_numpy(), tiles.column("y").to_numpy()], 1)

    def _location(self, slide_id: str) -> int:
        try:
            return self._where[slide_id]
        except KeyError as err:
            raise KeyError(f"{self.store.root}: slide {slide_id} has no embeddings in set {self.es.id} "
                           f"({self.es.encoder_name})") from err


class ArrayBags:
    """Bags held in memory, read like a :class:`BagReader`: embeddings computed in this process (a
    student's, during ``fs distill``) go through the same MIL code as stored ones."""

    def __init__(self, name: str, bags: dict[str, np.ndarray], xy: dict[str, np.ndarray]) -> None:
        self.name = name
        self._bags = {s: np.asarray(b, np.float32) for s, b in bags.items()}
        self._xy = xy
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


BagSource = BagReader | ArrayBags


def grid_positions(xy: np.ndarray) -> np.ndarray:
    """Integer (column, row) of each tile on the slide's tile grid.

    The grid step is the greatest common divisor of the offsets from the top-left tile, which is
    the tiling stride for any regular grid (with or without overlap) and needs no slide metadata.
    """
    offset = xy - xy.min(0)
    step = np.gcd.reduce(offset, axis=0)
    return offset // np.where(step == 0, 1, step)


@dataclass(frozen=True, eq=False)
class BagBatch:
    """Padded bags: ``x`` (B, N, D), ``mask`` (B, N), ``coords`` (B, N, 2) or None, ``y`` (B, 2), ``index`` (B,)."""

    x: Tensor
    mask: Tensor
    coords: Tensor | None
    y: Tensor
    index: Tensor

    def to(self, device: torch.device) -> BagBatch:
        return BagBatch(self.x.to(device, non_blocking=True), self.mask.to(device), None if self.coords is None
                        else self.coords.to(device), self.y.to(device), self.index)


class BagDataset(Dataset):
    """Slides of a cohort as (features, grid, target, index) items, read on demand.

    With ``max_tiles`` a bag larger than the cap yields a random subset of that size, drawn anew
    each epoch (``set_epoch``) but reproducibly; rows stay in tile order. Evaluation uses no cap.
    """

    def __init__(self, reader: BagSource, slide_ids: list[str], targets: np.ndarray, *,
                 max_tiles: int | None = None, coords: bool = False, seed: int = 0) -> None:
        self.reader = reader
        self.slide_ids = slide_ids
        self.targets = np.asarray(targets, np.float32)
        self.max_tiles = max_tiles
        self.coords = coords
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor | None, Tensor, int]:
        sid = self.slide_ids[i]
        n = self.reader.n_tiles(sid)
        rows = None
        if self.max_tiles is not None and n > self.max_tiles:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            rows = np.sort(rng.choice(n, self.max_tiles, replace=False))
        x = torch.from_numpy(self.reader.features(sid, rows))
        grid = None
        if self.coords:
            grid_all = grid_positions(self.reader.xy(sid))
            grid = torch.from_numpy(grid_all if rows is None else grid_all[rows])
        return x, grid, torch.from_numpy(self.targets[i]), i


def collate_bags(items: list[tuple[Tensor, Tensor | None, Tensor, int]]) -> BagBatch:
    """Pad bags to the longest one; real tiles come first in every row of ``mask``."""
    n = max(x.shape[0] for x, *_ in items)
    x = torch.zeros(len(items), n, items[0][0].shape[1])
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    has_coords = items[0][1] is not None
    coords = torch.zeros(len(items), n, 2, dtype=torch.long) if has_coords else None
    for b, (features, grid, _, _) in enumerate(items):
        x[b, :features.shape[0]] = features
        mask[b, :features.shape[0]] = True
        if coords is not None:
            coords[b, :grid.shape[0]] = grid
    y = torch.stack([t for _, _, t, _ in items])
    return BagBatch(x, mask, coords, y, torch.tensor([i for *_, i in items]))
