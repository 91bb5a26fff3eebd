"""Error hierarchy shared by every package.

Each class also subclasses the matching built-in, so callers can catch either
``FsError`` or the ordinary Python exception. Messages are one line: what is
wrong, where (file and row), and the fix.
"""


class FsError(Exception):
    """Base class of every error this project raises on purpose."""


class InvalidRecordError(FsError, ValueError):
    """A record field failed validation."""


class NotAStoreError(FsError, FileNotFoundError):
    """The path is not a feature store."""


class StoreExistsError(FsError, FileExistsError):
    """A store (or something else) already occupies the path."""


class StoreVersionError(FsError, RuntimeError):
    """The store was written by a newer format version than this code reads."""


class ReadOnlyError(FsError, PermissionError):
    """A write was attempted through a read-only handle or a read-only SQL session."""


class LabelsError(FsError, ValueError):
    """A labels file is malformed or does not match the store's slides."""


class InvalidArgumentError(FsError, ValueError):
    """A public function got an argument it cannot use; the message names the argument and the valid choices."""


class MissingDependencyError(FsError, ImportError):
    """An optional package a call needs is not installed; the message says what to install."""


class SqlError(FsError, ValueError):
    """DuckDB could not run a query (syntax, unknown table or column, types); the message is DuckDB's."""


class NotFoundError(FsError, KeyError):
    """Something looked up by name or id is not in the store (or not in the pinned snapshot)."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else ""


class UnknownEmbeddingSetError(NotFoundError):
    """No embedding set matches the requested model or id."""


class BagNotFoundError(NotFoundError):
    """A slide has no bag (embeddings) in the embedding set."""


class TilesNotFoundError(NotFoundError):
    """A slide has no tiles for the tiling."""


class PixelsNotCachedError(NotFoundError):
    """A slide's tile pixels were not cached for the tiling."""


class TileIdsNotFoundError(NotFoundError):
    """Tile ids that belong to no slide of the embedding set."""


class SlideError(FsError, OSError):
    """A slide cannot be opened or read."""


class MissingMppError(SlideError):
    """A slide has no µm/px metadata and none was assumed."""


class ModelError(FsError, RuntimeError):
    """A teacher model cannot be built or its weights cannot be loaded."""


class StoreDamageError(FsError, OSError):
    """A file the store's log says was written is missing, short or fails its checksum."""


class StoreWriteError(FsError, OSError):
    """The store's disk refused a write (full, quota, read-only, permissions); nothing was committed."""
