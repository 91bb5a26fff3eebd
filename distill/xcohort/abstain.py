"""Ensembles of K teacher heads as soft labels, and abstention calibrated to a target accuracy.

A slide is answered when the ensemble's top probability reaches a threshold, and left to a
pathologist otherwise. The threshold is the lowest one at which the *validation* slides that are
answered reach the target accuracy, i.e. the one with the most coverage; applied to held-out slides
it reports the coverage (share answered) and the accuracy actually reached there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from featurestore.distill.errors import ConfigError
from featurestore.distill.xcohort.objectives import ensemble_probabilities


def ensemble_predictions(predictions: pa.Table, temperature: float = 1.0) -> tuple[list[str], np.ndarray, int]:
    """Rows (slide_id, logits) of K heads per slide → (slide ids, mean class probabilities (n, C), K).

    Works on the ``predictions`` table of ``fs predict`` and on the out-of-fold predictions of a
    student run; every slide must have the same number of rows.
    """
    rows: dict[str, list[list[float]]] = {}
    for sid, logits in zip(predictions.column("slide_id").to_pylist(), predictions.column("logits").to_pylist(),
                           strict=True):
        rows.setdefault(sid, []).append(logits)
    counts = {len(v) for v in rows.values()}
    if len(counts) != 1:
        raise ConfigError(f"slides have different numbers of teacher heads {sorted(counts)}; "
                          "select one row per head and slide")
    slide_ids = sorted(rows)
    logits = torch.tensor(np.array([rows[s] for s in slide_ids], np.float32)).transpose(0, 1)
    return slide_ids, ensemble_probabilities(logits, temperature).numpy().astype(np.float64), counts.pop()


@dataclass(frozen=True)
class Abstention:
    """Answer when max probability >= ``threshold`` (inf: the target was unreachable, abstain on all)."""

    threshold: float
    target_accuracy: float
    val_accuracy: float
    val_coverage: float

    def answered(self, probs: np.ndarray) -> np.ndarray:
        return np.asarray(probs).max(1) >= self.threshold

    def evaluate(self, probs: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """(coverage, accuracy on the answered slides; NaN when none is answered)."""
        kept = self.answered(probs)
        correct = np.asarray(probs).argmax(1) == np.asarray(y).astype(int)
        return float(kept.mean()), float(correct[kept].mean()) if kept.any() else float("nan")


def calibrate_abstention(probs: np.ndarray, y: np.ndarray, target_accuracy: float) -> Abstention:
    """The lowest confidence threshold whose answered validation slides are at least ``target_accuracy`` right."""
    if not 0 < target_accuracy <= 1:
        raise ConfigError(f"target accuracy must be in (0, 1], got {target_accuracy}")
    probs = np.asarray(probs, np.float64)
    confidence = probs.max(1)
    correct = probs.argmax(1) == np.asarray(y).astype(int)
    best = Abstention(float("inf"), target_accuracy, float("nan"), 0.0)
    for t in np.unique(confidence)[::-1]:
        kept = confidence >= t
        accuracy = float(correct[kept].mean())
        if accuracy >= target_accuracy:
            best = Abstention(float(t), target_accuracy, accuracy, float(kept.mean()))
    return best
