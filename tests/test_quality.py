"""Tile quality measures on generated and real tiles, and ``--min-quality`` dropping tiles at extraction."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from featurestore.pipelines.extract import ExtractOptions, PixelSpec, run_extract
from featurestore.schemas import InvalidArgumentError, TilingSpec
from featurestore.slides import measure_tiles, open_slide, read_tiles, tile_grid, tissue_mask
from featurestore.slides.quality import DEFAULT_LIMITS, parse_limits
from featurestore.store import Store

TEACHER = "test/tiny-cnn"
TILING = TilingSpec(target_mpp=0.5, tile_size=224)


@pytest.fixture(scope="module")
def he(real_slide):
    """The real H&E slide's tissue tiles: (pixels, x, y, slide width, slide height)."""
    with open_slide(real_slide) as reader:
        grid = tile_grid(reader, TILING, tissue_mask(reader, TILING), mpp=reader.mpp[0])
        pixels = read_tiles(reader, grid, np.arange(len(grid)), TILING.tile_size)
        return pixels, grid.x, grid.y, *reader.dimensions


def blur(tiles: np.ndarray, sigma: float) -> np.ndarray:
    smooth = ndimage.gaussian_filter(tiles.astype(np.float32), sigma=(0, sigma, sigma, 0))
    return np.clip(np.round(smooth), 0, 255).astype(np.uint8)


def test_sharpness_falls_strictly_with_blur_and_is_zero_on_a_flat_tile():
    texture = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    sharp = [measure_tiles(blur(texture, s) if s else texture).sharpness[0] for s in (0, 0.5, 1, 2, 4)]
    assert all(a > b for a, b in zip(sharp, sharp[1:], strict=False)), sharp
    flat = np.full((2, 224, 224, 3), (231, 180, 210), dtype=np.uint8)
    assert np.allclose(measure_tiles(flat).sharpness, 0.0, atol=1e-6)


def test_default_sharpness_keeps_every_tissue_tile_and_drops_them_blurred_by_a_micron(he):
    pixels = he[0]
    limit = DEFAULT_LIMITS["sharpness"]
    assert measure_tiles(pixels).sharpness.min() >= limit
    assert measure_tiles(blur(pixels, 2.0)).sharpness.max() < limit  # σ = 2 px = 1 µm at 0.5 µm/px


def test_sharpness_ignores_the_step_to_edge_padding(he):
    pixels, x, y, width, height = he
    tile = blur(pixels[:1], 2.0)
    padded = tile.copy()
    padded[:, :, 150:] = 255
    inside = np.array([[224, 150]])
    assert measure_tiles(padded).sharpness[0] > 2 * measure_tiles(tile).sharpness[0]  # the step alone
    assert measure_tiles(padded, inside).sharpness[0] == pytest.approx(measure_tiles(tile[:, :, :150]).sharpness[0])
    assert measure_tiles(padded, inside).background_fraction[0] > 0.3


def clean_tile(he) -> np.ndarray:
    """The H&E tile with the least ink-coloured and the least glass pixels."""
    quality = measure_tiles(he[0])
    return he[0][np.argmin(quality.pen_fraction + quality.background_fraction)].copy()


@pytest.mark.parametrize("ink", [(60, 70, 160), (40, 130, 110), (30, 30, 35)], ids=["blue", "green", "black"])
@pytest.mark.parametrize("width", [20, 60])
def test_pen_fraction_of_a_drawn_stroke(he, ink, width):
    tile = clean_tile(he)
    base = measure_tiles(tile[None]).pen_fraction[0]
    mask = Image.new("L", (224, 224))
    ImageDraw.Draw(mask).line([(-20, 40), (250, 190)], fill=255, width=width)
    stroke = np.asarray(mask) > 0
    tile[stroke] = ink
    share = stroke.mean()
    measured = measure_tiles(tile[None]).pen_fraction[0]
    assert share > 0.08
    assert abs(measured - (share + (1 - share) * base)) < 0.02, (measured, share, base)


def test_he_tissue_is_not_ink_but_the_slides_marking_dye_is(he):
    pixels, x, y, width, height = he
    pen = measure_tiles(pixels).pen_fraction
    # The teal marking dye lies along the slide's right and top margins; the lower left is H&E alone.
    plain = (x < width * 2 / 3) & (y > height * 0.4)
    assert plain.sum() >= 20
    assert pen[plain].max() < 0.03 and np.median(pen[plain]) < 0.01
    dyed = pixels[np.argmax(pen)].reshape(-1, 3).astype(np.int16)
    r, g, b = dyed.T
    teal = (g > r + 20) & (b > r + 20)
    assert pen.max() > DEFAULT_LIMITS["pen"] and teal.mean() > 0.5 * pen.max()


@pytest.mark.parametrize("glass", [(255, 255, 255), (222, 244, 247)], ids=["padding", "tinted-glass"])
def test_background_fraction_of_a_half_glass_tile(he, glass):
    tile = clean_tile(he)
    base = measure_tiles(tile[None, :, :112]).background_fraction[0]
    tile[:, 112:] = glass
    quality = measure_tiles(tile[None])
    assert abs(quality.background_fraction[0] - (0.5 + 0.5 * base)) < 0.01
    assert quality.pen_fraction[0] < 0.02
    empty = measure_tiles(np.full((1, 224, 224, 3), glass, dtype=np.uint8))
    assert empty.background_fraction[0] == 1.0 and empty.pen_fraction[0] == 0.0 and empty.sharpness[0] == 0.0


def test_min_quality_values():
    assert parse_limits("default") == {"min_sharpness": DEFAULT_LIMITS["sharpness"], "max_pen": DEFAULT_LIMITS["pen"],
                                       "max_background": DEFAULT_LIMITS["background"]}
    assert parse_limits("pen=0.1") == {"max_pen": 0.1}
    assert parse_limits("default, sharpness=20")["min_sharpness"] == 20.0
    for bad in ("", "sharp=3", "pen", "pen=high", "pen=1.5", "sharpness=-1", "sharpness=nan"):
        with pytest.raises(InvalidArgumentError, match="--min-quality .*e.g. sharpness="):
            parse_limits(bad)
    limited = replace(TILING, **parse_limits("default"))
    assert limited.filters_quality and not TILING.filters_quality and limited.id != TILING.id


@pytest.fixture(scope="module")
def extracted(real_slide, tmp_path_factory):
    """The real slide extracted twice into one store: every tile, then with limits that drop some."""
    path = tmp_path_factory.mktemp("quality") / "store"
    cache = (PixelSpec(224, 0.5),)
    report = run_extract([real_slide], path, ExtractOptions((TEACHER,), TILING, device="cpu", cache_pixels=cache))
    assert not report.failed, [o.error for o in report.failed]
    store = Store.open(path)
    sharpness = store.sql("SELECT median(sharpness) AS m FROM tiles").column("m")[0].as_py()
    limited = replace(TILING, min_sharpness=sharpness, max_pen=0.05, max_background=0.5)
    report = run_extract([real_slide], path, ExtractOptions((TEACHER,), limited, device="cpu", cache_pixels=cache))
    assert not report.failed, [o.error for o in report.failed]
    return store, limited


def test_extracted_tiles_carry_their_measures(extracted):
    store, _ = extracted
    row = store.sql(f"SELECT count(*) AS n, count(sharpness) AS s, count(pen_fraction) AS p, "
                    f"count(background_fraction) AS b FROM tiles WHERE tiling_id = '{TILING.id}'").to_pylist()[0]
    assert row["n"] == row["s"] == row["p"] == row["b"] > 20


def test_limits_keep_exactly_the_tiles_that_meet_them_renumbered(extracted, real_slide):
    store, limited = extracted
    assert limited.id != TILING.id
    (slide,) = store.slides()
    every = {k: np.asarray(v) for k, v in store.read_tiles(TILING.id, slide.slide_id).to_pydict().items()}
    kept = {k: np.asarray(v) for k, v in store.read_tiles(limited.id, slide.slide_id).to_pydict().items()}
    meets = ((every["sharpness"] >= limited.min_sharpness) & (every["pen_fraction"] <= limited.max_pen)
             & (every["background_fraction"] <= limited.max_background))
    assert 0 < len(kept["x"]) == meets.sum() < len(every["x"])
    assert kept["tile_index"].tolist() == list(range(len(kept["x"])))
    for column in ("x", "y", "sharpness", "pen_fraction", "background_fraction", "tissue_fraction"):
        assert np.allclose(kept[column], every[column][meets]), column
    sets = {es.tiling_id: es for es in store.embedding_sets() if es.encoder_name == TEACHER}
    bag, full = store.read_bag(sets[limited.id], slide.slide_id), store.read_bag(sets[TILING.id], slide.slide_id)
    assert bag.shape[0] == len(kept["x"])
    assert np.allclose(bag, full[meets], atol=1e-3)  # same pixels, same teacher: only batching differs
    assert np.array_equal(store.read_pixels(limited.id, slide.slide_id),
                          store.read_pixels(TILING.id, slide.slide_id)[meets])


def test_a_model_added_later_embeds_the_kept_tiles_and_derived_pixels_are_measured(extracted, real_slide):
    store, limited = extracted
    (slide,) = store.slides()
    before = store.read_tiles(limited.id, slide.slide_id).drop_columns(["commit_id"])
    opts = ExtractOptions((TEACHER, "test/tiny-vit"), limited, device="cpu",
                          cache_pixels=(PixelSpec(224, 0.5), PixelSpec(224, 1.0)))
    (outcome,) = run_extract([real_slide], store.root, opts).outcomes
    assert (outcome.status, outcome.models, outcome.tiles) == ("done", ("test/tiny-vit",), before.num_rows)
    store = Store.open(store.root, read_only=True)
    assert store.read_tiles(limited.id, slide.slide_id).drop_columns(["commit_id"]).equals(before)
    vit = next(es for es in store.embedding_sets() if es.encoder_name == "test/tiny-vit")
    assert store.read_bag(vit, slide.slide_id).shape[0] == before.num_rows
    (coarse,) = [t for t in store.tilings() if t.target_mpp == 1.0]
    measured = store.sql(f"SELECT count(*) AS n, count(sharpness) AS s FROM tiles WHERE tiling_id = '{coarse.id}'")
    assert measured.column("n")[0].as_py() == measured.column("s")[0].as_py() > 0
    # The coarse tiling covers the tissue grid, whatever tiles the limits dropped: its id does not hold them.
    every = store.read_tiles(TILING.id, slide.slide_id)
    pitch = TILING.tile_size * TILING.target_mpp / slide.mpp_x
    cells = {(round(x / pitch) // 2, round(y / pitch) // 2)
             for x, y in zip(every.column("x").to_pylist(), every.column("y").to_pylist(), strict=True)}
    assert store.read_tiles(coarse.id, slide.slide_id).num_rows == len(cells)


def test_a_slide_whose_tiles_all_fail_is_a_one_line_failure_and_the_batch_completes(real_slide, tmp_path):
    with open_slide(real_slide) as reader:
        region = reader.read_region((600, 1200), 0, (1024, 1024))  # its right and bottom tiles are padded
    blurred = tmp_path / "blurred.png"
    Image.fromarray(blur(region[None], 3.0)[0]).save(blurred)
    tiling = replace(TILING, **parse_limits("sharpness=60"))
    opts = ExtractOptions((TEACHER,), tiling, device="cpu", assume_mpp=0.5)
    report = run_extract([real_slide, blurred], tmp_path / "store", opts)
    (failed,) = report.failed
    assert [o.path for o in report.outcomes if o.status == "done"] == [str(real_slide)]
    assert failed.error.startswith(f"{blurred}: none of its") and "--min-quality sharpness=60" in failed.error
    assert "relax --min-quality" in failed.error and "\n" not in failed.error
    store = Store.open(tmp_path / "store", read_only=True)
    assert [f.message for f in store.failures()] == [failed.error]
    assert store.sql("SELECT count(DISTINCT slide_id) AS n FROM tiles").column("n")[0].as_py() == 1


def test_cli_min_quality(real_slide, tmp_path):
    from typer.testing import CliRunner

    from featurestore.cli.main import app

    store = tmp_path / "store"
    runner = CliRunner()
    dry = runner.invoke(app, ["extract", str(real_slide), "-s", str(store), "-m", TEACHER, "--dry-run",
                              "--min-quality", "default"])
    assert dry.exit_code == 0 and "before --min-quality" in dry.output, dry.output
    bad = runner.invoke(app, ["extract", str(real_slide), "-s", str(store), "-m", TEACHER, "--min-quality", "pen:1"])
    assert bad.exit_code == 2 and "--min-quality 'pen:1'" in bad.output and "Traceback" not in bad.output
    assert not store.exists()
    defaults = ",".join(f"{name}={value:g}" for name, value in DEFAULT_LIMITS.items())
    usage = runner.invoke(app, ["extract", "--help"], env={"COLUMNS": "300"}).output
    assert defaults in " ".join(usage.replace("│", " ").split())
