"""``fs distill-slides`` and ``fs amkd``: slide students distilled from another cohort, modality or ensemble.

The commands parse and print; ``distill.xcohort`` does the work. ``register(app)`` adds them to ``fs``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from featurestore.cli._common import StoreOpt, console, friendly
from featurestore.cli._options import (
    BatchSize,
    Device,
    Epochs,
    Folds,
    Group,
    OptionalOut,
    Seeds,
    TaskKind,
    field_flags,
    group_column,
    registry_name,
)
from featurestore.distill.schedule import AMKD, AMKD_CV, SLIDES, SLIDES_CV


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def distill_slides_command(
    store: StoreOpt,
    model: Annotated[str, typer.Option("--model", "-m", help="Student's embedding set in --store.")],
    label: Annotated[str, typer.Option(help="Labels column the student learns.")],
    task: TaskKind = "classification",
    objective: Annotated[str, typer.Option(help=registry_name("Auxiliary term added to the task loss"))]
    = "triplet",
    bank_store: Annotated[Path | None, typer.Option(help="Store of the teacher cohort (default --store).")] = None,
    bank: Annotated[str | None, typer.Option(help="SQL returning the bank's `embedding` and label columns.")]
    = None,
    bank_label: Annotated[str | None, typer.Option(help="Bank label column (e.g. grade).")] = None,
    anchor_label: Annotated[str | None, typer.Option(help="Student's column matched to --bank-label.")] = None,
    bank_secondary: Annotated[str | None, typer.Option(help="Secondary column for positives, e.g. tumour_fraction.")]
    = None,
    bin_edge: Annotated[list[float] | None, typer.Option(help="Edge cutting --bank-secondary into bins; repeat.")]
    = None,
    soft_query: Annotated[str | None, typer.Option(help="Soft objective: SQL returning slide_id, logits per head.")]
    = None,
    weight: Annotated[float, typer.Option(help="λ: weight of the auxiliary term.")] = 1.0,
    margin: Annotated[float, typer.Option(help="Triplet margin (cosine distance).")] = 0.2,
    temperature: Annotated[float, typer.Option(help="InfoNCE temperature.")] = 0.1,
    gap: Annotated[int, typer.Option(help="Label distance of triplet negatives.")] = 1,
    hard_negatives: Annotated[bool, typer.Option(help="Hardest other-label bank item (FAISS) as negative.")]
    = False,
    sweep_margin: Annotated[list[float] | None, typer.Option(help="Sweep these margins (with --sweep-weight).")]
    = None,
    sweep_weight: Annotated[list[float] | None, typer.Option(help="Sweep these λ values.")] = None,
    compare: Annotated[bool, typer.Option(help="Also train task-only on the same splits; Wilcoxon over seeds.")]
    = False,
    folds: Folds = SLIDES_CV.folds,
    seeds: Seeds = SLIDES_CV.seeds,
    group: Group = SLIDES.group,
    epochs: Epochs = SLIDES.epochs,
    hidden: Annotated[int, typer.Option(help="ABMIL projection width.")] = 128,
    attention_dim: Annotated[int, typer.Option(help="ABMIL attention width.")] = 64,
    batch_size: BatchSize = SLIDES.batch_size,
    standardise: Annotated[bool, typer.Option(help="Z-score tiles with the training split's per-feature moments.")]
    = True,
    device: Device = SLIDES.device,
    out: OptionalOut = None,
) -> None:
    """Train an ABMIL student with task loss + λ·(triplet | clip | soft) from a teacher bank or ensemble.

    The bank is any SQL over --bank-store, e.g.
    "SELECT e.embedding, l.grade FROM slide_emb_uni e JOIN labels l USING (slide_id)".
    """
    import numpy as np

    from featurestore.distill.mil import HeadConfig
    from featurestore.distill.tasks import TaskSpec
    from featurestore.distill.xcohort import (
        BankSpec,
        SlideDistillConfig,
        compare_objectives,
        distill_slides,
        sweep,
        wilcoxon_p,
    )
    from featurestore.distill.xcohort.slides import write_run

    spec = None
    if bank is not None or bank_label is not None:
        if bank is None or bank_label is None:
            raise typer.BadParameter("--bank and --bank-label go together")
        spec = BankSpec(bank_store or store, bank, bank_label, bank_secondary, tuple(bin_edge or ()))
    cfg = SlideDistillConfig(store, model, TaskSpec(task, label), objective, spec, anchor_label,
                             soft_query=soft_query, weight=weight, margin=margin, temperature=temperature, gap=gap,
                             hard_negatives=hard_negatives, head=HeadConfig("abmil", hidden, attention_dim),
                             schedule=replace(SLIDES, epochs=epochs, batch_size=batch_size, device=device,
                                              group=group_column(group)),
                             cv=replace(SLIDES_CV, folds=folds, seeds=seeds), standardise=standardise)
    if sweep_margin or sweep_weight:
        rows = sweep(cfg, tuple(sweep_margin or [margin]), tuple(sweep_weight or [weight]))
        view = Table("margin", "λ", *list(rows[0])[2:], title="validation sweep (test folds unused)")
        for r in rows:
            view.add_row(*(_fmt(v) for v in r.values()))
        console.print(view)
        return
    if compare and objective != "task":
        results = compare_objectives(cfg, ("task", objective))
        if out is not None:
            write_run(results[objective], out)
    else:
        results = {objective: distill_slides(cfg, out)}
    first = next(iter(results.values()))
    view = Table("seed", *results, title=f"held-out {first.primary} per seed")
    for seed in range(seeds):
        view.add_row(str(seed), *(_fmt(r.primary_per_seed()[seed]) for r in results.values()))
    view.add_row("mean", *(_fmt(float(np.nanmean(r.primary_per_seed()))) for r in results.values()))
    console.print(view)
    if len(results) == 2:
        p = wilcoxon_p(results[objective].primary_per_seed(), results["task"].primary_per_seed())
        console.print(f"Wilcoxon signed-rank, {objective} vs task over {seeds} seeds: p = {p:.3g}")
    if out is not None:
        console.print(f"{objective} run written to {out}")


def amkd_command(
    store: StoreOpt,
    model: Annotated[str, typer.Option("--model", "-m", help="Embedding set in --store.")],
    time: Annotated[str, typer.Option(help="Follow-up time column.")],
    event: Annotated[str, typer.Option(help="Column with 1 = event, 0 = censored.")],
    omics: Annotated[list[str] | None, typer.Option(help="Omics label column; repeat for several.")] = None,
    omics_parquet: Annotated[Path | None, typer.Option(help="Parquet of omics features joined by --omics-key.")]
    = None,
    omics_key: Annotated[str, typer.Option(help="Column joining the Parquet rows to the labels.")] = "patient",
    folds: Folds = AMKD_CV.folds,
    seeds: Seeds = AMKD_CV.seeds,
    group: Group = AMKD.group,
    weight: Annotated[float, typer.Option(help="λ: weight of the distillation term.")] = 1.0,
    tau: Annotated[float, typer.Option(help="Disagreement scale of the adaptive weight (risk sds).")] = 1.0,
    omics_dropout: Annotated[float, typer.Option(help="Share of training patients seen without omics.")] = 0.25,
    epochs: Epochs = AMKD.epochs,
    batch_size: BatchSize = AMKD.batch_size,
    device: Device = AMKD.device,
    out: OptionalOut = None,
) -> None:
    """Distil a pathology + omics survival teacher into a pathology-only ABMIL student (docs/amkd.md)."""
    from featurestore.distill.xcohort import AmkdConfig, amkd

    cfg = AmkdConfig(store, model, time, event, tuple(omics or ()), omics_parquet, omics_key,
                     schedule=replace(AMKD, epochs=epochs, batch_size=batch_size, device=device,
                                      group=group_column(group)),
                     cv=replace(AMKD_CV, folds=folds, seeds=seeds), weight=weight, tau=tau, omics_dropout=omics_dropout)
    result = amkd(cfg, out)
    view = Table("seed", "teacher", "teacher, no omics", "pathology baseline", "distilled student",
                 title="held-out C-index")
    columns = (result.teacher, result.teacher_no_omics, result.baseline, result.student)
    for seed in range(seeds):
        view.add_row(str(seed), *(_fmt(c[seed]) for c in columns))
    console.print(view)
    if out is not None:
        console.print(f"run written to {out}")


def register(app: typer.Typer) -> None:
    """Add ``distill-slides`` and ``amkd`` to the ``fs`` app."""
    app.command("distill-slides")(friendly(field_flags(distill_slides_command)))
    app.command("amkd")(friendly(field_flags(amkd_command)))
