"""Stage one: slides → tissue → tiles → teacher embeddings → one atomic store commit per slide.

Reading overlaps compute: a thread pool reads and decodes the next batches of
tiles (OpenSlide and cuCIM release the GIL) while the current batch runs through
every teacher. Tiles are read once per slide and every teacher's embeddings are
stored against the same tile index.

Resumability comes from the store: a slide is skipped when every requested
encoder already has its bag, a slide tiled before gets only the missing
encoders, and a crash leaves at most an invisible staging directory. What is
done is judged from the encoders' specs (a checkpoint's hash), so a finished
store builds no teacher.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featurestore.devices import resolve_device
from featurestore.pipelines._versions import versions
from featurestore.pipelines.annotations import overlaps_of_new_tiles, write_qc_geojson
from featurestore.pipelines.discover import find_slides
from featurestore.pipelines.register import describe_slide
from featurestore.schemas import EmbeddingSet, EncoderSpec, Failure, FsError, Run, StoreWriteError, TilingSpec, utcnow
from featurestore.schemas.tables import TileQuality
from featurestore.slides import TileGrid, open_slide, qc_overlay, read_tiles, tile_grid, tissue_mask
from featurestore.slides.quality import describe_limits, inside_slide, measure_tiles, within_limits
from featurestore.store import SlideCommit, Store, TiledPixels, tiles_table

if TYPE_CHECKING:
    from featurestore.encoders import Teacher


@dataclass(frozen=True)
class PixelSpec:
    """Tile pixels to cache for students: ``size`` px at ``mpp`` µm/px (``224@0.5``)."""

    size: int
    mpp: float

    @classmethod
    def parse(cls, text: str) -> PixelSpec:
        try:
            size, mpp = text.split("@")
            return cls(int(size), float(mpp))
        except ValueError as err:
            raise ValueError(f"--cache-pixels {text!r}: expected SIZE@MPP such as 224@0.5") from err

    def __str__(self) -> str:
        return f"{self.size}@{self.mpp:g}"

    def is_tiling(self, tiling: TilingSpec) -> bool:
        """Pixels of the teacher tiles themselves (rather than of a coarser, derived tiling)."""
        return self.size == tiling.tile_size and self.mpp == tiling.target_mpp


@dataclass(frozen=True)
class ExtractOptions:
    """Everything that decides what an extraction computes (and so what resume compares)."""

    models: tuple[str, ...]
    tiling: TilingSpec
    weights: dict[str, str] = field(default_factory=dict)
    reader: str = "auto"
    device: str = "auto"
    batch_size: int = 64
    read_workers: int = 4
    cache_pixels: tuple[PixelSpec, ...] = ()
    assume_mpp: float | None = None
    dtype: str = "float16"
    qc: bool = True
    teacher_views: int = 1
    tissue_weights: str | None = None
    geojson: bool = False
    """Also write the tissue contours and tile grid as QuPath GeoJSON next to the QC image."""


@dataclass(frozen=True)
class SlideOutcome:
    path: str
    slide_id: str
    status: str
    tiles: int = 0
    models: tuple[str, ...] = ()
    seconds: float = 0.0
    device_seconds: float = 0.0
    error: str = ""


_TeacherKey = tuple[str, str | None, str]
_TEACHERS: dict[_TeacherKey, Teacher] = {}
_SPECS: dict[_TeacherKey, EncoderSpec] = {}


def _key(name: str, opts: ExtractOptions, device: str) -> _TeacherKey:
    return name, opts.weights.get(name), device


def load_teacher(name: str, opts: ExtractOptions, device: str) -> Teacher:
    """Teacher ``name`` for this process, built once and kept (Dask workers reuse it across slides)."""
    key = _key(name, opts, device)
    if key not in _TEACHERS:
        from featurestore.encoders import build_teacher

        _TEACHERS[key] = build_teacher(name, weights=key[1], device=device)
    return _TEACHERS[key]


def load_teachers(opts: ExtractOptions, device: str) -> list[Teacher]:
    """Every requested teacher, in ``opts.models`` order."""
    return [load_teacher(m, opts, device) for m in opts.models]


def teacher_specs(opts: ExtractOptions, device: str) -> dict[str, EncoderSpec]:
    """Each requested teacher's spec, computed once per process without building the teacher.

    A checkpoint is only hashed; a teacher with seeded weights is built (and kept), because only
    its generated tensors identify it. Unknown teachers and missing weights raise here.
    """
    from featurestore.encoders import teacher_spec

    for name in opts.models:
        key = _key(name, opts, device)
        if key not in _SPECS:
            _SPECS[key] = (_TEACHERS[key].spec if key in _TEACHERS
                           else teacher_spec(name, weights=key[1], device=device)
                           or load_teacher(name, opts, device).spec)
    return {m: _SPECS[_key(m, opts, device)] for m in opts.models}


def missing_models(opts: ExtractOptions, device: str, done: frozenset[str] | None) -> list[str]:
    """The requested teachers whose embedding set for this run is not among ``done``."""
    return [m for m, spec in teacher_specs(opts, device).items() if _set_id(spec, opts) not in (done or ())]


def _derived_tiling(base: TilingSpec, spec: PixelSpec) -> tuple[TilingSpec, int]:
    """A coarser tiling whose tiles cover exactly ``k × k`` base tiles, for cross-magnification pairs."""
    ratio = spec.size * spec.mpp / (base.tile_size * base.target_mpp)
    k = round(ratio)
    if k < 1 or abs(ratio - k) > 1e-6 or base.overlap:
        raise FsError(f"--cache-pixels {spec}: its field of view must be a whole multiple of the teacher tile's "
                      f"({base.tile_size}@{base.target_mpp:g}) with no overlap; e.g. "
                      f"{base.tile_size}@{base.target_mpp * 4:g}")
    derived = TilingSpec(target_mpp=spec.mpp, tile_size=spec.size, overlap=0, tissue_method=base.tissue_method,
                         thumbnail_mpp=base.thumbnail_mpp, saturation_floor=base.saturation_floor,
                         close_um=base.close_um, min_object_um2=base.min_object_um2, min_tissue=0.0, edge="pad")
    return derived, k


def check_options(opts: ExtractOptions) -> None:
    """Everything that can be checked before a slide is read, so a bad option costs nothing and writes nothing."""
    for name, value in (("--batch-size", opts.batch_size), ("--read-workers", opts.read_workers)):
        if value < 1:
            raise FsError(f"{name} {value}: must be at least 1")
    if opts.assume_mpp is not None and not opts.assume_mpp > 0:
        raise FsError(f"--assume-mpp {opts.assume_mpp}: must be a positive µm/px, e.g. 0.25 for 40x or 0.5 for 20x")
    for spec in opts.cache_pixels:
        if spec.size < 1 or not spec.mpp > 0:
            raise FsError(f"--cache-pixels {spec}: size and µm/px must be positive, e.g. 224@0.5")
    wanted_pixels(opts)  # a derived tiling that is not a whole multiple raises here


def _batches(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]


def _prefetch(read: Callable[[np.ndarray], np.ndarray], batches: list[np.ndarray], workers: int,
              depth: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (indices, pixels) in order while up to ``depth`` later batches are read in the background."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque = deque()
        it = iter(batches)
        for idx in it:
            pending.append((idx, pool.submit(read, idx)))
            if len(pending) >= depth:
                break
        while pending:
            idx, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(read, nxt)))
            yield idx, fut.result()


def _read_measured(reader, grid: TileGrid, idx: np.ndarray, size: int) -> tuple[np.ndarray, TileQuality]:
    """Read tiles and measure their quality in the same read thread, so measuring overlaps the model too."""
    pixels = read_tiles(reader, grid, idx, size)
    return pixels, measure_tiles(pixels, inside_slide(grid, reader.dimensions, idx, size))


@dataclass
class _QualityGate:
    """Drops tiles outside the tiling's quality limits as they are read, before any model sees them.

    The kept tiles are renumbered 0..m-1 in grid order as they stream through; ``kept`` then gives
    their grid rows and measures.
    """

    tiling: TilingSpec
    quality: list[TileQuality] = field(default_factory=list)
    passed: list[np.ndarray] = field(default_factory=list)
    count: int = 0

    def __call__(self, stream: Iterator[tuple[np.ndarray, tuple[np.ndarray, TileQuality]]]
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for idx, (pixels, quality) in stream:
            ok = within_limits(quality, self.tiling)
            self.quality.append(quality)
            self.passed.append(ok)
            n = int(ok.sum())
            if n:
                start, self.count = self.count, self.count + n
                yield np.arange(start, self.count), pixels if n == len(idx) else pixels[ok]

    def kept(self, grid: TileGrid, path: Path) -> tuple[TileGrid, TileQuality]:
        """The grid of the tiles that passed, and their measures; a slide where none did is a user error."""
        quality = TileQuality.concat(self.quality)
        ok = np.concatenate(self.passed) if self.passed else np.zeros(0, dtype=bool)
        if len(ok) != len(grid):
            raise RuntimeError(f"{path}: {len(ok)} tiles measured of {len(grid)}; every batch must be read")
        if not ok.any():
            failing = ", ".join(f"{name} {n}" for name, n in _failing(quality, self.tiling).items() if n)
            raise FsError(f"{path}: none of its {len(grid)} tiles meets --min-quality {describe_limits(self.tiling)} "
                          f"(tiles failing: {failing}); relax --min-quality for this slide")
        if ok.all():
            return grid, quality
        return replace(grid, x=grid.x[ok], y=grid.y[ok], tissue_fraction=grid.tissue_fraction[ok]), quality.take(ok)


def _failing(quality: TileQuality, tiling: TilingSpec) -> dict[str, int]:
    """How many tiles fail each quality limit, by ``--min-quality`` name."""
    return {"sharpness": int(np.count_nonzero(quality.sharpness < tiling.min_sharpness)),
            "pen": int(np.count_nonzero(quality.pen_fraction > tiling.max_pen)),
            "background": int(np.count_nonzero(quality.background_fraction > tiling.max_background))}


def embed_batches(teachers: list, pixel_batches: Iterator[tuple[np.ndarray, np.ndarray]], n: int,
                  device: str, *, keep_pixels: bool = False, views: int = 1
                  ) -> tuple[dict[EncoderSpec, np.ndarray], float, list[np.ndarray]]:
    """Run every teacher on every batch; returns embeddings per encoder, device seconds and the pixels seen.

    Each teacher autocasts to its own precision on a GPU (bf16 for the large ViTs) and takes uint8
    tiles, so the host-to-device copy moves a quarter of the bytes of float32. With ``views`` > 1
    each teacher also embeds dihedral views 1..K-1 of every tile: arrays are (n, K, dim).
    """
    import torch

    from featurestore.encoders.views import dihedral

    shape = (views,) if views > 1 else ()
    out = {t.spec: np.empty((n, *shape, t.spec.embed_dim), np.float32) for t in teachers}
    kept: list[np.ndarray] = []
    device_s = 0.0
    cuda = device.startswith("cuda")
    with torch.inference_mode():
        for idx, pixels in pixel_batches:
            if keep_pixels:
                kept.append(pixels)
            x = torch.from_numpy(pixels)
            if cuda:
                x = x.pin_memory().to(device, non_blocking=True)
            t0 = time.perf_counter()
            for t in teachers:
                emb = t(x) if views == 1 else torch.stack([t(dihedral(x, v)) for v in range(views)], dim=1)
                out[t.spec][idx] = emb.cpu().numpy()
            device_s += time.perf_counter() - t0
    return out, device_s, kept


def extract_slide(store: Store, path: Path, slide_id: str, opts: ExtractOptions,
                  done: frozenset[str] | None = None, pixels_done: frozenset[str] = frozenset()) -> SlideOutcome:
    """Extract one slide and commit it; failures are recorded in the store and returned, never raised.

    ``done`` is the resume state from ``Store.progress``: None when the slide has no tiles for this
    tiling yet, else the ids of the embedding sets already holding its bag. ``pixels_done`` holds the
    tilings whose pixels the store already caches for the slide: ``--cache-pixels`` on a finished
    slide adds the missing ones, without running a teacher.
    """
    t0 = time.perf_counter()
    stage = "open"
    try:
        device = str(resolve_device(opts.device))
        missing = missing_models(opts, device, done)
        pixel_tilings = wanted_pixels(opts) - pixels_done
        if not missing and not pixel_tilings:
            return SlideOutcome(str(path), slide_id, "skipped")
        todo = [load_teacher(m, opts, device) for m in missing]
        slide = describe_slide(path, slide_id, reader=opts.reader, assume_mpp=opts.assume_mpp)
        already_tiled = done is not None
        with open_slide(path, opts.reader) as reader:
            stage = "tissue"
            mpp = slide.mpp_x
            mask = tissue_mask(reader, opts.tiling, mpp=mpp, weights=opts.tissue_weights, device=device)
            grid = tile_grid(reader, opts.tiling, mask, mpp=mpp)
            # Derived tilings cover the tissue grid whatever the quality limits keep: their ids do not hold them.
            tissue_grid = grid
            if already_tiled:
                tiles = store.read_tiles(opts.tiling.id, slide_id)
                grid = grid.with_coordinates(tiles.column("x").to_numpy(), tiles.column("y").to_numpy())
            if len(grid) == 0:
                raise FsError(f"{path}: no tile has ≥{opts.tiling.min_tissue:.0%} tissue; check the slide, "
                              "or lower --min-tissue / use --tissue none")
            stage = "embed"
            size = opts.tiling.tile_size
            batches = _batches(len(grid), opts.batch_size)
            gate = _QualityGate(opts.tiling)
            if already_tiled:  # the stored rows hold these tiles' measures
                stream = _prefetch(lambda idx: read_tiles(reader, grid, idx, size), batches, opts.read_workers,
                                   depth=3)
            else:
                stream = gate(_prefetch(lambda idx: _read_measured(reader, grid, idx, size), batches,
                                        opts.read_workers, depth=3))
            cache_base = opts.tiling.id in pixel_tilings
            embeddings, device_s, seen = {}, 0.0, []
            if todo or cache_base or not already_tiled:
                embeddings, device_s, seen = embed_batches(todo, stream, len(grid), device, keep_pixels=cache_base,
                                                           views=opts.teacher_views)
            if not already_tiled:
                stage = "quality"
                grid, quality = gate.kept(grid, path)
                embeddings = {spec: rows[:len(grid)] for spec, rows in embeddings.items()}
            stage = "pixels"
            extra = tuple(_extra_layers(reader, slide_id, tissue_grid, opts, pixel_tilings))
            if opts.qc and not already_tiled:
                qc_dir = store.root / "qc"
                qc_dir.mkdir(exist_ok=True)
                qc_overlay(reader, mask, grid, qc_dir / f"{slide_id}.png")
        if already_tiled:
            # Pixels for a tiling are committed with its tiles, so the same rows are written again.
            new_tiles = tiles.drop_columns(["commit_id"]) if cache_base else None
        else:
            new_tiles = tiles_table(slide_id, opts.tiling.id, grid.x, grid.y, grid.level, grid.read_size,
                                    grid.tissue_fraction, quality)
            if opts.geojson:
                stage = "geojson"
                (store.root / "qc").mkdir(exist_ok=True)
                write_qc_geojson(store.root / "qc" / f"{slide_id}.geojson", mask, slide, new_tiles, grid.footprint)
        stage = "commit"
        # A slide annotated before this tiling was cut gets the new tiles' overlaps in the same commit.
        layers = ([(opts.tiling, new_tiles)] if new_tiles is not None else []) + [(x.tiling, x.tiles) for x in extra]
        overlaps = overlaps_of_new_tiles(store, slide, layers)
        store.commit_slide(SlideCommit(slide, opts.tiling, new_tiles, embeddings,
                                       np.concatenate(seen) if cache_base else None, opts.dtype, extra,
                                       tables=lambda _: overlaps))
        return SlideOutcome(str(path), slide_id, "done", len(grid), tuple(t.spec.name for t in todo),
                            time.perf_counter() - t0, device_s)
    except StoreWriteError:
        raise  # the store's disk, not the slide: every later slide would fail the same way
    except Exception as err:  # noqa: BLE001 - one bad slide must not stop a cohort; it is recorded below.
        message = str(err).splitlines()[0] if str(err) else repr(err)
        if not isinstance(err, FsError):
            message = f"{path}: {type(err).__name__}: {message}"
        store.register(Failure(str(path), stage, type(err).__name__, message, slide_id))
        return SlideOutcome(str(path), slide_id, "failed", seconds=time.perf_counter() - t0,
                            error=message + ("" if isinstance(err, FsError) else "\n" + traceback.format_exc(limit=3)))


def _set_id(spec: EncoderSpec, opts: ExtractOptions) -> str:
    """The embedding set this run writes for ``spec`` (its id covers dtype and views, not time)."""
    return EmbeddingSet(opts.tiling.id, spec.id, spec.name, spec.embed_dim, opts.dtype, opts.teacher_views).id


def wanted_pixels(opts: ExtractOptions) -> frozenset[str]:
    """Ids of the tilings whose pixels ``--cache-pixels`` asks for."""
    return frozenset(opts.tiling.id if spec.is_tiling(opts.tiling) else _derived_tiling(opts.tiling, spec)[0].id
                     for spec in opts.cache_pixels)


def _extra_layers(reader, slide_id: str, grid, opts: ExtractOptions, wanted: frozenset[str]
                  ) -> Iterator[TiledPixels]:
    """Pixels at further magnifications, on tilings aligned so each tile covers k×k teacher tiles."""
    for spec in opts.cache_pixels:
        if spec.is_tiling(opts.tiling):
            continue
        derived, k = _derived_tiling(opts.tiling, spec)
        if derived.id not in wanted:
            continue
        coarse = grid.coarsen(k)
        pixels = read_tiles(reader, coarse, np.arange(len(coarse)), spec.size, num_workers=opts.read_workers)
        inside = inside_slide(coarse, reader.dimensions, np.arange(len(coarse)), spec.size)
        yield TiledPixels(derived, tiles_table(slide_id, derived.id, coarse.x, coarse.y, coarse.level,
                                               coarse.read_size, coarse.tissue_fraction, measure_tiles(pixels, inside)),
                          pixels)


@dataclass
class ExtractReport:
    outcomes: list[SlideOutcome] = field(default_factory=list)
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0

    @property
    def failed(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def tiles(self) -> int:
        return sum(o.tiles for o in self.outcomes)


# What decides the embeddings a run writes: the network, the reader that decoded the pixels, the store.
_VERSIONED = ("featurestore-path", "torch", "timm", "openslide-python", "cucim-cu13", "wsidicom", "pylibCZIrw",
              "tifffile", "zarr", "duckdb")


def run_extract(paths: list[str | Path], store_path: Path, opts: ExtractOptions, *, workers: int = 0,
                scheduler: str | None = None, command: str = "fs extract",
                on_start: Callable[[int], None] | None = None,
                on_outcome: Callable[[SlideOutcome], None] | None = None) -> ExtractReport:
    """Extract every slide under ``paths`` into the store, in-process or on a Dask cluster.

    Unknown teachers and (in-process) missing weights fail before anything is written; on a finished
    store no teacher is built. ``workers`` > 0 starts a local Dask cluster with one process per
    worker (one per GPU on a GPU box); ``scheduler`` connects to an existing cluster. Each slide
    commits on its own, so any number of workers keeps the store consistent.
    """
    t0 = time.perf_counter()
    from featurestore.encoders import teacher_config
    from featurestore.encoders.views import DIHEDRAL_VIEWS

    for name in opts.models:
        teacher_config(name)
    if not 1 <= opts.teacher_views <= DIHEDRAL_VIEWS:
        raise FsError(f"--teacher-views {opts.teacher_views}: choose 1..{DIHEDRAL_VIEWS} (the dihedral views of a "
                      "square tile)")
    check_options(opts)
    if opts.tiling.tissue_method in ("grandqc", "hest"):
        from featurestore.slides.segmenters import load_segmenter

        # Missing or misfitting segmenter weights fail the command before the store is touched. Loaded on
        # the device the slides use, so an in-process run finds this model in the cache instead of loading twice.
        load_segmenter(opts.tiling.tissue_method, opts.tissue_weights, str(resolve_device(opts.device)))
    found = find_slides(paths)
    if not found.slides:
        gone = f" ({len(found.missing)} do not exist, e.g. {found.missing[0]})" if found.missing else ""
        raise FsError(f"no slides under {', '.join(map(str, paths))}{gone}; pass slide files, folders holding them "
                      "or globs (see `fs extract --help` for the formats read)")
    in_process = not (workers or scheduler)
    if in_process:
        device = str(resolve_device(opts.device))
        # Missing weights fail even on a finished store: their hash is what "finished" is judged by.
        teacher_specs(opts, device)
    store = Store.open_or_create(store_path)
    report = ExtractReport(duplicates=found.duplicates, missing=found.missing)
    snapshot = store.snapshot()
    progress, cached = snapshot.progress(opts.tiling.id), snapshot.cached_pixels()
    jobs = [(sid, path, progress.get(sid), cached.get(sid, frozenset())) for sid, path in found.slides.items()]
    if in_process:
        needed = {m for _, _, done, _ in jobs for m in missing_models(opts, device, done)}
        # Built before the run is recorded, so a checkpoint that does not fit fails the command, not each slide.
        for name in opts.models:
            if name in needed:
                load_teacher(name, opts, device)
    run = Run(run_id=f"run-{time.time_ns()}-{os.getpid()}", command=command, versions=versions(*_VERSIONED),
              host=socket.gethostname(), started_at=utcnow())
    store.register(run)
    if on_start:
        on_start(len(jobs))
    if in_process:
        outcomes = (extract_slide(store, path, sid, opts, done, pixels) for sid, path, done, pixels in jobs)
    else:
        outcomes = _run_dask(jobs, store_path, opts, workers, scheduler)
    for outcome in outcomes:
        report.outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome)
    report.wall_seconds = time.perf_counter() - t0
    status = "failed" if report.failed else "ok"
    store.register(Run(run.run_id, command, run.versions, run.host, run.started_at, utcnow(), report.wall_seconds,
                       sum(o.device_seconds for o in report.outcomes), status))
    return report


@dataclass(frozen=True)
class PlannedSlide:
    path: str
    slide_id: str
    tiles: int
    mpp: float | None
    error: str = ""


def dry_run_counts(paths: list[str | Path], opts: ExtractOptions) -> list[PlannedSlide]:
    """What an extraction would do: slides and their tile counts, without loading any model."""
    plan = []
    for slide_id, path in find_slides(paths).slides.items():
        try:
            slide = describe_slide(path, slide_id, reader=opts.reader, assume_mpp=opts.assume_mpp)
            with open_slide(path, opts.reader) as reader:
                mask = tissue_mask(reader, opts.tiling, mpp=slide.mpp_x, weights=opts.tissue_weights)
                n = len(tile_grid(reader, opts.tiling, mask, mpp=slide.mpp_x))
            plan.append(PlannedSlide(str(path), slide_id, n, slide.mpp_x))
        except FsError as err:
            plan.append(PlannedSlide(str(path), slide_id, 0, None, str(err)))
    return plan


def _dask_task(path: str, slide_id: str, store_path: str, opts: ExtractOptions,
               done: frozenset[str] | None, pixels: frozenset[str]) -> SlideOutcome:
    """Run one slide on a Dask worker; with ``--device auto`` local worker ``i`` takes GPU ``i mod n``."""
    import dataclasses

    import torch
    from dask.distributed import get_worker

    name = get_worker().name
    if opts.device == "auto" and torch.cuda.is_available() and isinstance(name, int):
        opts = dataclasses.replace(opts, device=f"cuda:{name % torch.cuda.device_count()}")
    return extract_slide(Store.open(store_path), Path(path), slide_id, opts, done, pixels)


def _run_dask(jobs: list[tuple[str, Path, frozenset[str] | None, frozenset[str]]], store_path: Path,
              opts: ExtractOptions, workers: int,
              scheduler: str | None) -> Iterator[SlideOutcome]:
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None if scheduler else LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                  dashboard_address=None)
    client = Client(scheduler or cluster)
    try:
        futures = [client.submit(_dask_task, str(path), sid, str(Path(store_path).resolve()), opts, done, pixels,
                                 key=f"extract-{sid}", pure=False) for sid, path, done, pixels in jobs]
        for fut in as_completed(futures):
            yield fut.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
