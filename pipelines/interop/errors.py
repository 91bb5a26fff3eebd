"""The one error the interop package raises."""

from __future__ import annotations

from featurestore.schemas import FsError


class InteropError(FsError, ValueError):
    """A feature file that cannot be imported as asked, or a set that cannot be exported in a layout."""
