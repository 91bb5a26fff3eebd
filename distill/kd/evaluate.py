"""How good and how cheap a student is: agreement with its teacher, probes, parameters, FLOPs, tiles/s.

Cosine to the teacher is reported three ways, because embeddings of a ReLU network are all
positive and a constant vector (the training mean of the teacher's embeddings) already has a high
cosine to every one of them: the raw cosine, the cosine of that mean-predictor baseline, and the
*centred* cosine cos(s − μ, t − μ) (μ the training mean), which is 0 for the baseline.

Probes use weak tile labels: a slide's label broadcast to its tiles. A logistic-regression probe
and a cosine kNN are fitted on the training slides' tiles and scored on the held-out slides'. The
probe's L2 strength is chosen per embedding by slide-grouped cross-validation on the training tiles:
a fixed one favours whichever embedding it happens to suit (a 1280-d teacher fitted on a few hundred
weakly labelled tiles overfits at the strength that suits a 576-d student), and a probe must not
decide which representation wins.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from featurestore.devices import autocast
from featurestore.distill import metrics as M


@dataclass(frozen=True)
class Cosine:
    mean: float
    centred: float
    mean_baseline: float


def cosine_to_teacher(student: np.ndarray, teacher: np.ndarray, train_mean: np.ndarray) -> Cosine:
    """Mean row cosine of ``student`` to ``teacher``; centred on ``train_mean``; and the mean predictor's."""
    def cos(a: np.ndarray, b: np.ndarray) -> float:
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
        return float(np.mean((a64 * b64).sum(1) / np.maximum(den, 1e-12)))

    baseline = np.broadcast_to(train_mean, teacher.shape)
    return Cosine(cos(student, teacher), cos(student - train_mean, teacher - train_mean), cos(baseline, teacher))


PROBE_WEIGHT_DECAYS = (1e-2, 1e-1, 1.0, 10.0, 100.0)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, weight_decay: float = 1e-2,
                 steps: int = 100) -> np.ndarray:
    """Class probabilities of a class-balanced multinomial logistic regression (L-BFGS on standardised features)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.from_numpy(((train_x - mu) / sd).astype(np.float32))
    y = torch.from_numpy(train_y.astype(np.int64))
    n_classes = int(train_y.max()) + 1
    counts = torch.bincount(y, minlength=n_classes).float()
    weights = counts.sum() / (n_classes * counts.clamp(min=1))
    linear = nn.Linear(x.shape[1], n_classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(x), y, weight=weights) + weight_decay * linear.weight.pow(2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return torch.softmax(linear(torch.from_numpy(((test_x - mu) / sd).astype(np.float32))), 1).numpy()


def grouped_folds(groups: np.ndarray, y: np.ndarray, k: int = 5) -> list[np.ndarray]:
    """Validation masks of up to ``k`` folds that keep each group (slide) whole, groups dealt by label so
    that every fold's training part sees every class whenever the groups allow it."""
    names = np.unique(groups)
    label_of = {g: int(np.bincount(y[groups == g]).argmax()) for g in names}
    order = sorted(names, key=lambda g: (label_of[g], str(g)))
    k = min(k, len(order))
    fold_of = {g: i % k for i, g in enumerate(order)}
    fold = np.array([fold_of[g] for g in groups])
    return [fold == i for i in range(k)]


def choose_weight_decay(x: np.ndarray, y: np.ndarray, groups: np.ndarray,
                        candidates: Sequence[float] = PROBE_WEIGHT_DECAYS) -> float:
    """The candidate L2 strength with the lowest class-balanced out-of-fold cross-entropy over
    slide-grouped folds of the training tiles (the first candidate when no fold can be scored)."""
    n_classes = int(y.max()) + 1
    folds = [m for m in grouped_folds(groups, y) if len(np.unique(y[~m])) == n_classes and m.any()]
    if not folds:
        return candidates[0]
    counts = np.bincount(y, minlength=n_classes)
    weight = (len(y) / (n_classes * np.maximum(counts, 1)))[y]
    losses = []
    for wd in candidates:
        nll = np.zeros(len(y))
        scored = np.zeros(len(y), bool)
        for val in folds:
            probs = linear_probe(x[~val], y[~val], x[val], weight_decay=wd)
            nll[val] = -np.log(np.clip(probs[np.arange(len(probs)), y[val]], 1e-12, None))
            scored |= val
        losses.append(float((weight * nll)[scored].sum() / weight[scored].sum()))
    return candidates[int(np.argmin(losses))]


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int = 10) -> np.ndarray:
    """Majority class of the ``k`` nearest training tiles by cosine (ties to the lower class)."""
    a = train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
    b = test_x / np.maximum(np.linalg.norm(test_x, axis=1, keepdims=True), 1e-12)
    nearest = np.argsort(-(b @ a.T), axis=1, kind="stable")[:, :min(k, len(a))]
    votes = np.zeros((len(b), int(train_y.max()) + 1))
    np.add.at(votes, (np.arange(len(b))[:, None], train_y[nearest]), 1)
    return votes.argmax(1)


def probe_scores(train_x: np.ndarray, train_y: np.ndarray, train_groups: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray) -> dict:
    """Linear-probe AUROC (binary) and balanced accuracy with its cross-validated L2 strength, kNN
    balanced accuracy, and the predictions. ``train_groups`` (the tiles' slides) keep CV folds whole."""
    weight_decay = choose_weight_decay(train_x, train_y, train_groups)
    probs = linear_probe(train_x, train_y, test_x, weight_decay=weight_decay)
    knn = knn_predict(train_x, train_y, test_x)
    out = {"linear_balanced_accuracy": M.balanced_accuracy(test_y, probs.argmax(1)),
           "knn_balanced_accuracy": M.balanced_accuracy(test_y, knn),
           "linear_auroc": M.auroc(test_y, probs[:, 1]) if probs.shape[1] == 2 else M.auroc_ovr(test_y, probs),
           "linear_weight_decay": weight_decay}
    return {"metrics": out, "linear": probs.argmax(1), "knn": knn}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_flops(module: nn.Module, input_size: int) -> int:
    """FLOPs (2 per multiply-add) of one tile through ``module`` in eval mode, on its own device."""
    device = next(module.parameters()).device
    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, 3, input_size, input_size, device=device))
    return int(counter.get_total_flops())


def teacher_flops(name: str) -> tuple[int | None, int | None, str]:
    """FLOPs per tile and parameters of teacher ``name``, and how they were obtained (or why not).

    The architecture is instantiated on PyTorch's meta device: shapes only — no weights are read,
    no memory is allocated and no pixel passes through it, so no teacher runs in stage two.
    """
    from featurestore.encoders import teacher_config
    from featurestore.encoders._registry import load_entrypoint
    from featurestore.schemas import FsError

    try:
        cfg = teacher_config(name)
        with torch.device("meta"):
            skeleton = load_entrypoint(cfg.builder)(cfg)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                skeleton(torch.empty(1, 3, cfg.input_size, cfg.input_size))
    except (FsError, RuntimeError, TypeError, ValueError, NotImplementedError, ImportError) as err:
        return None, None, f"not counted: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return (int(counter.get_total_flops()), count_parameters(skeleton),
            f"counted on the architecture at {cfg.input_size} px (meta device)")


def tiles_per_second(module: nn.Module, input_size: int, device: torch.device, *, batch: int = 64,
                     repeats: int = 3) -> float:
    """Measured inference throughput on ``device`` (autocast on CUDA), after one warm-up batch."""
    module.eval()
    x = torch.zeros(batch, 3, input_size, input_size, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(device):
        module(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            module(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return batch * repeats / (time.perf_counter() - start)
