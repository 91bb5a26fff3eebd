"""The index kinds: the one list that the library, ``fs index build --kind`` and its help take their names from.

No FAISS here, so the ``fs`` command can list the kinds without loading it.
"""

from __future__ import annotations

from typing import Literal, get_args

IndexKind = Literal["flat", "ivf", "ivf-pq", "hnsw"]
KINDS: tuple[IndexKind, ...] = get_args(IndexKind)

EXACT_BELOW = 100_000
"""Default kind: exact (flat) below this many vectors, where a full scan costs milliseconds; IVF above."""


def default_kind(n: int) -> IndexKind:
    """The kind an index of ``n`` vectors gets when none is asked for."""
    return "flat" if n < EXACT_BELOW else "ivf"
