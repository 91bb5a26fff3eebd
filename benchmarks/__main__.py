"""Run every benchmark and print one table of ratios; write JSON with the machine description.

    python -m benchmarks [--quick] [--only reading,extract,distill,store,retrieval,scale,formats,viewer]
                         [--out bench-results/latest.json]

Absolute times on a shared machine are noise; each ratio compares two variants measured in the
same run, which is what the targets in benchmarks/README.md are stated against.
"""

from __future__ import annotations

import argparse
import importlib
import json
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks._common import machine

MODULES = {"reading": "benchmarks.bench_reading", "extract": "benchmarks.bench_extract",
           "distill": "benchmarks.bench_distill", "store": "benchmarks.bench_store",
           "retrieval": "benchmarks.bench_retrieval", "scale": "benchmarks.bench_scale",
           "formats": "benchmarks.bench_formats", "viewer": "benchmarks.bench_viewer"}


def print_rows(rows: list[dict], console: Console | None = None) -> None:
    table = Table("benchmark", "case", "value", "unit", "ratio", "vs", "target", "note", title="benchmarks")
    for r in rows:
        table.add_row(r.get("benchmark", ""), r.get("case", ""), f"{r.get('value', '')}", r.get("unit", ""),
                      "" if r.get("ratio") is None else f"{r['ratio']:.3f}", r.get("vs", ""), r.get("target", ""),
                      r.get("note", ""))
    (console or Console(width=200)).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (minutes, not tens of minutes)")
    parser.add_argument("--only", default=",".join(MODULES), help="comma-separated subset of " + ", ".join(MODULES))
    parser.add_argument("--out", type=Path, default=Path("bench-results/latest.json"))
    args = parser.parse_args()
    rows = []
    for name in args.only.split(","):
        rows += importlib.import_module(MODULES[name]).run(args.quick)
    print_rows(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"when": datetime.now(UTC).isoformat(), "quick": args.quick,
                                    "machine": machine(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
