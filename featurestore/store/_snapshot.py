"""Resolving a snapshot: the newest checkpoint plus the log entries published after it.

A snapshot is fixed by one version number. Everything a read touches — table parts, tail files,
bag locations — comes from the files that version names, so a reader never mixes two moments,
and resolving costs O(checkpoint + commits since), whatever the store's history.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from featurestore.schemas import FORMAT_VERSION
from featurestore.store import _log
from featurestore.store._layout import CHECKPOINTS, COMMITS, LAST_CHECKPOINT, version_name
from featurestore.store._manifest import Damage, size_damage

CHECKPOINT_FILE = "_checkpoint.json"


@dataclass(frozen=True)
class Part:
    """A Parquet file of one table's rows from the log versions ``lo..hi``, shared by checkpoints."""

    path: str
    size: int
    lo: int
    hi: int
    level: int

    def to_list(self) -> list:
        return [self.path, self.size, self.lo, self.hi, self.level]

    @classmethod
    def from_list(cls, p: list) -> Part:
        return cls(str(p[0]), int(p[1]), int(p[2]), int(p[3]), int(p[4]))


@dataclass(frozen=True)
class Checkpoint:
    """Every table at ``version``, as the parts that hold its rows (a few per table, see ``_checkpoint``)."""

    version: int
    parts: dict[str, tuple[Part, ...]]
    bytes: int = 0
    """Total size of the commits folded in (as their log entries recorded)."""
    format: int = 2
    """Store format its parts are written in (checkpoints of format 2 did not record it)."""

    def to_dict(self) -> dict:
        return {"version": self.version, "parts": {k: [p.to_list() for p in v] for k, v in self.parts.items()},
                "bytes": self.bytes, "format": self.format}

    @classmethod
    def from_dict(cls, d: dict) -> Checkpoint:
        return cls(int(d["version"]), {k: tuple(Part.from_list(p) for p in v) for k, v in d["parts"].items()},
                   int(d.get("bytes", 0)), int(d.get("format", 2)))

    def files(self) -> list[tuple[str, int]]:
        return [(p.path, p.size) for parts in self.parts.values() for p in parts]


@dataclass(frozen=True)
class State:
    """One resolved snapshot: a checkpoint (or none) and the live log entries after it."""

    root: Path
    version: int
    checkpoint: Checkpoint | None
    entries: tuple[_log.LogEntry, ...]
    damaged: tuple[tuple[_log.LogEntry, Damage], ...] = ()
    dropped: frozenset[str] = field(default_factory=frozenset)
    legacy: bool = False
    """Whether some of its files may predate the current format's columns (a migrated store read without a
    current checkpoint): such files are read by column name, missing columns as nulls."""

    def table_files(self, name: str) -> list[Path]:
        """Parquet files whose rows make up table ``name`` at this version (before key resolution)."""
        files = [self.root / p.path for p in self.checkpoint.parts.get(name, ())] if self.checkpoint else []
        files += [self.root / COMMITS / e.commit_id / f"{name}.parquet" for e in self.entries if name in e.tables]
        return files

    def bytes(self) -> int:
        return (self.checkpoint.bytes if self.checkpoint else 0) + sum(e.bytes for e in self.entries)


def _checked_checkpoint(root: Path, version: int) -> Checkpoint | None:
    """Load checkpoint ``version`` if it and every file it names are intact, else None."""
    path = root / CHECKPOINTS / version_name(version) / CHECKPOINT_FILE
    try:
        ckpt = Checkpoint.from_dict(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        warnings.warn(f"{path}: damaged checkpoint, ignored (it is derived data; `fs compact` writes a new one)",
                      stacklevel=2)
        return None
    for rel, size in ckpt.files():
        if size_damage(root / rel, size) is not None:
            warnings.warn(f"{root / rel}: missing or short, so checkpoint {version} is ignored "
                          "(derived data; `fs compact` writes a new one)", stacklevel=2)
            return None
    return ckpt


def hinted_checkpoint(root: Path) -> int | None:
    """The version ``checkpoints/_last.json`` names (a hint: it may lag, never lead), or None."""
    try:
        return int(json.loads((root / CHECKPOINTS / LAST_CHECKPOINT).read_bytes())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(root: Path, upto: int | None = None) -> Checkpoint | None:
    """The newest intact checkpoint at or below ``upto``: the hint first, a directory listing if it fails."""
    hinted = hinted_checkpoint(root)
    if hinted is not None and (upto is None or hinted <= upto):
        ckpt = _checked_checkpoint(root, hinted)
        if ckpt is not None:
            return ckpt
    try:
        names = sorted((p.name for p in (root / CHECKPOINTS).iterdir() if p.name.isdigit()), reverse=True)
    except FileNotFoundError:
        return None
    for name in names:
        version = int(name)
        if version != hinted and (upto is None or version <= upto):
            ckpt = _checked_checkpoint(root, version)
            if ckpt is not None:
                return ckpt
    return None


class Resolver:
    """Resolves snapshots, remembering immutable log entries so a re-resolve reads only new ones."""

    def __init__(self, root: Path, *, migrated: bool = False) -> None:
        self.root = root
        self.migrated = migrated
        self._entries: dict[int, _log.LogEntry] = {}
        self.known = 0

    def entry(self, version: int) -> _log.LogEntry:
        found = self._entries.get(version)
        if found is None:
            found = self._entries[version] = _log.read_entry(self.root, version)
        return found

    def latest(self) -> int:
        """The newest published version; a fresh resolver starts from the checkpoint hint, not from 0."""
        if self.known == 0:
            self.known = max(0, hinted_checkpoint(self.root) or 0)
        self.known = _log.latest(self.root, self.known)
        return self.known

    def resolve(self, upto: int | None = None, *, use_checkpoint: bool = True) -> State:
        """The snapshot at ``upto`` (default: the newest version)."""
        version = self.latest() if upto is None else upto
        self.known = max(self.known, version)
        ckpt = latest_checkpoint(self.root, version) if use_checkpoint else None
        start = ckpt.version + 1 if ckpt else 0
        entries = [self.entry(v) for v in range(start, version + 1)]
        dropped = {c for e in entries for c in e.drops}
        commits = {e.commit_id for e in entries}
        if ckpt is not None and not dropped <= commits:
            # A drop of a commit the checkpoint already folded: replay from genesis until the next checkpoint.
            return self.resolve(version, use_checkpoint=False)
        live, damaged = [], []
        for e in entries:
            if e.commit_id is None or e.commit_id in dropped:
                continue
            broken = _table_damage(self.root, e)
            if broken:
                damaged.append((e, broken[0]))
            else:
                live.append(e)
        for v in [v for v in self._entries if v < start]:
            del self._entries[v]
        legacy = self.migrated and (ckpt is None or ckpt.format < FORMAT_VERSION)
        return State(self.root, version, ckpt, tuple(live), tuple(damaged), frozenset(dropped), legacy)


def _table_damage(root: Path, entry: _log.LogEntry) -> list[Damage]:
    """Missing or short table files of a commit: a ``stat`` each, so every resolve can afford it."""
    found = (size_damage(root / COMMITS / entry.commit_id / f"{name}.parquet", size)
             for name, size in entry.tables.items())
    return [d for d in found if d is not None]
