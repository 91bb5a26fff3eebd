"""Heads: padding never changes a bag's outputs or gradients; attention is a distribution over real tiles;
Nyström attention reduces to exact attention; PPEG sees the real tile grid; CLAM's instance loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featurestore.distill.mil import HEAD_NAMES, HEADS, HeadConfig, NystromAttention, build_head
from featurestore.distill.mil._transmil import PPEG

DIM = 12


def _head(name: str, n_classes: int = 2, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    cfg = HeadConfig(name, hidden=16, attention_dim=8, dropout=dropout, heads=4, landmarks=6, k_sample=3)
    return build_head(cfg, DIM, lambda d: nn.Linear(d, 3), n_classes)


def _bag(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` tiles at distinct cells of an 8 × 8 grid."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, DIM, generator=g)
    cells = torch.randperm(64, generator=g)[:n]
    return x, torch.stack([cells % 8, cells // 8], -1)[None]


def _pad(x: torch.Tensor, coords: torch.Tensor, extra: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append ``extra`` padded rows full of large garbage, so any leak through the mask would show."""
    n = x.shape[1]
    x = torch.cat([x, 1e3 * torch.randn(1, extra, DIM)], 1)
    coords = torch.cat([coords, torch.full((1, extra, 2), 7)], 1)
    mask = torch.arange(n + extra)[None] < n
    return x, coords, mask


def test_registry_matches_names():
    assert tuple(HEADS) == HEAD_NAMES


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_padding_changes_neither_outputs_nor_gradients(name):
    head = _head(name)
    x, coords = _bag(37, 1)
    xp, cp, mask = _pad(x, coords, 11)
    labels = torch.tensor([1])

    head.train()
    alone = head(x, torch.ones(1, 37, dtype=torch.bool), coords, labels)
    loss = alone.logits.sum() + alone.embedding.square().sum() + (alone.aux_loss or 0)
    grads_alone = torch.autograd.grad(loss, list(head.parameters()), allow_unused=True)
    padded = head(xp, mask, cp, labels)
    loss = padded.logits.sum() + padded.embedding.square().sum() + (padded.aux_loss or 0)
    grads_padded = torch.autograd.grad(loss, list(head.parameters()), allow_unused=True)

    torch.testing.assert_close(padded.logits, alone.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.embedding, alone.embedding, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.attention[:, :37], alone.attention, atol=1e-6, rtol=1e-5)
    assert torch.all(padded.attention[:, 37:] == 0)
    if name == "clam-sb":
        torch.testing.assert_close(padded.aux_loss, alone.aux_loss)
    for a, p in zip(grads_alone, grads_padded, strict=True):
        if a is None:
            assert p is None
        else:
            torch.testing.assert_close(p, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_a_bag_scores_the_same_alone_and_in_a_batch(name):
    head = _head(name).eval()
    short, short_coords = _bag(9, 2)
    long, long_coords = _bag(50, 3)
    x = torch.zeros(2, 50, DIM)
    x[0, :9], x[1] = short[0], long[0]
    coords = torch.zeros(2, 50, 2, dtype=torch.long)
    coords[0, :9], coords[1] = short_coords[0], long_coords[0]
    mask = torch.arange(50)[None] < torch.tensor([[9], [50]])
    with torch.no_grad():
        batch = head(x, mask, coords)
        one = head(short, torch.ones(1, 9, dtype=torch.bool), short_coords)
    torch.testing.assert_close(batch.logits[:1], one.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.attention[0, :9], one.attention[0], atol=1e-6, rtol=1e-5)
    assert torch.all(batch.attention[0, 9:] == 0), "padding gets no attention"
    torch.testing.assert_close(batch.attention[0, :9].sum(), torch.tensor(1.0))
    torch.testing.assert_close(batch.attention[1].sum(), torch.tensor(1.0))


def test_heads_report_their_embedding_width():
    for name in HEAD_NAMES:
        head = _head(name).eval()
        x, coords = _bag(20, 4)
        out = head(x, torch.ones(1, 20, dtype=torch.bool), coords)
        assert out.logits.shape == (1, 3) and out.embedding.shape == (1, head.embed_dim) == (1, 16)


def test_nystrom_attention_is_exact_when_every_token_is_a_landmark():
    torch.manual_seed(0)
    attention = NystromAttention(16, heads=2, landmarks=32, dropout=0.0, pinv_iterations=25)
    nn.init.zeros_(attention.residual.weight)
    x = torch.randn(1, 20, 16)
    out, first_row = attention(x, torch.ones(1, 20, dtype=torch.bool))
    q, k, v = attention.to_qkv(x).reshape(1, 20, 3, 2, 8).permute(2, 0, 3, 1, 4)
    exact = torch.softmax(q @ k.transpose(-1, -2) * attention.scale, -1)
    expected = attention.to_out((exact @ v).transpose(1, 2).reshape(1, 20, 16))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first_row, exact[:, :, 0].mean(1), atol=1e-4, rtol=1e-4)


def test_nystrom_approximation_stays_close_with_fewer_landmarks():
    torch.manual_seed(0)
    attention = NystromAttention(16, heads=2, landmarks=16, dropout=0.0)
    nn.init.zeros_(attention.residual.weight)
    x = torch.randn(1, 64, 16) * 0.3
    out, _ = attention(x, torch.ones(1, 64, dtype=torch.bool))
    q, k, v = attention.to_qkv(x).reshape(1, 64, 3, 2, 8).permute(2, 0, 3, 1, 4)
    exact = torch.softmax(q @ k.transpose(-1, -2) * attention.scale, -1)
    expected = attention.to_out((exact @ v).transpose(1, 2).reshape(1, 64, 16))
    assert (out - expected).abs().max() < 0.05 * expected.abs().max()


def test_ppeg_mixes_grid_neighbours_only():
    torch.manual_seed(0)
    ppeg = PPEG(4)
    tokens = torch.randn(1, 3, 4)
    mask = torch.ones(1, 3, dtype=torch.bool)
    near = torch.tensor([[[0, 0], [1, 0], [20, 20]]])
    base = ppeg(tokens, near, mask)
    moved_far = ppeg(tokens, torch.tensor([[[0, 0], [1, 0], [30, 5]]]), mask)
    moved_near = ppeg(tokens, torch.tensor([[[0, 0], [9, 9], [20, 20]]]), mask)
    torch.testing.assert_close(moved_far[:, 0], base[:, 0])
    assert not torch.allclose(moved_near[:, 0], base[:, 0])


def test_transmil_needs_coordinates():
    head = _head("transmil")
    with pytest.raises(ValueError, match="coordinates"):
        head(torch.randn(1, 5, DIM), torch.ones(1, 5, dtype=torch.bool))


def test_clam_instance_loss_only_when_training_with_classes():
    x, coords = _bag(30, 5)
    mask = torch.ones(1, 30, dtype=torch.bool)
    head = _head("clam-sb")
    assert head.train()(x, mask, coords, torch.tensor([0])).aux_loss > 0
    assert head.eval()(x, mask, coords, torch.tensor([0])).aux_loss is None
    assert head.train()(x, mask, coords).aux_loss is None
    assert _head("clam-sb", n_classes=0).train()(x, mask, coords, torch.tensor([0])).aux_loss is None
    three = _head("clam-sb", n_classes=3)
    assert three.subtyping and three.train()(x, mask, coords, torch.tensor([2])).aux_loss > 0


def test_max_pool_attention_is_the_share_of_features_won():
    head = _head("max").eval()
    x = torch.zeros(1, 4, DIM)
    x[0, 2] = 10.0
    with torch.no_grad():
        out = head(x, torch.ones(1, 4, dtype=torch.bool))
    h = head.project(x)[0]
    winners = h.argmax(0)
    torch.testing.assert_close(out.attention[0], torch.bincount(winners, minlength=4).float() / h.shape[1])


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(name="gnn"), "unknown head"),
    (dict(name="transmil", hidden=30, heads=8), "divisible"),
    (dict(dropout=1.0), r"\[0, 1\)"),
])
def test_bad_head_configs_are_refused(kwargs, match):
    from featurestore.distill.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        HeadConfig(**kwargs)
