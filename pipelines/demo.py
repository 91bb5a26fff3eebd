"""Synthetic H&E slide cohort: real pyramidal TIFFs plus labels, for demos and end-to-end tests.

The slides are drawn, not scanned, but they exercise the same code paths as real
ones: tiled JPEG pyramids that OpenSlide and cuCIM both open with µm/px, tissue on
a white background for tissue detection, and a learnable morphological signal
(tumour nuclei are larger, darker and denser) tied to the slide labels, grades
and survival so that downstream students have something real to distil.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

LABELS_COLUMNS = ("filename", "patient", "label", "grade", "tumour_fraction", "survival_months", "event")

_BACKGROUND = np.array([240.0, 238.0, 242.0], dtype=np.float32)
_EOSIN = np.array([230.0, 150.0, 190.0], dtype=np.float32)
_TUMOUR_STROMA = np.array([215.0, 135.0, 190.0], dtype=np.float32)
_HEMATOXYLIN = np.array([80.0, 40.0, 130.0], dtype=np.float32)

_PYRAMID_FACTOR = 4
_PYRAMID_MIN_SIDE = 512


_SURVIVAL_SCALE_MONTHS = 120.0
_SURVIVAL_HAZARD_PER_GRADE = 0.45
_CENSORED_SHARE = 0.3


@dataclass(frozen=True)
class _Nuclei:
    """Nucleus morphology of one tissue class, in physical units so it is independent of µm/px."""

    radius_um: tuple[float, float]
    per_1000_um2: float
    stain: tuple[float, float]


_BENIGN_NUCLEI = _Nuclei(radius_um=(3.0, 4.0), per_1000_um2=1.6, stain=(0.75, 0.9))
_TUMOUR_NUCLEI = _Nuclei(radius_um=(6.0, 8.0), per_1000_um2=4.0, stain=(0.9, 1.0))


@dataclass(frozen=True)
class DemoSlide:
    """One synthetic slide and the clinical labels it was drawn to match."""

    path: Path
    patient: str
    label: int
    grade: int
    tumour_fraction: float
    survival_months: float
    event: int


@dataclass(frozen=True)
class DemoCohort:
    """A cohort on disk: ``root/slides/*.tiff`` and ``root/labels.csv``."""

    root: Path
    slides: tuple[DemoSlide, ...]
    labels_csv: Path


def make_cohort(
    root: Path, n_slides: int = 8, *, size: int = 4096, mpp: float = 0.5, seed: int = 0
) -> DemoCohort:
    """Write ``n_slides`` square slides of ``size`` px and labels; the same seed redraws the same cohort.

    Half the slides (rounded up) carry tumour. Some patients contribute two slides with
    the same label, so patient-grouped splits differ from slide-level ones.
    """
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    root = Path(root)
    slide_dir = root / "slides"
    slide_dir.mkdir(parents=True, exist_ok=True)
    cohort_seq, *slide_seqs = np.random.SeedSequence(seed).spawn(n_slides + 1)
    rng = np.random.default_rng(cohort_seq)

    n_tumour = (n_slides + 1) // 2
    labels = rng.permutation(np.r_[np.ones(n_tumour, int), np.zeros(n_slides - n_tumour, int)])
    fractions = np.where(labels == 1, np.round(rng.uniform(0.2, 0.8, n_slides), 3), 0.0)
    grades = np.where(labels == 1, np.clip(1 + np.floor(5 * fractions), 1, 5), 0).astype(int)
    months, events = _survival(rng, grades)
    patients = _assign_patients(rng, labels)

    slides = []
    for i in range(n_slides):
        path = slide_dir / f"demo_{i:03d}.tiff"
        rgb = render_tissue(np.random.default_rng(slide_seqs[i]), size, float(fractions[i]), mpp=mpp)
        write_slide(path, rgb, mpp)
        slides.append(
            DemoSlide(
                path=path,
                patient=patients[i],
                label=int(labels[i]),
                grade=int(grades[i]),
                tumour_fraction=float(fractions[i]),
                survival_months=float(months[i]),
                event=int(events[i]),
            )
        )

    labels_csv = root / "labels.csv"
    with labels_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(LABELS_COLUMNS)
        for s in slides:
            writer.writerow(
                [s.path.name, s.patient, s.label, s.grade, s.tumour_fraction, s.survival_months, s.event]
            )
    return DemoCohort(root=root, slides=tuple(slides), labels_csv=labels_csv)


def _survival(rng: np.random.Generator, grades: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exponential times with hazard rising per grade; a fixed ~30 % share is censored early.

    Censoring a fixed count, rather than drawing censoring times, guarantees that even a
    four-slide cohort has both observed and censored outcomes.
    """
    n = len(grades)
    scale = _SURVIVAL_SCALE_MONTHS * np.exp(-_SURVIVAL_HAZARD_PER_GRADE * grades)
    months = rng.exponential(scale)
    events = np.ones(n, int)
    censored = rng.choice(n, size=round(_CENSORED_SHARE * n), replace=False)
    events[censored] = 0
    months[censored] *= rng.uniform(0.3, 0.9, len(censored))
    return np.maximum(np.round(months, 2), 0.1), events


def _assign_patients(rng: np.random.Generator, labels: np.ndarray) -> list[str]:
    """Give ``n // 2 + 1`` patients to ``n`` slides; paired slides always share their label.

    Pairs are taken alternately from the tumour and benign pools. They always fit:
    ``ceil(n / 2) - 1`` pairs never exceed ``tumour // 2 + benign // 2``.
    """
    n = len(labels)
    pools = [list(rng.permutation(np.flatnonzero(labels == v))) for v in (1, 0)]
    members: list[list[int]] = []
    pairs_left = n - (n // 2 + 1)
    turn = 0
    while pairs_left > 0 and any(len(p) >= 2 for p in pools):
        if len(pools[turn]) >= 2:
            members.append([int(pools[turn].pop()), int(pools[turn].pop())])
            pairs_left -= 1
        turn = 1 - turn
    members += [[int(i)] for pool in pools for i in pool]
    members.sort(key=min)
    patients = [""] * n
    for k, slide_ids in enumerate(members):
        for i in slide_ids:
            patients[i] = f"P{k:03d}"
    return patients


def render_tissue(
    rng: np.random.Generator, size: int, tumour_fraction: float, *, mpp: float = 0.5
) -> np.ndarray:
    """Draw an H&E-like ``(size, size, 3)`` uint8 image at ``mpp`` µm/px.

    Tissue is one to three smooth blobs over 30-60 % of the area; ``tumour_fraction`` of
    the tissue area is tumour, where nuclei are about twice as large, darker and 2.5x as
    dense. Nucleus sizes are physical (µm), so the signal holds at any ``mpp``. Full-size
    arithmetic runs in place on float32 buffers, which keeps 4096 px to a second or two.
    """
    if not 0.0 <= tumour_fraction <= 1.0:
        raise ValueError(f"tumour_fraction must be in [0, 1], got {tumour_fraction}")
    tissue = _blob_field(rng, size, n_blobs=int(rng.integers(1, 4)))
    tissue = tissue >= np.quantile(tissue[::4, ::4], 1 - rng.uniform(0.3, 0.6))
    tumour = np.zeros_like(tissue)
    if tumour_fraction > 0:
        field = _blob_field(rng, size, n_blobs=1)
        tumour = tissue & (field >= np.quantile(field[tissue], 1 - tumour_fraction))

    stain = np.zeros((size, size), np.float32)
    _stamp_nuclei(rng, stain, tissue & ~tumour, _BENIGN_NUCLEI, mpp)
    _stamp_nuclei(rng, stain, tumour, _TUMOUR_NUCLEI, mpp)
    noise = rng.standard_normal((size, size), dtype=np.float32)

    # Per pixel: stroma * (1 - stain) + hematoxylin * chromatin * stain, stroma shaded by texture.
    # One noise field serves twice: chromatin inside nuclei, grain on the (disjoint) background.
    grain = ndimage.gaussian_filter(rng.standard_normal((max(size // 16, 4),) * 2), 1.0, mode="wrap")
    stroma_weight = _upsample(grain / grain.std(), size)
    stroma_weight *= 0.06
    stroma_weight += 1
    stroma_weight *= 1 - stain
    nucleus_weight = np.clip(noise, -2.5, 2.5)
    nucleus_weight *= 0.15
    nucleus_weight += 1
    nucleus_weight *= stain
    tumour_weight = stroma_weight * tumour
    noise *= 1.5
    background = ~tissue

    out = np.empty((size, size, 3), np.uint8)
    channel = np.empty((size, size), np.float32)
    scratch = np.empty_like(channel)
    for k in range(3):
        np.multiply(stroma_weight, _EOSIN[k], out=channel)
        channel += np.multiply(nucleus_weight, _HEMATOXYLIN[k], out=scratch)
        channel += np.multiply(tumour_weight, _TUMOUR_STROMA[k] - _EOSIN[k], out=scratch)
        np.add(noise, _BACKGROUND[k], out=channel, where=background)
        np.clip(channel, 0, 254.5, out=channel)
        channel += 0.5
        out[..., k] = channel
    return out


def _upsample(coarse: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly upsample a square grid to ``size`` px as two matrix products, far cheaper than zoom."""
    cells = coarse.shape[0]
    centres = np.clip((np.arange(size) + 0.5) * cells / size - 0.5, 0, cells - 1)
    weights = np.clip(1 - np.abs(centres[:, None] - np.arange(cells)), 0, None).astype(np.float32)
    return (weights @ coarse.astype(np.float32)) @ weights.T


def _blob_field(rng: np.random.Generator, size: int, *, n_blobs: int) -> np.ndarray:
    """Smooth field peaking on ``n_blobs`` random centres; thresholding it gives irregular blobs."""
    cells = 128
    yy, xx = np.mgrid[0:cells, 0:cells] / cells
    field = np.zeros((cells, cells))
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0.25, 0.75, 2)
        sy, sx = rng.uniform(0.12, 0.22, 2)
        field += np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2) / 2)
    noise = ndimage.gaussian_filter(rng.standard_normal((cells, cells)), 6, mode="wrap")
    field += 0.5 * noise / noise.std()
    return _upsample(field, size)


def _stamp_nuclei(
    rng: np.random.Generator,
    stain: np.ndarray,
    region: np.ndarray,
    nuclei: _Nuclei,
    mpp: float,
) -> None:
    """Draw antialiased discs into ``stain`` at a Poisson density inside ``region``.

    Discs are grouped by integer radius so each group is one broadcast index operation;
    overlaps keep the stronger stain.
    """
    size = stain.shape[0]
    ys, xs = rng.integers(0, size, (2, rng.poisson(nuclei.per_1000_um2 * (size * mpp) ** 2 / 1000)))
    inside = region[ys, xs]
    ys, xs = ys[inside], xs[inside]
    radii = rng.uniform(*nuclei.radius_um, len(ys)) / mpp
    strength = rng.uniform(*nuclei.stain, len(ys)).astype(np.float32)
    for r in np.unique(np.ceil(radii).astype(int)):
        dy, dx = np.mgrid[-r : r + 1, -r : r + 1].reshape(2, -1)
        dist = np.hypot(dy, dx)
        sel = np.flatnonzero(np.ceil(radii) == r)
        edge = np.clip(radii[sel, None] + 0.5 - dist, 0, 1)
        py = np.clip(ys[sel, None] + dy, 0, size - 1)
        px = np.clip(xs[sel, None] + dx, 0, size - 1)
        np.maximum.at(stain, (py, px), (edge * strength[sel, None]).astype(np.float32))


def write_slide(path: Path, rgb: np.ndarray, mpp: float, *, tile: int = 256, jpeg_quality: int = 90) -> None:
    """Write ``rgb`` as a tiled JPEG pyramid, one IFD per level in the main chain.

    Both OpenSlide's generic-tiff reader and cuCIM find levels only in the main IFD
    chain (not in SubIFDs), and both take µm/px from X/YResolution in pixels per
    centimetre. Levels shrink by 4x with area averaging until the longer side is at
    most 512 px.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    levels = [rgb]
    while max(levels[-1].shape[:2]) > _PYRAMID_MIN_SIDE:
        levels.append(_downsample(levels[-1], _PYRAMID_FACTOR))
    px_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=rgb.nbytes > 2**32 - 2**25) as tw:
        for i, level in enumerate(levels):
            res = px_per_cm / _PYRAMID_FACTOR**i
            tw.write(
                level,
                photometric="rgb",
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": jpeg_quality},
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
                metadata=None,
            )


def _downsample(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Area-average ``factor`` x ``factor`` blocks (antialiased); a ragged edge is cropped."""
    h, w = rgb.shape[0] // factor, rgb.shape[1] // factor
    blocks = rgb[: h * factor, : w * factor].reshape(h, factor, w, factor, 3)
    return blocks.mean(axis=(1, 3), dtype=np.float32).round().astype(np.uint8)
