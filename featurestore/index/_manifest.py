"""An index's version: which bags it holds, and how it was built.

    STORE/indexes/<set_id>/
      manifest.json      this record; written last, by temp file + rename
      <build_id>.faiss   the FAISS index the manifest names (never modified, only replaced)

A bag is one slide's embeddings, identified by the commit that wrote it. An index is
fresh exactly when its bags equal the embedding set's current bags: a new slide shows
up as an added bag, a re-written slide as a changed commit id. Because the manifest is
replaced atomically and names an immutable file, a reader sees one consistent version.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurestore.index._errors import StaleIndexError
from featurestore.index._faiss import IndexParams
from featurestore.schemas import StoreVersionError

INDEXES = "indexes"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class BagVersion:
    """One slide's bag as indexed: the commit that wrote its embeddings, and its tile count."""

    slide_id: str
    commit_id: str
    n_tiles: int


@dataclass(frozen=True)
class IndexRequest:
    """What the user asked for (kind and overrides; None = default), kept so a rebuild honours it."""

    kind: str | None
    overrides: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class Manifest:
    set_id: str
    encoder_name: str
    dim: int
    params: IndexParams
    request: IndexRequest
    index_file: str
    bags: tuple[BagVersion, ...]
    trained_on: int
    device: str
    faiss_version: str
    built_at: str
    updated_at: str

    @property
    def n_vectors(self) -> int:
        return sum(b.n_tiles for b in self.bags)

    def to_json(self) -> str:
        payload: dict[str, Any] = {
            "manifest_version": MANIFEST_VERSION, "set_id": self.set_id, "encoder_name": self.encoder_name,
            "dim": self.dim, "params": self.params.to_dict(),
            "request": {"kind": self.request.kind, "overrides": dict(self.request.overrides)},
            "index_file": self.index_file, "n_vectors": self.n_vectors,
            "bags": [[b.slide_id, b.commit_id, b.n_tiles] for b in self.bags],
            "trained_on": self.trained_on, "device": self.device, "faiss_version": self.faiss_version,
            "built_at": self.built_at, "updated_at": self.updated_at,
        }
        return json.dumps(payload, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: Path) -> Manifest:
        d = json.loads(text)
        if d.get("manifest_version", 0) > MANIFEST_VERSION:
            raise StoreVersionError(f"{source}: index manifest version {d['manifest_version']} is newer than "
                                    f"this code reads ({MANIFEST_VERSION}); upgrade with "
                                    "`pip install -U featurestore-path`")
        return cls(d["set_id"], d["encoder_name"], d["dim"], IndexParams.from_dict(d["params"]),
                   IndexRequest(d["request"]["kind"], tuple(sorted(d["request"]["overrides"].items()))),
                   d["index_file"], tuple(BagVersion(*b) for b in d["bags"]), d["trained_on"], d["device"],
                   d["faiss_version"], d["built_at"], d["updated_at"])


@dataclass(frozen=True)
class IndexStatus:
    """How an index differs from its embedding set now (slide ids)."""

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    file_missing: bool = False

    @property
    def fresh(self) -> bool:
        return not (self.added or self.changed or self.removed or self.file_missing)

    @property
    def extendable(self) -> bool:
        """Only new slides: adding their vectors brings the index up to date."""
        return not (self.changed or self.removed or self.file_missing)

    def describe(self) -> str:
        if self.file_missing:
            return "the index file is missing"
        kinds = ((self.added, "added"), (self.changed, "re-written"), (self.removed, "removed"))
        parts = [f"{len(ids)} slide{'s' if len(ids) != 1 else ''} {what}" for ids, what in kinds if ids]
        return ", ".join(parts) + " since the index was built" if parts else "up to date"


def diff(indexed: tuple[BagVersion, ...], current: tuple[BagVersion, ...]) -> IndexStatus:
    old = {b.slide_id: b.commit_id for b in indexed}
    new = {b.slide_id: b.commit_id for b in current}
    return IndexStatus(added=tuple(sorted(new.keys() - old.keys())),
                       changed=tuple(sorted(s for s in new.keys() & old.keys() if new[s] != old[s])),
                       removed=tuple(sorted(old.keys() - new.keys())))


def index_dir(root: Path, set_id: str) -> Path:
    return root / INDEXES / set_id


def read_manifest(directory: Path) -> Manifest | None:
    """The index's manifest, None when never built; a damaged one is a ``StaleIndexError`` with the fix."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        return Manifest.from_json(path.read_text(), path)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise StaleIndexError(f"{path}: damaged index manifest ({type(err).__name__}: {err}); the index is derived "
                              "data: rebuild it with `fs index build --rebuild`") from err


def new_build_id() -> str:
    """Time-ordered and unique across processes, like commit ids."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through ``write(tmp)`` and rename onto ``path``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    write_atomic(directory / MANIFEST, lambda tmp: tmp.write_text(manifest.to_json()))
