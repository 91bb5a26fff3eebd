"""The commit log: ``log/<version>.json``, one entry per published commit, created put-if-absent.

A writer claims version v by hard-linking its finished entry to ``log/<v>.json``. ``link`` fails
if the name exists, atomically, on local filesystems and on NFS, Lustre and GPFS alike; a writer
that loses the race tries v + 1. The versions therefore form a gap-free sequence in publication
order, and a reader learns "everything published so far" by probing forward from a known version
until a name is missing — never by listing history. (On an object store the same step is a PUT
with ``If-None-Match: *``; see docs/store-format.md.)
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from featurestore.schemas import StoreDamageError
from featurestore.store._layout import LOG, fsync_dir, version_name


@dataclass(frozen=True)
class LogEntry:
    """One published version: a commit (its tables with their sizes, the slides it touched) or a drop."""

    version: int
    commit_id: str | None
    published_at: float
    tables: dict[str, int]
    slides: tuple[str, ...] = ()
    drops: tuple[str, ...] = ()
    bytes: int = 0
    """Total size of the commit's files, so ``fs info`` need not walk the store."""

    def to_dict(self) -> dict:
        return {"version": self.version, "commit_id": self.commit_id, "published_at": self.published_at,
                "tables": self.tables, "slides": list(self.slides), "drops": list(self.drops), "bytes": self.bytes}

    @classmethod
    def from_dict(cls, d: dict) -> LogEntry:
        return cls(int(d["version"]), d["commit_id"], float(d["published_at"]), dict(d["tables"]),
                   tuple(d.get("slides", ())), tuple(d.get("drops", ())), int(d.get("bytes", 0)))


def entry_path(root: Path, version: int) -> Path:
    return root / LOG / f"{version_name(version)}.json"


def exists(root: Path, version: int) -> bool:
    return entry_path(root, version).exists()


def read_entry(root: Path, version: int) -> LogEntry:
    path = entry_path(root, version)
    try:
        entry = LogEntry.from_dict(json.loads(path.read_bytes()))
    except (ValueError, KeyError, TypeError) as err:
        raise StoreDamageError(f"{path}: damaged log entry ({err}); restore it from a backup — every later "
                               "version depends on it") from err
    if entry.version != version:
        raise StoreDamageError(f"{path}: holds version {entry.version}; restore it from a backup")
    return entry


def latest(root: Path, known: int) -> int:
    """The newest published version, from ``known`` (a version that exists, or -1).

    The log has no gaps, so doubling steps then a bisection find the end in O(log(new entries))
    ``stat`` calls: a reader far behind (a fresh process, a stale checkpoint hint) stays cheap,
    which matters on NFS or Lustre where every ``stat`` is a round trip.
    """
    if not exists(root, known + 1):
        return known
    found, step = known + 1, 1
    while exists(root, found + step):
        found += step
        step *= 2
    missing = found + step
    while missing - found > 1:
        mid = (found + missing) // 2
        if exists(root, mid):
            found = mid
        else:
            missing = mid
    return found


def append(root: Path, known: int, *, commit_id: str | None, tables: dict[str, int],
           slides: tuple[str, ...] = (), drops: tuple[str, ...] = (), size: int = 0) -> LogEntry:
    """Publish one entry at the first free version after ``known``; return it."""
    log = root / LOG
    tmp = log / f".{uuid.uuid4().hex}.tmp"
    version = latest(root, known) + 1
    try:
        while True:
            entry = LogEntry(version, commit_id, time.time(), tables, slides, drops, size)
            with open(tmp, "w") as f:
                f.write(json.dumps(entry.to_dict()) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, entry_path(root, version))
                break
            except FileExistsError:
                # NFS may retry a link that succeeded and report EEXIST; a second link to our file proves it.
                if os.stat(tmp).st_nlink >= 2:
                    break
                version = latest(root, version) + 1
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(log)
    return entry
