"""Distillation objectives behind one interface: student output + cached targets → named loss terms.

Every objective is an ``nn.Module`` owning its heads (projections, spatial head, classifier,
learned weights), so one optimiser trains the student and them together. ``forward`` returns a
dict of already-weighted terms; the training loss is their sum and each term is logged on its own.
``export_projection`` is the head that maps the student into its primary teacher's space (None when
the objective has none); it is saved with the student, so ``student:RUN_DIR`` embeds in that space.

Targets come from the store only: teacher embeddings (``teachers``), the child tiles of a coarse
tile (``child_mask``), weak tile labels broadcast from slide labels, and teacher-head logits
computed from cached embeddings. No objective ever sees a teacher network. Two use no teacher at
all (``BASELINES``: supervised on weak labels, SimSiam): the from-scratch students a distilled one
is compared with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featurestore.distill.errors import ConfigError, require

OBJECTIVES = ("feature", "multi-teacher", "xmag", "relational", "logit", "dino", "supervised", "simsiam")
BASELINES = ("supervised", "simsiam")
"""Objectives that use no teacher: the from-scratch students distilled ones are compared with."""
XMAG_DISTANCES = ("cosine", "mse", "cosine+mse")


@dataclass(frozen=True, eq=False)
class StudentOutput:
    """``embedding`` (B, E) the student's pooled features; ``feature_map`` (B, C, h, w) before pooling."""

    embedding: Tensor
    feature_map: Tensor


@dataclass(frozen=True, eq=False)
class Targets:
    """What the cache provides for a batch.

    ``teachers`` maps teacher name → (B, D) embeddings, or (B, k·k, D) child embeddings for XMAG
    with ``child_mask`` (B, k·k) true where that child tile exists (tissue). ``labels`` (B,) are weak
    tile classes (−1 unknown). ``logits`` (B, C) are a teacher head's outputs on the cached
    embeddings. ``regions`` (B, 3) is (block, row, col) of each tile in a b×b neighbourhood of one
    slide, for region-level relations. ``second_view`` is the student's output on another
    augmentation of the same tiles, for objectives that declare ``views = 2``.
    """

    teachers: dict[str, Tensor]
    child_mask: Tensor | None = None
    labels: Tensor | None = None
    logits: Tensor | None = None
    regions: Tensor | None = None
    second_view: StudentOutput | None = None


@dataclass(frozen=True)
class ObjectiveConfig:
    """Hyper-parameters of every objective; each reads only its own.

    feature / multi-teacher: ``cosine`` and ``smooth_l1`` weights (β = ``beta``); multi-teacher:
    ``teacher_weights`` (one per teacher, default 1) and ``learned_weights`` (homoscedastic
    uncertainty weighting, Kendall et al. 2018). xmag: ``xmag_lambda`` λ and ``xmag_distance``.
    relational: ``relation_weight``, ``feature_weight``, ``relation_feature_weight``, ``levels``
    (neighbourhood pyramid, tiles per side). logit: ``alpha``, ``tau``. dino: ``prototypes``,
    ``teacher_temp``, ``student_temp``, ``center_momentum``, ``seed`` (of the fixed prototypes).
    """

    cosine: float = 1.0
    smooth_l1: float = 1.0
    beta: float = 1.0
    teacher_weights: tuple[float, ...] = ()
    learned_weights: bool = False
    xmag_lambda: float = 0.7
    xmag_distance: str = "cosine+mse"
    relation_weight: float = 0.1
    feature_weight: float = 0.05
    relation_feature_weight: float = 0.01
    levels: tuple[int, ...] = (1, 2, 4)
    alpha: float = 0.5
    tau: float = 4.0
    prototypes: int = 64
    teacher_temp: float = 0.04
    student_temp: float = 0.1
    center_momentum: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        require(min(self.cosine, self.smooth_l1) >= 0 and self.cosine + self.smooth_l1 > 0, "cosine",
                "and smooth_l1 weights must be >= 0 and not both 0")
        require(self.xmag_distance in XMAG_DISTANCES, "xmag_distance", f"must be one of {', '.join(XMAG_DISTANCES)}")
        require(0 <= self.alpha <= 1, "alpha", "must be in [0, 1]")
        require(self.tau > 0, "tau", "must be > 0")
        require(self.prototypes >= 2, "prototypes", "must be >= 2")
        require(min(self.teacher_temp, self.student_temp) > 0, "teacher_temp",
                "and student_temp (DINO temperatures) must be > 0")
        require(0 <= self.center_momentum < 1, "center_momentum", "must be in [0, 1)")
        require(bool(self.levels) and all(v >= 1 for v in self.levels), "levels", "must be >= 1")
        require(all(w >= 0 for w in self.teacher_weights), "teacher_weights", "must be >= 0")


class Objective(nn.Module, ABC):
    """A distillation objective: ``forward(student_out, targets)`` → named, weighted loss terms.

    ``views`` is how many augmentations of each tile the student must see per step (2: the trainer
    fills ``targets.second_view``).
    """

    views: ClassVar[int] = 1

    @abstractmethod
    def forward(self, out: StudentOutput, targets: Targets) -> dict[str, Tensor]:
        """Loss terms (scalars, already weighted); the training loss is their sum."""

    def export_projection(self) -> nn.Linear | None:
        """The head into the primary teacher's space, exported with the student; None if there is none."""
        return None


def cosine_distance(z: Tensor, t: Tensor) -> Tensor:
    """1 − cos per row (B,); float32 whatever the autocast dtype."""
    return 1 - F.cosine_similarity(z.float(), t.float(), dim=-1, eps=1e-8)


def feature_loss(z: Tensor, t: Tensor, cosine: float, smooth_l1: float, beta: float) -> dict[str, Tensor]:
    """``cosine``·mean(1 − cos) + ``smooth_l1``·mean elementwise smooth-L1 (β), as two terms."""
    terms = {}
    if cosine:
        terms["cosine"] = cosine * cosine_distance(z, t).mean()
    if smooth_l1:
        terms["smooth_l1"] = smooth_l1 * F.smooth_l1_loss(z.float(), t.float(), beta=beta)
    return terms


class FeatureKD(Objective):
    """Feature distillation: a linear projection to the teacher's width, cosine and/or smooth-L1."""

    def __init__(self, student_dim: int, teacher: str, teacher_dim: int, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.teacher = teacher
        self.cfg = cfg
        self.head = nn.Linear(student_dim, teacher_dim)

    def forward(self, out: StudentOutput, targets: Targets) -> dict[str, Tensor]:
        return feature_loss(self.head(out.embedding), targets.teachers[self.teacher], self.cfg.cosine,
                            self.cfg.smooth_l1, self.cfg.beta)

    def export_projection(self) -> nn.Linear:
        return self.head


class MultiTeacherKD(Objective):
    """One projection head per teacher (any widths), per-teacher weights w_i.

    Fixed weighting: Σ w_i·L_i. Learned weighting (Kendall et al. 2018): Σ w_i·(exp(−s_i)·L_i + s_i)
    with log-variances s_i registered as parameters initialised at 0, so a teacher whose targets the
    student cannot fit is down-weighted instead of dominating. L_i is the feature loss.
    """

    def __init__(self, student_dim: int, teacher_dims: dict[str, int], cfg: ObjectiveConfig) -> None:
        super().__init__()
        if len(teacher_dims) < 2:
            raise ConfigError("the multi-teacher objective needs two or more --teacher; use --objective feature")
        weights = cfg.teacher_weights or (1.0,) * len(teacher_dims)
        if len(weights) != len(teacher_dims):
            raise ConfigError(f"{len(weights)} --teacher-weight values for {len(teacher_dims)} teachers; "
                              "give one per --teacher")
        self.names = list(teacher_dims)
        self.cfg = cfg
        self.heads = nn.ModuleList(nn.Linear(student_dim, d) for d in teacher_dims.values())
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))
        self.log_vars = nn.Parameter(torch.zeros(len(self.names))) if cfg.learned_weights else None

    def forward(self, out: StudentOutput, targets: Targets) -> dict[str, Tensor]:
        terms = {}
        for i, (name, head) in enumerate(zip(self.names, self.heads, strict=True)):
            parts = feature_loss(head(out.embedding), targets.teachers[name], self.cfg.cosine, self.cfg.smooth_l1,
                                 self.cfg.beta)
            loss = sum(parts.values())
            if self.log_vars is not None:
                loss = torch.exp(-self.log_vars[i]) * loss + self.log_vars[i]
            terms[f"teacher:{name}"] = self.weights[i] * loss
        return terms

    def export_projection(self) -> nn.Linear:
        return self.heads[0]


class XmagKD(Objective):
    """Cross-magnification distillation: a low-magnification tile predicts its k×k high-magnification children.

    Global term: distance between the projected student embedding and the mean of the child
    teacher embeddings that exist. Local term (×λ): a spatial head (adaptive average pooling of the
    feature map to k×k, then a 1×1 convolution to the teacher's width) predicts each child; cells
    without a child (non-tissue) are masked out. The distance is 1 − cos, the MSE (mean over dims),
    or their sum (the default: cosine alone ignores the norm, which centred targets carry).
    """

    def __init__(self, student_dim: int, channels: int, teacher: str, teacher_dim: int, k: int,
                 cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.teacher = teacher
        self.k = k
        self.cfg = cfg
        self.head = nn.Linear(student_dim, teacher_dim)
        self.spatial = nn.Sequential(nn.AdaptiveAvgPool2d(k), nn.Conv2d(channels, teacher_dim, 1))

    def _distance(self, z: Tensor, t: Tensor) -> Tensor:
        mse = (z.float() - t.float()).pow(2).mean(-1)
        if self.cfg.xmag_distance == "mse":
            return mse
        cos = cosine_distance(z, t)
        return cos if self.cfg.xmag_distance == "cosine" else cos + mse

    def forward(self, out: StudentOutput, targets: Targets) -> dict[str, Tensor]:
        children = targets.teachers[self.teacher].float()
        mask = targets.child_mask.float()
        present = mask.sum(1).clamp(min=1)
        mean_child = (children * mask[..., None]).sum(1) / present[:, None]
        global_term = self._distance(self.head(out.embedding), mean_child).mean()
        local = self.spatial(out.feature_map).flatten(2).transpose(1, 2)
        per_child = self._distance(local, children)
        local_term = (per_child * mask).sum() / mask.sum().clamp(min=1)
        return {"global": global_term, "local": self.cfg.xmag_lambda * local_term}

    def export_projection(self) -> nn.Linear:
        return self.head


def relation_map(f: Tensor) -> Tensor:
    """Row-L2-normalised Gram matrix of a set of embeddings (n, d) → (n, n)."""
    gram = f.float() @ f.float().T
    return F.normalize(gram, dim=1, eps=1e-8)


def region_embeddings(f: Tensor, regions: Tensor, level: int) -> Tensor:
    """Mean embedding of each level×level window of adjacent tiles (same block) that has a tile in the batch."""
    keys = torch.stack([regions[:, 0], regions[:, 1] // level, regions[:, 2] // level], 1)
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    n = int(inverse.max()) + 1
    sums = torch.zeros(n, f.shape[1], device=f.device, dtype=torch.float32).index_add_(0, inverse, f.float())
    counts = torch.zeros(n, device=f.device).index_add_(0, inverse, torch.ones_like(inverse, dtype=torch.float32))
    return sums / counts[:, None]


class RelationalKD(Objective):
    """HVisKD-style relational distillation, with each term's definition spelled out.

    With s the student embedding, z = P s its projection to the teacher's width, t the teacher
    embedding and R(·) the row-L2-normalised Gram matrix of a batch:

    - relation maps (×0.1): mean over pyramid levels ℓ of MSE(R(s_ℓ), R(t_ℓ)), where level 1 is the
      batch's tiles (sample-level relations) and level ℓ > 1 pools each ℓ×ℓ window of adjacent tiles
      of one slide into a region embedding (region-level relations; needs ``targets.regions``);
    - feature (×0.05): MSE(z, t);
    - relation-aware feature (×0.01): MSE(z + γ·R(s)z/B, t + γ·R(t)t/B) over a batch of B tiles, each
      side enriched with its relation-weighted context; the scale γ is a parameter initialised at 0,
      so training starts from the plain feature loss and learns how much context to match.
    """

    def __init__(self, student_dim: int, teacher: str, teacher_dim: int, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.teacher = teacher
        self.cfg = cfg
        self.head = nn.Linear(student_dim, teacher_dim)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, out: StudentOutput, targets: Targets) -> dict[str, Tensor]:
        s = out.embedding.float()
        t = targets.teachers[self.teacher].float()
        z = self.head(out.embedding).float()
        levels = self.cfg.levels if targets.regions is not None else (1,)
        relation = []
        for level in levels:
            if level == 1:
                relation.append(F.mse_loss(relation_map(s), relation_map(t)))
            else:
                relation.append(F.mse_loss(relation_map(region_embeddings(s, targets.regions, level)),
                                           relation_map(region_embeddings(t, targets.regions, level))))
        n = s.shape[0]
        enriched_s = z + self.gamma * (relation_map(s) @ z) / n
        enriched_t = t + self.gamma * (relation_map(t) @ t) / n
        return {"relation": self.cfg.relation_weight * torch.stack(relation).mean(),
                "feature": self.cfg.feature_weight * F.mse_loss(z, t),
                "relation_feature": self.cfg.relation_feature_weight * F.mse_loss(enriched_s, enriched_t)}

    def export_projection(self) -> nn.Linear:
        return self.head


def hinton_kd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, alpha: float,
              tau: float) -> dict[str, Tensor]:
    """α·CE(y) + (1 − α)·τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)), KL averaged over the batch.

    Tiles with label −1 are left out of the CE term (its mean is over labelled tiles).
    """
    zs, zt = student_logits.float(), teacher_logits.float()
    kl = F.kl_div(F.log_softmax(zs / tau, 1), F.log_softmax(zt / tau, 1), reduction="batchmean", log_target=True)
    terms = {"kl": (1 - alpha) * tau**2 * kl}
    if alpha > 0:
        known = labels >= 0 if labels is not None else torch.zeros(zs.shape[0], dtype=torch.bool, device=zs.device)
        ce = F.cross_entropy(zs[known], labels[known]) if known.any() else zs.sum() * 0
        terms["ce"] = alpha * ce
    return terms


class LogitKD(Objective):
    """Hinton distillation of a teacher head's tile logits (from cached embeddings) into a student classifier."""

    def __init__(self, student_dim: int, n_classes: int, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.classifier = nn.Linear(student_dim, n_classes)

    def forward(self, out: StudentOutput, targets: Targets) -> dict[str, Tensor]:
        if targets.logits is None:
            raise ConfigError("the logit objective needs teacher logits; pass --teacher-head")
        return hinton_kd(self.classifier(out.embedding), targets.logits, targets.labels, self.cfg.alpha,
                         self.cfg.tau)


class DistributionKD(Objective):
    """DINO-style distribution matching on K fixed prototypes.

    Teacher: scores l_t = normalise(t)·Pᵀ on fixed random unit prototypes P (seeded), centred by
    c (an exponential moving average of the batch-mean scores, updated after each training batch)
    and sharpened: p_t = softmax((l_t − c)/τ_t). Student: a linear head to K scores and
    p_s = softmax(l_s/τ_s). Loss: cross-entropy −Σ p_t log p_s, averaged over the batch. Centring
    stops one prototype from winning every tile, sharpening stops the uniform solution.
    """

    def __init__(self, student_dim: int, teacher: str, teacher_dim: int, cfg: ObjectiveConfig) -> None:
        super().__init__()
        self.teacher = teacher
        self.cfg = cfg
        generator = torch.Generator().manual_seed(cfg.seed)
        prototypes = torch.randn(cfg.prototypes, teacher_dim, generator=generator)
        self.register_buffer("prototypes", F.normalize(prototypes, dim=1))
        self.register_buffer("center", torch.zeros(cfg.prototypes))
        self.head = nn.Linear(student_dim, cfg.prototypes)

    def teacher_scores(self, t: Tensor) -> Tensor:
        return F.normalize(t.float(), dim=1) @ self.prototypes.T

    def forward(self, out: StudentOutput, targets: Targets) -> dict[str, Tensor]:
        scores = self.teacher_scores(targets.teachers[self.teacher])
        p_t = torch.softmax((scores - self.center) / self.cfg.teacher_temp, dim=1)
        log_p_s = torch.log_softmax(self.head(out.embedding).float() / self.cfg.student_temp, dim=1)
        if self.training:
            with torch.no_grad():
                m = self.cfg.center_momentum
                self.center.mul_(m).add_((1 - m) * scores.mean(0))
        return {"cross_entropy": -(p_t * log_p_s).sum(1).mean()}


class Supervised(Objective):
    """No teacher: cross-entropy on weak tile labels (slide labels broadcast), the from-scratch baseline."""

    def __init__(self, student_dim: int, n_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(student_dim, n_classes)

    def forward(self, out: StudentOutput, targets: Targets) -> dict[str, Tensor]:
        known = targets.labels >= 0
        logits = self.classifier(out.embedding).float()
        return {"ce": F.cross_entropy(logits[known], targets.labels[known]) if known.any() else logits.sum() * 0}


class SimSiam(Objective):
    """No teacher, no labels: SimSiam (Chen & He 2021), the self-supervised from-scratch baseline.

    z = projector(s), p = predictor(z) for two augmentations of the same tiles; the loss is
    −½·[cos(p₁, sg(z₂)) + cos(p₂, sg(z₁))] with sg the stop-gradient, which with the predictor
    keeps the representation from collapsing. It is what a student learns from the cached pixels
    alone, so a distilled student must beat it to show what the teacher's targets add.
    """

    views = 2

    def __init__(self, student_dim: int, dim: int = 256, bottleneck: int = 64) -> None:
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(student_dim, dim), nn.BatchNorm1d(dim), nn.ReLU(),
                                       nn.Linear(dim, dim), nn.BatchNorm1d(dim))
        self.predictor = nn.Sequential(nn.Linear(dim, bottleneck), nn.BatchNorm1d(bottleneck), nn.ReLU(),
                                       nn.Linear(bottleneck, dim))

    def forward(self, out: StudentOutput, targets: Targets) -> dict[str, Tensor]:
        if targets.second_view is None:
            raise ConfigError("simsiam needs two views of each tile; the trainer fills Targets.second_view")
        z1, z2 = self.projector(out.embedding), self.projector(targets.second_view.embedding)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = (cosine_distance(p1, z2.detach()).mean() + cosine_distance(p2, z1.detach()).mean()) / 2 - 1
        return {"negative_cosine": loss}


def build_objective(name: str, cfg: ObjectiveConfig, *, student_dim: int, channels: int,
                    teacher_dims: dict[str, int], n_classes: int, k: int = 1) -> Objective:
    """The objective ``name`` for a student of ``student_dim`` pooled / ``channels`` spatial features.

    ``teacher_dims`` (name → width, primary first) are the cached teachers; ``n_classes`` the weak
    label classes; ``k`` the children per side of an XMAG tile.
    """
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    if name == "supervised":
        return Supervised(student_dim, _classes(n_classes, name))
    if name == "simsiam":
        return SimSiam(student_dim)
    if not teacher_dims:
        raise ConfigError(f"objective {name} needs at least one --teacher")
    primary, dim = next(iter(teacher_dims.items()))
    if name != "multi-teacher" and len(teacher_dims) > 1:
        raise ConfigError(f"objective {name} distils one teacher, got {len(teacher_dims)}; "
                          "use --objective multi-teacher or pass one --teacher")
    if name == "feature":
        return FeatureKD(student_dim, primary, dim, cfg)
    if name == "multi-teacher":
        return MultiTeacherKD(student_dim, teacher_dims, cfg)
    if name == "xmag":
        if k < 2:
            raise ConfigError("xmag needs --pixels at a lower magnification whose tiles cover k×k teacher tiles "
                              "(k >= 2), e.g. --pixels 224@2.0 on a 224@0.5 teacher tiling")
        return XmagKD(student_dim, channels, primary, dim, k, cfg)
    if name == "relational":
        return RelationalKD(student_dim, primary, dim, cfg)
    if name == "logit":
        return LogitKD(student_dim, _classes(n_classes, name), cfg)
    return DistributionKD(student_dim, primary, dim, cfg)


def _classes(n_classes: int, name: str) -> int:
    if n_classes < 2:
        raise ConfigError(f"objective {name} needs a label column with two or more classes; pass --label COLUMN")
    return n_classes

