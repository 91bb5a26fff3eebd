"""The run directory's numbers and pictures: metrics.json, ROC / Kaplan–Meier / scatter plots, heatmaps.

Metrics are computed from ``predictions.parquet`` alone, so ``fs eval RUN_DIR`` reproduces them
without the store. Each metric is reported per (seed, fold), as mean ± sd over those, and
*pooled*: computed on all out-of-fold predictions of a seed, averaged over seeds, with a 95 %
bootstrap interval that resamples patients (the same resample for every seed).

Pictures are drawn with Pillow (matplotlib is not a dependency).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw, ImageFont

from featurestore.devices import autocast
from featurestore.distill import metrics as M
from featurestore.distill.data import BagReader, grid_positions
from featurestore.distill.errors import RunDirError
from featurestore.distill.rundir import write_json
from featurestore.distill.runtime import load_checkpoint
from featurestore.distill.tasks import Classification, Ordinal, Survival, Task, task_from_dict
from featurestore.store import Store

PREDICTIONS_SCHEMA = pa.schema([
    pa.field("slide_id", pa.string()), pa.field("group", pa.string()), pa.field("seed", pa.int64()),
    pa.field("fold", pa.int64()), pa.field("label", pa.string()), pa.field("y", pa.float64()),
    pa.field("event", pa.int64()), pa.field("logits", pa.list_(pa.float32())), pa.field("score", pa.float64()),
])
"""Out-of-fold test predictions: ``label`` is the raw label text, ``y`` the encoded target (class or
grade index, survival time, value), ``event`` 1 unless censored, ``score`` the task's per-slide number."""

_PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127)]
_VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64)


def _columns(predictions: pa.Table) -> dict[str, np.ndarray]:
    cols = {name: predictions.column(name).to_numpy(zero_copy_only=False) for name in
            ("slide_id", "group", "seed", "fold", "y", "event", "score")}
    cols["logits"] = np.array(predictions.column("logits").to_pylist(), np.float64)
    return cols


def _json_number(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def summarize(task: Task, predictions: pa.Table, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per-fold metrics, their mean ± sd, and the pooled out-of-fold value with its bootstrap 95 % CI."""
    c = _columns(predictions)
    per_fold = []
    for s, f in sorted({(int(s), int(f)) for s, f in zip(c["seed"], c["fold"], strict=True)}):
        sel = (c["seed"] == s) & (c["fold"] == f)
        values = task.metrics(c["y"][sel], c["event"][sel], c["logits"][sel], c["score"][sel])
        per_fold.append({"seed": s, "fold": f, "n": int(sel.sum()), **values})
    names = [k for k in per_fold[0] if k not in ("seed", "fold", "n")]
    seeds = sorted(set(c["seed"].tolist()))
    by_seed = []
    for s in seeds:
        rows = np.flatnonzero(c["seed"] == s)
        by_seed.append(rows[np.argsort(c["slide_id"][rows], kind="stable")])
    reference = c["slide_id"][by_seed[0]]
    if any(not np.array_equal(c["slide_id"][rows], reference) for rows in by_seed):
        raise RunDirError("predictions: seeds cover different slides; every seed must predict the same test slides")

    def pooled(idx: np.ndarray) -> np.ndarray:
        per_seed = []
        for rows in by_seed:
            r = rows[idx]
            m = task.metrics(c["y"][r], c["event"][r], c["logits"][r], c["score"][r])
            per_seed.append([m[name] for name in names])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.array(per_seed, np.float64), axis=0)

    point = pooled(np.arange(reference.size))
    if n_boot:
        lo, hi = M.bootstrap_ci(pooled, reference.size, groups=c["group"][by_seed[0]], n_boot=n_boot, seed=seed)
    else:
        lo = hi = np.full(len(names), np.nan)
    summary = {}
    for j, name in enumerate(names):
        values = np.array([row[name] for row in per_fold], np.float64)
        values = values[~np.isnan(values)]
        summary[name] = {
            "mean": _json_number(values.mean()) if values.size else None,
            "sd": _json_number(values.std(ddof=1)) if values.size > 1 else None,
            "pooled": _json_number(point[j]), "ci95": [_json_number(lo[j]), _json_number(hi[j])],
        }
    return {"task": task.spec.kind, "primary": task.primary, "slides": int(reference.size), "seeds": len(seeds),
            "splits": len(per_fold), "summary": summary,
            "per_fold": [{k: _json_number(v) if isinstance(v, float) else v for k, v in row.items()}
                         for row in per_fold],
            "bootstrap": {"resamples": n_boot, "unit": "patient", "level": 0.95, "seed": seed}}


def write_report(run_dir: Path, task: Task, predictions: pa.Table, *, n_boot: int = 1000) -> dict[str, Any]:
    """``metrics.json`` and the task's curves (roc.png, km.png or scatter.png) in ``run_dir``."""
    result = summarize(task, predictions, n_boot=n_boot)
    write_json(run_dir / "metrics.json", result)
    c = _columns(predictions)
    first = c["seed"] == c["seed"].min()
    if isinstance(task, Classification | Ordinal):
        roc_figure(task, c).save(run_dir / "roc.png")
    elif isinstance(task, Survival):
        km_figure({k: v[first] for k, v in c.items()}).save(run_dir / "km.png")
    else:
        scatter_figure(c["y"][first], c["score"][first], task.spec.label).save(run_dir / "scatter.png")
    return result


def evaluate_run(run_dir: Path, *, n_boot: int = 1000) -> dict[str, Any]:
    """Recompute ``metrics.json`` and the curves of a finished run from its predictions (``fs eval``)."""
    config_path, predictions_path = run_dir / "config.json", run_dir / "predictions.parquet"
    for path in (config_path, predictions_path):
        if not path.is_file():
            raise RunDirError(f"{path}: not found; is {run_dir} a finished fs train run directory?")
    config = json.loads(config_path.read_text())
    task = task_from_dict(config["resolved"]["task"])
    return write_report(run_dir, task, pq.read_table(predictions_path), n_boot=n_boot)


# --- plots ---------------------------------------------------------------------------------------


def _font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


class _Plot:
    """A minimal x/y chart on a Pillow canvas: frame, ticks, title, lines, steps, markers, legend."""

    def __init__(self, title: str, xlabel: str, ylabel: str, xlim: tuple[float, float],
                 ylim: tuple[float, float] = (0.0, 1.0), *, legend_top: bool = False,
                 size: tuple[int, int] = (560, 480)) -> None:
        self.image = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.image)
        self.box = (64, 40, size[0] - 16, size[1] - 56)
        self.xlim, self.ylim = xlim, ylim
        self.font = _font()
        self.legend_rows = 0
        self.legend_top = legend_top
        left, top, right, bottom = self.box
        self.draw.rectangle(self.box, outline="black")
        for t in np.linspace(0, 1, 6):
            x, y = left + t * (right - left), bottom - t * (bottom - top)
            xv, yv = xlim[0] + t * (xlim[1] - xlim[0]), ylim[0] + t * (ylim[1] - ylim[0])
            self.draw.line([(x, bottom), (x, bottom + 4)], fill="black")
            self.draw.line([(left - 4, y), (left, y)], fill="black")
            self.draw.text((x, bottom + 6), f"{xv:.3g}", fill="black", font=self.font, anchor="ma")
            self.draw.text((left - 6, y), f"{yv:.3g}", fill="black", font=self.font, anchor="rm")
        self.draw.text(((left + right) / 2, size[1] - 8), xlabel, fill="black", font=self.font, anchor="md")
        label = Image.new("RGB", (int(self.draw.textlength(ylabel, font=self.font)) + 4, 18), "white")
        ImageDraw.Draw(label).text((2, 9), ylabel, fill="black", font=self.font, anchor="lm")
        label = label.rotate(90, expand=True)
        self.image.paste(label, (6, int((top + bottom) / 2 - label.size[1] / 2)))
        self.draw.text(((left + right) / 2, 12), title, fill="black", font=_font(15), anchor="mt")

    def _px(self, x: np.ndarray, y: np.ndarray) -> list[tuple[float, float]]:
        left, top, right, bottom = self.box
        fx = (np.asarray(x, np.float64) - self.xlim[0]) / ((self.xlim[1] - self.xlim[0]) or 1)
        fy = (np.asarray(y, np.float64) - self.ylim[0]) / ((self.ylim[1] - self.ylim[0]) or 1)
        return list(zip(left + fx * (right - left), bottom - fy * (bottom - top), strict=True))

    def line(self, x: np.ndarray, y: np.ndarray, color: tuple[int, int, int], width: int = 2) -> None:
        self.draw.line(self._px(x, y), fill=color, width=width)

    def step(self, x: np.ndarray, y: np.ndarray, color: tuple[int, int, int], width: int = 2) -> None:
        xs = np.repeat(x, 2)[1:]
        ys = np.repeat(y, 2)[:-1]
        self.line(xs, ys, color, width)

    def markers(self, x: np.ndarray, y: np.ndarray, color: tuple[int, int, int], r: int = 3) -> None:
        for px, py in self._px(x, y):
            self.draw.line([(px - r, py), (px + r, py)], fill=color)
            self.draw.line([(px, py - r), (px, py + r)], fill=color)

    def legend(self, text: str, color: tuple[int, int, int]) -> None:
        left, top, right, bottom = self.box
        y = top + 12 + 16 * self.legend_rows if self.legend_top else bottom - 14 - 16 * self.legend_rows
        x = right - 250
        self.draw.line([(x, y), (x + 18, y)], fill=color, width=3)
        self.draw.text((x + 24, y), text, fill="black", font=self.font, anchor="lm")
        self.legend_rows += 1


def roc_figure(task: Classification | Ordinal, c: dict[str, np.ndarray]) -> Image.Image:
    """Pooled out-of-fold ROC per seed (thick) and per fold of the first seed (thin)."""
    if isinstance(task, Ordinal):
        t = task.spec.threshold - task.levels[0]
        curves = [(f"grade >= {task.spec.threshold}", c["y"] >= t, 1 / (1 + np.exp(-c["logits"][:, t - 1])))]
    elif len(task.classes) == 2:
        curves = [(f"{task.spec.label} = {task.classes[1]}", c["y"] == 1, _softmax(c["logits"])[:, 1])]
    else:
        probs = _softmax(c["logits"])
        curves = [(f"{name} vs rest", c["y"] == k, probs[:, k]) for k, name in enumerate(task.classes)]
    plot = _Plot("ROC (out-of-fold test predictions)", "1 - specificity", "sensitivity", (0.0, 1.0))
    plot.line(np.array([0, 1]), np.array([0, 1]), (190, 190, 190), 1)
    first = c["seed"] == c["seed"].min()
    for k, (name, positive, score) in enumerate(curves):
        color = _PALETTE[k % len(_PALETTE)]
        if len(curves) == 1:
            for f in np.unique(c["fold"][first]):
                sel = first & (c["fold"] == f)
                plot.line(*M.roc_curve(positive[sel], score[sel]), tuple(min(255, v + 120) for v in color), 1)
        for s in np.unique(c["seed"]):
            sel = c["seed"] == s
            plot.line(*M.roc_curve(positive[sel], score[sel]), color, 3)
        auc = np.nanmean([M.auroc(positive[c["seed"] == s], score[c["seed"] == s]) for s in np.unique(c["seed"])])
        plot.legend(f"{name}: AUROC {auc:.3f}", color)
    return plot.image


def km_figure(c: dict[str, np.ndarray]) -> Image.Image:
    """Kaplan–Meier curves of the high- and low-risk halves, split at each test fold's median risk."""
    high = np.zeros(c["score"].size, bool)
    for f in np.unique(c["fold"]):
        sel = c["fold"] == f
        high[sel] = c["score"][sel] > np.median(c["score"][sel])
    horizon = float(c["y"].max()) or 1.0
    plot = _Plot("Kaplan-Meier by predicted risk (fold medians)", "time", "survival", (0.0, horizon),
                 legend_top=True)
    p = M.logrank_p(c["y"], c["event"], high)
    for k, (name, sel) in enumerate((("low risk", ~high), ("high risk", high))):
        if not sel.any():
            continue
        color = _PALETTE[k]
        t, s = M.kaplan_meier(c["y"][sel], c["event"][sel])
        t, s = np.r_[t, horizon], np.r_[s, s[-1]]
        plot.step(t, s, color)
        censored = sel & (c["event"] == 0)
        at = np.searchsorted(t, c["y"][censored], side="right") - 1
        plot.markers(c["y"][censored], s[np.clip(at, 0, s.size - 1)], color)
        plot.legend(f"{name} (n={int(sel.sum())})", color)
    plot.legend(f"log-rank p = {p:.3g}", (255, 255, 255))
    return plot.image


def scatter_figure(y: np.ndarray, pred: np.ndarray, label: str) -> Image.Image:
    lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    lo, hi = (lo, hi) if hi > lo else (lo - 1, hi + 1)
    plot = _Plot(f"{label}: predicted vs true (r = {M.pearson(pred, y):.3f})", "true", "predicted", (lo, hi), (lo, hi))
    plot.line(np.array([lo, hi]), np.array([lo, hi]), (190, 190, 190), 1)
    plot.markers(y, pred, _PALETTE[0])
    return plot.image


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# --- attention heatmaps --------------------------------------------------------------------------


def _colormap(v: np.ndarray) -> np.ndarray:
    """Viridis-like colours for values in [0, 1]."""
    pos = np.clip(v, 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(pos.astype(int), len(_VIRIDIS) - 2)
    frac = (pos - i)[:, None]
    return (_VIRIDIS[i] * (1 - frac) + _VIRIDIS[i + 1] * frac).astype(np.uint8)


def cell_size(grid: np.ndarray, max_side: int = 640) -> int:
    """Pixels per tile so that the heatmap's longer side is about ``max_side``."""
    return int(max(2, min(32, max_side // int(grid.max() + 1))))


def heatmap_image(grid: np.ndarray, attention: np.ndarray, title: str, thumbnails: np.ndarray | None = None
                  ) -> Image.Image:
    """Attention over the slide's tile grid, as percentiles within the slide (CLAM's convention).

    ``thumbnails`` (n, cell, cell, 3) are the tiles' cached pixels shrunk to ``cell_size(grid)``;
    without them the tissue is drawn as a light silhouette of the tiles.
    """
    cell = cell_size(grid)
    cols, rows = grid.max(0) + 1
    band = 28
    image = Image.new("RGB", (max(int(cols * cell), 360), int(rows * cell) + band + 24), "white")
    base = Image.new("RGB", (int(cols * cell), int(rows * cell)), "white")
    overlay = Image.new("RGB", base.size, "white")
    covered = Image.new("L", base.size, 0)
    draw_base, draw_over, draw_mask = ImageDraw.Draw(base), ImageDraw.Draw(overlay), ImageDraw.Draw(covered)
    percentile = (np.argsort(np.argsort(attention, kind="stable"), kind="stable") + 0.5) / attention.size
    colours = _colormap(percentile)
    for i, (gx, gy) in enumerate(grid):
        box = (int(gx * cell), int(gy * cell), int((gx + 1) * cell) - 1, int((gy + 1) * cell) - 1)
        if thumbnails is not None:
            base.paste(Image.fromarray(thumbnails[i]), box[:2])
        else:
            draw_base.rectangle(box, fill=(236, 222, 232))
        draw_over.rectangle(box, fill=tuple(int(v) for v in colours[i]))
        draw_mask.rectangle(box, fill=255)
    image.paste(Image.composite(Image.blend(base, overlay, 0.55), base, covered), (0, band))
    draw = ImageDraw.Draw(image)
    draw.text((6, band // 2), title, fill="black", font=_font(), anchor="lm")
    bar = _colormap(np.linspace(0, 1, 128))
    y0 = image.size[1] - 18
    for k, colour in enumerate(bar):
        x = 6 + k
        draw.line([(x, y0), (x, y0 + 10)], fill=tuple(int(v) for v in colour))
    draw.text((140, y0 + 5), "attention percentile: low -> high", fill="black", font=_font(11), anchor="lm")
    return image


def cached_thumbnails(store: Store, slide_id: str, tiling_id: str, n: int, cell: int) -> np.ndarray | None:
    """The slide's cached tile pixels shrunk to ``cell`` px, read 256 tiles at a time; None without pixels."""
    has = store.sql(f"SELECT pixels FROM slide_tilings WHERE slide_id = '{slide_id}' AND tiling_id = '{tiling_id}'")
    if has.num_rows == 0 or not has.column("pixels")[0].as_py():
        return None
    out = np.empty((n, cell, cell, 3), np.uint8)
    for start in range(0, n, 256):
        chunk = store.read_pixels(tiling_id, slide_id, np.arange(start, min(start + 256, n)))
        for j, tile in enumerate(chunk):
            out[start + j] = np.asarray(Image.fromarray(tile).resize((cell, cell), Image.Resampling.BILINEAR))
    return out


@torch.no_grad()
def attention_heatmaps(run_dir: Path, store: Store, reader: BagReader, task: Task, predictions: pa.Table,
                       count: int, device: torch.device) -> list[Path]:
    """Heatmaps of the first seed's highest- and lowest-scored test slides, each from the model that
    had it in its test fold, over cached tile pixels when the store has them."""
    c = _columns(predictions)
    first = np.flatnonzero(c["seed"] == c["seed"].min())
    ranked = first[np.argsort(-c["score"][first], kind="stable")]
    picks = list(dict.fromkeys([*ranked[: (count + 1) // 2], *ranked[::-1][: count // 2]]))
    out_dir = run_dir / "attention"
    out_dir.mkdir(exist_ok=True)
    labels = predictions.column("label").to_pylist()
    paths = []
    for rank, r in enumerate(picks):
        sid = str(c["slide_id"][r])
        ck = load_checkpoint(run_dir / "checkpoints" / f"seed{int(c['seed'][r])}-fold{int(c['fold'][r])}.pt", device)
        x = torch.from_numpy(reader.features(sid))[None].to(device)
        grid = grid_positions(reader.xy(sid))
        coords = torch.from_numpy(grid)[None].to(device) if ck.head.needs_coords else None
        with autocast(device):
            out = ck.head(x, torch.ones(x.shape[:2], dtype=torch.bool, device=device), coords)
        attention = out.attention[0].float().cpu().numpy()
        title = f"{sid[:12]}  {task.spec.label}={labels[r]}  score={c['score'][r]:.3g}"
        thumbnails = cached_thumbnails(store, sid, reader.es.tiling_id, len(grid), cell_size(grid))
        path = out_dir / f"{rank:02d}_{sid}.png"
        heatmap_image(grid, attention, title, thumbnails).save(path)
        paths.append(path)
    return paths
