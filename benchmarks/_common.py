"""Shared by the benchmarks: one row format, a best-of-N timer, and the machine description."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any


def best_of(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Fastest wall time of ``repeats`` runs: the least-disturbed run on a shared machine."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def best_of_interleaved(variants: dict[str, Callable[[], Any]], repeats: int = 3) -> dict[str, float]:
    """Fastest wall time of each variant over ``repeats`` rounds, every round running all variants in an
    order that alternates (forward, then reversed): a busy spell on shared cores, a warming page cache or
    a turbo clock then hits every variant alike instead of whichever ran in that stretch."""
    best = dict.fromkeys(variants, float("inf"))
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            best[name] = min(best[name], best_of(variants[name], repeats=1))
    return best


def row(benchmark: str, case: str, value: float, unit: str, *, ratio: float | None = None, vs: str = "",
        target: str = "", note: str = "") -> dict[str, Any]:
    """One line of the results table; ``ratio`` compares ``value`` with the ``vs`` variant in the same run."""
    return {"benchmark": benchmark, "case": case, "value": round(value, 4), "unit": unit,
            "ratio": None if ratio is None else round(ratio, 3), "vs": vs, "target": target, "note": note}


def machine() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "processor": platform.processor(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
