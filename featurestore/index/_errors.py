"""Errors of the index package; each is an ``FsError`` so the CLI prints it as one line."""

from featurestore.schemas import FsError


class IndexConfigError(FsError, ValueError):
    """An index kind or parameter that cannot work (unknown kind, nprobe > nlist, PQ size not dividing d)."""


class IndexBuildError(FsError, RuntimeError):
    """An index cannot be built now: nothing to index, or a GPU was required but none is usable."""


class IndexMissingError(FsError, FileNotFoundError):
    """No index has been built for an embedding set."""


class StaleIndexError(FsError, RuntimeError):
    """The embedding set changed since its index was built; searching it would silently miss or mix slides."""


class QueryError(FsError, ValueError):
    """A search that cannot be answered as asked (no query, two queries, query SQL returning no vector...)."""
