"""Slides in every format we read, written from real pixels by each format's own writer.

A pytest plugin (``pytest_plugins = ("tests.slide_formats",)``) so ``test_slides.py`` and
``test_formats.py`` share one set of session fixtures, each file written once per run.

Sources: a 1280 x 1024 crop of the real Aperio slide (tissue and glass) and the synthetic
pyramid of ``test_slides`` (its level 0, downsampled 2x per level by area averaging).
Writers: wsidicom's own ``WsiDicom.save`` for DICOM (fed by a small ``Source`` over the
arrays, the extension point wsidicom documents for other formats; ``wsidicomizer`` pins
an older wsidicom); pylibCZIrw's ``create_czi`` for CZI; tifffile with OME metadata for
OME-TIFF; Pillow for PNG and JPEG.

PYTEST_DONT_REWRITE: it holds no asserts, and test modules import it before pytest loads it as a plugin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.conftest import REAL_SLIDE

REAL_MPP = 0.499
CROP = (400, 1000, 1280, 1024)
"""x, y, width, height of the crop in the real slide's level 0: skin on the right, glass on the left."""
REAL_TISSUE = 0.62
"""Tissue fraction of the crop at 8 µm/px: every format measured 0.621-0.623."""
TILE = 256


# Synthetic slide: pink tissue disk (with a hole) and three specks on white, 0.5 µm/px.
PYR_SIZE = (2048, 1536)
PYR_MPP = 0.5
DISK = (1000, 760, 500)  # centre x, y and radius in level-0 px
HOLE = (900, 700, 60)
SPECKS = [(1800, 200), (200, 1300), (1750, 1400)]


@dataclass(frozen=True)
class SlideCase:
    """A slide file (or DICOM series folder) and what its reader must report."""

    path: Path
    dimensions: tuple[int, int]
    downsamples: tuple[float, ...]
    mpp: float | None
    vendor: str
    objective: float | None = None
    tissue: float | None = None
    """Tissue fraction at 8 µm/px (``tissue_mask`` with the default spec)."""
    source: np.ndarray | None = None
    """Level-0 pixels the file was written from, for pixel comparisons."""
    jpeg_error: float | None = None
    """Mean absolute error allowed against ``source`` where the writer re-encoded with JPEG; None: lossless."""


def disk(shape: tuple[int, int], cx: float, cy: float, r: float, scale: float = 1.0) -> np.ndarray:
    """Pixels whose centres (in level-0 units, ``scale`` px per pixel) lie inside the circle."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return ((xx + 0.5) * scale - cx) ** 2 + ((yy + 0.5) * scale - cy) ** 2 <= r * r


def write_pyramid(path: Path, image: np.ndarray, mpp: float | None, levels: int) -> Path:
    """A tiled JPEG pyramidal TIFF (levels by 2x area averaging) that both OpenSlide and cuCIM read."""
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(pyramid_levels(image, levels)):
            kw = {}
            if mpp is not None:
                kw = {"resolution": (1e4 / (mpp * 2**i),) * 2, "resolutionunit": "CENTIMETER"}
            tw.write(level, tile=(TILE, TILE), compression="jpeg", photometric="rgb",
                     subfiletype=0 if i == 0 else 1, **kw)
    return path


def halve(image: np.ndarray) -> np.ndarray:
    """2x downsample by area averaging (odd edges dropped), the pyramid rule of every writer here."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    return image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)


def pyramid_levels(image: np.ndarray, count: int) -> list[np.ndarray]:
    levels = [image]
    for _ in range(count - 1):
        levels.append(halve(levels[-1]))
    return levels


# DICOM ------------------------------------------------------------------------------------------


def write_dicom(folder: Path, levels: list[np.ndarray], mpp: float | None, *, jpeg: bool,
                objective: float | None = None) -> Path:
    """A DICOM WSI series (one instance file per level) written by ``wsidicom.WsiDicom.save``.

    ``jpeg`` picks JPEG baseline (quality 95, 4:2:0 as scanners write it); else uncompressed, which is lossless.
    """
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from wsidicom import WsiDicom
    from wsidicom.codec import Encoder, JpegSettings, Subsampling
    from wsidicom.geometry import Size, SizeMm
    from wsidicom.instance import ImageData, WsiInstance
    from wsidicom.metadata import (
        Equipment,
        ImageType,
        Label,
        Objectives,
        OpticalPath,
        Patient,
        Pyramid,
        Series,
        Slide,
        SlideSample,
        Study,
        WsiMetadata,
    )
    from wsidicom.metadata import Image as ImageMetadata
    from wsidicom.metadata.schema.dicom import WsiMetadataDicomSchema
    from wsidicom.source import Source

    encoder = (Encoder.create_for_settings(JpegSettings(quality=95, subsampling=Subsampling.R420)) if jpeg
               else Encoder.create(ExplicitVRLittleEndian, 8, "RGB"))

    class ArrayTiles(ImageData):
        """One level held in memory, cut into white-padded tiles."""

        def __init__(self, pixels: np.ndarray, mpp: float | None) -> None:
            super().__init__(encoder)
            self._pixels, self._mpp = pixels, mpp

        transfer_syntax = property(lambda self: self.encoder.transfer_syntax)
        image_size = property(lambda self: Size(self._pixels.shape[1], self._pixels.shape[0]))
        tile_size = property(lambda self: Size(TILE, TILE))
        pixel_spacing = property(lambda self: SizeMm(self._mpp / 1000, self._mpp / 1000) if self._mpp else None)
        imaged_size = property(lambda self: None)
        samples_per_pixel = property(lambda self: 3)
        photometric_interpretation = property(lambda self: self.encoder.photometric_interpretation)
        bits = property(lambda self: 8)
        image_coordinate_system = property(lambda self: None)
        thread_safe = property(lambda self: True)
        lossy_compression = property(lambda self: None)
        transcoder = property(lambda self: None)

        def get_decoded_tile(self, tile: Any, z: float, path: str, cache: bool = True) -> np.ndarray:
            out = np.full((TILE, TILE, 3), 255, np.uint8)
            crop = self._pixels[tile.y * TILE:(tile.y + 1) * TILE, tile.x * TILE:(tile.x + 1) * TILE]
            out[:crop.shape[0], :crop.shape[1]] = crop
            return out

        def get_encoded_tile(self, tile: Any, z: float, path: str) -> bytes:
            return self.encoder.encode(self.get_decoded_tile(tile, z, path))

    optical = OpticalPath(identifier="0", objective=Objectives(objective_power=objective) if objective else None)
    metadata = WsiMetadata(
        study=Study(uid=generate_uid()), series=Series(uid=generate_uid(), number=1), patient=Patient(),
        equipment=Equipment(), slide=Slide(samples=[SlideSample(identifier="s", uid=generate_uid())]),
        pyramid=Pyramid(image=ImageMetadata(), optical_paths=[optical], uid=generate_uid()), label=Label(),
        frame_of_reference_uid=generate_uid(), dimension_organization_uids=[generate_uid()])

    class ArraySource(Source):
        def __init__(self) -> None:
            super().__init__()
            # Each instance gets its own dataset: building one fills in its SOP instance UID.
            dump = WsiMetadataDicomSchema().dump
            self._levels = [WsiInstance.create_instance(ArrayTiles(a, mpp * 2**i if mpp else None),
                                                        dump(metadata, ImageType.VOLUME, False), ImageType.VOLUME, 0)
                            for i, a in enumerate(levels)]

        base_dataset = property(lambda self: self._levels[0].dataset)
        level_instances = property(lambda self: self._levels)
        label_instances = overview_instances = thumbnail_instances = annotation_instances = property(
            lambda self: [])

        def close(self) -> None:
            pass

    folder.mkdir(parents=True, exist_ok=True)
    with WsiDicom(ArraySource()) as wsi:
        wsi.save(folder)
    return folder


# CZI --------------------------------------------------------------------------------------------


def write_czi(path: Path, image: np.ndarray, mpp: float | None) -> Path:
    """A CZI written by pylibCZIrw in 512-px subblocks, zstd (lossless); ``scale_x`` in µm as its docs say."""
    from pylibCZIrw import czi as pyczi

    with pyczi.create_czi(str(path), exist_ok=True, compression_options="zstd0:ExplicitLevel=1") as czi:
        for y in range(0, image.shape[0], 512):
            for x in range(0, image.shape[1], 512):
                czi.write(np.ascontiguousarray(image[y:y + 512, x:x + 512, ::-1]), location=(x, y))  # Bgr24
        czi.write_metadata(document_name=path.stem, scale_x=mpp or 0.0, scale_y=mpp or 0.0)
    return path


# OME-TIFF ---------------------------------------------------------------------------------------


def write_ome_tiff(path: Path, levels: list[np.ndarray], mpp: float | None, *, subifds: bool = True,
                   unit: str = "µm", objective: float | None = None, compression: str = "zlib") -> Path:
    """An OME-TIFF written by tifffile: levels as SubIFDs of the full image, or as further OME images.

    ``mpp`` is written in ``unit`` (µm or nm), so the reader's unit handling is exercised. An objective is
    added to the OME-XML afterwards with ``tifffile.tiffcomment`` (tifffile's writer has no Instrument).
    """
    scale = {"µm": 1.0, "nm": 1000.0}[unit]
    with tifffile.TiffWriter(path, bigtiff=False, ome=True) as tw:
        for i, level in enumerate(levels):
            md: dict[str, Any] = {"axes": "YXS", "Name": "slide" if i == 0 or subifds else f"slide level {i}"}
            if mpp is not None:
                size = mpp * 2**i * scale
                md |= {"PhysicalSizeX": size, "PhysicalSizeY": size, "PhysicalSizeXUnit": unit,
                       "PhysicalSizeYUnit": unit}
            kw = {"tile": (TILE, TILE), "compression": compression, "photometric": "rgb"}
            if not subifds:
                tw.write(level, metadata=md, **kw)
            elif i == 0:
                tw.write(level, subifds=len(levels) - 1, metadata=md, **kw)
            else:
                tw.write(level, subfiletype=1, metadata=None, **kw)
    if objective is not None:
        xml = tifffile.tiffcomment(path)
        instrument = (f'<Instrument ID="Instrument:0"><Objective ID="Objective:0" '
                      f'NominalMagnification="{objective}"/></Instrument>')
        xml = re.sub(r"(<OME[^>]*>)", r"\1" + instrument, xml, count=1)
        xml = re.sub(r'(<Image ID="Image:0"[^>]*>)', r'\1<ObjectiveSettings ID="Objective:0"/>', xml, count=1)
        tifffile.tiffcomment(path, xml.encode())
    return path


# Fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pyramid(tmp_path_factory) -> SlideCase:
    w, h = PYR_SIZE
    rng = np.random.default_rng(0)
    image = np.full((h, w, 3), 250, dtype=np.uint8)
    tissue = disk((h, w), *DISK) & ~disk((h, w), *HOLE)
    for sx, sy in SPECKS:
        tissue |= disk((h, w), sx, sy, 15)
    pink = np.array([220, 130, 190]) + rng.integers(-20, 20, (h, w, 3))
    image[tissue] = np.clip(pink[tissue], 0, 255)
    path = write_pyramid(tmp_path_factory.mktemp("pyr") / "pyramid.tif", image, PYR_MPP, 3)
    # tifffile's default JPEG quality on the noisy pink: measured mean error 1.91 (max 50).
    return SlideCase(path, PYR_SIZE, (1.0, 2.0, 4.0), PYR_MPP, "generic-tiff", source=image, jpeg_error=2.5)


@pytest.fixture(scope="session")
def no_mpp_tiff(tmp_path_factory) -> Path:
    image = np.full((512, 512, 3), 240, dtype=np.uint8)
    return write_pyramid(tmp_path_factory.mktemp("nompp") / "nompp.tif", image, None, 1)


@pytest.fixture(scope="session")
def real() -> SlideCase:
    """The Aperio SVS itself: one level, 20x; tissue fraction measured 0.39 (a strip of skin, glass either side)."""
    if not REAL_SLIDE.is_file():
        pytest.skip(f"real test slide not found at {REAL_SLIDE}")
    return SlideCase(REAL_SLIDE, (2220, 2967), (1.0,), REAL_MPP, "aperio", 20.0, 0.39)


@pytest.fixture(scope="session")
def real_crop() -> np.ndarray:
    if not REAL_SLIDE.is_file():
        pytest.skip(f"real test slide not found at {REAL_SLIDE}")
    import openslide

    x, y, w, h = CROP
    with openslide.OpenSlide(REAL_SLIDE) as slide:
        return np.asarray(slide.read_region((x, y), 0, (w, h)).convert("RGB"))


def _real_case(path: Path, crop: np.ndarray, downsamples: tuple[float, ...], mpp: float | None, vendor: str,
               objective: float | None = None) -> SlideCase:
    return SlideCase(path, (crop.shape[1], crop.shape[0]), downsamples, mpp, vendor, objective, REAL_TISSUE, crop)


@pytest.fixture(scope="session")
def dicom_real(tmp_path_factory, real_crop) -> SlideCase:
    """JPEG baseline, as scanners and converters write DICOM WSI; 2 levels, objective 20x."""
    folder = write_dicom(tmp_path_factory.mktemp("dicom") / "real", pyramid_levels(real_crop, 2), REAL_MPP,
                         jpeg=True, objective=20.0)
    case = _real_case(folder, real_crop, (1.0, 2.0), REAL_MPP, "dicom", 20.0)
    return replace(case, jpeg_error=4.0)  # measured 3.74 (4:2:0 chroma on H&E; max 97 at sharp edges)


@pytest.fixture(scope="session")
def dicom_pyramid(tmp_path_factory, pyramid) -> SlideCase:
    """Uncompressed (lossless), 3 levels."""
    folder = write_dicom(tmp_path_factory.mktemp("dicom") / "pyramid", pyramid_levels(pyramid.source, 3),
                         pyramid.mpp, jpeg=False)
    return SlideCase(folder, pyramid.dimensions, (1.0, 2.0, 4.0), pyramid.mpp, "dicom",
                     source=pyramid.source)


@pytest.fixture(scope="session")
def czi_real(tmp_path_factory, real_crop) -> SlideCase:
    path = write_czi(tmp_path_factory.mktemp("czi") / "real.czi", real_crop, REAL_MPP)
    return _real_case(path, real_crop, (1.0, 4.0), REAL_MPP, "czi")


@pytest.fixture(scope="session")
def czi_pyramid(tmp_path_factory, pyramid) -> SlideCase:
    path = write_czi(tmp_path_factory.mktemp("czi") / "pyramid.czi", pyramid.source, pyramid.mpp)
    return SlideCase(path, pyramid.dimensions, (1.0, 4.0), pyramid.mpp, "czi", source=pyramid.source)


@pytest.fixture(scope="session")
def czi_no_mpp(tmp_path_factory) -> Path:
    return write_czi(tmp_path_factory.mktemp("czi") / "nompp.czi", np.full((512, 512, 3), 240, np.uint8), None)


@pytest.fixture(scope="session")
def ome_real(tmp_path_factory, real_crop) -> SlideCase:
    """SubIFD pyramid, zlib (lossless), µm/px written in nm, objective 20x in the OME-XML."""
    path = write_ome_tiff(tmp_path_factory.mktemp("ome") / "real.ome.tif", pyramid_levels(real_crop, 3), REAL_MPP,
                          unit="nm", objective=20.0)
    return _real_case(path, real_crop, (1.0, 2.0, 4.0), REAL_MPP, "ome-tiff", 20.0)


@pytest.fixture(scope="session")
def ome_pyramid(tmp_path_factory, pyramid) -> SlideCase:
    path = write_ome_tiff(tmp_path_factory.mktemp("ome") / "pyramid.ome.tif", pyramid_levels(pyramid.source, 3),
                          pyramid.mpp)
    return SlideCase(path, pyramid.dimensions, (1.0, 2.0, 4.0), pyramid.mpp, "ome-tiff",
                     source=pyramid.source)


@pytest.fixture(scope="session")
def ome_no_mpp(tmp_path_factory) -> Path:
    return write_ome_tiff(tmp_path_factory.mktemp("ome") / "nompp.ome.tif", [np.full((512, 512, 3), 240, np.uint8)],
                          None)


@pytest.fixture(scope="session")
def png_real(tmp_path_factory, real_crop) -> SlideCase:
    path = tmp_path_factory.mktemp("png") / "real.png"
    Image.fromarray(real_crop).save(path, compress_level=1)
    return _real_case(path, real_crop, (1.0,), None, "png")


@pytest.fixture(scope="session")
def png_pyramid(tmp_path_factory, pyramid) -> SlideCase:
    path = tmp_path_factory.mktemp("png") / "pyramid.png"
    Image.fromarray(pyramid.source).save(path, compress_level=1)
    return SlideCase(path, pyramid.dimensions, (1.0,), None, "png", source=pyramid.source)


@pytest.fixture(scope="session")
def png_no_mpp(png_pyramid) -> Path:
    return png_pyramid.path


@pytest.fixture(scope="session")
def jpeg_real(tmp_path_factory, real_crop) -> SlideCase:
    path = tmp_path_factory.mktemp("jpeg") / "real.jpg"
    Image.fromarray(real_crop).save(path, quality=95)
    return replace(_real_case(path, real_crop, (1.0,), None, "jpeg"), jpeg_error=4.0)  # measured 3.74
