"""``fs distill``: a lightweight student trained only against cached teacher targets (stage two).

The command parses and prints; ``distill.kd`` does the work. ``register(app)`` adds it to ``fs``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from featurestore.cli._common import StoreOpt, console, friendly
from featurestore.cli._options import (
    BatchSize,
    Device,
    Epochs,
    Group,
    Lr,
    Out,
    WeightDecay,
    field_flags,
    group_column,
    registry_name,
)
from featurestore.distill.schedule import KD


def _print_report(report: dict[str, Any]) -> None:
    ev, cost, ledger = report["evaluation"], report["cost"], report["ledger"]

    def fmt(v: Any, digits: int = 3) -> str:
        return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    view = Table("held-out tiles", "value", title=f"{report['student']['arch']} · {report['objective']}")
    view.add_row("cosine to teacher", fmt(ev["cosine"]["mean"]))
    view.add_row("centred cosine (mean predictor = 0)", fmt(ev["cosine"]["centred"]))
    view.add_row("mean-predictor cosine", fmt(ev["cosine"]["mean_baseline"]))
    for who in ("student", "teacher"):
        probe = ev["probe"].get(who)
        if probe:
            view.add_row(f"{who} probe AUROC / kNN bal. acc.",
                         f"{fmt(probe['linear_auroc'])} / {fmt(probe['knn_balanced_accuracy'])}")
    down = ev.get("downstream") or {}
    for who in ("student", "teacher") if "student" in down else ():
        view.add_row(f"{who} downstream {down['head']} {down['metric']} ({down['folds']}-fold)",
                     fmt(down[who][down["metric"]]))
    console.print(view)
    student, teacher = cost["student"], cost["teacher"]
    gflops = [None if c.get("flops") is None else c["flops"] / 1e9 for c in (student, teacher)]
    console.print(f"student {student['parameters']:,} parameters, {fmt(gflops[0])} GFLOPs/tile, "
                  f"{fmt(student['tiles_per_s'], 1)} tiles/s; teacher {fmt(gflops[1])} GFLOPs/tile. "
                  f"Teacher forward passes: {ledger['teacher_forward_passes']}; wall {ledger['wall_seconds']:.1f} s",
                  highlight=False)


def distill_command(
    store: StoreOpt,
    teacher: Annotated[list[str], typer.Option("--teacher", "-t", help="Embedding set (encoder name, view or set "
                                                                        "id); repeat for several.")],
    student: Annotated[str, typer.Option(help="Any timm architecture, e.g. resnet18, mobilenetv3_small_100.")],
    objective: Annotated[str, typer.Option(help=registry_name("Distillation objective"))],
    out: Out,
    pixels: Annotated[str | None, typer.Option(help="Cached pixels SIZE@MPP the student sees; default the teacher "
                                                    "tiling (xmag: the cached coarser one).")] = None,
    input_size: Annotated[int, typer.Option(help="Student input edge; tiles are resized to it.")] = 112,
    epochs: Epochs = KD.epochs,
    batch_size: BatchSize = KD.batch_size,
    lr: Lr = KD.lr,
    weight_decay: WeightDecay = KD.weight_decay,
    tiles_per_slide: Annotated[int, typer.Option(help="Tiles per slide per epoch; 0 for the median slide's.")] = 0,
    holdout: Annotated[float, typer.Option(help="Share of patients held out for evaluation.")] = 0.25,
    downstream_folds: Annotated[int, typer.Option(help="Folds of the downstream ABMIL check, student vs teacher "
                                                  "bags (0: skip).")] = 3,
    label: Annotated[str, typer.Option(help="Slide label broadcast to tiles (probes, logit CE, supervised).")]
    = "label",
    group: Group = KD.group,
    teacher_head: Annotated[Path | None, typer.Option(help="logit: linear head file or fs train run dir.")] = None,
    teacher_weight: Annotated[list[float] | None, typer.Option(help="multi-teacher: weight per --teacher.")] = None,
    learned_weights: Annotated[bool, typer.Option(help="multi-teacher: learn the weighting.")] = False,
    cosine: Annotated[float, typer.Option(help="feature: weight of 1 − cosine.")] = 1.0,
    smooth_l1: Annotated[float, typer.Option(help="feature: weight of smooth-L1.")] = 1.0,
    xmag_lambda: Annotated[float, typer.Option(help="xmag: weight λ of the per-sub-tile term.")] = 0.7,
    xmag_distance: Annotated[str, typer.Option(help=registry_name("xmag: distance of both terms"))] = "cosine+mse",
    alpha: Annotated[float, typer.Option(help="logit: weight of CE on weak labels.")] = 0.5,
    tau: Annotated[float, typer.Option(help="logit: temperature.")] = 4.0,
    prototypes: Annotated[int, typer.Option(help="dino: number of fixed prototypes.")] = 64,
    region: Annotated[int, typer.Option(help="relational: tiles per side of a neighbourhood.")] = 4,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="No flips, rotations or colour jitter.")]
    = False,
    raw_targets: Annotated[bool, typer.Option("--raw-targets", help="Do not centre and scale teacher targets.")]
    = False,
    seed: Annotated[int, typer.Option(help="Seed of the split, initialisation and sampling.")] = 0,
    device: Device = KD.device,
    cache_gb: Annotated[float, typer.Option(help="Memory for cached pixels and targets (GiB).")] = 4.0,
    name: Annotated[str | None, typer.Option(help="Encoder name for fs extract; default student:<out name>.")]
    = None,
) -> None:
    """Train a student from cached pixels and teacher targets; no teacher runs. Writes the student,
    report.json / report.md / curves.png and a cost ledger; use it with fs extract --model student:OUT."""
    from featurestore.distill.kd import Augment, DistillConfig, ObjectiveConfig, distill

    objective_cfg = ObjectiveConfig(cosine=cosine, smooth_l1=smooth_l1, teacher_weights=tuple(teacher_weight or ()),
                                    learned_weights=learned_weights, xmag_lambda=xmag_lambda,
                                    xmag_distance=xmag_distance, alpha=alpha, tau=tau, prototypes=prototypes, seed=seed)
    cfg = DistillConfig(store=store, teachers=tuple(teacher), student=student, objective=objective, out=out,
                        pixels=pixels, input_size=input_size,
                        schedule=replace(KD, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                         device=device, group=group_column(group)),
                        tiles_per_slide=tiles_per_slide, holdout=holdout, label=label,
                        downstream_folds=downstream_folds, seed=seed, augment=None if no_augment else Augment(),
                        region=region, teacher_head=teacher_head, objective_cfg=objective_cfg, cache_gb=cache_gb,
                        standardize=not raw_targets, name=name)
    result = distill(cfg, on_progress=lambda line: console.print(line, highlight=False))
    _print_report(result.report)


def register(app: typer.Typer) -> None:
    """Add ``distill`` to the ``fs`` app."""
    app.command("distill")(friendly(field_flags(distill_command)))
