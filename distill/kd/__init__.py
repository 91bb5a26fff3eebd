"""Students distilled from cached teacher targets (``fs distill``); no teacher is built in stage two.

- ``distill.kd.train``: ``distill(DistillConfig(...))`` trains a timm student and writes a run directory
  that ``fs extract --model student:RUN_DIR`` runs as an encoder.
- ``distill.kd.objectives``: the ``Objective`` interface and the feature, multi-teacher, XMAG,
  relational, logit and DINO-style objectives, plus the no-teacher baselines (supervised on weak
  labels, SimSiam) that distilled students are compared with.
- ``distill.kd.data``: cached pixels and targets, the slide-balanced sampler, student augmentation.
- ``distill.kd.evaluate`` / ``distill.kd.report``: cosine to the teacher, probes, cost, the report.
"""

from featurestore.distill.kd.config import DistillConfig, DistillResult
from featurestore.distill.kd.data import Augment, CachedTiles, SlideBalancedSampler, dihedral
from featurestore.distill.kd.objectives import (
    BASELINES,
    OBJECTIVES,
    Objective,
    ObjectiveConfig,
    StudentOutput,
    Targets,
    build_objective,
)
from featurestore.distill.kd.train import distill

__all__ = ["BASELINES", "OBJECTIVES", "Augment", "CachedTiles", "DistillConfig", "DistillResult", "Objective",
           "ObjectiveConfig", "SlideBalancedSampler", "StudentOutput", "Targets", "build_objective", "dihedral",
           "distill"]
