"""Register slides in a store: fingerprint, read metadata, commit ``Slide`` records."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from featurestore.pipelines.discover import find_slides, slide_bytes
from featurestore.schemas import Failure, MissingMppError, Slide, SlideError
from featurestore.slides import open_slide
from featurestore.store import Store


def describe_slide(path: Path, slide_id: str, *, reader: str = "auto", assume_mpp: float | None = None) -> Slide:
    """A ``Slide`` record for a file or DICOM series folder; refuses one without µm/px unless ``assume_mpp`` is given.

    An assumed µm/px is used only when the file has none, and is recorded (``mpp_assumed``). Plain images
    (PNG, JPEG) never have one.
    """
    with open_slide(path, reader) as r:
        mpp = r.mpp
        assumed = mpp is None
        if assumed:
            if assume_mpp is None:
                what = f"a plain {r.vendor.upper()} image has" if r.backend == "pillow" else "the slide's metadata has"
                raise MissingMppError(f"{path}: {what} no µm/px; pass --assume-mpp X "
                                      "(0.25 for a 40x scan, 0.5 for 20x) to extract it anyway")
            mpp = (assume_mpp, assume_mpp)
        width, height = r.dimensions
        return Slide(slide_id=slide_id, path=str(path.resolve()), bytes=slide_bytes(path), vendor=r.vendor,
                     width=width, height=height, mpp_x=mpp[0], mpp_y=mpp[1], objective_power=r.objective_power,
                     level_count=r.level_count, mpp_assumed=assumed)


@dataclass
class RegisterReport:
    added: list[Slide] = field(default_factory=list)
    known: list[Path] = field(default_factory=list)
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def add_slides(store: Store, paths: list[str | Path], *, reader: str = "auto",
               assume_mpp: float | None = None) -> RegisterReport:
    """Register every slide found under ``paths`` that the store does not know yet.

    Unreadable slides become ``Failure`` rows; the others are committed together.
    """
    found = find_slides(paths)
    report = RegisterReport(duplicates=found.duplicates, missing=found.missing)
    known = {s.slide_id for s in store.slides()}
    for slide_id, path in found.slides.items():
        if slide_id in known:
            report.known.append(path)
            continue
        try:
            report.added.append(describe_slide(path, slide_id, reader=reader, assume_mpp=assume_mpp))
        except SlideError as err:
            report.failures.append(Failure(str(path), "register", type(err).__name__, str(err), slide_id))
    if report.added or report.failures:
        store.register(*report.added, *report.failures)
    return report
