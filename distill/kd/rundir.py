"""What a distillation run directory holds besides its report: the student's weights and the config.

The directory is staged by ``distill.rundir``, so a run that dies leaves no half-written ``RUN_DIR``
behind: ``fs extract --model student:RUN_DIR`` must never find weights without the config and report
that say how they were made.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from featurestore.distill.kd.config import DistillConfig
from featurestore.distill.kd.objectives import Objective
from featurestore.distill.kd.students import StudentSpec, save_student
from featurestore.distill.rundir import write_json
from featurestore.encoders.student import StudentEncoder
from featurestore.schemas import TilingSpec


def save_weights(run_dir: Path, encoder: StudentEncoder, spec: StudentSpec, objective: Objective, *, name: str,
                 pixels: TilingSpec, run_id: str) -> None:
    """The exported student (``student.safetensors``/``student.json``) and the objective's own state."""
    save_student(run_dir, encoder, spec, name=name, tile_size=pixels.tile_size, mpp=pixels.target_mpp,
                 version=run_id)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in objective.state_dict().items()},
              run_dir / "objective.safetensors")


def write_config(run_dir: Path, cfg: DistillConfig, resolved: dict[str, Any]) -> None:
    """``config.json``: the configuration, what the run resolved from it, and the library versions."""
    write_json(run_dir / "config.json",
               cfg.to_dict() | resolved | {"python": platform.python_version(), "torch": torch.__version__})
