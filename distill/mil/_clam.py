"""CLAM-SB (Lu et al. 2021): gated attention plus instance-level clustering on the most and least attended tiles."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featurestore.distill.mil._pooling import ABMIL
from featurestore.distill.mil.base import HeadConfig, HeadOutput, Readout, masked_softmax


class ClamSB(ABMIL):
    """Single-branch CLAM.

    While training with bag labels, the k most attended tiles of a bag are pseudo-labelled positive
    and the k least attended negative for the bag's class's instance classifier; with more than two
    classes (subtyping) the top-k tiles are also negatives for every other class's classifier. The
    instance loss is cross-entropy (CLAM's smooth-SVM option is not implemented). Tasks without
    classes (survival, regression) train CLAM-SB without the instance loss, i.e. as ABMIL.
    """

    def __init__(self, in_dim: int, readout: Readout, cfg: HeadConfig, n_classes: int = 0) -> None:
        super().__init__(in_dim, readout, cfg, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(cfg.hidden, 2) for _ in range(n_classes))
        self.subtyping = n_classes > 2

    def forward(self, x: Tensor, mask: Tensor, coords: Tensor | None = None,
                labels: Tensor | None = None) -> HeadOutput:
        h = self.project(x)
        scores = self.attention(h)
        a = masked_softmax(scores, mask)
        z = torch.einsum("bn,bnd->bd", a.to(h.dtype), h)
        aux = None
        if self.training and labels is not None and len(self.instance_classifiers):
            aux = torch.stack([self._instance_loss(h[b][mask[b]], scores[b][mask[b]], int(labels[b]))
                               for b in range(x.shape[0])]).mean()
        return HeadOutput(self.readout(z), z, a, aux)

    def _instance_loss(self, h: Tensor, scores: Tensor, label: int) -> Tensor:
        k = min(self.cfg.k_sample, h.shape[0] // 2)
        if k == 0:
            return h.sum() * 0
        top = h[scores.topk(k).indices]
        bottom = h[(-scores).topk(k).indices]
        losses = []
        for c, classifier in enumerate(self.instance_classifiers):
            if c == label:
                target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
                losses.append(F.cross_entropy(classifier(torch.cat([top, bottom])).float(), target))
            elif self.subtyping:
                losses.append(F.cross_entropy(classifier(top).float(), torch.zeros(k, dtype=torch.long,
                                                                                   device=h.device)))
        return torch.stack(losses).mean()
