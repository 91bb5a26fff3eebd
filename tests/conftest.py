"""Shared fixtures (the real slide, stores filled through the real write path) and the test tiers.

Tiers are markers, registered here: ``slow`` tests run only with ``--slow`` (``pytest --slow -m slow``
runs that tier alone); ``gpu`` tests skip, saying why, where ``torch.cuda.is_available()`` is false.
tests/README.md lists what each tier covers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featurestore.schemas import EncoderSpec, Slide, TilingSpec
from featurestore.store import SlideCommit, Store, tiles_table

REAL_SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run the slow tier: research comparisons over "
                     "seeds and folds (tests marked slow)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: research comparisons over seeds and folds, minutes each; skipped "
                            "unless pytest is given --slow")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped where torch.cuda.is_available() is false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--slow"):
        skip_slow = pytest.mark.skip(reason="slow tier: run it with pytest --slow")
        for item in items:
            if item.get_closest_marker("slow"):
                item.add_marker(skip_slow)
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            skip_gpu = pytest.mark.skip(reason="gpu tier: torch.cuda.is_available() is false on this machine")
            for item in gpu:
                item.add_marker(skip_gpu)


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
