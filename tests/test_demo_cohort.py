"""The synthetic cohort must look like a real one to both slide readers and carry a real class signal."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import openslide
import pytest

from featurestore.pipelines.demo import LABELS_COLUMNS, DemoCohort, make_cohort, write_slide

SIZE = 2048
MPP = 0.5

# Same JPEG bytes through two libjpeg builds: identical in practice (measured 0 / 0), but decoders
# may legitimately differ by IDCT rounding and chroma upsampling, which stays well inside these.
MEAN_ABS_TOLERANCE = 2.0
MAX_ABS_TOLERANCE = 16


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> DemoCohort:
    return make_cohort(tmp_path_factory.mktemp("demo"), 4, size=SIZE, mpp=MPP, seed=0)


def _rgb(region) -> np.ndarray:
    return np.asarray(region)[..., :3].astype(np.int16)


def _read_labels(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_openslide_sees_pyramid_and_mpp(cohort: DemoCohort) -> None:
    for slide in cohort.slides:
        with openslide.OpenSlide(slide.path) as osr:
            assert osr.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
            assert osr.level_count >= 2
            assert osr.level_dimensions[0] == (SIZE, SIZE)
            assert osr.level_dimensions[1] == (SIZE // 4, SIZE // 4)
            assert osr.level_downsamples[1] == pytest.approx(4.0)
            assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP, rel=1e-3)
            assert float(osr.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(MPP, rel=1e-3)


def test_cucim_agrees_with_openslide(cohort: DemoCohort) -> None:
    pytest.importorskip("cucim")
    from featurestore.slides._cucim import import_cuimage  # sets the cuFile config before cucim loads

    cuimage = import_cuimage()
    # One tile-aligned window and one straddling four tiles, to cover tile seams.
    locations = [(768, 768), (1000, 1130)]
    for slide in cohort.slides:
        img = cuimage(str(slide.path))
        with openslide.OpenSlide(slide.path) as osr:
            assert img.resolutions["level_count"] == osr.level_count
            assert tuple(map(tuple, img.resolutions["level_dimensions"])) == osr.level_dimensions
            assert img.spacing()[:2] == pytest.approx([MPP, MPP], rel=1e-3)
            assert img.spacing_units()[:2] == ["micrometer", "micrometer"]
            for loc in locations:
                ref = _rgb(osr.read_region(loc, 0, (256, 256)))
                got = _rgb(img.read_region(loc, (256, 256), 0))
                diff = np.abs(ref - got)
                assert got.shape == ref.shape == (256, 256, 3)
                assert diff.mean() < MEAN_ABS_TOLERANCE
                assert diff.max() <= MAX_ABS_TOLERANCE


def test_labels_csv(cohort: DemoCohort) -> None:
    columns, rows = _read_labels(cohort.labels_csv)
    assert tuple(columns) == LABELS_COLUMNS
    assert [r["filename"] for r in rows] == [s.path.name for s in cohort.slides]
    assert all(s.path.is_file() for s in cohort.slides)

    labels = [int(r["label"]) for r in rows]
    grades = [int(r["grade"]) for r in rows]
    assert sorted(labels) == [0, 0, 1, 1]
    assert all((g == 0) == (lab == 0) and 0 <= g <= 5 for g, lab in zip(grades, labels, strict=True))
    for r in rows:
        fraction = float(r["tumour_fraction"])
        assert 0.2 <= fraction <= 0.8 if r["label"] == "1" else fraction == 0.0
        assert float(r["survival_months"]) > 0
        assert r["event"] in {"0", "1"}

    by_patient: dict[str, set[int]] = {}
    for r in rows:
        by_patient.setdefault(r["patient"], set()).add(int(r["label"]))
    slides_per_patient = [sum(r["patient"] == p for r in rows) for p in by_patient]
    assert max(slides_per_patient) == 2
    assert all(len(patient_labels) == 1 for patient_labels in by_patient.values())

    for s, r in zip(cohort.slides, rows, strict=True):
        assert s.patient == r["patient"]
        assert (s.label, s.grade, s.event) == (int(r["label"]), int(r["grade"]), int(r["event"]))
        assert s.tumour_fraction == float(r["tumour_fraction"])
        assert s.survival_months == float(r["survival_months"])


def test_same_seed_same_cohort(tmp_path: Path) -> None:
    a = make_cohort(tmp_path / "a", 4, size=1024, seed=3)
    b = make_cohort(tmp_path / "b", 4, size=1024, seed=3)
    assert a.labels_csv.read_text() == b.labels_csv.read_text()
    for sa, sb in zip(a.slides, b.slides, strict=True):
        with openslide.OpenSlide(sa.path) as ra, openslide.OpenSlide(sb.path) as rb:
            region = ((200, 300), 0, (512, 512))
            np.testing.assert_array_equal(_rgb(ra.read_region(*region)), _rgb(rb.read_region(*region)))


def test_tumour_slides_have_more_nuclei(cohort: DemoCohort) -> None:
    fractions: dict[int, list[float]] = {0: [], 1: []}
    for slide in cohort.slides:
        with openslide.OpenSlide(slide.path) as osr:
            rgb = _rgb(osr.read_region((0, 0), 0, osr.level_dimensions[0]))
        gray = rgb @ np.array([0.299, 0.587, 0.114])
        tissue = gray < 220
        assert 0.25 < tissue.mean() < 0.65
        fractions[slide.label].append(float((gray[tissue] < 120).mean()))
    assert min(fractions[1]) > 1.5 * max(fractions[0])


def test_write_slide_non_square(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (600, 1000, 3), dtype=np.uint8)
    path = tmp_path / "odd.tiff"
    write_slide(path, rgb, 0.25)
    with openslide.OpenSlide(path) as osr:
        assert osr.level_dimensions == ((1000, 600), (250, 150))
        assert float(osr.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25, rel=1e-3)
