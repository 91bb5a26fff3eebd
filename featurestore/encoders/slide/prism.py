"""PRISM's slide aggregator (huggingface.co/paige-ai/Prism: ``perceiver.py``, ``configuring_prism.py``).

``slide_representations`` is the Perceiver resampler alone (the BioGPT report decoder is not
needed): 1 + 512 learned latent queries of width 1280 read the Virchow tile embeddings (2560-d) by
single-head cross-attention, each of 8 layers following its cross-attention with a 6-block
self-attention stack; layers 2-7 reuse layer 1's cross-attention weights and layers 1-7 reuse layer
0's self-attention stack (``share_xattn_start_layer=1``, ``share_tf_start_layer=0``), so the
checkpoint holds those tensors once or under every alias. The slide embedding is the first latent,
layer-normed (``image_embedding``). For one slide the vendor's mask is a tensor of float ones added to
every attention logit, which leaves the softmax unchanged; it is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from featurestore.encoders.slide._config import SlideEncoderConfig

TOWER = "image_resampler."


@dataclass(frozen=True)
class PerceiverShape:
    """``PerceiverConfig`` as PRISM's hub configuration sets it."""

    latent_seq: int = 512
    latent_dim: int = 1280
    context_dim: int = 2560
    mhsa_heads: int = 8
    perceiver_depth: int = 8
    transformer_depth: int = 6
    share_xattn_start_layer: int = 1
    share_tf_start_layer: int = 0


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


class FeedForward(nn.Module):
    """Pre-norm GEGLU MLP of width ``dim`` (``mlp_mult=1``): Linear to 2·dim, x · GELU(gate), Linear back."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net = nn.Sequential(nn.Linear(dim, dim * 2), GEGLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


class CrossAttention(nn.Module):
    """One head of width ``dim`` over the un-normed context (``c_norm=False``), bias-free projections."""

    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.x_norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, dim * 2, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_kv(context).chunk(2, dim=-1)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q = self.to_q(self.x_norm(x))
        return self.to_out(F.scaled_dot_product_attention(q[:, None], kv[0][:, None], kv[1][:, None])[:, 0])


class SelfAttention(nn.Module):
    """PRISM's ``MHSA``: pre-norm ``nn.MultiheadAttention`` without biases."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.mha(x, x, x, need_weights=False)[0]


class Perceiver(nn.Module):
    def __init__(self, shape: PerceiverShape) -> None:
        super().__init__()
        self.shape = shape
        dim = shape.latent_dim
        self.latents = nn.Parameter(torch.zeros(1 + shape.latent_seq, dim))
        layers: list[nn.ModuleDict] = []
        for i in range(shape.perceiver_depth):
            xattn = (nn.ModuleDict({"xattn": CrossAttention(dim, shape.context_dim), "ff": FeedForward(dim)})
                     if i <= shape.share_xattn_start_layer else layers[-1]["xattn"])
            tf = (nn.ModuleList(nn.ModuleDict({"mhsa": SelfAttention(dim, shape.mhsa_heads), "ff": FeedForward(dim)})
                                for _ in range(shape.transformer_depth))
                  if i <= shape.share_tf_start_layer else layers[-1]["tf"])
            layers.append(nn.ModuleDict({"xattn": xattn, "tf": tf}))
        self.layers = nn.ModuleList(layers)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        x = self.latents[None]
        kv = None
        for i, layer in enumerate(self.layers):
            xattn = layer["xattn"]
            if kv is None or i <= self.shape.share_xattn_start_layer:
                kv = xattn["xattn"].kv(context)
            x = xattn["xattn"](x, kv) + x
            x = xattn["ff"](x) + x
            for block in layer["tf"]:
                x = block["mhsa"](x) + x
                x = block["ff"](x) + x
        return x


class PerceiverResampler(nn.Module):
    def __init__(self, shape: PerceiverShape) -> None:
        super().__init__()
        self.cls_norm = nn.LayerNorm(shape.latent_dim)
        self.img_norm = nn.LayerNorm(shape.latent_dim)
        self.perceiver = Perceiver(shape)

    def encode(self, features: torch.Tensor, coords: torch.Tensor, patch_size_lv0: int) -> torch.Tensor:
        """``slide_representations(...)["image_embedding"]``: the first latent, layer-normed."""
        return self.cls_norm(self.perceiver(features[None])[:, 0])


def prism(config: SlideEncoderConfig, in_dim: int) -> PerceiverResampler:
    return PerceiverResampler(PerceiverShape(context_dim=in_dim))


def image_resampler(state: dict[str, torch.Tensor], model: PerceiverResampler) -> dict[str, torch.Tensor]:
    """The ``image_resampler.*`` tensors of the full PRISM checkpoint, with every shared layer's alias.

    Saving drops the duplicate names of tensors shared between layers (transformers keeps one), so each
    alias the module has is filled from the tensor it shares; the decoder's tensors are not loaded.
    """
    tower = {k.removeprefix(TOWER): v for k, v in state.items() if k.startswith(TOWER)}
    shared: dict[int, list[str]] = {}
    for name, param in model.state_dict(keep_vars=True).items():
        shared.setdefault(id(param), []).append(name)
    for names in shared.values():
        present = next((n for n in names if n in tower), None)
        if present is not None:
            tower.update({n: tower[present] for n in names if n not in tower})
    return tower
