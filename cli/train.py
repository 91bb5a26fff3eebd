"""``fs train``, ``fs eval`` and ``fs predict``: slide-level heads trained from the cache (stage two).

The commands parse and print; ``distill`` does the work. ``register(app)`` adds them to ``fs``.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from featurestore.cli._common import StoreOpt, console, friendly


class TaskKind(StrEnum):
    classification = "classification"
    ordinal = "ordinal"
    survival = "survival"
    regression = "regression"


class HeadName(StrEnum):
    mean = "mean"
    max = "max"
    abmil = "abmil"
    transmil = "transmil"
    clam_sb = "clam-sb"


class Loss(StrEnum):
    ce = "ce"
    coral = "coral"
    cumulative = "cumulative"
    cox = "cox"
    discrete = "discrete"
    mse = "mse"
    huber = "huber"


def _print_metrics(result: dict[str, Any], title: str) -> None:
    view = Table("metric", "mean ± sd over folds", "pooled out-of-fold", "95% CI (bootstrap by patient)",
                 title=title)

    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    for name, s in result["summary"].items():
        lo, hi = s["ci95"]
        view.add_row(f"[bold]{name}[/bold]" if name == result["primary"] else name,
                     f"{fmt(s['mean'])} ± {fmt(s['sd'])}", fmt(s["pooled"]), f"{fmt(lo)} – {fmt(hi)}")
    console.print(view)


def train_command(
    store: StoreOpt,
    model: Annotated[str, typer.Option("--model", "-m", help="Embedding set: encoder name, view name or set id.")],
    label: Annotated[str, typer.Option(help="Labels column to learn; for survival, the follow-up time.")],
    out: Annotated[Path, typer.Option(help="New run directory (must not exist or be empty).")],
    task: Annotated[TaskKind, typer.Option(help="What the label is.")] = TaskKind.classification,
    head: Annotated[HeadName, typer.Option(help="MIL head.")] = HeadName.abmil,
    event: Annotated[str | None, typer.Option(help="Survival: column with 1 = event, 0 = censored.")] = None,
    loss: Annotated[Loss | None, typer.Option(help="Loss; default ce / coral / cox / mse by task.")] = None,
    folds: Annotated[int, typer.Option(help="Cross-validation folds.")] = 5,
    seeds: Annotated[int, typer.Option(help="Repeats with different splits and initialisations.")] = 1,
    group: Annotated[str, typer.Option(help="Labels column grouping slides of one patient; 'none' for slides.")]
    = "patient",
    split: Annotated[str | None, typer.Option(help="Fixed train/val/test column instead of k-fold.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of training patients for model selection.")] = 0.2,
    epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = 50,
    patience: Annotated[int, typer.Option(help="Epochs without validation improvement before stopping.")] = 10,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 2e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Bags per step (Cox: 16 or more).")] = 8,
    max_tiles: Annotated[int, typer.Option(help="Random tiles per training bag; 0 for all.")] = 4096,
    hidden: Annotated[int, typer.Option(help="Projection width (GUIDE-US: 1024).")] = 512,
    attention_dim: Annotated[int, typer.Option(help="Attention width (GUIDE-US: 768).")] = 256,
    dropout: Annotated[float, typer.Option(help="Dropout in the head.")] = 0.25,
    attention_heads: Annotated[int, typer.Option(help="TransMIL attention heads.")] = 8,
    landmarks: Annotated[int, typer.Option(help="TransMIL Nyström landmarks; 0 for hidden/2.")] = 0,
    k_sample: Annotated[int, typer.Option(help="CLAM-SB top/bottom tiles per bag.")] = 8,
    instance_weight: Annotated[float, typer.Option(help="CLAM-SB instance-loss weight.")] = 0.3,
    bins: Annotated[int, typer.Option(help="Discrete-time survival intervals.")] = 4,
    threshold: Annotated[int, typer.Option(help="Ordinal: grade >= this is 'positive' for AUROC.")] = 1,
    class_weights: Annotated[bool, typer.Option(help="Inverse-frequency class weights.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    workers: Annotated[int, typer.Option(help="Data-loader worker processes.")] = 0,
    cache_gb: Annotated[float, typer.Option(help="In-memory cache of decoded bags (GiB, per worker).")] = 2.0,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
    heatmaps: Annotated[int, typer.Option(help="Attention heatmaps to draw.")] = 4,
) -> None:
    """Cross-validate a MIL head on cached embeddings; write checkpoints, predictions, metrics and pictures.

    Splits are stratified and grouped by patient; the model is selected on an inner validation
    split of the training patients, never on the test fold.
    """
    from featurestore.distill.mil import HeadConfig
    from featurestore.distill.tasks import TaskSpec
    from featurestore.distill.train import TrainConfig, train

    cfg = TrainConfig(
        store=store, model=model, out=out,
        task=TaskSpec(task.value, label, event, loss.value if loss else "", class_weights, bins, threshold),
        head=HeadConfig(head.value, hidden, attention_dim, dropout, attention_heads, landmarks, k_sample,
                        instance_weight),
        folds=folds, seeds=seeds, group=None if group.lower() == "none" else group, split=split,
        val_fraction=val_fraction, epochs=epochs, patience=patience, lr=lr, weight_decay=weight_decay,
        batch_size=batch_size, max_tiles=max_tiles or None, device=device, workers=workers, cache_gb=cache_gb,
        bootstrap=bootstrap,
        heatmaps=heatmaps)
    result = train(cfg, on_progress=lambda line: console.print(line, highlight=False))
    _print_metrics(result.metrics, f"{head.value} · {task.value} · {label}")
    console.print(f"run {result.run_id} written to {result.run_dir}")


def eval_command(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by fs train.")],
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
) -> None:
    """Recompute metrics.json and the curves of a run from its predictions."""
    from featurestore.distill.report import evaluate_run

    _print_metrics(evaluate_run(run_dir, n_boot=bootstrap), str(run_dir))


def predict_command(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by fs train.")],
    store: StoreOpt,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Bags per forward pass.")] = 8,
) -> None:
    """Apply a run's heads to the store's slides; commit logits, scores and slide embeddings as `predictions`.

    Rows are keyed by (run_id, slide_id, seed, fold); held_out marks slides a head never trained or
    selected on, so out-of-fold soft targets for distillation are one filter away.
    """
    from featurestore.distill.predict import predict

    result = predict(run_dir, store, device=device, batch_size=batch_size,
                     on_progress=lambda line: console.print(line, highlight=False))
    console.print(f"wrote {result.rows} predictions for {result.slides} slides of run {result.run_id} "
                  f"to {store} (commit {result.commit_id})")


def register(app: typer.Typer) -> None:
    """Add ``train``, ``eval`` and ``predict`` to the ``fs`` app."""
    app.command("train")(friendly(train_command))
    app.command("eval")(friendly(eval_command))
    app.command("predict")(friendly(predict_command))
