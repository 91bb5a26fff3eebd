"""A distillation run's report: ``report.json``, a short ``report.md`` table and ``curves.png``.

Pictures are drawn with Pillow (matplotlib is not a dependency).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]


def _number(v: Any) -> Any:
    """JSON-safe: NaN/inf become null; nested containers are cleaned recursively."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _number(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_number(x) for x in v]
    return v


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    """The run at a glance: agreement with the teacher, probes, cost of student and teacher, ledger."""
    ev, cost, ledger = report["evaluation"], report["cost"], report["ledger"]
    cos = ev["cosine"]
    lines = [f"# {report['student']['arch']} ← {', '.join(report['teachers'])} ({report['objective']})", "",
             "| held-out tiles | value |", "|---|---|",
             f"| cosine to teacher | {_fmt(cos['mean'])} |",
             f"| centred cosine (0 = mean predictor) | {_fmt(cos['centred'])} |",
             f"| mean-predictor cosine | {_fmt(cos['mean_baseline'])} |"]
    for who in ("student", "teacher"):
        probe = ev["probe"].get(who) or {}
        lines.append(f"| {who} probe AUROC / balanced acc. / kNN bal. acc. | "
                     f"{_fmt(probe.get('linear_auroc'))} / {_fmt(probe.get('linear_balanced_accuracy'))} / "
                     f"{_fmt(probe.get('knn_balanced_accuracy'))} |")
    agree = ev["probe"].get("agreement") or {}
    lines.append(f"| probe agreement student vs teacher (linear / kNN) | {_fmt(agree.get('linear'))} / "
                 f"{_fmt(agree.get('knn'))} |")
    down = ev.get("downstream") or {}
    if "student" in down:
        metric = down["metric"]
        lines += ["", f"Downstream: {down['head']} on {down['task']}, {down['folds']}-fold cross-validation over "
                  f"{down['slides']} slides, same splits for both.", "",
                  f"| slide embeddings | {metric} | balanced accuracy |", "|---|---|---|"]
        lines += [f"| {who} | {_fmt(down[who].get(metric))} | {_fmt(down[who].get('balanced_accuracy'))} |"
                  for who in ("student", "teacher")]
    elif down:
        lines += ["", f"Downstream MIL skipped: {down['skipped']}"]
    lines += ["", "| | parameters | GFLOPs / tile | tiles/s |", "|---|---|---|---|"]
    for who in ("student", "teacher"):
        c = cost[who]
        gflops = None if c.get("flops") is None else c["flops"] / 1e9
        lines.append(f"| {who} | {_fmt(c.get('parameters'))} | {_fmt(gflops)} | {_fmt(c.get('tiles_per_s'), 1)} |")
    avoided = ledger.get("teacher_flops_avoided")
    lines += ["", f"Student tiles/s measured on {cost['student'].get('device')} at its input size; teacher tiles/s "
              "from stage one's records (device seconds of every teacher in the extraction runs).", "",
              f"Teacher forward passes in stage two: **{ledger['teacher_forward_passes']}**. "
              f"Wall time {ledger['wall_seconds']:.1f} s. Teacher compute avoided: "
              f"{'unknown' if avoided is None else f'{avoided / 1e12:.2f} TFLOPs'} "
              f"({ledger['target_tiles']} cached targets × {ledger['views_per_target']} view).", ""]
    return "\n".join(lines)


def _font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def plot_curves(path: Path, curves: dict[str, list[float | None]], title: str, *, width: int = 640,
                height: int = 400) -> None:
    """Each curve against epoch (1..n), every curve scaled to its own range so losses and cosines share a plot."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    left, top, right, bottom = 50, 40, width - 20, height - 40 - 18 * len(curves)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((left, 10), title, fill=(0, 0, 0), font=font)
    n = max((len(v) for v in curves.values()), default=0)
    for i in range(n):
        x = left + (right - left) * (i / max(n - 1, 1))
        draw.text((x - 4, bottom + 4), str(i + 1), fill=(0, 0, 0), font=font)
    for j, (name, values) in enumerate(curves.items()):
        colour = _COLOURS[j % len(_COLOURS)]
        known = [(i, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        if known:
            lo, hi = min(v for _, v in known), max(v for _, v in known)
            span = hi - lo or 1.0
            points = [(left + (right - left) * (i / max(n - 1, 1)), bottom - (bottom - top) * (v - lo) / span)
                      for i, v in known]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            label = f"{name}  ({lo:.3g} … {hi:.3g})"
        else:
            label = f"{name}  (no values)"
        draw.text((left, bottom + 24 + 18 * j), label, fill=colour, font=font)
    image.save(path)


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    """``report.json``, ``report.md`` and ``curves.png`` in ``run_dir``."""
    clean = _number(report)
    (run_dir / "report.json").write_text(json.dumps(clean, indent=1) + "\n")
    (run_dir / "report.md").write_text(markdown(clean))
    history = clean["history"]
    plot_curves(run_dir / "curves.png", {"train loss": history["train_loss"], "held-out loss": history["heldout_loss"],
                                         "held-out cosine": history["heldout_cosine"]},
                f"{clean['student']['arch']} · {clean['objective']}")
