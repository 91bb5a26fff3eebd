"""Slide-level tasks: how labels become targets, which readout and loss train them, what is measured.

One interface (``Task``) with four implementations. A task is built once per cohort from the
labels (class names, ordinal levels) and then *fitted* per training split, so that everything
learned from labels — class weights, discrete-time bins, regression scaling — comes from the
training slides only. Targets are always an ``(n, 2)`` float array ``[y, event]`` (``event`` is 1
outside survival), which keeps batching identical for every task.

Each task owns its readout layer (slide embedding → outputs) because the loss constrains it:
CORAL needs one shared weight with ordered biases, a cumulative-link model ordered thresholds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar, Literal, Self

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featurestore.distill import metrics as M
from featurestore.distill.errors import ConfigError

Kind = Literal["classification", "ordinal", "survival", "regression"]
LOSSES: dict[str, tuple[str, ...]] = {
    "classification": ("ce",),
    "ordinal": ("coral", "cumulative"),
    "survival": ("cox", "discrete"),
    "regression": ("mse", "huber"),
}
"""Losses per task kind; the first is the default."""

SPECIFICITIES = (0.4, 0.6, 0.8)


@dataclass(frozen=True)
class TaskSpec:
    """What to learn: the task kind, its label column(s) and loss.

    For survival ``label`` is the follow-up time and ``event`` the column that is 1 when the event
    was observed and 0 when censored. ``threshold`` turns an ordinal grade into the binary question
    "grade >= threshold" for AUROC and sensitivity at fixed specificity (GUIDE-US reports
    csPCa detection this way). ``bins`` is the number of intervals of the discrete-time model.
    """

    kind: Kind
    label: str
    event: str | None = None
    loss: str = ""
    class_weights: bool = True
    bins: int = 4
    threshold: int = 1

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise ConfigError(f"unknown task {self.kind!r}; choose one of {', '.join(LOSSES)}")
        if not self.loss:
            object.__setattr__(self, "loss", LOSSES[self.kind][0])
        if self.loss not in LOSSES[self.kind]:
            raise ConfigError(f"loss {self.loss!r} does not fit task {self.kind}; "
                              f"choose one of {', '.join(LOSSES[self.kind])}")
        if self.kind == "survival" and not self.event:
            raise ConfigError("survival needs the event column (1 = event observed, 0 = censored); "
                              "pass --event COLUMN with --label as the time column")
        if self.kind != "survival" and self.event:
            raise ConfigError(f"event is only used by survival, not by {self.kind}; drop it", field="event")
        if self.bins < 2:
            raise ConfigError(f"bins must be >= 2 for the discrete-time model, got {self.bins}")

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.label, self.event) if self.event else (self.label,)


class Task(ABC):
    """Targets, readout, loss, per-slide score and metrics of one task kind."""

    spec: TaskSpec
    primary: ClassVar[str]
    """The metric reported first and used to rank runs."""

    @property
    @abstractmethod
    def n_outputs(self) -> int: ...

    @property
    def n_classes(self) -> int:
        """Classes for instance-level losses (CLAM); 0 when the task has none."""
        return 0

    @abstractmethod
    def targets(self, labels: pa.Table) -> np.ndarray:
        """``(n, 2)`` float64 ``[y, event]`` from the label columns; rows must have no missing values."""

    @abstractmethod
    def strata(self, targets: np.ndarray) -> np.ndarray:
        """Integer stratum per slide, balanced across folds."""

    def fit(self, targets: np.ndarray) -> Self:
        """A copy carrying what this task learns from the training targets only."""
        return self

    @abstractmethod
    def readout(self, dim: int) -> nn.Module:
        """Slide embedding ``(B, dim)`` → outputs ``(B, n_outputs)``."""

    @abstractmethod
    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor: ...

    @abstractmethod
    def score(self, outputs: np.ndarray) -> np.ndarray:
        """One number per slide: P(positive), expected grade, risk or the predicted value."""

    @abstractmethod
    def metrics(self, y: np.ndarray, event: np.ndarray, outputs: np.ndarray, score: np.ndarray) -> dict[str, float]:
        ...

    def instance_labels(self, targets: Tensor) -> Tensor | None:
        """Bag class per slide for instance-level losses; None when the task has no classes."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, **asdict(self)}  # type: ignore[call-overload]


def _column(labels: pa.Table, name: str) -> list:
    if name not in labels.column_names:
        raise ConfigError(f"labels have no column {name!r} (columns: {', '.join(labels.column_names)}); "
                          "import it with fs labels import or choose another --label")
    return labels.column(name).to_pylist()


def _as_float(values: list, name: str) -> np.ndarray:
    try:
        return np.asarray(values, np.float64)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"label column {name!r} is not numeric (e.g. {values[0]!r}); "
                          "choose a numeric column for this task") from err


@dataclass(frozen=True)
class Classification(Task):
    """Binary or multi-class; cross-entropy with inverse-frequency class weights from the training split."""

    spec: TaskSpec
    classes: tuple[str, ...]
    weights: tuple[float, ...] = ()
    primary: ClassVar[str] = "auroc"

    @property
    def n_outputs(self) -> int:
        return len(self.classes)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def targets(self, labels: pa.Table) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        values = [_label_text(v) for v in _column(labels, self.spec.label)]
        unknown = sorted({v for v in values if v not in index})
        if unknown:
            raise ConfigError(f"label values {unknown[:5]} are not among the classes {list(self.classes)}")
        return np.stack([np.array([index[v] for v in values], np.float64), np.ones(len(values))], 1)

    def strata(self, targets: np.ndarray) -> np.ndarray:
        return targets[:, 0].astype(int)

    def fit(self, targets: np.ndarray) -> Self:
        if not self.spec.class_weights:
            return self
        counts = np.bincount(targets[:, 0].astype(int), minlength=len(self.classes))
        weights = counts.sum() / (len(self.classes) * np.maximum(counts, 1))
        return replace(self, weights=tuple(float(w) for w in weights))

    def readout(self, dim: int) -> nn.Module:
        return nn.Linear(dim, len(self.classes))

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        weight = torch.tensor(self.weights, dtype=outputs.dtype, device=outputs.device) if self.weights else None
        return F.cross_entropy(outputs, targets[:, 0].long(), weight=weight)

    def score(self, outputs: np.ndarray) -> np.ndarray:
        probs = _softmax(outputs)
        return probs[:, 1] if len(self.classes) == 2 else probs.argmax(1).astype(np.float64)

    def metrics(self, y: np.ndarray, event: np.ndarray, outputs: np.ndarray, score: np.ndarray) -> dict[str, float]:
        y = y.astype(int)
        probs = _softmax(outputs)
        pred = probs.argmax(1)
        out = {"auroc": M.auroc(y == 1, probs[:, 1]) if len(self.classes) == 2 else M.auroc_ovr(y, probs),
               "balanced_accuracy": M.balanced_accuracy(y, pred), "accuracy": float(np.mean(pred == y))}
        if len(self.classes) == 2:
            out |= {f"sensitivity_at_specificity_{round(s * 100)}": M.sensitivity_at_specificity(y, probs[:, 1], s)
                    for s in SPECIFICITIES}
        return out

    def instance_labels(self, targets: Tensor) -> Tensor | None:
        return targets[:, 0].long()


class CoralReadout(nn.Module):
    """CORAL (Cao et al. 2020): one shared weight vector and K − 1 biases → logits of P(y > k)."""

    def __init__(self, dim: int, n_levels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(n_levels - 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + self.bias


class CumulativeLinkReadout(nn.Module):
    """Proportional-odds model: a score s and ordered thresholds θ_k → logits s − θ_k of P(y > k)."""

    def __init__(self, dim: int, n_levels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 1)
        self.first = nn.Parameter(torch.zeros(1))
        self.gaps = nn.Parameter(torch.zeros(n_levels - 2))

    def forward(self, x: Tensor) -> Tensor:
        thresholds = torch.cat([self.first, self.first + torch.cumsum(F.softplus(self.gaps), 0)])
        return self.fc(x) - thresholds


@dataclass(frozen=True)
class Ordinal(Task):
    """Ordered grades 0..K−1 (e.g. ISUP); outputs are logits of P(y > k), k = 0..K−2.

    ``coral`` sums K − 1 binary cross-entropies; ``cumulative`` is the negative log-likelihood of
    the proportional-odds model. Both keep P(y > k) decreasing in k. The predicted grade counts
    the thresholds passed, the score is the expected grade Σ P(y > k).
    """

    spec: TaskSpec
    levels: tuple[int, ...]
    primary: ClassVar[str] = "qwk"

    @property
    def n_outputs(self) -> int:
        return len(self.levels) - 1

    @property
    def n_classes(self) -> int:
        return len(self.levels)

    def targets(self, labels: pa.Table) -> np.ndarray:
        values = _as_float(_column(labels, self.spec.label), self.spec.label)
        return np.stack([values - self.levels[0], np.ones(len(values))], 1)

    def strata(self, targets: np.ndarray) -> np.ndarray:
        return targets[:, 0].astype(int)

    def readout(self, dim: int) -> nn.Module:
        cls = CoralReadout if self.spec.loss == "coral" else CumulativeLinkReadout
        return cls(dim, len(self.levels))

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        y = targets[:, 0].long()
        above = (y[:, None] > torch.arange(outputs.shape[1], device=y.device)).to(outputs.dtype)
        if self.spec.loss == "coral":
            return F.binary_cross_entropy_with_logits(outputs, above, reduction="none").sum(1).mean()
        p_above = torch.sigmoid(outputs)
        ones = torch.ones_like(p_above[:, :1])
        p_class = torch.cat([ones, p_above], 1) - torch.cat([p_above, 0 * ones], 1)
        return -torch.log(p_class.gather(1, y[:, None]).clamp_min(1e-7)).mean()

    def score(self, outputs: np.ndarray) -> np.ndarray:
        return _sigmoid(outputs).sum(1)

    def metrics(self, y: np.ndarray, event: np.ndarray, outputs: np.ndarray, score: np.ndarray) -> dict[str, float]:
        y = y.astype(int)
        p_above = _sigmoid(outputs)
        pred = (p_above > 0.5).sum(1)
        t = self.spec.threshold - self.levels[0]
        out = {"qwk": M.quadratic_weighted_kappa(y, pred, len(self.levels)),
               "accuracy": float(np.mean(pred == y)), "balanced_accuracy": M.balanced_accuracy(y, pred),
               "mae": float(np.mean(np.abs(pred - y)))}
        if 0 < t < len(self.levels):
            positive, p = y >= t, p_above[:, t - 1]
            out[f"auroc_ge{self.spec.threshold}"] = M.auroc(positive, p)
            out |= {f"sensitivity_at_specificity_{round(s * 100)}_ge{self.spec.threshold}":
                    M.sensitivity_at_specificity(positive, p, s) for s in SPECIFICITIES}
        return out

    def instance_labels(self, targets: Tensor) -> Tensor | None:
        return targets[:, 0].long()


def cox_breslow_loss(risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
    """Negative Cox partial log-likelihood with Breslow ties, averaged over events.

    Every event at time t is compared with the whole risk set {j : t_j >= t}, tied events included.
    O(n²) in the batch, which is exact and cheap for the batch and validation sizes MIL uses.
    A batch without events contributes zero (with a gradient path, so the step still runs).
    """
    at_risk = time[None, :] >= time[:, None]
    log_denominator = torch.logsumexp(risk[None, :].masked_fill(~at_risk, float("-inf")), dim=1)
    observed = event > 0
    if not observed.any():
        return risk.sum() * 0
    return -(risk - log_denominator)[observed].mean()


def discrete_time_nll(hazard_logits: Tensor, interval: Tensor, event: Tensor) -> Tensor:
    """Negative log-likelihood of a discrete-time hazard model (one logit per interval).

    An event in interval k contributes −log h_k − Σ_{j<k} log(1 − h_j); a slide censored in
    interval k survived it: −Σ_{j<=k} log(1 − h_j).
    """
    k = torch.arange(hazard_logits.shape[1], device=hazard_logits.device)[None, :]
    interval = interval.long()[:, None]
    log_h = F.logsigmoid(hazard_logits)
    log_s = F.logsigmoid(-hazard_logits)
    observed = (event > 0)[:, None]
    survived = (k < interval) | (~observed & (k == interval))
    nll = -(log_s * survived).sum(1) - (log_h * (observed & (k == interval))).sum(1)
    return nll.mean()


@dataclass(frozen=True)
class Survival(Task):
    """Right-censored survival; higher score = higher risk.

    ``cox``: one output, the log hazard ratio; the loss needs several events per batch, so use
    batches of 16 or more. ``discrete``: one hazard logit per interval, with interval edges at
    quantiles of the training split's event times; the score is −Σ_k S(k).
    """

    spec: TaskSpec
    cuts: tuple[float, ...] = ()
    primary: ClassVar[str] = "c_index"

    @property
    def n_outputs(self) -> int:
        return 1 if self.spec.loss == "cox" else self.spec.bins

    def targets(self, labels: pa.Table) -> np.ndarray:
        time = _as_float(_column(labels, self.spec.label), self.spec.label)
        event = _as_float(_column(labels, self.spec.event or ""), self.spec.event or "")
        if not np.isin(event, (0, 1)).all():
            raise ConfigError(f"event column {self.spec.event!r} must hold 0 (censored) or 1 (event), "
                              f"found {sorted(set(event.tolist()) - {0.0, 1.0})[:5]}")
        if (time < 0).any():
            raise ConfigError(f"time column {self.spec.label!r} has negative values; survival times must be >= 0")
        return np.stack([time, event], 1)

    def strata(self, targets: np.ndarray) -> np.ndarray:
        return targets[:, 1].astype(int)

    def fit(self, targets: np.ndarray) -> Self:
        if self.spec.loss == "cox":
            return self
        times = targets[targets[:, 1] > 0, 0]
        if times.size == 0:
            times = targets[:, 0]
        cuts = np.quantile(times, np.linspace(0, 1, self.spec.bins + 1)[1:-1])
        return replace(self, cuts=tuple(float(c) for c in cuts))

    def readout(self, dim: int) -> nn.Module:
        return nn.Linear(dim, self.n_outputs)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        time, event = targets[:, 0], targets[:, 1]
        if self.spec.loss == "cox":
            return cox_breslow_loss(outputs[:, 0], time, event)
        cuts = torch.tensor(self.cuts, dtype=time.dtype, device=time.device)
        interval = torch.bucketize(time.contiguous(), cuts, right=True)
        return discrete_time_nll(outputs, interval, event)

    def score(self, outputs: np.ndarray) -> np.ndarray:
        if self.spec.loss == "cox":
            return outputs[:, 0].astype(np.float64)
        return -np.cumprod(1 - _sigmoid(outputs), axis=1).sum(1)

    def metrics(self, y: np.ndarray, event: np.ndarray, outputs: np.ndarray, score: np.ndarray) -> dict[str, float]:
        return {"c_index": M.c_index(y, event, score)}


@dataclass(frozen=True)
class Regression(Task):
    """A continuous target, standardised with the training split's mean and sd; MSE or Huber (δ = 1 sd)."""

    spec: TaskSpec
    mean: float = 0.0
    sd: float = 1.0
    primary: ClassVar[str] = "pearson"

    @property
    def n_outputs(self) -> int:
        return 1

    def targets(self, labels: pa.Table) -> np.ndarray:
        values = _as_float(_column(labels, self.spec.label), self.spec.label)
        return np.stack([values, np.ones(len(values))], 1)

    def strata(self, targets: np.ndarray) -> np.ndarray:
        edges = np.quantile(targets[:, 0], [0.25, 0.5, 0.75])
        return np.searchsorted(edges, targets[:, 0], side="right")

    def fit(self, targets: np.ndarray) -> Self:
        sd = float(targets[:, 0].std())
        return replace(self, mean=float(targets[:, 0].mean()), sd=sd if sd > 0 else 1.0)

    def readout(self, dim: int) -> nn.Module:
        return nn.Linear(dim, 1)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        z = (targets[:, 0] - self.mean) / self.sd
        if self.spec.loss == "huber":
            return F.huber_loss(outputs[:, 0], z.to(outputs.dtype))
        return F.mse_loss(outputs[:, 0], z.to(outputs.dtype))

    def score(self, outputs: np.ndarray) -> np.ndarray:
        return outputs[:, 0].astype(np.float64) * self.sd + self.mean

    def metrics(self, y: np.ndarray, event: np.ndarray, outputs: np.ndarray, score: np.ndarray) -> dict[str, float]:
        return {"pearson": M.pearson(score, y), "spearman": M.spearman(score, y),
                "mae": float(np.mean(np.abs(score - y))), "rmse": float(np.sqrt(np.mean((score - y) ** 2)))}


_TYPES: dict[str, type[Task]] = {c.__name__: c for c in (Classification, Ordinal, Survival, Regression)}


def make_task(spec: TaskSpec, labels: pa.Table) -> Task:
    """Build the (unfitted) task for a cohort: class names or grade levels come from all its labels."""
    for name in spec.columns:
        if any(v is None for v in _column(labels, name)):
            raise ConfigError(f"label column {name!r} has missing values; drop those slides first")
    if spec.kind == "classification":
        values = _column(labels, spec.label)
        classes = tuple(_label_text(v) for v in sorted(set(values)))
        if len(classes) < 2:
            raise ConfigError(f"label column {spec.label!r} has a single class {classes}; classification needs two")
        return Classification(spec, classes)
    if spec.kind == "ordinal":
        values = _as_float(_column(labels, spec.label), spec.label)
        if not np.all(values == np.round(values)):
            raise ConfigError(f"ordinal label {spec.label!r} must hold integer grades; "
                              f"found {values[values % 1 != 0][:3]}")
        low, high = int(values.min()), int(values.max())
        if high - low < 2:
            raise ConfigError(f"ordinal label {spec.label!r} spans {low}..{high}; ordinal needs >= 3 grades "
                              "(use --task classification for two)")
        return Ordinal(spec, tuple(range(low, high + 1)))
    if spec.kind == "survival":
        return Survival(spec)
    return Regression(spec)


def task_from_dict(state: dict[str, Any]) -> Task:
    """Rebuild a (fitted) task saved with ``Task.to_dict`` in a checkpoint or run config."""
    data = dict(state)
    cls = _TYPES[data.pop("type")]
    data["spec"] = TaskSpec(**data["spec"])
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _label_text(value: Any) -> str:
    """Class names as text; integral floats (CSV '1.0') name the same class as ints."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))

