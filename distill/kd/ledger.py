"""What a distillation run cost and what the cache saved: teacher passes, FLOPs, throughput of both stages.

While a run lasts, a forward hook on every module counts calls into any
``featurestore.encoders.Teacher``; the ledger records that count (0) next to the teacher compute the
cache saved.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from featurestore.distill.kd import evaluate as E
from featurestore.distill.kd.config import DistillConfig
from featurestore.distill.kd.objectives import BASELINES
from featurestore.distill.kd.students import StudentSpec
from featurestore.encoders.student import StudentEncoder
from featurestore.schemas import EmbeddingSet
from featurestore.store import Store


class TeacherPassCounter:
    """Counts forward calls into any ``featurestore.encoders.Teacher`` while active (a global module hook)."""

    def __enter__(self) -> TeacherPassCounter:
        from featurestore.encoders import Teacher

        self.count = 0

        def hook(module: nn.Module, args: tuple) -> None:
            if isinstance(module, Teacher):
                self.count += 1

        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def _stage_one_tiles_per_s(store: Store, es: EmbeddingSet) -> float | None:
    """Tiles of ``es`` over the device seconds of every finished extraction run (all their teachers together)."""
    seconds = sum(r.device_seconds for r in store.runs() if r.status == "ok")
    tiles = store.sql(f"SELECT sum(n_tiles) AS n FROM bags WHERE set_id = '{es.id}'").column("n")[0].as_py()
    return float(tiles) / seconds if seconds and tiles else None


def cost(encoder: StudentEncoder, spec: StudentSpec, sets: list[EmbeddingSet], store: Store, device: torch.device,
         cfg: DistillConfig) -> dict[str, Any]:
    """Parameters, FLOPs per tile and tiles/s of the student (measured) and the teachers (stage one).

    Teacher totals add up every teacher of the run, as online distillation would run them all."""
    flops, params, how = {}, {}, {}
    for es in sets:
        flops[es.encoder_name], params[es.encoder_name], how[es.encoder_name] = E.teacher_flops(es.encoder_name)

    def total(values: dict[str, int | None]) -> int | None:
        return None if None in values.values() else sum(values.values())

    return {
        "student": {"parameters": E.count_parameters(encoder), "flops": E.forward_flops(encoder, spec.input_size),
                    "tiles_per_s": E.tiles_per_second(encoder, spec.input_size, device) if cfg.measure_speed else None,
                    "device": str(device)},
        "teacher": {"flops": total(flops), "flops_by_teacher": flops, "flops_source": how,
                    "parameters": total(params),
                    "tiles_per_s": _stage_one_tiles_per_s(store, sets[0]),
                    "tiles_per_s_source": "stage one: tiles of the primary set / device seconds of all finished "
                                          "extraction runs (every teacher they ran)"},
    }


def ledger(cfg: DistillConfig, cost: dict[str, Any], target_tiles: int, train_seconds: float) -> dict[str, Any]:
    """The teacher compute the cached targets stood in for; passes and wall time are filled in once the run ends.

    Baselines train on no teacher targets, so they saved no teacher compute."""
    gflops = [cost["teacher"]["flops_by_teacher"][n] for n in cfg.teachers]
    training_targets = cfg.objective not in BASELINES
    return {"teacher_forward_passes": None, "wall_seconds": None, "train_seconds": train_seconds,
            "epochs": cfg.schedule.epochs, "target_tiles": target_tiles if training_targets else 0,
            "views_per_target": 1,
            "teacher_flops_avoided": (sum(gflops) * target_tiles if training_targets and None not in gflops
                                      else None)}
