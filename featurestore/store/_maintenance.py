"""Keeping a store healthy: compact, verify, drop damaged commits, vacuum, and migrate older formats.

Each of these is safe while writers commit: they read immutable versions, publish through the
log like any writer, and delete only what no snapshot younger than the retention period can name.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from featurestore.schemas import FORMAT_VERSION, InvalidRecordError, StoreVersionError
from featurestore.store import _checkpoint, _log, _manifest
from featurestore.store._commit import fsync_tree
from featurestore.store._layout import (
    CHECKPOINTS,
    COMMITS,
    GENESIS,
    LOG,
    PARTS,
    STAGING,
    fsync_dir,
    migrated_from,
    read_marker_version,
    version_name,
    write_marker,
)
from featurestore.store._snapshot import CHECKPOINT_FILE, Resolver, latest_checkpoint

SUPERSEDED = "_superseded.json"
"""Files of a commit that ``vacuum`` removed because newer commits replaced them; verify skips them."""


@dataclass(frozen=True)
class CompactReport:
    version: int
    commits_folded: int
    parts_before: int
    parts_after: int


def compact(root: Path, resolver: Resolver) -> CompactReport:
    """Checkpoint the newest version with every table merged into one part."""
    state = resolver.resolve()
    before = len(state.checkpoint.files()) if state.checkpoint else 0
    if state.checkpoint is not None and state.checkpoint.version == state.version:
        # A checkpoint directory is never rewritten; an empty log entry gives compaction its own version.
        _log.append(root, state.version, commit_id=None, tables={})
        state = resolver.resolve()
    ckpt = _checkpoint.write(state, compact=True)
    if ckpt is None:
        ckpt = latest_checkpoint(root)
    return CompactReport(state.version, len(state.entries), before, len(ckpt.files()) if ckpt else 0)


@dataclass(frozen=True)
class Problem:
    """One damaged file of a live commit, with the slides it holds."""

    commit_id: str
    version: int
    slides: tuple[str, ...]
    path: Path
    problem: str


@dataclass(frozen=True)
class VerifyReport:
    version: int
    commits: int
    files: int
    bytes_hashed: int
    problems: tuple[Problem, ...]

    def fix(self, root: Path) -> str:
        return (f"drop the damaged commits with `fs verify -s {root} --drop-damaged` (their slides then revert "
                "to an earlier version or disappear), then re-run `fs extract` on those slides")


def verify(root: Path, resolver: Resolver, *, deep: bool = False) -> VerifyReport:
    """Check every live commit's files against its manifest: presence and size, and sha256 when ``deep``."""
    state = resolver.resolve(use_checkpoint=False)
    problems, files, hashed = [], 0, 0
    for entry, damage in state.damaged:
        problems.append(Problem(entry.commit_id, entry.version, entry.slides, damage.path, damage.problem))
    for entry in state.entries:
        directory = root / COMMITS / entry.commit_id
        manifest = _manifest.read(directory)
        if manifest is None:
            problems.append(Problem(entry.commit_id, entry.version, entry.slides, directory / "_manifest.json",
                                    "missing or unreadable"))
            continue
        gone = _superseded(directory)
        manifest = {k: v for k, v in manifest.items() if k not in gone}
        files += len(manifest)
        if deep:
            hashed += sum(size for size, _ in manifest.values())
        for d in _manifest.check(directory, manifest, deep=deep):
            problems.append(Problem(entry.commit_id, entry.version, entry.slides, d.path, d.problem))
    return VerifyReport(state.version, len(state.entries) + len(state.damaged), files, hashed, tuple(problems))


def drop(root: Path, resolver: Resolver, commit_ids: list[str]) -> int:
    """Publish a drop of ``commit_ids`` and a checkpoint replayed without them; return the drop's version."""
    state = resolver.resolve(use_checkpoint=False)
    known = {e.commit_id for e in state.entries} | {e.commit_id for e, _ in state.damaged}
    unknown = [c for c in commit_ids if c not in known]
    if unknown or GENESIS in commit_ids:
        raise InvalidRecordError(f"{root}: no live commit {(unknown or [GENESIS])[0]!r} to drop; "
                                 "`fs verify` lists the damaged ones")
    entry = _log.append(root, state.version, commit_id=None, tables={}, drops=tuple(commit_ids))
    _checkpoint.write(resolver.resolve(entry.version, use_checkpoint=False))
    return entry.version


@dataclass(frozen=True)
class VacuumReport:
    staging: int
    unpublished_commits: int
    superseded_arrays: int
    checkpoints: int
    parts: int
    bytes_freed: int


def _superseded(directory: Path) -> set[str]:
    try:
        return set(json.loads((directory / SUPERSEDED).read_bytes()))
    except (OSError, ValueError):
        return set()


def _remove(path: Path) -> int:
    """Delete a file or tree; return the bytes freed."""
    if path.is_dir():
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path, ignore_errors=True)
        return size
    try:
        size = path.stat().st_size
        path.unlink()
        return size
    except FileNotFoundError:
        return 0


def _old(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


def vacuum(root: Path, resolver: Resolver, older_than_s: float) -> VacuumReport:
    """Delete leftovers and replaced files older than the retention period.

    Removed: staging directories (writers or checkpoints that died), commit directories no log
    entry names (a writer died between rename and log), bag and pixel arrays replaced by a commit
    published before the cutoff, checkpoints older than the newest one, and table parts no kept
    checkpoint names. A snapshot pinned within the retention period never needs any of these.
    """
    cutoff = time.time() - older_than_s
    state = resolver.resolve(use_checkpoint=False)
    every = [resolver.entry(v) for v in range(state.version + 1)]
    staging = _remove_all(p for p in (root / STAGING).iterdir() if _old(p, cutoff))
    logged = {e.commit_id for e in every if e.commit_id}
    unpublished = _remove_all(p for p in (root / COMMITS).iterdir() if p.name not in logged and _old(p, cutoff))
    arrays = _remove_replaced_arrays(root, [e for e in every if e.commit_id and e.commit_id not in state.dropped],
                                     cutoff)
    checkpoints, parts = _remove_old_checkpoints(root, cutoff)
    counts = (staging, unpublished, arrays, checkpoints, parts)
    return VacuumReport(*(n for n, _ in counts), sum(freed for _, freed in counts))


Removed = tuple[int, int]
"""How many things were removed, and their bytes."""


def _remove_all(paths: Iterable[Path]) -> Removed:
    freed = [_remove(p) for p in paths]
    return len(freed), sum(freed)


def _remove_replaced_arrays(root: Path, live: list[_log.LogEntry], cutoff: float) -> Removed:
    """Arrays of a (set or tiling, slide) that a later commit, published before ``cutoff``, wrote again."""
    latest: dict[tuple[str, str], str] = {}
    count = freed = 0
    for e in live:
        directory = root / COMMITS / e.commit_id
        for kind in ("emb", "pix"):
            for sub in (directory / kind).iterdir() if (directory / kind).is_dir() else ():
                for slide in e.slides:
                    key = (f"{kind}/{sub.name}", slide)
                    if key in latest and e.published_at < cutoff:
                        removed = _mark_superseded(root / COMMITS / latest[key], key[0])
                        count, freed = count + (removed is not None), freed + (removed or 0)
                    latest[key] = e.commit_id
    return count, freed


def _remove_old_checkpoints(root: Path, cutoff: float) -> tuple[Removed, Removed]:
    """Checkpoints older than the newest, then the parts that no remaining checkpoint names."""
    newest = latest_checkpoint(root)
    if newest is None:
        return (0, 0), (0, 0)
    old, keep = [], set()
    for p in sorted((root / CHECKPOINTS).iterdir()):
        if not p.name.isdigit():
            continue
        if int(p.name) < newest.version and _old(p, cutoff):
            old.append(p)
        else:
            keep |= _checkpoint_parts(p)
    parts = (p for p in ((root / PARTS).iterdir() if (root / PARTS).is_dir() else ())
             if f"{PARTS}/{p.name}" not in keep and _old(p, cutoff))
    return _remove_all(old), _remove_all(parts)


def _checkpoint_parts(directory: Path) -> set[str]:
    """The parts a checkpoint directory names (none if its record is unreadable)."""
    try:
        return {p[0] for parts in json.loads((directory / CHECKPOINT_FILE).read_bytes())["parts"].values()
                for p in parts}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return set()


def _mark_superseded(directory: Path, prefix: str) -> int | None:
    """Remove one replaced array from an old commit, recording it so verify does not call it damage.

    Returns the bytes freed, or None when it was removed before.
    """
    target = directory / prefix
    if not target.exists():
        return None
    gone = _superseded(directory)
    manifest = _manifest.read(directory) or {}
    gone.update(k for k in manifest if k.startswith(prefix + "/"))
    (directory / SUPERSEDED).write_text(json.dumps(sorted(gone)) + "\n")
    return _remove(target)


@dataclass(frozen=True)
class MigrateReport:
    from_version: int
    to_version: int
    commits_logged: int
    checkpoint: int | None

    @property
    def changed(self) -> bool:
        return self.from_version != self.to_version or self.checkpoint is not None


def migrate(root: Path) -> MigrateReport:
    """Upgrade a store of an older format in place.

    Format 1 had commit directories but no log, manifests or checkpoints: migration writes a manifest
    into each commit and builds the log in ``log.migrating/`` before renaming it to ``log/``. Format 2
    lacks the ``tiles`` quality columns, the tiling quality limits and the annotation and slide-feature
    tables: nothing of it is rewritten; the marker records ``migrated_from`` and readers fill the missing
    columns with nulls until a checkpoint of the current format folds the older files. Migration writes
    that checkpoint (as ``fs compact`` does) right after switching the marker. A crash before the switch
    leaves a store of the old format that ``fs migrate`` takes again; a crash after it leaves a current
    store that reads correctly, and ``fs migrate`` then only writes the checkpoint. Stop every writer of
    older code before migrating.
    """
    version = read_marker_version(root)
    if version > FORMAT_VERSION:
        raise StoreVersionError(f"{root}: store format version {version} cannot be migrated by this code "
                                f"(it reads {FORMAT_VERSION}); upgrade with `pip install -U featurestore-path`")
    source = migrated_from(root) if version == FORMAT_VERSION else version
    if source is None:
        return MigrateReport(version, version, 0, None)
    logged = _log_format_1(root) if version == 1 else 0
    if version != FORMAT_VERSION:
        write_marker(root, FORMAT_VERSION, migrated_from=source)
    resolver = Resolver(root, migrated=True)
    if not resolver.resolve().legacy:
        return MigrateReport(version, FORMAT_VERSION, logged, None)
    return MigrateReport(version, FORMAT_VERSION, logged, compact(root, resolver).version)


def _log_format_1(root: Path) -> int:
    """Give a format-1 store its manifests and log; return the number of commits logged."""
    for leftover in (root / f"{LOG}.migrating", root / LOG, root / CHECKPOINTS, root / PARTS):
        shutil.rmtree(leftover, ignore_errors=True)
    building = root / f"{LOG}.migrating"
    building.mkdir()
    commits = sorted(p.name for p in (root / COMMITS).iterdir() if p.is_dir())
    if GENESIS not in commits:
        raise StoreVersionError(f"{root}: format-1 store without a genesis commit; re-create it with `fs init` "
                                "and `fs import`/`fs extract`")
    commits.remove(GENESIS)
    for v, commit_id in enumerate([GENESIS, *commits]):
        directory = root / COMMITS / commit_id
        files = _manifest.build(directory)
        _manifest.write(directory, commit_id, files)
        entry = _log.LogEntry(v, commit_id, time.time(), _manifest.table_sizes(files), _slides_of(directory),
                              bytes=sum(s for s, _ in files.values()))
        (building / f"{version_name(v)}.json").write_text(json.dumps(entry.to_dict()) + "\n")
    fsync_tree(root / COMMITS)
    fsync_tree(building)
    os.rename(building, root / LOG)
    fsync_dir(root)
    (root / CHECKPOINTS).mkdir(exist_ok=True)
    return len(commits) + 1


def _slides_of(directory: Path) -> tuple[str, ...]:
    slides: set[str] = set()
    for table in directory.glob("*.parquet"):
        if "slide_id" in pq.read_schema(table).names:
            slides.update(s for s in pq.read_table(table, columns=["slide_id"]).column(0).unique().to_pylist() if s)
    return tuple(sorted(slides))
