"""Which head? Several MIL heads on identical splits, compared with paired statistics (``fs train --compare``).

Every head is trained on the same patient-grouped folds, the same seeds and the same initialisation
seeds, so each test slide has one out-of-fold prediction per head and seed and the heads can be
compared pairwise on the same slides:

- per head, the task's primary metric (AUROC, QWK, C-index, Pearson) pooled over the out-of-fold
  predictions of each seed, averaged over seeds, with a 95 % bootstrap interval (patients resampled);
- per pair, the paired difference with a 95 % interval from the *same* patient resamples for both
  heads, Wilcoxon's signed-rank test over the (seed, fold) results, and, for a binary AUROC,
  DeLong's test of the two correlated AUROCs on the pooled predictions (each slide's score averaged
  over seeds). p-values are Holm-adjusted over the pairs.

A pair is *told apart* only when the paired interval excludes zero and every adjusted p is below
0.05. The recommendation is the best head if it is told apart from every other, else the simplest
head the data cannot tell apart from the best (mean < max < abmil < clam-sb < transmil).

Nothing is chosen on a test fold: each head's epoch is selected on an inner validation split of its
training fold, exactly as in ``fs train``. The heads' figures are held-out estimates; the recommended
head's own figure is optimistic by the act of picking the best of several, and the report says so.
"""

from __future__ import annotations

import itertools
import math
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import stats

from featurestore.devices import resolve_device
from featurestore.distill import metrics as M
from featurestore.distill import report
from featurestore.distill.data import BagReader
from featurestore.distill.errors import ConfigError
from featurestore.distill.mil import HeadConfig
from featurestore.distill.rundir import staged_run, write_json
from featurestore.distill.splits import Split
from featurestore.distill.tasks import Classification, Task, make_task
from featurestore.distill.train import TrainConfig, load_cohort, make_splits, run_split, splits_table
from featurestore.store import Store

Progress = Callable[[str], None]

SIMPLICITY = ("mean", "max", "abmil", "clam-sb", "transmil")
"""Heads from fewest to most moving parts: the order a tie is broken in."""

ALPHA = 0.05
MIN_PAIRS = 6
"""The fewest paired (seed, fold) results whose two-sided exact Wilcoxon p can fall below 0.05 (2/2^6)."""

SELECTION = ("Each head's kept epoch was chosen on a validation split of the patients of its own training "
             "fold; no test fold was used for any choice. The recommended head was picked after seeing these "
             "held-out results, so its own figure is optimistic: confirm it on an independent cohort or with "
             "nested cross-validation before reporting it as the chosen model's performance.")


def check_heads(heads: Sequence[str], task: Task) -> None:
    """Refuse head lists that cannot be compared: fewer than two, repeats, or a head the task cannot train."""
    if len(heads) < 2:
        raise ConfigError(f"--compare needs at least two heads, got {', '.join(heads) or 'none'}; "
                          f"pass e.g. --head mean,abmil")
    if len(set(heads)) < len(heads):
        raise ConfigError(f"--head lists a head twice ({', '.join(heads)}); name each head once")
    if "clam-sb" in heads and not isinstance(task, Classification):
        raise ConfigError(f"clam-sb has no instance loss for a {task.spec.kind} task (it would train as abmil); "
                          "drop it from --head")


def check_splits(splits: list[Split], task: Task, targets: np.ndarray) -> None:
    """Refuse splits on which the paired tests cannot work: too few (seed, fold) results for Wilcoxon, or a
    test fold on which the primary metric is undefined."""
    if len(splits) < MIN_PAIRS:
        seeds = len({sp.seed for sp in splits})
        folds = len(splits) // seeds
        raise ConfigError(f"{folds} folds x {seeds} seeds give {len(splits)} paired results; Wilcoxon's "
                          f"signed-rank test cannot reach p < {ALPHA} with fewer than {MIN_PAIRS}; "
                          f"pass --seeds {math.ceil(MIN_PAIRS / folds)}")
    for sp in splits:
        y, event = targets[sp.test, 0], targets[sp.test, 1]
        if task.spec.kind in ("classification", "ordinal"):
            problem = "test slides of one class only" if np.unique(y).size < 2 else ""
        elif task.spec.kind == "survival":
            problem = "no event among its test slides" if not event.any() else ""
        else:
            problem = "fewer than 3 test slides" if len(sp.test) < 3 else ""
        if problem:
            raise ConfigError(f"fold {sp.fold} of seed {sp.seed} has {problem} ({len(sp.test)} slides), so its "
                              f"{task.primary} is undefined and the folds cannot be paired; lower --folds")


def compare(cfg: TrainConfig, heads: Sequence[HeadConfig], on_progress: Progress | None = None) -> dict[str, Any]:
    """Train every head in ``heads`` on ``cfg``'s splits and write the comparison to ``cfg.out``:
    ``comparison.json``, ``comparison.md``, ``predictions.parquet`` (one row per head, seed and slide),
    ``splits.parquet`` and ``config.json``. Returns the comparison."""
    say = on_progress or (lambda _: None)
    names = [h.name for h in heads]
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    store = Store.open(cfg.store, read_only=True)
    reader = BagReader(store, store.embedding_set(cfg.model), cache_bytes=int(cfg.cache_gb * 2**30))
    cohort = load_cohort(store, reader, cfg.task, cfg.schedule.group, cfg.split)
    task = make_task(cfg.task, cohort.labels)
    check_heads(names, task)
    targets = task.targets(cohort.labels)
    splits = make_splits(cfg, cohort, task, targets)
    check_splits(splits, task, targets)
    device = resolve_device(cfg.schedule.device)
    with staged_run(cfg.out, run_id) as staging:
        say(f"{len(cohort.slide_ids)} slides, {len(set(cohort.groups))} patients, {len(splits)} splits, "
            f"heads {', '.join(names)} on {device}")
        tables: dict[str, pa.Table] = {}
        for head in heads:
            rows: list[dict] = []
            for sp in splits:
                rows += run_split(sp, replace(cfg, head=head), task, targets, cohort, reader, device, None)[0]
            tables[head.name] = pa.Table.from_pylist(rows, schema=report.PREDICTIONS_SCHEMA)
            say(f"{head.name}: {task.primary} {task.metrics(*_arrays(tables[head.name]))[task.primary]:.3f} "
                "(all folds and seeds pooled)")
        result = compare_predictions(task, tables, n_boot=cfg.bootstrap)
        result["run_id"] = run_id
        write_json(staging / "config.json", {"run_id": run_id, **cfg.to_dict(),
                                             "heads": [asdict(h) for h in heads], "task": task.to_dict()})
        pq.write_table(report_predictions(tables), staging / "predictions.parquet")
        pq.write_table(splits_table(splits, cohort), staging / "splits.parquet")
        write_json(staging / "comparison.json", result)
        (staging / "comparison.md").write_text(markdown(result))
    return result


def report_predictions(tables: dict[str, pa.Table]) -> pa.Table:
    """The heads' prediction tables stacked, with a ``head`` column first."""
    return pa.concat_tables([t.add_column(0, "head", pa.array([name] * t.num_rows)) for name, t in tables.items()])


def _arrays(t: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (t.column("y").to_numpy(), t.column("event").to_numpy(),
            np.array(t.column("logits").to_pylist(), np.float64), t.column("score").to_numpy())


def _aligned(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """Every head's table sorted by (seed, slide); refused unless all hold the same (seed, fold, slide) rows."""
    keys = [("seed", "ascending"), ("slide_id", "ascending")]
    out = {name: t.sort_by(keys) for name, t in tables.items()}
    first_name, first = next(iter(out.items()))
    for name, t in out.items():
        for column in ("seed", "fold", "slide_id", "y", "event"):
            if not t.column(column).equals(first.column(column)):
                raise ConfigError(f"{name} and {first_name} were not run on the same splits and labels "
                                  f"({column} differs); compare heads trained with the same --label, --folds, "
                                  "--seeds and --group")
    return out


def holm(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``p`` (NaN stays NaN and does not count as a test)."""
    p = np.asarray(p, np.float64)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    adjusted = np.full(p.shape, np.nan)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (order.size - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def compare_predictions(task: Task, tables: dict[str, pa.Table], *, n_boot: int = 1000,
                        seed: int = 0) -> dict[str, Any]:
    """The comparison of heads from their out-of-fold prediction tables (same splits, seeds and slides)."""
    names = list(tables)
    tables = _aligned(tables)
    ref = tables[names[0]]
    seeds_col, folds_col = ref.column("seed").to_numpy(), ref.column("fold").to_numpy()
    seeds = sorted(set(seeds_col.tolist()))
    n = int((seeds_col == seeds[0]).sum())
    arrays = {name: _arrays(t) for name, t in tables.items()}
    by_seed = [np.flatnonzero(seeds_col == s) for s in seeds]
    groups = ref.column("group").to_numpy(zero_copy_only=False)[by_seed[0]]
    primary = task.primary

    def value(name: str, rows: np.ndarray) -> float:
        y, event, logits, score = arrays[name]
        return task.metrics(y[rows], event[rows], logits[rows], score[rows])[primary]

    def pooled(idx: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.array([np.nanmean([value(name, rows[idx]) for rows in by_seed]) for name in names])

    point = pooled(np.arange(n))
    pairs = list(itertools.combinations(range(len(names)), 2))

    def statistic(idx: np.ndarray) -> np.ndarray:
        v = pooled(idx)
        return np.r_[v, [v[i] - v[j] for i, j in pairs]]

    if n_boot:
        lo, hi = M.bootstrap_ci(statistic, n, groups=groups, n_boot=n_boot, seed=seed)
    else:
        lo = hi = np.full(len(names) + len(pairs), np.nan)
    splits = sorted({(int(s), int(f)) for s, f in zip(seeds_col, folds_col, strict=True)})
    per_fold = {name: np.array([value(name, np.flatnonzero((seeds_col == s) & (folds_col == f))) for s, f in splits])
                for name in names}
    binary = isinstance(task, Classification) and len(task.classes) == 2
    rows = []
    for k, (i, j) in enumerate(pairs):
        a, b = names[i], names[j]
        diffs = per_fold[a] - per_fold[b]
        diffs = diffs[~np.isnan(diffs)]
        row: dict[str, Any] = {"a": a, "b": b, "difference": float(point[i] - point[j]),
                               "ci95": [_num(lo[len(names) + k]), _num(hi[len(names) + k])],
                               "wilcoxon_p": _wilcoxon(diffs), "pairs": int(diffs.size),
                               "wins_a": int((diffs > 0).sum()), "wins_b": int((diffs < 0).sum())}
        if binary:
            y = arrays[a][0][by_seed[0]]
            mean_a = np.mean([arrays[a][3][r] for r in by_seed], 0)
            mean_b = np.mean([arrays[b][3][r] for r in by_seed], 0)
            d, se, p = M.delong_paired(y, mean_a, mean_b)
            row |= {"delong_difference": _num(d), "delong_se": _num(se), "delong_p": _num(p)}
        rows.append(row)
    tests = ["wilcoxon_p"] + (["delong_p"] if binary else [])
    for test in tests:
        for row, adjusted in zip(rows, holm([np.nan if row[test] is None else row[test] for row in rows]),
                                 strict=True):
            row[f"{test}_holm"] = _num(adjusted)
    for row in rows:
        lo_d, hi_d = row["ci95"]
        excludes = lo_d is not None and hi_d is not None and (lo_d > 0 or hi_d < 0)
        significant = all(row[f"{t}_holm"] is not None and row[f"{t}_holm"] < ALPHA for t in tests)
        row["told_apart"] = bool(excludes and significant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        heads = {name: {"pooled": _num(point[i]), "ci95": [_num(lo[i]), _num(hi[i])],
                        "mean": _num(np.nanmean(per_fold[name])), "sd": _num(np.nanstd(per_fold[name], ddof=1))}
                 for i, name in enumerate(names)}
    result = {"task": task.spec.kind, "label": task.spec.label, "primary": primary, "slides": n,
              "patients": int(np.unique(groups).size), "seeds": len(seeds), "splits": len(splits),
              "heads": heads, "pairs": rows, "tests": tests, "alpha": ALPHA, "selection": SELECTION,
              "bootstrap": {"resamples": n_boot, "unit": "patient", "level": 0.95, "seed": seed}}
    result["recommendation"] = recommend(result)
    return result


def _num(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _wilcoxon(diffs: np.ndarray) -> float | None:
    if diffs.size == 0:
        return None
    if not diffs.any():
        return 1.0
    return _num(stats.wilcoxon(diffs).pvalue)


def recommend(result: dict[str, Any]) -> str:
    """The plain-language verdict of a comparison."""
    heads, primary = result["heads"], result["primary"]
    ranked = sorted(heads, key=lambda h: -(heads[h]["pooled"] if heads[h]["pooled"] is not None else -math.inf))
    best = ranked[0]
    apart = {(r["a"], r["b"]) for r in result["pairs"] if r["told_apart"]}

    def separated(x: str, y: str) -> bool:
        return (x, y) in apart or (y, x) in apart

    tied = [h for h in ranked[1:] if not separated(best, h)]
    beaten = [h for h in ranked[1:] if separated(best, h)]
    figure = f"{primary} {heads[best]['pooled']:.3f}"
    if not tied:
        return (f"{best} ({figure}) is better than every other head on this cohort "
                f"(paired 95 % CI excludes 0 and Holm-adjusted p < {ALPHA} for each pair).")
    choice = min([best, *tied], key=SIMPLICITY.index)
    text = (f"The data cannot tell {best} ({figure}) apart from {', '.join(tied)}: "
            f"the differences are within noise at {result['slides']} slides. ")
    if beaten:
        text += f"It is better than {', '.join(beaten)}. "
    if choice == best:
        return text + f"Use {best}."
    return text + f"Prefer the simplest of them, {choice} ({primary} {heads[choice]['pooled']:.3f})."


def markdown(result: dict[str, Any]) -> str:
    """``comparison.md``: the tables and the recommendation, for a human."""
    primary = result["primary"]

    def f(v: float | None, digits: int = 3) -> str:
        return "–" if v is None else f"{v:.{digits}f}"

    def p(v: float | None) -> str:
        return "–" if v is None else f"{v:.2g}"

    lines = [f"# Head comparison: {result['task']} of `{result['label']}`", "",
             f"{result['slides']} slides, {result['patients']} patients, {result['splits']} (seed, fold) splits "
             f"over {result['seeds']} seeds; every head on the same splits and seeds.", "",
             f"| head | {primary} pooled | 95 % CI | mean ± sd over folds |", "|---|---|---|---|"]
    for name, h in result["heads"].items():
        lines.append(f"| {name} | {f(h['pooled'])} | {f(h['ci95'][0])} – {f(h['ci95'][1])} | "
                     f"{f(h['mean'])} ± {f(h['sd'])} |")
    delong = "delong_p" in result["tests"]
    lines += ["", "| a − b | difference | paired 95 % CI | Wilcoxon p (Holm) | folds won a:b |"
              + (" DeLong p (Holm) |" if delong else "") + " told apart |",
              "|---|---|---|---|---|" + ("---|" if delong else "") + "---|"]
    for r in result["pairs"]:
        lines.append(f"| {r['a']} − {r['b']} | {f(r['difference'])} | {f(r['ci95'][0])} – {f(r['ci95'][1])} | "
                     f"{p(r['wilcoxon_p'])} ({p(r['wilcoxon_p_holm'])}) | {r['wins_a']}:{r['wins_b']} |"
                     + (f" {p(r['delong_p'])} ({p(r['delong_p_holm'])}) |" if delong else "")
                     + f" {'yes' if r['told_apart'] else 'no'} |")
    lines += ["", f"**Recommendation.** {result['recommendation']}", "", f"**Selection.** {result['selection']}", ""]
    return "\n".join(lines)
