"""Shared fixtures: the real slide, and stores filled through the real write path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featurestore.schemas import EncoderSpec, Slide, TilingSpec
from featurestore.store import SlideCommit, Store, tiles_table

REAL_SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def real_slide() -> Path:
    if not REAL_SLIDE.is_file():
        pytest.skip(f"real test slide not found at {REAL_SLIDE}")
    return REAL_SLIDE


def make_slide(i: int) -> Slide:
    return Slide(slide_id=f"{i:032x}", path=f"/data/slide_{i}.svs", bytes=1000 + i, vendor="aperio",
                 width=4000, height=3000, mpp_x=0.5, mpp_y=0.5, objective_power=20.0, level_count=3)


def make_encoder(name: str = "test/enc", dim: int = 16) -> EncoderSpec:
    return EncoderSpec(name=name, version="1", weights_sha256="ab" * 32, embed_dim=dim, input_size=224,
                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), pooling="cls")


def commit_random_slide(store: Store, i: int, tiling: TilingSpec, encoders: list[EncoderSpec], n: int,
                        *, dtype: str = "float16", pixels: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """Commit slide ``i`` with ``n`` tiles and random embeddings; return the float32 arrays written."""
    rng = np.random.default_rng(seed + i)
    slide = make_slide(i)
    xs, ys = np.divmod(np.arange(n), 50)
    tiles = tiles_table(slide.slide_id, tiling.id, xs * 448, ys * 448, 0, 448, rng.uniform(0.3, 1, n))
    emb = {e: rng.standard_normal((n, e.embed_dim)).astype(np.float32) for e in encoders}
    pix = rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8) if pixels else None
    store.commit_slide(SlideCommit(slide, tiling, tiles, emb, pix, dtype))
    return {e.name: a for e, a in emb.items()}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny heads train several times faster on one intra-op thread than on two small CPU cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiling() -> TilingSpec:
    return TilingSpec(target_mpp=0.5, tile_size=224)
