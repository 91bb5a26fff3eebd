"""Student training data from the store: cached tile pixels and cached teacher targets, no slide reads.

**Pairs.** A student tile is a tile of the *pixel tiling* (``--pixels SIZE@MPP``); its targets are
rows of the teachers' embedding sets on the *teacher tiling*. On the same tiling, tile i pairs
with row i (the store aligns both with ``tile_index``). On a coarser tiling (cross-magnification),
a tile at (X, Y) covering k×k teacher tiles pairs with its children: the teacher tiles with
X ≤ x < X + k·F and Y ≤ y < Y + k·F (F the teacher footprint), k·k rows in row-major order with
−1 where a child is not tissue. Both are found on the tile grid (column = round(x / stride)),
exactly as stage one cut the coarse tiles.

**Views.** A cached target belongs to the tile as the teacher saw it: the un-augmented tile. The
student sees an augmented tile (dihedral flip/rotation, HED and colour jitter), so teacher and
student see different views. An embedding set with K views (``EmbeddingSet.views``) holds the
teacher's embeddings of dihedral views 0..K−1 of every tile (``dihedral``); the student is then
shown the very dihedral view whose embedding it is trained against, and only colour jitter is
student-only. With one view the student's flip/rotation is random and its target is view 0 — the
usual cached-target approximation, fair for tissue, which has no orientation.

**Memory.** Pixels are resized once to the student's input size by ``featurestore.encoders.preprocess``,
the function ``fs extract --model student:RUN_DIR`` uses, so training and extraction see identical
pixels. They stay uint8 (27 KiB per tile at 96 px) next to the targets in an LRU cache of
``cache_bytes``: when the training slides fit they are read once per run, otherwise the sampler
visits slides in groups that fit and every slide is read once per epoch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from featurestore.encoders.views import dihedral
from featurestore.schemas import EmbeddingSet, TilingSpec
from featurestore.store import Store

DIHEDRAL_VIEWS = 8
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
"""Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in scikit-image."""


def dihedral_each(x: Tensor, views: Tensor) -> Tensor:
    """``dihedral`` with one view per item of a batch (B, H, W, C)."""
    out = x.clone()
    for v in views.unique().tolist():
        sel = views == v
        out[sel] = dihedral(x[sel], v)
    return out


@dataclass(frozen=True)
class Augment:
    """Student-side augmentation: dihedral flips/rotations, HED stain jitter, brightness/contrast/saturation.

    HED jitter (Tellez et al. 2018) scales and shifts each stain's optical density by
    U(1 − ``hed``, 1 + ``hed``) and U(−``hed``, ``hed``); the colour factors are U(1 ± value).
    """

    dihedral: bool = True
    hed: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1

    def colour(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Jitter float tiles (B, H, W, 3) in [0, 1]; random numbers come from ``generator`` (CPU)."""
        b = x.shape[0]

        def uniform(*shape: int, spread: float) -> Tensor:
            return (1 + spread * (2 * torch.rand(*shape, generator=generator) - 1)).to(x.device)

        if self.hed:
            rgb_from_hed = _RGB_FROM_HED.to(x.device)
            od = -torch.log(x.clamp(min=1e-6))
            stains = od @ torch.linalg.inv(rgb_from_hed)
            scale = uniform(b, 1, 1, 3, spread=self.hed)
            shift = uniform(b, 1, 1, 3, spread=self.hed) - 1
            x = torch.exp(-((stains * scale + shift) @ rgb_from_hed)).clamp(0, 1)
        if self.brightness:
            x = x * uniform(b, 1, 1, 1, spread=self.brightness)
        if self.contrast:
            mean = x.mean((1, 2, 3), keepdim=True)
            x = (x - mean) * uniform(b, 1, 1, 1, spread=self.contrast) + mean
        if self.saturation:
            grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device)).sum(-1, keepdim=True)
            x = grey + (x - grey) * uniform(b, 1, 1, 1, spread=self.saturation)
        return x.clamp(0, 1)


def resize_tiles(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 tiles (n, h, w, 3) → (n, size, size, 3) uint8, resized by ``featurestore.encoders.preprocess``.

    The student's encoder config has the same resize (bilinear, antialiased, shorter side then
    centre crop); here normalisation is the identity so it can follow augmentation instead.
    """
    from featurestore.encoders import TeacherConfig, preprocess

    if pixels.shape[1:3] == (size, size):
        return pixels
    cfg = TeacherConfig(name="student-input", builder="featurestore.encoders.student:student_encoder", embed_dim=1,
                        input_size=size, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, pooling="pooler",
                        interpolation="bilinear")
    out = np.empty((len(pixels), size, size, 3), np.uint8)
    for i in range(0, len(pixels), 256):
        x = preprocess(torch.from_numpy(np.ascontiguousarray(pixels[i:i + 256])), cfg)
        out[i:i + 256] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def grid_cells(xy: np.ndarray, stride: float) -> np.ndarray:
    """(column, row) of level-0 tile origins on a grid of ``stride`` level-0 px (stage one's rounding)."""
    return np.round(np.asarray(xy, np.float64) / stride).astype(np.int64)


def children(fine_xy: np.ndarray, coarse_xy: np.ndarray, stride: float, k: int) -> np.ndarray:
    """(n_coarse, k·k) index of each coarse tile's child tiles in row-major order; −1 where there is none.

    ``stride`` is the fine grid's step in level-0 px; coarse tile (X, Y) covers fine cells
    [X/stride, X/stride + k) × [Y/stride, Y/stride + k).
    """
    fine = grid_cells(fine_xy, stride)
    coarse = grid_cells(coarse_xy, stride * k)
    where = {(int(c), int(r)): i for i, (c, r) in enumerate(coarse)}
    out = np.full((len(coarse), k * k), -1, np.int64)
    for j, (c, r) in enumerate(fine):
        parent = where.get((int(c) // k, int(r) // k))
        if parent is not None:
            out[parent, (r % k) * k + c % k] = j
    return out


def blocks(xy: np.ndarray, stride: float, b: int) -> np.ndarray:
    """(n_blocks, b·b) tiles of each b×b neighbourhood of adjacent tiles that holds any tile; −1 where none."""
    cells = grid_cells(xy, stride)
    corners = np.unique(cells // b, axis=0)
    return children(xy, corners * stride * b, stride, b)


@dataclass(frozen=True, eq=False)
class SlideData:
    """One slide in memory: student-size uint8 pixels and (m, views, dim) float16 targets per teacher."""

    pixels: np.ndarray
    targets: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return self.pixels.nbytes + sum(t.nbytes for t in self.targets.values())


@dataclass(frozen=True, eq=False)
class Batch:
    """A batch on its way to the student.

    ``pixels`` (B, S, S, 3) uint8 already in the student's dihedral ``views``; ``teachers`` name →
    (B, D) or, cross-magnification, (B, k·k, D) float32 with ``child_mask``; ``labels`` (B,) weak
    labels (−1 unknown); ``regions`` (B, 3) (block, row, col) in region mode; ``slide``/``tile``
    (B,) where each item came from.
    """

    pixels: Tensor
    views: Tensor
    teachers: dict[str, Tensor]
    labels: Tensor
    slide: Tensor
    tile: Tensor
    child_mask: Tensor | None = None
    regions: Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        move = {"non_blocking": True}
        return Batch(self.pixels.to(device, **move), self.views, {k: v.to(device, **move) for k, v in
                                                                   self.teachers.items()},
                     self.labels.to(device), self.slide, self.tile,
                     None if self.child_mask is None else self.child_mask.to(device),
                     None if self.regions is None else self.regions.to(device))


class CachedTiles:
    """Random access to a cohort's cached pixels (one tiling) and teacher targets (another or the same).

    ``teacher_sets`` (one or more, on one tiling; the first is the primary teacher) give the targets.

    ``k`` is 1 when the pixel tiling is the teacher tiling, else the number of teacher tiles per
    side of a pixel tile. ``region`` > 1 groups teacher tiles into region×region neighbourhoods
    (units of the sampler) for region-level relations. ``views`` is the fewest cached teacher views
    among the teachers. ``xy`` holds each slide's level-0 tile corners on the pixel tiling, in
    tile_index order.
    """

    def __init__(self, store: Store, teacher_sets: Sequence[EmbeddingSet], pixel_tiling: TilingSpec,
                 slide_ids: Sequence[str], labels: dict[str, int], *, input_size: int, region: int = 1,
                 cache_bytes: int = 4 << 30) -> None:
        self.store = store
        self.sets = list(teacher_sets)
        self.names = [es.encoder_name for es in self.sets]
        self.pixel_tiling = pixel_tiling
        self.slide_ids = list(slide_ids)
        self.labels = np.array([labels.get(s, -1) for s in self.slide_ids], np.int64)
        self.input_size = input_size
        self.views = min(es.views for es in self.sets)
        teacher_tiling = next(t for t in store.tilings() if t.id == self.sets[0].tiling_id)
        ratio = (pixel_tiling.tile_size * pixel_tiling.target_mpp
                 / (teacher_tiling.tile_size * teacher_tiling.target_mpp))
        self.k = max(1, round(ratio))
        if pixel_tiling.id != teacher_tiling.id and self.k < 2:
            raise ValueError(f"pixel tiling {pixel_tiling.id} is not the teacher tiling and covers no k×k of its tiles")
        self.region = region
        mpp = {s.slide_id: s.mpp_x for s in store.slides()}
        self.units: list[np.ndarray] = []
        self.children: list[np.ndarray | None] = []
        self.xy: list[np.ndarray] = []
        self.n_tiles: list[int] = []
        self.n_rows: list[int] = []
        for sid in self.slide_ids:
            pix_xy = self._xy(sid, pixel_tiling.id)
            self.xy.append(pix_xy)
            self.n_tiles.append(len(pix_xy))
            stride = teacher_tiling.stride * teacher_tiling.target_mpp / mpp[sid]
            if self.k > 1:
                fine_xy = self._xy(sid, teacher_tiling.id)
                self.n_rows.append(len(fine_xy))
                self.children.append(children(fine_xy, pix_xy, stride, self.k))
            else:
                self.n_rows.append(len(pix_xy))
                self.children.append(None)
            self.units.append(blocks(pix_xy, stride, region) if region > 1 else np.arange(len(pix_xy))[:, None])
        self._cache: OrderedDict[int, SlideData] = OrderedDict()
        self._budget = cache_bytes

    def _xy(self, slide_id: str, tiling_id: str) -> np.ndarray:
        tiles = self.store.read_tiles(tiling_id, slide_id)
        return np.stack([tiles.column("x").to_numpy(), tiles.column("y").to_numpy()], 1)

    def slide_bytes(self, i: int) -> int:
        """Bytes slide ``i`` takes in memory, known before reading it."""
        pixels = self.n_tiles[i] * self.input_size**2 * 3
        return pixels + sum(self.n_rows[i] * es.views * es.embed_dim * 2 for es in self.sets)

    def load(self, i: int) -> SlideData:
        """Slide ``i``'s pixels and targets, from the cache or the store (then cached, oldest evicted)."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        sid = self.slide_ids[i]
        pixels = resize_tiles(self.store.read_pixels(self.pixel_tiling.id, sid), self.input_size)
        targets = {}
        for name, es in zip(self.names, self.sets, strict=True):
            bag = self.store.read_bag(es, sid)
            targets[name] = bag.reshape(len(bag), es.views, es.embed_dim).astype(np.float16, copy=False)
        data = SlideData(pixels, targets)
        while self._cache and sum(d.nbytes for d in self._cache.values()) + data.nbytes > self._budget:
            self._cache.popitem(last=False)
        self._cache[i] = data
        return data

    def target_stats(self, name: str) -> tuple[np.ndarray, float]:
        """Mean (D,) and RMS deviation from it of teacher ``name``'s cached rows (every view) on these slides."""
        es = self.sets[self.names.index(name)]
        total, squares, n = np.zeros(es.embed_dim), np.zeros(es.embed_dim), 0
        for sid in self.slide_ids:
            rows = self.store.read_bag(es, sid).reshape(-1, es.embed_dim).astype(np.float64)
            total += rows.sum(0)
            squares += (rows**2).sum(0)
            n += len(rows)
        mean = total / n
        return mean.astype(np.float32), float(np.sqrt(max((squares / n - mean**2).mean(), 1e-12)))

    def batch(self, items: np.ndarray, views: np.ndarray) -> Batch:
        """Assemble units ``items`` (m, 2) = (slide, unit) with one student view per tile of each unit."""
        slide_idx, tile_idx, regions = [], [], []
        for j, (s, u) in enumerate(items):
            members = self.units[s][u]
            for slot in np.flatnonzero(members >= 0):
                slide_idx.append(s)
                tile_idx.append(members[slot])
                regions.append((j, slot // self.region, slot % self.region))
        slide_idx, tile_idx = np.asarray(slide_idx), np.asarray(tile_idx)
        views = np.asarray(views)[: len(tile_idx)]
        target_views = views if self.views > 1 else np.zeros_like(views)
        n, s = len(tile_idx), self.input_size
        pixels = np.empty((n, s, s, 3), np.uint8)
        width = self.k * self.k
        teachers = {name: np.zeros((n, width, es.embed_dim) if self.k > 1 else (n, es.embed_dim), np.float32)
                    for name, es in zip(self.names, self.sets, strict=True)}
        child_mask = np.zeros((n, width), bool) if self.k > 1 else None
        for si in np.unique(slide_idx):
            sel = np.flatnonzero(slide_idx == si)
            data = self.load(int(si))
            pixels[sel] = data.pixels[tile_idx[sel]]
            if self.k > 1:
                rows = self._rotated_children(int(si), tile_idx[sel], views[sel])
                child_mask[sel] = rows >= 0
                for name in self.names:
                    got = data.targets[name][np.maximum(rows, 0), target_views[sel][:, None]]
                    teachers[name][sel] = np.where(rows[..., None] >= 0, got, 0)
            else:
                for name in self.names:
                    teachers[name][sel] = data.targets[name][tile_idx[sel], target_views[sel]]
        view_t = torch.from_numpy(views.astype(np.int64))
        return Batch(dihedral_each(torch.from_numpy(pixels), view_t), view_t,
                     {k: torch.from_numpy(v) for k, v in teachers.items()},
                     torch.from_numpy(self.labels[slide_idx]), torch.from_numpy(slide_idx), torch.from_numpy(tile_idx),
                     None if child_mask is None else torch.from_numpy(child_mask),
                     torch.tensor(regions, dtype=torch.long) if self.region > 1 else None)

    def _rotated_children(self, slide: int, tiles: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Children of each tile laid out as the student sees the tile after its dihedral view."""
        grid = torch.from_numpy(self.children[slide][tiles].reshape(-1, self.k, self.k, 1))
        return dihedral_each(grid, torch.from_numpy(views.astype(np.int64))).reshape(len(tiles), -1).numpy()

    def iterate(self, plan: list[np.ndarray], *, augment: Augment | None, seed: int) -> Iterator[Batch]:
        """Batches of a plan; with ``augment`` each tile gets a random dihedral view (from the cached
        views when there are several), drawn reproducibly from ``seed``."""
        rng = np.random.default_rng(seed)
        for items in plan:
            n = int(sum((self.units[s][u] >= 0).sum() for s, u in items))
            if augment is not None and augment.dihedral:
                views = rng.integers(0, self.views if self.views > 1 else DIHEDRAL_VIEWS, n)
            else:
                views = np.zeros(n, np.int64)
            yield self.batch(items, views)


class SlideBalancedSampler:
    """Per epoch, ``per_slide`` units from every slide, so large slides do not dominate.

    A slide with fewer units repeats them (each unit first once, in random order); a larger one
    contributes a random subset, a new one each epoch. Slides are shuffled and grouped so that
    each group fits the cache (``sizes`` bytes each, ``budget`` in all); units are shuffled within
    a group and cut into batches of ``units_per_batch`` (an incomplete last batch is dropped when
    there are others, so batch shapes stay fixed). Everything is drawn from (seed, epoch).
    """

    def __init__(self, counts: Sequence[int], per_slide: int, units_per_batch: int, *, sizes: Sequence[int],
                 budget: int, seed: int) -> None:
        self.counts = list(counts)
        self.per_slide = per_slide
        self.units_per_batch = units_per_batch
        self.sizes = list(sizes)
        self.budget = budget
        self.seed = seed

    def epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        groups: list[list[int]] = [[]]
        used = 0
        for s in rng.permutation(len(self.counts)):
            if groups[-1] and used + self.sizes[s] > self.budget:
                groups.append([])
                used = 0
            groups[-1].append(int(s))
            used += self.sizes[s]
        plan = []
        for group in groups:
            items = np.concatenate([self._draw(s, rng) for s in group])
            items = items[rng.permutation(len(items))]
            cuts = list(range(0, len(items), self.units_per_batch))
            batches = [items[c:c + self.units_per_batch] for c in cuts]
            if len(batches) > 1 and len(batches[-1]) < self.units_per_batch:
                batches.pop()
            plan.extend(batches)
        return plan

    def _draw(self, slide: int, rng: np.random.Generator) -> np.ndarray:
        n = self.counts[slide]
        picks = np.concatenate([rng.permutation(n) for _ in range(-(-self.per_slide // n))])[: self.per_slide]
        return np.stack([np.full(len(picks), slide), picks], 1)


def sequential_plan(counts: Sequence[int], units_per_batch: int) -> list[np.ndarray]:
    """Every unit of every slide once, in order: the evaluation plan."""
    items = np.concatenate([np.stack([np.full(n, s), np.arange(n)], 1) for s, n in enumerate(counts)])
    return [items[i:i + units_per_batch] for i in range(0, len(items), units_per_batch)]


def to_student(pixels: Tensor, mean: Sequence[float], std: Sequence[float], *, augment: Augment | None,
               generator: torch.Generator) -> Tensor:
    """uint8 (B, S, S, 3) on any device → normalised (B, 3, S, S) float, colour-jittered when training."""
    x = pixels.float() / 255
    if augment is not None:
        x = augment.colour(x, generator)
    m = torch.tensor(mean, device=x.device)
    s = torch.tensor(std, device=x.device)
    return ((x - m) / s).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
