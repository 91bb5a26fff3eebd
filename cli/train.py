"""``fs train``, ``fs eval`` and ``fs predict``: slide-level heads trained from the cache (stage two).

The commands parse and print; ``distill`` does the work. ``register(app)`` adds them to ``fs``.
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
    Folds,
    Group,
    Lr,
    MaxTiles,
    Out,
    Patience,
    Seeds,
    TaskKind,
    ValFraction,
    WeightDecay,
    field_flags,
    group_column,
    registry_name,
)
from featurestore.distill.schedule import TRAIN, TRAIN_CV


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
    out: Out,
    task: TaskKind = "classification",
    head: Annotated[str, typer.Option(help=registry_name("MIL head; with --compare, several: mean,abmil,…"))]
    = "abmil",
    compare: Annotated[bool, typer.Option(help="Train every --head on the same splits and seeds; write a paired "
                                         "comparison (comparison.md) with a recommendation.")] = False,
    event: Annotated[str | None, typer.Option(help="Survival: column with 1 = event, 0 = censored.")] = None,
    loss: Annotated[str | None, typer.Option(help=registry_name("Loss; default ce / coral / cox / mse by task"))]
    = None,
    folds: Folds = TRAIN_CV.folds,
    seeds: Seeds = TRAIN_CV.seeds,
    group: Group = TRAIN.group,
    split: Annotated[str | None, typer.Option(help="Fixed train/val/test column instead of k-fold.")] = None,
    val_fraction: ValFraction = TRAIN_CV.val_fraction,
    epochs: Epochs = TRAIN.epochs,
    patience: Patience = TRAIN_CV.patience,
    lr: Lr = TRAIN.lr,
    weight_decay: WeightDecay = TRAIN.weight_decay,
    batch_size: BatchSize = TRAIN.batch_size,
    max_tiles: MaxTiles = TRAIN_CV.max_tiles or 0,
    window: Annotated[int, typer.Option(help="Select on the validation loss averaged over this many epochs and "
                                        "keep their averaged weights; 1 for the single best epoch.")]
    = TRAIN_CV.window,
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
    device: Device = TRAIN.device,
    workers: Annotated[int, typer.Option(help="Data-loader worker processes.")] = 0,
    cache_gb: Annotated[float, typer.Option(help="In-memory cache of decoded bags (GiB, per worker).")] = 2.0,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
    heatmaps: Annotated[int, typer.Option(help="Attention heatmaps to draw.")] = 4,
) -> None:
    """Cross-validate a MIL head on cached embeddings; write checkpoints, predictions, metrics and pictures.

    Splits are stratified and grouped by patient; the model is selected on an inner validation
    split of the training patients, never on the test fold.
    """
    from featurestore.distill.errors import ConfigError
    from featurestore.distill.mil import HeadConfig
    from featurestore.distill.tasks import TaskSpec
    from featurestore.distill.train import TrainConfig, train

    names = [h.strip() for h in head.split(",") if h.strip()]
    if len(names) != 1 and not compare:
        raise ConfigError(f"--head {head} names {len(names)} heads; pass --compare to compare them, or name one")
    heads = [HeadConfig(h, hidden, attention_dim, dropout, attention_heads, landmarks, k_sample, instance_weight)
             for h in names]
    cfg = TrainConfig(
        store=store, model=model, out=out,
        task=TaskSpec(task, label, event, loss or "", class_weights, bins, threshold),
        head=heads[0],
        schedule=replace(TRAIN, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                         device=device, group=group_column(group)),
        cv=replace(TRAIN_CV, folds=folds, seeds=seeds, val_fraction=val_fraction, patience=patience,
                   max_tiles=max_tiles or None, window=window),
        split=split, workers=workers, cache_gb=cache_gb, bootstrap=bootstrap, heatmaps=heatmaps)
    if compare:
        from featurestore.distill.compare import compare as compare_heads
        from featurestore.distill.compare import markdown

        comparison = compare_heads(cfg, heads, on_progress=lambda line: console.print(line, highlight=False))
        console.print(markdown(comparison), highlight=False)
        console.print(f"comparison written to {out}")
        return
    result = train(cfg, on_progress=lambda line: console.print(line, highlight=False))
    _print_metrics(result.metrics, f"{head} · {task} · {label}")
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
    device: Device = "auto",
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
    app.command("train")(friendly(field_flags(train_command)))
    app.command("eval")(friendly(eval_command))
    app.command("predict")(friendly(field_flags(predict_command)))
