"""Teacher views of a tile: the 8 dihedral symmetries of a square, numbered once for both stages.

Stage one caches the teacher's embedding of ``dihedral(tile, v)`` for v < K (``--teacher-views K``);
stage two shows a student the very view whose cached embedding it is trained against.
"""

from __future__ import annotations

import torch

DIHEDRAL_VIEWS = 8


def dihedral(x: torch.Tensor, view: int) -> torch.Tensor:
    """View 0..7 of (..., H, W, C) tiles: rotate 90°·(view mod 4), then mirror left-right if view ≥ 4.

    View 0 is the tile itself.
    """
    y = torch.rot90(x, view % 4, dims=(-3, -2))
    return torch.flip(y, dims=(-2,)) if view >= 4 else y
