"""Stage two: learning from the store only (no slide file, no teacher).

- ``distill.train``: ``train(TrainConfig(...))``, cross-validated MIL heads (``fs train``).
- ``distill.report``: metrics.json, curves and heatmaps; ``evaluate_run`` (``fs eval``).
- ``distill.predict``: ``predict`` commits head outputs to a store (``fs predict``); ``read_predictions``.
- ``distill.mil`` heads, ``distill.tasks`` tasks and losses, ``distill.metrics``, ``distill.splits``,
  ``distill.data`` bag reading.
- ``distill.kd``: tile students distilled from cached pixels and teacher targets (``fs distill``).
- ``distill.xcohort``: cross-cohort bank students (triplet, CLIP), AMKD, ensemble abstention.

Submodules are imported on use, so ``distill.metrics`` stays NumPy-only.
"""
