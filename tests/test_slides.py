"""Slide readers, tissue detection and tiling.

One reader suite (``ReaderTests``) runs against both backends, on the real
Aperio slide and on a generated pyramidal TIFF, so OpenSlide and cuCIM are held
to the same contract: level-0 coordinates, exact fill outside the slide, batched
reads equal to single reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import featurestore.slides._cucim as cucim_backend
from featurestore.schemas.errors import MissingMppError, SlideError
from featurestore.schemas.records import TilingSpec
from featurestore.slides import (
    SlideGeometry,
    SlideReader,
    TissueMask,
    open_slide,
    otsu_threshold,
    qc_overlay,
    read_tiles,
    tile_grid,
    tissue_mask,
)
from tests.conftest import REAL_SLIDE

REPO = Path(__file__).resolve().parents[1]
FILL = (10, 200, 30)

# Synthetic slide: pink tissue disk (with a hole) and three specks on white, 0.5 µm/px.
PYR_SIZE = (2048, 1536)
PYR_MPP = 0.5
DISK = (1000, 760, 500)  # centre x, y and radius in level-0 px
HOLE = (900, 700, 60)
SPECKS = [(1800, 200), (200, 1300), (1750, 1400)]


@dataclass(frozen=True)
class SlideCase:
    path: Path
    dimensions: tuple[int, int]
    downsamples: tuple[float, ...]
    mpp: float
    vendor: str


def _disk(shape: tuple[int, int], cx: float, cy: float, r: float, scale: float = 1.0) -> np.ndarray:
    """Pixels whose centres (in level-0 units, ``scale`` px per pixel) lie inside the circle."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return ((xx + 0.5) * scale - cx) ** 2 + ((yy + 0.5) * scale - cy) ** 2 <= r * r


def write_pyramid(path: Path, image: np.ndarray, mpp: float | None, levels: int) -> Path:
    """A tiled JPEG pyramidal TIFF (levels by 2x area averaging) that both OpenSlide and cuCIM read."""
    with tifffile.TiffWriter(path) as tw:
        level = image
        for i in range(levels):
            kw = {}
            if mpp is not None:
                kw = {"resolution": (1e4 / (mpp * 2**i),) * 2, "resolutionunit": "CENTIMETER"}
            tw.write(level, tile=(256, 256), compression="jpeg", photometric="rgb",
                     subfiletype=0 if i == 0 else 1, **kw)
            h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
            level = level[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
    return path


@pytest.fixture(scope="session")
def pyramid(tmp_path_factory) -> SlideCase:
    w, h = PYR_SIZE
    rng = np.random.default_rng(0)
    image = np.full((h, w, 3), 250, dtype=np.uint8)
    tissue = _disk((h, w), *DISK) & ~_disk((h, w), *HOLE)
    for sx, sy in SPECKS:
        tissue |= _disk((h, w), sx, sy, 15)
    pink = np.array([220, 130, 190]) + rng.integers(-20, 20, (h, w, 3))
    image[tissue] = np.clip(pink[tissue], 0, 255)
    path = write_pyramid(tmp_path_factory.mktemp("pyr") / "pyramid.tif", image, PYR_MPP, 3)
    return SlideCase(path, PYR_SIZE, (1.0, 2.0, 4.0), PYR_MPP, "generic-tiff")


@pytest.fixture(scope="session")
def no_mpp_tiff(tmp_path_factory) -> Path:
    image = np.full((512, 512, 3), 240, dtype=np.uint8)
    return write_pyramid(tmp_path_factory.mktemp("nompp") / "nompp.tif", image, None, 1)


@pytest.fixture(scope="session")
def real() -> SlideCase:
    if not REAL_SLIDE.is_file():
        pytest.skip(f"real test slide not found at {REAL_SLIDE}")
    return SlideCase(REAL_SLIDE, (2220, 2967), (1.0,), 0.499, "aperio")


@pytest.fixture(params=["real", "pyramid"])
def case(request) -> SlideCase:
    return request.getfixturevalue(request.param)


class ReaderTests:
    """The reader contract; subclasses name the backend (as zarr's StoreTests do for stores)."""

    backend: str

    def open(self, path: Path) -> SlideReader:
        return open_slide(path, self.backend)

    def test_backend_and_geometry(self, case):
        with self.open(case.path) as r:
            assert r.backend == self.backend
            assert r.dimensions == case.dimensions == r.level_dimensions[0]
            assert r.level_count == len(case.downsamples)
            assert r.level_downsamples == pytest.approx(case.downsamples)
            assert r.mpp == pytest.approx((case.mpp, case.mpp))
            assert r.vendor == case.vendor

    def test_objective_power(self, real, pyramid):
        with self.open(real.path) as r:
            assert r.objective_power == 20.0
        with self.open(pyramid.path) as r:
            assert r.objective_power is None

    def test_mpp_none_when_absent(self, no_mpp_tiff):
        with self.open(no_mpp_tiff) as r:
            assert r.mpp is None
            assert r.vendor == "generic-tiff"

    def test_read_region_shape_and_dtype(self, case):
        with self.open(case.path) as r:
            for level in range(r.level_count):
                region = r.read_region((64, 32), level, (100, 60))
                assert region.shape == (60, 100, 3) and region.dtype == np.uint8
                assert region.flags.writeable

    def test_outside_is_fill_exactly(self, case):
        with self.open(case.path) as r:
            w, h = r.dimensions
            corner = r.read_region((w - 50, h - 30), 0, (100, 80), fill=FILL)
            assert (corner[30:] == FILL).all() and (corner[:, 50:] == FILL).all()
            np.testing.assert_array_equal(corner[:30, :50], r.read_region((w - 50, h - 30), 0, (50, 30)))
            origin = r.read_region((-20, -10), 0, (64, 48), fill=FILL)
            assert (origin[:10] == FILL).all() and (origin[:, :20] == FILL).all()
            np.testing.assert_array_equal(origin[10:, 20:], r.read_region((0, 0), 0, (44, 38)))
            assert (r.read_region((w + 10, 0), 0, (16, 16), fill=FILL) == FILL).all()

    def test_outside_is_fill_at_coarser_level(self, pyramid):
        with self.open(pyramid.path) as r:
            w, h = r.dimensions
            region = r.read_region((w - 100, h - 60), 1, (100, 80), fill=FILL)
            assert (region[30:] == FILL).all() and (region[:, 50:] == FILL).all()
            np.testing.assert_array_equal(region[:30, :50], r.read_region((w - 100, h - 60), 1, (50, 30)))

    def test_read_regions_equals_read_region(self, case):
        with self.open(case.path) as r:
            w, h = r.dimensions
            locations = [(0, 0), (300, 500), (w - 40, h - 40), (-16, 100), (1000, 900), (w + 5, 0)]
            for workers in (1, 2):
                batch = r.read_regions(locations, 0, (64, 48), fill=FILL, num_workers=workers)
                assert batch.shape == (len(locations), 48, 64, 3)
                for got, loc in zip(batch, locations, strict=True):
                    np.testing.assert_array_equal(got, r.read_region(loc, 0, (64, 48), fill=FILL))
            assert r.read_regions([], 0, (8, 8)).shape == (0, 8, 8, 3)

    def test_context_manager_closes(self, pyramid):
        with self.open(pyramid.path) as r:
            r.read_region((0, 0), 0, (8, 8))
        with pytest.raises(SlideError, match="closed"):
            r.read_region((0, 0), 0, (8, 8))
        r.close()

    def test_bad_reads_and_files(self, pyramid, tmp_path):
        with self.open(pyramid.path) as r:
            with pytest.raises(SlideError, match="level 3 does not exist"):
                r.read_region((0, 0), 3, (8, 8))
            with pytest.raises(SlideError, match="empty"):
                r.read_region((0, 0), 0, (0, 8))
        with pytest.raises(SlideError, match="no such file"):
            self.open(tmp_path / "missing.svs")
        junk = tmp_path / "junk.svs"
        junk.write_bytes(b"not a slide" * 100)
        with pytest.raises(SlideError, match="junk.svs"):
            self.open(junk)

    def test_tissue_fraction_of_real_slide(self, real):
        with self.open(real.path) as r:
            mask = tissue_mask(r, TilingSpec(target_mpp=0.5, tile_size=224))
        assert 0.25 < mask.fraction < 0.6  # measured 0.39: one strip of skin, white glass either side
        assert mask.mpp == pytest.approx(8.0, rel=0.01)

    def test_tissue_mask_finds_the_disk(self, pyramid):
        with self.open(pyramid.path) as r:
            mask = tissue_mask(r, TilingSpec(target_mpp=0.5, tile_size=224))
        assert mask.mask.shape == (96, 128) and mask.downsample == 16.0 and mask.mpp == 8.0
        expected = _disk(mask.mask.shape, *DISK, scale=mask.downsample)  # hole filled, specks removed
        iou = (mask.mask & expected).sum() / (mask.mask | expected).sum()
        assert iou > 0.9
        for sx, sy in SPECKS:
            assert not mask.mask[int(sy / 16), int(sx / 16)]
        assert mask.mask[int(HOLE[1] / 16), int(HOLE[0] / 16)]

    def test_read_tiles_and_qc_overlay(self, pyramid, tmp_path):
        spec = TilingSpec(target_mpp=1.0, tile_size=128, min_tissue=0.5)
        with self.open(pyramid.path) as r:
            mask = tissue_mask(r, spec)
            grid = tile_grid(r, spec, mask, mpp=PYR_MPP)
            assert (grid.level, grid.read_size, grid.footprint) == (1, 128, 256)
            assert 0 < len(grid) < 48 and (grid.tissue_fraction >= 0.5).all()
            idx = np.arange(len(grid))
            same = read_tiles(r, grid, idx, 128, num_workers=2)
            np.testing.assert_array_equal(same[0], r.read_region((grid.x[0], grid.y[0]), 1, (128, 128)))
            small = read_tiles(r, grid, idx[:3], 64)
            assert small.shape == (3, 64, 64, 3) and small.dtype == np.uint8
            assert np.abs(small.mean(axis=(1, 2)) - same[:3].mean(axis=(1, 2))).max() < 3
            out = qc_overlay(r, mask, grid, tmp_path / "qc.png")
        with Image.open(out) as png:
            assert png.format == "PNG" and max(png.size) <= 1024


class TestOpenSlideReader(ReaderTests):
    backend = "openslide"


class TestCuCIMReader(ReaderTests):
    backend = "cucim"


def test_backends_agree_on_real_slide(real):
    """Both decode with libjpeg-turbo here: measured max 0, mean 0.0 over these regions."""
    regions = [((0, 0), (256, 256)), ((500, 700), (512, 384)), ((1234, 567), (300, 300)),
               ((1900, 2700), (320, 267)), ((2000, 2800), (400, 300))]
    with open_slide(real.path, "openslide") as a, open_slide(real.path, "cucim") as b:
        for loc, size in regions:
            diff = np.abs(a.read_region(loc, 0, size).astype(int) - b.read_region(loc, 0, size).astype(int))
            assert diff.max() <= 16 and diff.mean() < 1.0, (loc, diff.max(), diff.mean())


def test_backends_agree_on_pyramid_levels(pyramid):
    with open_slide(pyramid.path, "openslide") as a, open_slide(pyramid.path, "cucim") as b:
        for level in range(3):
            x = a.read_region((512, 256), level, (200, 150), fill=FILL).astype(int)
            y = b.read_region((512, 256), level, (200, 150), fill=FILL).astype(int)
            assert np.abs(x - y).max() <= 16 and np.abs(x - y).mean() < 1.0


def test_auto_prefers_cucim_and_falls_back(pyramid, monkeypatch):
    with open_slide(pyramid.path) as r:
        assert r.backend == "cucim"

    def unusable() -> None:
        raise ImportError("no cucim here")

    monkeypatch.setattr(cucim_backend, "import_cuimage", unusable)
    with open_slide(pyramid.path) as r:
        assert r.backend == "openslide"
    with pytest.raises(SlideError, match="cuCIM is not usable"):
        open_slide(pyramid.path, "cucim")
    with pytest.raises(SlideError, match="unknown slide reader"):
        open_slide(pyramid.path, "bioformats")  # type: ignore[arg-type]


def test_cufile_config_is_shipped_and_respects_the_user(monkeypatch):
    config = json.loads(cucim_backend.CUFILE_CONFIG.read_text())
    assert config["properties"]["force_compat_mode"] is True
    monkeypatch.setenv("CUFILE_ENV_PATH_JSON", "/etc/my-cufile.json")
    cucim_backend.import_cuimage()
    assert os.environ["CUFILE_ENV_PATH_JSON"] == "/etc/my-cufile.json"
    monkeypatch.delenv("CUFILE_ENV_PATH_JSON")
    cucim_backend.import_cuimage()
    assert os.environ["CUFILE_ENV_PATH_JSON"] == str(cucim_backend.CUFILE_CONFIG)


@pytest.mark.slow
def test_cucim_after_torch_does_not_hang(real, tmp_path):
    """The import order that can hang in cuFile's driver start-up finishes, with our config in force."""
    code = textwrap.dedent(f"""
        import os, sys
        import torch
        from featurestore.slides import open_slide
        assert "cucim" not in sys.modules, "importing featurestore.slides must not import cucim"
        r = open_slide({str(real.path)!r}, "cucim")
        assert r.read_region((100, 100), 0, (64, 64)).shape == (64, 64, 3)
        print("CUFILE_ENV_PATH_JSON=" + os.environ.get("CUFILE_ENV_PATH_JSON", ""))
    """)
    env = {k: v for k, v in os.environ.items() if k != "CUFILE_ENV_PATH_JSON"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"CUFILE_ENV_PATH_JSON={cucim_backend.CUFILE_CONFIG}" in proc.stdout
    # Without the config, cuFile writes cufile.log into the working directory; ours sends it to /tmp.
    assert not (tmp_path / "cufile.log").exists()


def test_missing_mpp_needs_an_assumed_one(no_mpp_tiff):
    spec = TilingSpec(target_mpp=0.5, tile_size=224)
    with open_slide(no_mpp_tiff, "openslide") as r:
        with pytest.raises(MissingMppError, match="assume"):
            tissue_mask(r, spec)
        mask = tissue_mask(r, spec, mpp=0.5)
    assert mask.mask.shape == (32, 32) and not mask.mask.any()  # flat grey: below the saturation floor


def test_tissue_method_none_is_all_true(pyramid):
    with open_slide(pyramid.path, "openslide") as r:
        mask = tissue_mask(r, TilingSpec(target_mpp=0.5, tile_size=224, tissue_method="none"))
    assert mask.mask.shape == (96, 128) and mask.mask.all()
    with pytest.raises(ValueError, match="read-only"):
        mask.mask[0, 0] = False


def test_otsu_threshold_splits_two_modes():
    rng = np.random.default_rng(1)
    low, high = rng.normal(20, 5, 5000).astype(np.uint8), rng.normal(120, 10, 2000).astype(np.uint8)
    assert low.max() <= otsu_threshold(np.concatenate([low, high])) < high.min()


# Tiling, hand-computed: 0.5 µm/px, tiles of 100 px at 1.0 µm/px -> footprint 200 level-0 px.
NONE = {"tissue_method": "none", "target_mpp": 1.0, "tile_size": 100, "min_tissue": 0.0}


def test_grid_exact_fit():
    grid = tile_grid(SlideGeometry((1000, 800), (1.0, 4.0)), TilingSpec(**NONE, edge="drop"), None, mpp=0.5)
    assert len(grid) == 20 and grid.footprint == 200 and grid.stride == 200.0
    np.testing.assert_array_equal(grid.x, np.tile([0, 200, 400, 600, 800], 4))
    np.testing.assert_array_equal(grid.y, np.repeat([0, 200, 400, 600], 5))
    assert grid.x.dtype == np.int64 and grid.tissue_fraction.dtype == np.float32
    assert (grid.tissue_fraction == 1.0).all()
    assert (grid.level, grid.read_size, grid.downsample_to_target) == (0, 200, 2.0)
    coarse = tile_grid(SlideGeometry((1000, 800), (1.0, 2.0, 4.0)), TilingSpec(**NONE), None, mpp=0.5)
    assert (coarse.level, coarse.read_size, coarse.downsample_to_target) == (1, 100, 1.0)


def test_drop_and_pad_differ_only_at_edges():
    slide = SlideGeometry((1100, 850))
    drop = tile_grid(slide, TilingSpec(**NONE, edge="drop"), None, mpp=0.5)
    pad = tile_grid(slide, TilingSpec(**NONE, edge="pad"), None, mpp=0.5)
    assert (len(drop), len(pad)) == (20, 30)
    dropped = set(zip(drop.x.tolist(), drop.y.tolist(), strict=True))
    padded = set(zip(pad.x.tolist(), pad.y.tolist(), strict=True))
    assert dropped < padded
    assert all(x + 200 > 1100 or y + 200 > 850 for x, y in padded - dropped)
    assert all(x < 1100 and y < 850 for x, y in padded)


def test_overlap_shrinks_the_stride():
    grid = tile_grid(SlideGeometry((1000, 800)), TilingSpec(**NONE, overlap=50, edge="drop"), None, mpp=0.5)
    assert len(grid) == 9 * 7 and grid.stride == 100.0 and grid.footprint == 200
    np.testing.assert_array_equal(np.unique(grid.x), np.arange(0, 801, 100))


def test_fractional_stride_does_not_drift():
    spec = TilingSpec(target_mpp=0.5, tile_size=224, tissue_method="none", edge="drop")
    grid = tile_grid(SlideGeometry((20000, 400)), spec, None, mpp=0.3)
    xs = np.unique(grid.x)
    origins = np.floor(np.arange(len(xs) + 1) * 224 * 0.5 / 0.3 + 0.5)
    np.testing.assert_array_equal(xs, origins[:-1])
    assert xs[-1] + grid.footprint <= 20000 < origins[-1] + grid.footprint


def test_tissue_fraction_from_mask():
    left = np.zeros((85, 110), dtype=bool)  # 10 level-0 px per mask px on a 1100 x 850 slide
    left[:, :50] = True
    mask = TissueMask(left, mpp=5.0, downsample=10.0)
    spec = TilingSpec(target_mpp=1.0, tile_size=100, min_tissue=0.0)
    grid = tile_grid(SlideGeometry((1100, 850)), spec, mask, mpp=0.5)
    top = grid.y == 0
    by_x = dict(zip(grid.x[top].tolist(), grid.tissue_fraction[top].tolist(), strict=True))
    assert by_x == {0: 1.0, 200: 1.0, 400: 0.5, 600: 0.0, 800: 0.0, 1000: 0.0}
    full = TissueMask(np.ones((85, 110), dtype=bool), mpp=5.0, downsample=10.0)
    edge = tile_grid(SlideGeometry((1100, 850)), spec, full, mpp=0.5)
    corner = edge.tissue_fraction[(edge.x == 1000) & (edge.y == 800)]
    assert corner == pytest.approx([0.5 * 0.25])  # beyond the slide counts as background
    half = TilingSpec(**{**NONE, "tissue_method": "otsu", "min_tissue": 0.5})
    kept = tile_grid(SlideGeometry((1100, 850)), half, mask, mpp=0.5)
    assert set(kept.x.tolist()) == {0, 200, 400}
    with pytest.raises(ValueError, match="tissue mask"):
        tile_grid(SlideGeometry((1100, 850)), spec, None, mpp=0.5)


def test_coarsen_and_with_coordinates():
    grid = tile_grid(SlideGeometry((1000, 800)), TilingSpec(**NONE, edge="drop"), None, mpp=0.5)
    coarse = grid.coarsen(2)
    np.testing.assert_array_equal(coarse.x, [0, 400, 800, 0, 400, 800])
    np.testing.assert_array_equal(coarse.y, [0, 0, 0, 400, 400, 400])
    np.testing.assert_allclose(coarse.tissue_fraction, [1, 1, 0.5, 1, 1, 0.5])
    assert (coarse.footprint, coarse.read_size, coarse.stride) == (400, 400, 400.0)
    moved = grid.with_coordinates(np.array([200]), np.array([400]))
    assert len(moved) == 1 and moved.read_size == grid.read_size and np.isnan(moved.tissue_fraction).all()
