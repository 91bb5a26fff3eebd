"""Every format a lab has, end to end: content sniffing, the DICOM backends against each other,
JPEG and series-level variants, unit handling, discovery of series folders, refusals of broken
files (one line naming the reader), and ``fs extract`` on a folder holding good and broken slides.

Files come from ``tests/slide_formats.py``: real pixels written by each format's own writer.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from featurestore.cli.main import app
from featurestore.pipelines.discover import find_slides, fingerprint, slide_bytes
from featurestore.pipelines.register import describe_slide
from featurestore.schemas import MissingMppError, SlideError
from featurestore.slides import detect_format, open_slide
from featurestore.slides._czi import _metadata
from featurestore.store import Store
from tests.slide_formats import REAL_MPP, halve, pyramid_levels, write_czi, write_ome_tiff

pytest_plugins = ("tests.slide_formats",)

REPO = Path(__file__).resolve().parents[1]


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean absolute difference over all samples, and the fraction of pixels identical in all three channels."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return float(diff.mean()), float((diff.max(axis=-1) == 0).mean())


# Content, not names ---------------------------------------------------------------------------------


def test_auto_picks_by_content_not_extension(tmp_path, dicom_real, czi_real, ome_real, png_real, jpeg_real, pyramid):
    disguised = {
        "czi.svs": (czi_real.path, "czi", "pylibczirw"),
        "ome.czi": (ome_real.path, "ome-tiff", "tifffile"),
        "png.tif": (png_real.path, "image", "pillow"),
        "jpeg.png": (jpeg_real.path, "image", "pillow"),
        "tiff.ome.tif": (pyramid.path, "tiff", "cucim"),
    }
    for name, (source, fmt, backend) in disguised.items():
        shutil.copy(source, tmp_path / name)
        assert detect_format(tmp_path / name) == fmt, name
        with open_slide(tmp_path / name) as r:
            assert r.backend == backend, name
    series = tmp_path / "series"
    shutil.copytree(dicom_real.path, series)
    for i, f in enumerate(sorted(series.iterdir())):
        f.rename(series / f"instance{i}")  # PACS exports name files by UID, with no extension
    assert detect_format(series) == "dicom"
    assert detect_format(series / "instance0") == "dicom"
    with open_slide(series) as r, open_slide(series / "instance1") as one:
        assert r.backend == one.backend == "wsidicom"
        assert r.level_dimensions == one.level_dimensions == ((1280, 1024), (640, 512))


def test_lazy_imports():
    """Importing the slides package loads no backend library; the first open of a format loads its own only."""
    code = (
        "import sys\n"
        "import featurestore.slides as s\n"
        "heavy = ('openslide', 'cucim', 'wsidicom', 'pydicom', 'pylibCZIrw', 'tifffile', 'zarr')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "s.open_slide(sys.argv[1]).close()\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    png = REPO / "tests" / "_lazy.png"
    Image.new("RGB", (32, 32), "white").save(png)
    try:
        out = subprocess.run([sys.executable, "-c", code, str(png)], capture_output=True, text=True, check=True,
                             cwd=REPO).stdout.splitlines()
    finally:
        png.unlink()
    assert out == ["[]", "[]"]


# DICOM: two backends, one series ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["dicom_real", "dicom_pyramid"])
def test_dicom_backends_agree(request, which):
    """wsidicom and OpenSlide on the same series, every level read whole.

    Measured here (libjpeg-turbo in both): JPEG series and uncompressed series alike, mean absolute
    difference 0.0 and 100% identical pixels at every level.
    """
    case = request.getfixturevalue(which)
    with open_slide(case.path, "wsidicom") as a, open_slide(case.path, "openslide") as b:
        assert a.level_dimensions == b.level_dimensions and a.level_downsamples == pytest.approx(b.level_downsamples)
        assert a.mpp == pytest.approx(b.mpp)
        for level, size in enumerate(a.level_dimensions):
            mean, same = agreement(a.read_region((0, 0), level, size), b.read_region((0, 0), level, size))
            assert mean <= 0.01 and same >= 0.99, (which, level, mean, same)
        corner = (a.dimensions[0] - 40, a.dimensions[1] - 40)
        np.testing.assert_array_equal(a.read_region(corner, 0, (100, 100), fill=(1, 2, 3)),
                                      b.read_region(corner, 0, (100, 100), fill=(1, 2, 3)))


def test_dicom_objective_power_is_read_by_wsidicom(dicom_real):
    with open_slide(dicom_real.path, "wsidicom") as r:
        assert r.objective_power == 20.0


# Variants of the other formats -------------------------------------------------------------------


def test_jpeg_image_matches_the_source_within_jpeg_error(jpeg_real):
    """Pillow's quality 95 (4:2:0 chroma): measured mean absolute error 3.74 against the source crop."""
    with open_slide(jpeg_real.path) as r:
        assert (r.backend, r.vendor, r.mpp, r.level_count) == ("pillow", "jpeg", None, 1)
        got = r.read_region((0, 0), 0, r.dimensions)
    mean, _ = agreement(got, jpeg_real.source)
    assert mean <= jpeg_real.jpeg_error, mean


def test_ome_tiff_levels_stored_as_series(tmp_path, real_crop):
    """A pyramid stored as further OME images (no SubIFDs) reads as levels; each level is the written one."""
    levels = pyramid_levels(real_crop, 3)
    path = write_ome_tiff(tmp_path / "series.ome.tif", levels, REAL_MPP, subifds=False)
    with open_slide(path) as r:
        assert r.backend == "tifffile" and r.level_count == 3
        assert r.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert r.mpp == pytest.approx((REAL_MPP, REAL_MPP))
        np.testing.assert_array_equal(r.read_region((0, 0), 1, r.level_dimensions[1]), halve(real_crop))
        np.testing.assert_array_equal(r.read_region((0, 0), 2, r.level_dimensions[2]), levels[2])


def test_ome_tiff_planar_rgb(tmp_path, real_crop):
    """Some writers store RGB as one plane per sample (axes SYX); it reads as the same interleaved pixels."""
    crop = real_crop[:512, :640]
    path = tmp_path / "planar.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(np.moveaxis(crop, -1, 0), photometric="rgb", planarconfig="separate", tile=(256, 256),
                 compression="zlib", metadata={"axes": "SYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
    with open_slide(path) as r:
        assert (r.backend, r.dimensions, r.mpp) == ("tifffile", (640, 512), (0.25, 0.25))
        np.testing.assert_array_equal(r.read_region((0, 0), 0, r.dimensions), crop)


def test_czi_scale_in_metres_as_zen_writes_it(tmp_path, real_crop):
    """The CZI format stores metres; pylibCZIrw's writer stores whatever it is given (its docs say µm)."""
    path = write_czi(tmp_path / "metres.czi", real_crop[:512, :512], REAL_MPP * 1e-6)
    with open_slide(path) as r:
        assert r.mpp == pytest.approx((REAL_MPP, REAL_MPP))
    zen = ("<ImageDocument><Metadata><Scaling><Items><Distance Id='X'><Value>2.2E-07</Value></Distance>"
           "<Distance Id='Y'><Value>2.2E-07</Value></Distance></Items></Scaling><Information><Instrument>"
           "<Objectives><Objective><NominalMagnification>40</NominalMagnification></Objective></Objectives>"
           "</Instrument></Information></Metadata></ImageDocument>")
    assert _metadata(zen) == (pytest.approx((0.22, 0.22)), 40.0)


# Discovery ---------------------------------------------------------------------------------------------


def test_a_series_folder_is_one_slide(tmp_path, dicom_real, dicom_pyramid, czi_real):
    cohort = tmp_path / "cohort"
    shutil.copytree(dicom_real.path, cohort / "patient1" / "series")
    shutil.copytree(dicom_pyramid.path, cohort / "patient2")
    for i, f in enumerate(sorted((cohort / "patient2").iterdir())):
        f.rename(f.with_name(f"1.2.826.0.1.{i}"))  # named by UID, as PACS exports do: found by the DICM preamble
    shutil.copy(czi_real.path, cohort / "slide.czi")
    (cohort / "notes.txt").write_text("not a slide")
    found = find_slides([cohort])
    assert sorted(found.slides.values()) == [cohort / "patient1" / "series", cohort / "patient2",
                                             cohort / "slide.czi"]
    series = cohort / "patient1" / "series"
    assert fingerprint(series) == fingerprint(dicom_real.path)  # names and place do not matter
    assert slide_bytes(series) == sum(f.stat().st_size for f in series.iterdir())
    one_file = next(series.iterdir())
    again = find_slides([one_file, cohort / "patient2"])
    assert list(again.slides.values()) == [series, cohort / "patient2"]
    slide = describe_slide(series, fingerprint(series))
    assert (slide.vendor, slide.width, slide.height, slide.level_count) == ("dicom", 1280, 1024, 2)
    assert slide.objective_power == 20.0 and slide.bytes == slide_bytes(series)


# Broken files ------------------------------------------------------------------------------------------


def _truncate(path: Path, keep: float = 0.4) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def broken(tmp_path, dicom_pyramid, czi_real, ome_real, png_real) -> dict[str, Path]:
    """Files that claim a format by content but are not a readable slide."""
    dicom = tmp_path / "dicom"
    shutil.copytree(dicom_pyramid.path, dicom)
    for f in dicom.iterdir():
        _truncate(f, 0.05)  # header, then a few frames of each level
    out = {"dicom": dicom}
    for name, source in (("czi", czi_real.path), ("png", png_real.path)):
        out[name] = tmp_path / source.name
        shutil.copy(source, out[name])
        _truncate(out[name])
    # tifffile writes the OME-XML last, so a truncated OME-TIFF is a plain TIFF by content (and cuCIM's to
    # refuse); garbage over the tile data keeps the OME-XML and breaks the tiles.
    out["ome-tiff"] = tmp_path / ome_real.path.name
    data = bytearray(ome_real.path.read_bytes())
    start, stop = len(data) // 8, len(data) // 2
    data[start:stop] = np.random.default_rng(0).integers(0, 256, stop - start, dtype=np.uint8).tobytes()
    out["ome-tiff"].write_bytes(bytes(data))
    out["not-wsi"] = tmp_path / "report.dcm"
    out["not-wsi"].write_bytes(bytes(128) + b"DICM" + b"a DICOM preamble, then no dataset" * 20)
    out["wrong"] = tmp_path / "wrong.czi"
    out["wrong"].write_bytes(b"ZISRAWFILE" + bytes(6) + b"this is not a CZI segment" * 40)
    return out


@pytest.mark.parametrize(("which", "names"), [
    ("dicom", ["wsidicom"]), ("not-wsi", ["wsidicom", "openslide"]), ("czi", ["pylibczirw"]),
    ("ome-tiff", ["tifffile"]), ("png", ["pillow"]), ("wrong", ["pylibczirw"]),
])
def test_broken_files_are_one_line_naming_the_reader(broken, which, names):
    """Opening or reading fails with a SlideError: one line, the file, the reader that refused it and why
    (each reader, when the format has a fallback and it refused too)."""
    path = broken[which]
    with pytest.raises(SlideError) as info, open_slide(path) as r:
        r.read_region((0, 0), 0, r.dimensions)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and all(n in message for n in names), message


def test_plain_image_needs_assume_mpp(png_real):
    with pytest.raises(MissingMppError) as info:
        describe_slide(png_real.path, "0" * 32)
    message = str(info.value)
    assert message.startswith(f"{png_real.path}: a plain PNG image has no µm/px") and "--assume-mpp" in message
    assert "\n" not in message
    slide = describe_slide(png_real.path, "0" * 32, assume_mpp=0.5)
    assert slide.mpp_assumed and slide.mpp_x == 0.5 and slide.vendor == "png"


def test_fs_extract_records_broken_files_and_finishes_the_rest(tmp_path, dicom_real, czi_real, broken):
    folder = tmp_path / "batch"
    shutil.copytree(dicom_real.path, folder / "good-dicom")
    shutil.copy(czi_real.path, folder / "good.czi")
    shutil.copytree(broken["dicom"], folder / "broken-dicom")
    shutil.copy(broken["czi"], folder / "broken.czi")
    store = tmp_path / "store"
    args = ["extract", str(folder), "-s", str(store), "-m", "test/tiny-cnn", "--device", "cpu", "--tile-size", "64",
            "--batch-size", "32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    s = Store.open(store, read_only=True)
    assert sorted(Path(x.path).name for x in s.slides()) == ["good-dicom", "good.czi"]
    failures = {Path(f.slide_path).name: f.message for f in s.failures()}
    assert set(failures) == {"broken-dicom", "broken.czi"}
    assert "wsidicom" in failures["broken-dicom"] and "pylibczirw" in failures["broken.czi"]
    assert all("\n" not in m for m in failures.values())
