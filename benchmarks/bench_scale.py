"""Store at cohort scale: open, fs info, metadata SQL, one slide's vectors, the resume decision, one more
commit and an index build's reads, at 1k, 5k and 20k slides of one store that grows between sizes.

    python -m benchmarks.bench_scale [--quick]

Every slide is a real ``commit_slide`` (100 tiles × 64-d float16, one encoder) and labels arrive through
``import_labels``. The bulk of each size is committed by a few writer threads, each with its own
``Store`` as parallel extraction workers would have, so their fsync waits overlap; the last commits
before each size come from one writer and are timed one by one. Each figure is a ratio to a floor
measured in the same interleaved rounds (medians of floor, ours, ours, floor...):

- open, ``fs info``, the metadata queries and the resume decision: the same answers from raw DuckDB
  over one compacted Parquet file per table, written from the store's own SQL results;
- a fresh process: the CLI's start (``fs --help``);
- one slide's vectors and the bag reads of an index build: raw Zarr reads of the same arrays;
- commits and open: the same figure at the smallest size (the cost must not grow with the store).

CPU seconds (``process_time`` plus finished children) are the primary figure: wall time on shared
cores moves with the load. Targets are judged at the largest size.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import zarr
from zarr.storage import LocalStore

from benchmarks._common import row
from featurestore.schemas import EncoderSpec, Slide, TilingSpec
from featurestore.store import SlideCommit, Snapshot, Store, tiles_table
from featurestore.store.store import CHECKPOINT_EVERY

TILES, DIM = 100, 64
TILING = TilingSpec(0.5, 224)
ENCODER = EncoderSpec("scale", "1", "0" * 64, DIM, 224, (0.5,) * 3, (0.5,) * 3, "cls")
SITES = ("north", "south", "east", "west")

COUNT = "SELECT count(*) FROM tiles"
JOIN = "SELECT l.site, count(*) FROM tiles t JOIN labels l USING (slide_id) GROUP BY 1"
VECTORS = "SELECT embedding FROM emb_scale WHERE slide_id = ?"
FLOOR_TABLES = ("tiles", "labels", "slides", "slide_tilings", "bags", "embedding_sets")
FLOOR_PROGRESS = ("SELECT st.slide_id, list(e.set_id) FILTER (WHERE e.set_id IS NOT NULL) AS sets "
                  "FROM slide_tilings st LEFT JOIN bags b USING (slide_id) LEFT JOIN embedding_sets e "
                  "ON e.set_id = b.set_id AND e.tiling_id = st.tiling_id WHERE st.tiling_id = ? GROUP BY 1")
FLOOR_INFO = ("SELECT (SELECT count(*) FROM slides), (SELECT sum(n_tiles) FROM slide_tilings), "
              "(SELECT count(*) FROM labels)", "SELECT set_id, count(*), sum(n_tiles) FROM bags GROUP BY 1")


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    timed_commits: int
    """Single-writer commits timed just before each size; 100 span one automatic checkpoint."""
    repeats: int
    """Interleaved rounds of each in-process pair."""
    cli_repeats: int
    """Interleaved rounds of the subprocess variants (a CLI start costs seconds)."""
    bag_sample: int
    """Bags read per round in the index-read case (all of them below this size)."""
    writers: int = 4


FULL = Plan((1000, 5000, 20_000), 100, 5, 3, 2000)
QUICK = Plan((200, 500, 1000), 20, 3, 2, 500)


@dataclass(frozen=True)
class Timing:
    """Median wall and CPU seconds of one variant over interleaved rounds."""

    wall: float
    cpu: float


def _cpu() -> float:
    """CPU seconds of this process (every thread) and of its finished children."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def _interleaved(variants: dict[str, Callable[[int], object]], repeats: int) -> dict[str, Timing]:
    """Each round runs every variant (given the round number), order alternating; medians per variant."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            c0, t0 = _cpu(), time.perf_counter()
            variants[name](r)
            samples[name].append((time.perf_counter() - t0, _cpu() - c0))
    return {name: Timing(float(np.median([w for w, _ in s])), float(np.median([c for _, c in s])))
            for name, s in samples.items()}


# --- building the store ----------------------------------------------------------------------------


def _slide_commit(i: int, rng: np.random.Generator) -> SlideCommit:
    slide = Slide(f"{i:032x}", f"/bench/slide_{i}.svs", 1, "bench", 100_000, 100_000, 0.5, 0.5, 20.0, 1)
    xs, ys = np.divmod(np.arange(TILES), 10)
    tiles = tiles_table(slide.slide_id, TILING.id, xs * 224, ys * 224, 0, 224, rng.uniform(0, 1, TILES))
    emb = rng.standard_normal((TILES, DIM), dtype=np.float32).astype(np.float16)
    return SlideCommit(slide, TILING, tiles, {ENCODER: emb})


def _fill(path: Path, lo: int, hi: int, writers: int) -> None:
    """Commit slides ``lo..hi-1`` from ``writers`` threads, each through its own ``Store``."""
    def work(k: int) -> None:
        store = Store.open(path)
        rng = np.random.default_rng(lo + k)
        for i in range(lo + k, hi, writers):
            store.commit_slide(_slide_commit(i, rng))

    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(work, range(writers)))


def _timed_commits(path: Path, lo: int, hi: int) -> tuple[list[Timing], int]:
    """Commit slides ``lo..hi-1`` from one writer, timing all but the first (which resolves the store's
    catalogue once per writer); return the timings and how many of them also wrote a checkpoint."""
    store = Store.open(path)
    rng = np.random.default_rng(hi)
    store.commit_slide(_slide_commit(lo, rng))
    first = store.version
    out = []
    for i in range(lo + 1, hi):
        item = _slide_commit(i, rng)
        c0, t0 = _cpu(), time.perf_counter()
        store.commit_slide(item)
        out.append(Timing(time.perf_counter() - t0, _cpu() - c0))
    checkpoints = sum((first + j) % CHECKPOINT_EVERY == 0 for j in range(1, len(out) + 1))
    return out, checkpoints


def _import_labels(path: Path, lo: int, hi: int, tmp: Path) -> None:
    csv = tmp / f"labels-{lo}-{hi}.csv"
    csv.write_text("slide_id,label,site\n" + "".join(f"{i:032x},{i % 2},{SITES[i % len(SITES)]}\n"
                                                     for i in range(lo, hi)))
    Store.open(path).import_labels(csv, key="slide_id")


# --- floors ------------------------------------------------------------------------------------------


def _write_floor(snap: Snapshot, directory: Path) -> dict[str, Path]:
    """One compacted Parquet file per table, holding the rows the store's SQL returns."""
    directory.mkdir()
    files = {}
    for name in FLOOR_TABLES:
        files[name] = directory / f"{name}.parquet"
        table = snap.sql(f"SELECT * FROM {name}")
        if name == "tiles":
            table = table.sort_by([("slide_id", "ascending"), ("tile_index", "ascending")])
        pq.write_table(table, files[name], compression="zstd", row_group_size=100_000)
    return files


def _floor_connect(files: dict[str, Path]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    for name, path in files.items():
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{path}')")
    return con


def _floor_info(files: dict[str, Path]) -> None:
    con = _floor_connect(files)
    for q in FLOOR_INFO:
        con.execute(q).fetchall()
    con.close()


def _floor_progress(con: duckdb.DuckDBPyConnection, tiling_id: str) -> dict[str, frozenset[str]]:
    rows = con.sql(FLOOR_PROGRESS, params=[tiling_id]).to_arrow_table().to_pylist()
    return {r["slide_id"]: frozenset(r["sets"] or ()) for r in rows}


def _raw_read(path: Path) -> np.ndarray:
    """A bag straight from its Zarr array: no snapshot, no manifest check."""
    return zarr.open_array(LocalStore(path, read_only=True), mode="r")[...]


def _fs() -> Path:
    fs = Path(sys.executable).with_name("fs")
    if not fs.is_file():
        raise FileNotFoundError(f"{fs}: the fs command is missing; install the project (pip install -e .)")
    return fs


def _run_cli(*args: str) -> None:
    subprocess.run([str(_fs()), *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# --- one size ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """What a later size is compared against: the smallest size's open and commit costs."""

    slides: int
    open_cpu: float
    commit_median_cpu: float
    commit_mean_cpu: float


def _open_rows(path: Path, files: dict[str, Path], case: str, repeats: int,
               last: bool) -> tuple[list[dict], Timing, Timing]:
    """Open (snapshot + views) and fs info in process, each against its DuckDB floor; return the rows and
    the timings of our open and of the floor's."""
    t = _interleaved({
        "floor": lambda _: _floor_connect(files).execute("SELECT 1").fetchall(),
        "open": lambda _: Store.open(path, read_only=True).snapshot().sql("SELECT 1"),
        "floor_info": lambda _: _floor_info(files),
        "info": lambda _: Store.open(path, read_only=True).info(),
    }, repeats)
    entries = len(Store.open(path, read_only=True).snapshot().state.entries)
    target = f"< 2 s CPU: {_verdict(t['open'].cpu < 2)}" if last else ""
    info_target = f"< 2 s CPU: {_verdict(t['info'].cpu < 2)}" if last else ""
    return [
        row("scale", f"{case}: open, Store.open().snapshot() + views (select 1)", t["open"].cpu, "CPU s",
            ratio=t["open"].cpu / t["floor"].cpu, vs="raw DuckDB: connect + views on compacted Parquet + select 1",
            target=target, note=f"wall {t['open'].wall:.3f} vs {t['floor'].wall:.3f} s; "
                                f"log entries after the checkpoint: {entries}"),
        row("scale", f"{case}: fs info in process, Store.open().info()", t["info"].cpu, "CPU s",
            ratio=t["info"].cpu / t["floor_info"].cpu, vs="raw DuckDB: the same counts on compacted Parquet",
            target=info_target, note=f"wall {t['info'].wall:.3f} vs {t['floor_info'].wall:.3f} s"),
    ], t["open"], t["floor"]


def _cli_rows(path: Path, floors: dict[str, Timing], case: str, repeats: int, last: bool) -> list[dict]:
    """Fresh processes: fs sql / fs info against the CLI's own start; a metadata query against twice what raw
    DuckDB needs for it in a fresh process (connect, views on the compacted files, the query) plus that start."""
    store = str(path)
    t = _interleaved({
        "help": lambda _: _run_cli("--help"),
        "open": lambda _: _run_cli("sql", "SELECT 1", "-s", store),
        "info": lambda _: _run_cli("info", "-s", store),
        "count": lambda _: _run_cli("sql", COUNT, "-s", store),
        "join": lambda _: _run_cli("sql", JOIN, "-s", store),
    }, repeats)
    start = t["help"]
    rows = [row("scale", f"{case}: CLI start, fs --help", start.cpu, "CPU s", note=f"wall {start.wall:.2f} s"),
            row("scale", f"{case}: open in a fresh process, fs sql 'select 1'", t["open"].cpu, "CPU s",
                ratio=t["open"].cpu / start.cpu, vs="fs --help",
                note=f"wall {t['open'].wall:.2f} s; store's own CPU {t['open'].cpu - start.cpu:+.2f} s"),
            row("scale", f"{case}: fs info in a fresh process", t["info"].cpu, "CPU s",
                ratio=t["info"].cpu / start.cpu, vs="fs --help",
                note=f"wall {t['info'].wall:.2f} s; store's own CPU {t['info'].cpu - start.cpu:+.2f} s")]
    for name, label in (("count", "count(*) from tiles"), ("join", "labels join")):
        floor = Timing(floors["open"].wall + floors[name].wall, floors["open"].cpu + floors[name].cpu)
        limit = 2 * floor.cpu + start.cpu
        rows.append(row("scale", f"{case}: fs sql {label}, fresh process", t[name].cpu, "CPU s",
                        ratio=t[name].cpu / limit, vs="2 × raw DuckDB (connect + views + query) + fs --help",
                        target=f"≤ 1: {_verdict(t[name].cpu <= limit)}" if last else "",
                        note=f"wall {t[name].wall:.2f} s vs {2 * floor.wall + start.wall:.2f} s"))
    return rows


def _measure(path: Path, tmp: Path, n: int, plan: Plan, commits: tuple[list[Timing], int],
             first: Measured | None, last: bool) -> tuple[list[dict], Measured]:
    case = f"{n:,} slides"
    snap = Store.open(path, read_only=True).snapshot()
    files = _write_floor(snap, tmp / f"floor-{n}")
    floor = _floor_connect(files)
    es = snap.embedding_set(ENCODER.name)
    locations = snap.bag_commits(es)
    load = os.getloadavg()[0]
    rows, opened, floor_open = _open_rows(path, files, case, plan.repeats, last)
    rows[0]["note"] += f"; load {load:.1f}"

    # Metadata queries and the resume decision on one open snapshot, against the same on the floor files.
    t = _interleaved({
        "floor_count": lambda _: floor.sql(COUNT).to_arrow_table(),
        "count": lambda _: snap.sql(COUNT),
        "floor_join": lambda _: floor.sql(JOIN).to_arrow_table(),
        "join": lambda _: snap.sql(JOIN),
        "floor_progress": lambda _: _floor_progress(floor, TILING.id),
        "progress": lambda _: snap.progress(TILING.id),
    }, plan.repeats)
    for name, label in (("count", COUNT), ("join", "labels join (" + JOIN + ")"),
                        ("progress", f"resume decision, snapshot.progress(tiling) over {n:,} slides")):
        rows.append(row("scale", f"{case}: {label}", t[name].cpu, "CPU s", ratio=t[name].cpu / t[f"floor_{name}"].cpu,
                        vs="the same query, raw DuckDB on compacted Parquet",
                        note=f"wall {t[name].wall * 1e3:.1f} vs {t[f'floor_{name}'].wall * 1e3:.1f} ms; open snapshot"))

    # One slide's vectors: a different slide each round (the view keeps the last few bags it read).
    rng = np.random.default_rng(n)
    picked = rng.choice(sorted(locations), size=min(plan.repeats * 2, n), replace=False)
    bag_dir = {s: path / "commits" / locations[s] / "emb" / es.id for s in locations}
    t_vec = _interleaved({
        "floor": lambda r: _raw_read(bag_dir[picked[r]]),
        "sql": lambda r: snap.sql(VECTORS, [str(picked[r])]),
    }, len(picked))
    vec_ratio = t_vec["sql"].cpu / t_vec["floor"].cpu
    rows.append(row("scale", f"{case}: one slide's vectors, {VECTORS}", t_vec["sql"].cpu * 1e3, "CPU ms",
                    ratio=vec_ratio, vs="raw zarr read of the same bag",
                    target=f"≤ 2: {_verdict(vec_ratio <= 2)}" if last else "",
                    note=f"wall {t_vec['sql'].wall * 1e3:.1f} vs {t_vec['floor'].wall * 1e3:.1f} ms"))

    # An index build's read phase: every bag once from a fresh snapshot (its manifests unread), same sample raw.
    sample = [str(s) for s in rng.choice(sorted(locations), size=min(plan.bag_sample, n), replace=False)]
    rounds = min(plan.repeats, 3)
    fresh = [Store.open(path, read_only=True).snapshot() for _ in range(rounds)]
    for s in fresh:
        s.bag_commits(es)
    t_bags = _interleaved({
        "floor": lambda _: [_raw_read(bag_dir[s]) for s in sample],
        "ours": lambda r: [fresh[r].read_bag(es, s) for s in sample],
    }, rounds)
    per_bag = {k: Timing(v.wall / len(sample) * 1e3, v.cpu / len(sample) * 1e3) for k, v in t_bags.items()}
    rows.append(row("scale", f"{case}: index read phase, snapshot.read_bag × {len(sample):,} bags",
                    per_bag["ours"].cpu, "CPU ms/bag", ratio=per_bag["ours"].cpu / per_bag["floor"].cpu,
                    vs="raw zarr reads of the same arrays",
                    note=f"wall {per_bag['ours'].wall:.2f} vs {per_bag['floor'].wall:.2f} ms/bag"))

    timings, checkpoints = commits
    walls, cpus = np.array([c.wall for c in timings]), np.array([c.cpu for c in timings])
    measured = Measured(n, opened.cpu, float(np.median(cpus)), float(cpus.mean()))
    base = first or measured
    for label, value, ref, wall in (("median", measured.commit_median_cpu, base.commit_median_cpu, np.median(walls)),
                                    ("mean", measured.commit_mean_cpu, base.commit_mean_cpu, walls.mean())):
        ratio = value / ref
        rows.append(row("scale", f"{case}: one more commit, {label} of {len(timings)} (single writer)",
                        value * 1e3, "CPU ms", ratio=ratio, vs=f"the same at {base.slides:,} slides",
                        target=f"0.8–1.2: {_verdict(0.8 <= ratio <= 1.2)}" if last else "",
                        note=f"wall {wall * 1e3:.1f} ms; {checkpoints} wrote a checkpoint "
                             f"(max {walls.max() * 1e3:.0f} ms wall)"))
    if last and first is not None:
        ratio = opened.cpu / first.open_cpu
        rows.append(row("scale", f"{case}: open CPU vs the smallest size", opened.cpu, "CPU s", ratio=ratio,
                        vs=f"open at {first.slides:,} slides", target=f"0.8–1.2: {_verdict(0.8 <= ratio <= 1.2)}"))
    floors = {"open": floor_open, "count": t["floor_count"], "join": t["floor_join"]}
    rows += _cli_rows(path, floors, case, plan.cli_repeats, last)
    floor.close()
    return rows, measured


def run(quick: bool, plan: Plan | None = None) -> list[dict]:
    plan = plan or (QUICK if quick else FULL)
    rows: list[dict] = []
    first: Measured | None = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = tmp / "store"
        Store.create(path)
        done = 0
        for n in plan.sizes:
            t0 = time.perf_counter()
            _fill(path, done, max(done, n - plan.timed_commits - 1), plan.writers)
            commits = _timed_commits(path, n - plan.timed_commits - 1, n)
            _import_labels(path, done, n, tmp)
            built = time.perf_counter() - t0
            size_rows, measured = _measure(path, tmp, n, plan, commits, first, n == plan.sizes[-1])
            size_rows[0]["note"] += f"; {n - done:,} slides committed in {built:.0f} s"
            rows += size_rows
            first = first or measured
            done = n
        rows += _before_checkpoint(path, tmp, done, plan)
    return rows


def _before_checkpoint(path: Path, tmp: Path, n: int, plan: Plan) -> list[dict]:
    """Open and fs info once the store is one commit short of its next checkpoint (the most log to replay)."""
    short = CHECKPOINT_EVERY - 1 - Store.open(path).version % CHECKPOINT_EVERY
    _fill(path, n, n + short, plan.writers)
    snap = Store.open(path, read_only=True).snapshot()
    files = _write_floor(snap, tmp / "floor-before-checkpoint")
    case = f"{n + short:,} slides, one commit short of a checkpoint"
    return _open_rows(path, files, case, plan.repeats, last=True)[0]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    from benchmarks.__main__ import print_rows

    print_rows(run(parser.parse_args().quick))
