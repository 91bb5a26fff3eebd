"""The benchmark helpers whose mistakes would silently skew a reported ratio, and tiny runs of the scale
and formats benchmarks (they time things, but no timing is checked)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import _common, bench_extract, bench_formats, bench_scale
from benchmarks.__main__ import MODULES, print_rows
from benchmarks._common import best_of_interleaved
from benchmarks.bench_distill import _conv_backward_flops
from benchmarks.peers import __main__ as peers
from featurestore.pipelines import extract
from featurestore.pipelines.demo import make_cohort
from featurestore.pipelines.extract import ExtractOptions, run_extract
from featurestore.schemas import TilingSpec


def _conv_flops(conv: torch.nn.Conv2d, fixed: bool) -> tuple[int, int]:
    """(forward, backward) FLOPs of one conv, with torch's backward formula or the benchmark's."""
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops} if fixed else {}
    x = torch.rand(2, conv.in_channels, 12, 12, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        conv(x).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    return counts[torch.ops.aten.convolution], counts[torch.ops.aten.convolution_backward]


def test_conv_backward_flops_agree_with_torch_on_dense_convs() -> None:
    conv = torch.nn.Conv2d(8, 16, 3)
    assert _conv_flops(conv, fixed=True) == _conv_flops(conv, fixed=False)


def test_depthwise_backward_is_two_forwards_not_channels_times_more() -> None:
    conv = torch.nn.Conv2d(32, 32, 3, groups=32)
    forward, backward = _conv_flops(conv, fixed=True)
    assert backward == 2 * forward
    assert _conv_flops(conv, fixed=False)[1] > 10 * forward  # torch's own formula ignores groups


def test_best_of_interleaved_runs_every_variant_each_round_alternating_and_keeps_its_fastest(monkeypatch) -> None:
    """A fake clock: each call of a variant advances it by that variant's next duration."""
    clock = [0.0]
    durations = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 6.0, 4.0])}
    calls: list[str] = []

    def variant(name: str):
        def run() -> None:
            calls.append(name)
            clock[0] += next(durations[name])
        return run

    monkeypatch.setattr(_common, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    best = best_of_interleaved({"a": variant("a"), "b": variant("b")}, repeats=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert best == {"a": 1.0, "b": 4.0}


def test_scale_benchmark_runs_at_tiny_sizes() -> None:
    plan = bench_scale.Plan((20, 40), timed_commits=5, repeats=1, cli_repeats=1, bag_sample=10, writers=2)
    rows = bench_scale.run(True, plan)
    console = Console(record=True, width=250)
    print_rows(rows, console)
    text = console.export_text()
    for case in ("40 slides: open", "fs info in process", "SELECT count(*) FROM tiles", "labels join",
                 "one slide's vectors", "resume decision", "index read phase", "one more commit, median",
                 "one more commit, mean", "fs sql count(*) from tiles, fresh process", "open CPU vs the smallest"):
        assert case in text
    assert sum("PASS" in r["target"] or "FAIL" in r["target"] for r in rows) >= 7


def test_viewer_benchmark_at_a_tiny_size_times_the_search_and_a_first_view_against_fs_search() -> None:
    pytest.importorskip("uvicorn", reason="the [view] extra is not installed")
    pytest.importorskip("starlette", reason="the [view] extra is not installed")
    from benchmarks import bench_viewer

    rows = bench_viewer.run(True, bench_viewer.Plan(2, 1024, "test/tiny-cnn", rounds=2))
    assert [r["benchmark"] for r in rows] == ["viewer"] * 3
    assert rows[0]["case"].startswith("fs search call (reference)") and rows[0]["ratio"] is None
    assert rows[1]["case"] == "GET /api/search, same query"
    # 7 requests before the DZI's tiles are known, /api/sets, 16 button images, levels 7-10: 1 + 4 + 9 + 25 tiles.
    assert rows[2]["case"].startswith("slide page first view (63 requests:") and "39 deep zoom tiles" in rows[2]["case"]
    for r in rows[1:]:
        assert r["unit"] == "ms" and r["ratio"] > 0 and r["vs"] == "fs search call" and r["target"] == "< 1 s"
    assert MODULES["viewer"] == "benchmarks.bench_viewer"


def test_formats_benchmark_at_a_tiny_size_reads_lossless_files_as_the_svs_pixel_for_pixel() -> None:
    """A 448-px crop of the real slide in every format: lossless files equal the SVS through every backend, JPEG
    re-encodings differ a little, and every file is read and extracted."""
    rows = bench_formats.run(True, bench_formats.Plan((1000, 1800, 448, 448), read_rounds=1, extract_rounds=1))
    kinds = {k: [r for r in rows if r["benchmark"] == f"format {k}"] for k in ("pixels", "reading", "extraction")}
    assert [len(v) for v in kinds.values()] == [10, 10, 7]  # 7 files; the SVS and both DICOMs by two backends each
    for r in kinds["pixels"]:
        mae, worst = r["value"], int(r["note"].removeprefix("max "))
        if "JPEG q95" in r["case"] or "quality 95" in r["case"]:
            assert 1 < mae < 8 and worst > 0, r  # measured 4.98 (max 81) on this crop
        elif r["case"].startswith("Aperio SVS") and "cucim" in r["case"]:
            assert mae < 1, r  # cuCIM's JPEG decoder against OpenSlide's
        else:
            assert (mae, worst) == (0, 0), r
    assert all(r["ratio"] > 0 and r["vs"].startswith("Aperio SVS") for r in kinds["reading"] + kinds["extraction"])
    tiles = [int(re.search(r"(\d+) tiles", r["case"]).group(1)) for r in kinds["extraction"]]
    assert tiles[0] > 4 and tiles[1:] == [4] * 6  # the whole SVS; the crop's 2 × 2 tissue tiles in every file


@pytest.mark.parametrize("between_batches", [False, True])
def test_extraction_breakdown_times_every_stage_of_the_real_pipeline_and_sums_to_the_wall(
        tmp_path: Path, between_batches: bool) -> None:
    """A stage the pipeline stopped calling would read 0 s here: the benchmark would be measuring nothing."""
    cohort = make_cohort(tmp_path / "cohort", 1, size=1024, seed=2)
    opts = ExtractOptions(models=("test/tiny-cnn",), tiling=TilingSpec(0.5, 128), device="cpu", batch_size=4, qc=False)
    originals = (extract.open_slide, extract._prefetch, extract.read_tiles, extract.extract_slide)
    clock = bench_extract.StageClock()
    with bench_extract.instrumented(clock, between_batches):
        report = run_extract([cohort.root / "slides"], tmp_path / "store", opts)
    assert not report.failed and report.tiles > 2 * opts.batch_size
    assert (extract.open_slide, extract._prefetch, extract.read_tiles, extract.extract_slide) == originals
    for stage in (bench_extract.SETUP, bench_extract.WAIT, bench_extract.NORMALISE, bench_extract.MODEL,
                  bench_extract.COMMIT, bench_extract.READ, "slides"):
        assert clock.seconds[stage] > 0, stage
    rows = bench_extract.breakdown_rows(clock, report.wall_seconds, "tiny")
    main = [r for r in rows if r["unit"] == "s"]
    assert sum(r["value"] for r in main) == pytest.approx(report.wall_seconds, abs=1e-3)
    assert all(r["value"] >= 0 for r in main)
    assert {r["case"].removeprefix("tiny: ") for r in rows if r["unit"] == "thread-s"} >= {bench_extract.READ}


def test_peers_arguments_reject_unknown_tools_and_trident_needs_a_checkout(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        peers.parse_args(["--tools", "lazyslide,clam"])
    assert "unknown clam" in capsys.readouterr().err
    args = peers.parse_args(["--tools", "trident", "--rounds", "1"])
    if args.trident_src is None:
        assert peers.install_spec("trident", args) is None
        assert "not on PyPI" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no pyproject.toml"):
        peers.install_spec("trident", peers.parse_args(["--trident-src", str(tmp_path)]))
    assert peers.install_spec("lazyslide", args) == [peers.LAZYSLIDE]
