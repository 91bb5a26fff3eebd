"""Losses of cross-cohort and ensemble distillation: triplet, symmetric InfoNCE, ensemble logit KD.

All work on L2-normalised vectors, so distances are cosine distances and one margin or temperature
means the same thing whatever the teacher's feature scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float) -> Tensor:
    """mean(max(0, d(a, p) − d(a, n) + margin)) with d = 1 − cosine similarity (GUIDE-US's triplet)."""
    a, p, n = (F.normalize(t, dim=-1) for t in (anchor, positive, negative))
    d_pos = 1 - (a * p).sum(-1)
    d_neg = 1 - (a * n).sum(-1)
    return F.relu(d_pos - d_neg + margin).mean()


def info_nce(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Symmetric CLIP loss: row i of ``student`` and row i of ``teacher`` are the positive pair, every other
    row of the batch a negative, in both directions.

    The data are unpaired, so the caller pairs each student bag with a random teacher-bank item of
    the same label. Other rows of the same label then count as negatives although they are not —
    the weakness of CLIP-style losses on unpaired data that GUIDE-US reported; it is kept on purpose
    so the comparison is with CLIP as published.
    """
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    logits = s @ t.T / temperature
    target = torch.arange(len(s), device=s.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def ensemble_probabilities(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Soft targets of K heads: the mean of their tempered softmaxes, ``logits`` (K, n, C) → (n, C).

    Averaging probabilities, not logits, keeps a head that is confidently wrong from dominating.
    """
    return torch.softmax(logits / temperature, dim=-1).mean(0)


def soft_target_loss(student_logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Hinton's KD: T² · KL(targets ‖ softmax(student / T)), averaged over the batch."""
    log_p = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(log_p, targets, reduction="batchmean") * temperature**2
