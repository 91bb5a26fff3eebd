"""Student data from the store: pairing pixels with targets, teacher views, sampling, resizing, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featurestore.distill.kd.data import (
    Augment,
    CachedTiles,
    SlideBalancedSampler,
    blocks,
    children,
    dihedral,
    dihedral_each,
    resize_tiles,
    sequential_plan,
    to_student,
)
from featurestore.encoders import TeacherConfig, preprocess
from featurestore.schemas import EncoderSpec, Slide, TilingSpec
from featurestore.store import SlideCommit, Store, tiles_table

TILING = TilingSpec(target_mpp=0.5, tile_size=224)


def test_dihedral_views_are_the_eight_symmetries_and_view_zero_is_the_tile():
    tile = torch.arange(9).view(1, 3, 3, 1)
    views = [dihedral(tile, v) for v in range(8)]
    assert torch.equal(views[0], tile)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert torch.equal(views[1][0, :, :, 0], torch.rot90(tile[0, :, :, 0], 1))
    assert torch.equal(views[4][0, :, :, 0], torch.flip(tile[0, :, :, 0], (1,)))
    batch = torch.stack([tile[0]] * 3)
    mixed = dihedral_each(batch, torch.tensor([0, 5, 0]))
    assert torch.equal(mixed[1], dihedral(tile, 5)[0]) and torch.equal(mixed[2], tile[0])


def test_children_follow_the_coordinate_rule_and_rotate_with_the_tile():
    stride, k = 224, 2
    fine = np.array([(x, y) for y in range(0, 5 * stride, stride) for x in range(0, 4 * stride, stride)
                     if (x, y) != (stride, 0)])
    coarse = np.array([(0, 0), (2 * stride, 0), (0, 2 * stride), (2 * stride, 2 * stride), (0, 4 * stride)])
    got = children(fine, coarse, stride, k)
    for i, (cx, cy) in enumerate(coarse):
        inside = [j for j, (x, y) in enumerate(fine) if cx <= x < cx + k * stride and cy <= y < cy + k * stride]
        assert sorted(got[i][got[i] >= 0].tolist()) == inside
        for j in inside:
            x, y = fine[j]
            assert got[i, ((y - cy) // stride) * k + (x - cx) // stride] == j, "children are in row-major order"
    assert got[0, 1] == -1, "a missing (non-tissue) child is −1"
    assert (got[4, 2:] == -1).all(), "children beyond the slide are −1"
    # A coarse image made of its children's colours, rotated, shows the children where the rotated grid says.
    grid = torch.tensor([[10, 11], [12, 13]]).view(1, 2, 2, 1)
    image = grid.repeat_interleave(4, 1).repeat_interleave(4, 2)
    for v in range(8):
        seen = dihedral(image, v)[0, ::4, ::4, 0]
        assert torch.equal(seen, dihedral(grid, v)[0, :, :, 0])
    assert blocks(fine, stride, 2).shape == (6, 4)


def make_store(root, views: int, n: int = 6, dim: int = 4) -> tuple[Store, np.ndarray, np.ndarray]:
    """One slide of ``n`` tiles with 16 px pixels and embeddings whose view v of tile i is (i, v, 0, ...)."""
    store = Store.create(root)
    slide = Slide(slide_id="ab" * 16, path="/data/a.svs", bytes=1, vendor="test", width=2000, height=2000,
                  mpp_x=0.5, mpp_y=0.5, objective_power=20.0, level_count=1)
    xs, ys = np.arange(n) % 3 * 224, np.arange(n) // 3 * 224
    tiles = tiles_table(slide.slide_id, TILING.id, xs, ys, 0, 224, np.ones(n))
    pixels = np.random.default_rng(0).integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)
    emb = np.zeros((n, views, dim), np.float32)
    emb[:, :, 0] = np.arange(n)[:, None]
    emb[:, :, 1] = np.arange(views)[None, :]
    spec = EncoderSpec(name="test/enc", version="1", weights_sha256="ab" * 32, embed_dim=dim, input_size=16,
                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pooling="mean")
    store.commit_slide(SlideCommit(slide, TILING, tiles, {spec: emb if views > 1 else emb[:, 0]}, pixels))
    return store, pixels, emb


@pytest.mark.parametrize("views", [1, 4])
def test_student_sees_the_view_whose_cached_target_it_gets(tmp_path, views):
    store, pixels, emb = make_store(tmp_path / "s", views)
    es = store.embedding_set("test/enc")
    assert es.views == views
    data = CachedTiles(store, [es], TILING, [store.slides()[0].slide_id], {}, input_size=16)
    assert data.views == views and data.k == 1
    chosen = np.array([0, 1, 2, 3, 1, 2]) % max(views, 2)
    batch = data.batch(np.array([[0, i] for i in range(6)]), chosen)
    for j, tile in enumerate(batch.tile.tolist()):
        v = int(chosen[j])
        assert torch.equal(batch.pixels[j], dihedral(torch.from_numpy(pixels[tile]), v))
        target_view = v if views > 1 else 0
        np.testing.assert_array_equal(batch.teachers["test/enc"][j].numpy(), emb[tile, target_view])
    assert (batch.labels == -1).all()
    drawn = np.concatenate([b.views.numpy() for b in data.iterate(sequential_plan([6], 3), augment=Augment(),
                                                                     seed=1)])
    assert drawn.max() < (views if views > 1 else 8), "with several cached views the student only sees those"


def test_sampler_balances_slides_groups_by_memory_and_is_reproducible():
    sampler = SlideBalancedSampler([3, 10, 5], per_slide=4, units_per_batch=4, sizes=[1, 1, 1], budget=10, seed=7)
    plan = sampler.epoch(0)
    items = np.concatenate(plan)
    assert [len(b) for b in plan] == [4, 4, 4]
    assert np.bincount(items[:, 0]).tolist() == [4, 4, 4]
    assert set(items[items[:, 0] == 0, 1].tolist()) == {0, 1, 2}, "a small slide shows every tile before repeating"
    assert all(np.array_equal(a, b) for a, b in zip(plan, sampler.epoch(0), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(plan, sampler.epoch(1), strict=True))
    tight = SlideBalancedSampler([8, 8, 8], per_slide=4, units_per_batch=4, sizes=[10, 10, 10], budget=15, seed=0)
    assert all(len(set(b[:, 0].tolist())) == 1 for b in tight.epoch(0)), "slides that do not fit are visited apart"


def test_resize_matches_the_encoder_preprocessing_exactly():
    pixels = np.random.default_rng(1).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cfg = TeacherConfig(name="student:x", builder="featurestore.encoders.student:student_encoder", embed_dim=8,
                        input_size=96, mean=mean, std=std, pooling="pooler", interpolation="bilinear")
    want = preprocess(torch.from_numpy(pixels), cfg)
    got = to_student(torch.from_numpy(resize_tiles(pixels, 96)), mean, std, augment=None, generator=torch.Generator())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_colour_augmentation_is_bounded_reproducible_and_off_when_zero():
    x = torch.rand(4, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    aug = Augment(hed=0.1, brightness=0.2, contrast=0.2, saturation=0.2)
    a = aug.colour(x, torch.Generator().manual_seed(3))
    b = aug.colour(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, x)
    none = Augment(hed=0.0, brightness=0.0, contrast=0.0, saturation=0.0)
    assert torch.equal(none.colour(x, torch.Generator()), x.clamp(0, 1))
    stains_only = Augment(hed=1e-9, brightness=0.0, contrast=0.0, saturation=0.0)
    torch.testing.assert_close(stains_only.colour(x.clamp(0.05, 1), torch.Generator()), x.clamp(0.05, 1),
                               atol=1e-5, rtol=0)
