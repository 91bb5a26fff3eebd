"""Cross-cohort, multimodal and ensemble distillation of slide heads from the cache (stage two, issue 7).

- ``distill.xcohort.bank``: a labelled teacher bank selected by SQL (any store) and triplet sampling from it.
- ``distill.xcohort.objectives``: triplet, symmetric InfoNCE, ensemble soft targets and their KD loss.
- ``distill.xcohort.slides``: ABMIL students on another cohort with task + λ·(triplet | clip | soft),
  paired comparison over seeds (Wilcoxon) and a margin/λ sweep on validation.
- ``distill.xcohort.amkd``: pathology + omics survival teacher → pathology-only student with adaptive weights.
- ``distill.xcohort.abstain``: ensemble averaging and an abstention threshold calibrated to a target accuracy.
"""

from featurestore.distill.xcohort.abstain import Abstention, calibrate_abstention, ensemble_predictions
from featurestore.distill.xcohort.amkd import AmkdConfig, AmkdResult, OmicsGuidedMIL, adaptive_weights, amkd, kd_loss
from featurestore.distill.xcohort.bank import TeacherBank, TripletSampler, load_bank
from featurestore.distill.xcohort.objectives import ensemble_probabilities, info_nce, soft_target_loss, triplet_loss
from featurestore.distill.xcohort.slides import (
    OBJECTIVES,
    BankSpec,
    SlideDistillConfig,
    SlideDistillResult,
    compare_objectives,
    distill_slides,
    sweep,
    wilcoxon_p,
)

__all__ = ["OBJECTIVES", "Abstention", "AmkdConfig", "AmkdResult", "BankSpec", "OmicsGuidedMIL", "SlideDistillConfig",
           "SlideDistillResult", "TeacherBank", "TripletSampler", "adaptive_weights", "amkd", "calibrate_abstention",
           "compare_objectives", "distill_slides", "ensemble_predictions", "ensemble_probabilities", "info_nce",
           "kd_loss", "load_bank", "soft_target_loss", "sweep", "triplet_loss", "wilcoxon_p"]
