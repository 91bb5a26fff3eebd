"""The one way stage two writes a run directory (``fs train``, ``fs distill``, ``fs distill-slides``, ``fs amkd``).

A run is assembled in a hidden sibling ``.OUT.partial-ID`` and renamed to ``OUT`` when complete, so
``OUT`` either holds a whole run or does not exist. An exception or Ctrl-C removes the partial
directory; a hard kill can leave it behind, hidden, and never where a finished run is expected.
An existing ``OUT`` is refused unless it is an empty directory: runs are never replaced.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from featurestore.distill.errors import RunDirError


def check_new_run_dir(out: Path) -> None:
    """Refuse a run directory that is a file or has something in it."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: is a file; choose a new run directory")
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out}: run directory exists and is not empty; choose a new one or delete it")


@contextmanager
def staged_run(out: Path, run_id: str | None = None) -> Iterator[Path]:
    """Yield the staging directory of run ``out``; rename it to ``out`` when the block completes."""
    out = Path(out)
    check_new_run_dir(out)
    staging = out.parent / f".{out.name}.partial-{run_id or uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        yield staging
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON; paths and other values JSON lacks are written as text."""
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
