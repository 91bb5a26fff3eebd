"""Slide readers, tissue detection and tiling.

One reader suite (``ReaderTests``) runs against every backend, each on real and
synthetic slides in its own format (written by ``tests/slide_formats.py``), so every
reader is held to the same contract: level-0 coordinates, exact fill outside the
slide, batched reads equal to single reads, the tissue a slide shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

import featurestore.slides._cucim as cucim_backend
from featurestore.schemas.errors import MissingMppError, SlideError
from featurestore.schemas.records import TilingSpec
from featurestore.slides import (
    SlideGeometry,
    SlideReader,
    TissueMask,
    best_level,
    open_slide,
    otsu_threshold,
    qc_overlay,
    read_tiles,
    tile_grid,
    tissue_mask,
)
from tests.slide_formats import DISK, HOLE, PYR_MPP, REAL_MPP, SPECKS, SlideCase, disk

pytest_plugins = ("tests.slide_formats",)

REPO = Path(__file__).resolve().parents[1]
FILL = (10, 200, 30)

FORMATS: dict[str, tuple[str, str, str | None]] = {
    "tiff": ("real", "pyramid", "no_mpp_tiff"),
    "dicom": ("dicom_real", "dicom_pyramid", None),  # a DICOM WSI volume must state its pixel spacing
    "czi": ("czi_real", "czi_pyramid", "czi_no_mpp"),
    "ome-tiff": ("ome_real", "ome_pyramid", "ome_no_mpp"),
    "png": ("png_real", "png_pyramid", "png_no_mpp"),
}
"""Fixtures giving each format's real-slide case, synthetic-pyramid case and a file without µm/px."""


class ReaderTests:
    """The reader contract; subclasses name the backend and the format it reads (as zarr's StoreTests do)."""

    backend: ClassVar[str]
    fmt: ClassVar[str] = "tiff"

    @pytest.fixture
    def real_case(self, request) -> SlideCase:
        return request.getfixturevalue(FORMATS[self.fmt][0])

    @pytest.fixture
    def pyramid_case(self, request) -> SlideCase:
        return request.getfixturevalue(FORMATS[self.fmt][1])

    @pytest.fixture
    def no_mpp_path(self, request) -> Path:
        name = FORMATS[self.fmt][2]
        if name is None:
            pytest.skip(f"{self.fmt} files always state µm/px")
        return request.getfixturevalue(name)

    @pytest.fixture(params=["real_case", "pyramid_case"])
    def case(self, request) -> SlideCase:
        return request.getfixturevalue(request.param)

    def open(self, path: Path) -> SlideReader:
        return open_slide(path, self.backend)

    def test_backend_and_geometry(self, case):
        with self.open(case.path) as r:
            assert r.backend == self.backend
            assert r.dimensions == case.dimensions == r.level_dimensions[0]
            assert r.level_count == len(case.downsamples)
            assert r.level_downsamples == pytest.approx(case.downsamples, rel=1e-3)
            assert r.mpp == (None if case.mpp is None else pytest.approx((case.mpp, case.mpp)))
            assert r.vendor == case.vendor

    def test_objective_power(self, real_case, pyramid_case):
        with self.open(real_case.path) as r:
            assert r.objective_power == real_case.objective
        with self.open(pyramid_case.path) as r:
            assert r.objective_power is None

    def test_mpp_none_when_absent(self, no_mpp_path):
        with self.open(no_mpp_path) as r:
            assert r.mpp is None

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

    def test_outside_is_fill_at_coarser_level(self, pyramid_case):
        with self.open(pyramid_case.path) as r:
            if r.level_count == 1:
                pytest.skip("one level only")
            w, h = r.dimensions
            d = r.level_downsamples[1]
            loc = (w - round(50 * d), h - round(30 * d))
            region = r.read_region(loc, 1, (100, 80), fill=FILL)
            lw, lh = r.level_dimensions[1]
            inside = (lw - loc[0] // d, lh - loc[1] // d)
            assert 0 < inside[0] < 100 and 0 < inside[1] < 80
            cols, rows = int(inside[0]), int(inside[1])
            assert (region[rows:] == FILL).all() and (region[:, cols:] == FILL).all()
            np.testing.assert_array_equal(region[:rows, :cols], r.read_region(loc, 1, (cols, rows)))

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

    def test_level_zero_matches_the_source(self, case):
        """Lossless writers give the source back exactly; JPEG-compressed files within their stated error."""
        if case.source is None:
            pytest.skip("the native slide is the source")
        with self.open(case.path) as r:
            got = r.read_region((0, 0), 0, r.dimensions).astype(int)
        diff = np.abs(got - case.source)
        if case.jpeg_error is None:
            assert diff.max() == 0, (case.path, diff.mean(), diff.max())
        else:
            assert diff.mean() <= case.jpeg_error, (case.path, diff.mean(), diff.max())

    def test_context_manager_closes(self, pyramid_case):
        with self.open(pyramid_case.path) as r:
            r.read_region((0, 0), 0, (8, 8))
        with pytest.raises(SlideError, match="closed"):
            r.read_region((0, 0), 0, (8, 8))
        r.close()

    def test_bad_reads_and_files(self, pyramid_case, tmp_path):
        with self.open(pyramid_case.path) as r:
            n = r.level_count
            with pytest.raises(SlideError, match=f"level {n} does not exist"):
                r.read_region((0, 0), n, (8, 8))
            with pytest.raises(SlideError, match="empty"):
                r.read_region((0, 0), 0, (0, 8))
        with pytest.raises(SlideError, match="no such file"):
            self.open(tmp_path / "missing.svs")
        junk = tmp_path / "junk.svs"
        junk.write_bytes(b"not a slide" * 100)
        with pytest.raises(SlideError, match=f"junk.svs: {self.backend} cannot read it"):
            self.open(junk)

    def test_tissue_fraction_of_real_slide(self, real_case):
        with self.open(real_case.path) as r:
            mask = tissue_mask(r, TilingSpec(target_mpp=0.5, tile_size=224), mpp=real_case.mpp or REAL_MPP)
        assert mask.fraction == pytest.approx(real_case.tissue, abs=0.03)
        assert mask.mpp == pytest.approx(8.0, rel=0.01)

    def test_tissue_mask_finds_thedisk(self, pyramid_case):
        with self.open(pyramid_case.path) as r:
            mask = tissue_mask(r, TilingSpec(target_mpp=0.5, tile_size=224), mpp=PYR_MPP)
        assert mask.mask.shape == (96, 128) and mask.downsample == 16.0 and mask.mpp == 8.0
        expected = disk(mask.mask.shape, *DISK, scale=mask.downsample)  # hole filled, specks removed
        iou = (mask.mask & expected).sum() / (mask.mask | expected).sum()
        assert iou > 0.9
        for sx, sy in SPECKS:
            assert not mask.mask[int(sy / 16), int(sx / 16)]
        assert mask.mask[int(HOLE[1] / 16), int(HOLE[0] / 16)]

    def test_read_tiles_and_qc_overlay(self, pyramid_case, tmp_path):
        spec = TilingSpec(target_mpp=1.0, tile_size=128, min_tissue=0.5)
        with self.open(pyramid_case.path) as r:
            mask = tissue_mask(r, spec, mpp=PYR_MPP)
            grid = tile_grid(r, spec, mask, mpp=PYR_MPP)
            level = best_level(pyramid_case.downsamples, 2.0)
            read_size = round(256 / pyramid_case.downsamples[level])
            assert (grid.level, grid.read_size, grid.footprint) == (level, read_size, 256)
            assert 0 < len(grid) < 48 and (grid.tissue_fraction >= 0.5).all()
            idx = np.arange(len(grid))
            same = read_tiles(r, grid, idx, read_size, num_workers=2)
            np.testing.assert_array_equal(same[0], r.read_region((grid.x[0], grid.y[0]), level,
                                                                 (read_size, read_size)))
            small = read_tiles(r, grid, idx[:3], 64)
            assert small.shape == (3, 64, 64, 3) and small.dtype == np.uint8
            reference = read_tiles(r, grid, idx[:3], 128)
            assert np.abs(small.mean(axis=(1, 2)) - reference.mean(axis=(1, 2))).max() < 3
            out = qc_overlay(r, mask, grid, tmp_path / "qc.png")
        with Image.open(out) as png:
            assert png.format == "PNG" and max(png.size) <= 1024


class TestOpenSlideReader(ReaderTests):
    backend = "openslide"


class TestCuCIMReader(ReaderTests):
    backend = "cucim"


class TestWsiDicomReader(ReaderTests):
    backend = "wsidicom"
    fmt = "dicom"


class TestOpenSlideDicomReader(ReaderTests):
    backend = "openslide"
    fmt = "dicom"


class TestCziReader(ReaderTests):
    backend = "pylibczirw"
    fmt = "czi"


class TestOmeTiffReader(ReaderTests):
    backend = "tifffile"
    fmt = "ome-tiff"


class TestImageReader(ReaderTests):
    backend = "pillow"
    fmt = "png"


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
