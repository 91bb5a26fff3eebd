"""Contact sheets: the query tile and its hits as one picture, for a quick look at what a teacher "sees"."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from featurestore.index._build import quote
from featurestore.index._errors import QueryError
from featurestore.index._manifest import write_atomic
from featurestore.index._search import read_image
from featurestore.store import Store

CELL = 192
CAPTION = 30
PAD = 6
COLUMNS = 6
QUERY_COLOUR = (30, 90, 200)


def tile_pixels(store: Store, tiling_id: str, tile_ids: list[int]) -> dict[int, np.ndarray | str]:
    """RGB pixels of tiles by id: from the store's pixel cache when the slide has one, else read from the
    slide file with OpenSlide at the tile's level and read size. A tile that cannot be read maps to the
    reason (a missing or moved slide file, an imported slide with no file)."""
    if not tile_ids:
        return {}
    rows = store.sql(
        "SELECT t.tile_id, t.slide_id, t.tile_index, t.x, t.y, t.level, t.read_size, st.pixels, s.path "
        "FROM tiles t JOIN slide_tilings st ON t.slide_id = st.slide_id AND t.tiling_id = st.tiling_id "
        f"JOIN slides s ON s.slide_id = t.slide_id WHERE t.tiling_id = {quote(tiling_id)} "
        f"AND t.tile_id IN ({', '.join(str(int(i)) for i in tile_ids)})").to_pylist()
    out: dict[int, np.ndarray | str] = {}
    for slide_id in dict.fromkeys(r["slide_id"] for r in rows):
        tiles = [r for r in rows if r["slide_id"] == slide_id]
        if tiles[0]["pixels"]:
            pixels = store.read_pixels(tiling_id, slide_id, np.array([r["tile_index"] for r in tiles]))
            out.update({r["tile_id"]: p for r, p in zip(tiles, pixels, strict=True)})
        else:
            out.update(_read_from_slide(tiles[0]["path"], tiles))
    return out


def _read_from_slide(path: str, tiles: list[dict]) -> dict[int, np.ndarray | str]:
    import openslide

    try:
        with openslide.OpenSlide(path) as slide:
            out: dict[int, np.ndarray | str] = {}
            for t in tiles:
                rgba = slide.read_region((t["x"], t["y"]), t["level"], (t["read_size"], t["read_size"]))
                rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
                out[t["tile_id"]] = np.asarray(rgb)
            return out
    except (OSError, openslide.OpenSlideError) as err:
        reason = f"cannot read {Path(path).name}: {str(err).splitlines()[0][:60]}"
        return {t["tile_id"]: reason for t in tiles}


def contact_sheet(store: Store, model: str, results: pa.Table, out: str | Path, *,
                  query_tile: int | None = None, query_image: str | Path | None = None) -> Path:
    """Write a PNG of the query (framed in blue) then each hit in rank order, captioned with rank, score,
    slide and position; tiles whose pixels are unavailable are grey with the reason."""
    if "tile_id" not in results.column_names:
        raise QueryError("--save draws tiles, and a slide-level search returns slides; "
                         "search by --tile, --image or --query to save a contact sheet")
    es = store.embedding_set(model)
    hits = results.select(["rank", "score", "slide_id", "tile_id", "x", "y"]).to_pylist()
    ids = [h["tile_id"] for h in hits] + ([query_tile] if query_tile is not None else [])
    pixels = tile_pixels(store, es.tiling_id, ids)
    panels: list[tuple[np.ndarray | str, str, str, bool]] = []
    if query_image is not None:
        panels.append((read_image(Path(query_image), CELL), "query", Path(query_image).name[:28], True))
    elif query_tile is not None:
        panels.append((pixels.get(query_tile, "query tile not found"), "query", f"tile {query_tile}", True))
    for h in hits:
        panels.append((pixels.get(h["tile_id"], "tile not found"), f"#{h['rank']}  {h['score']:.3f}",
                       f"{h['slide_id'][:10]} ({h['x']}, {h['y']})", False))
    path = Path(out)
    sheet = _draw(panels)
    write_atomic(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path


def _draw(panels: list[tuple[np.ndarray | str, str, str, bool]]) -> Image.Image:
    cols = max(1, min(COLUMNS, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    sheet = Image.new("RGB", (PAD + cols * (CELL + PAD), PAD + rows * (CELL + CAPTION + PAD)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (pixels, line1, line2, is_query) in enumerate(panels):
        row, col = divmod(i, cols)
        x0, y0 = PAD + col * (CELL + PAD), PAD + row * (CELL + CAPTION + PAD)
        if isinstance(pixels, str):
            sheet.paste((200, 200, 200), (x0, y0, x0 + CELL, y0 + CELL))
            draw.multiline_text((x0 + 4, y0 + 4), _wrap(pixels, 30), fill="black", font=font)
        else:
            sheet.paste(Image.fromarray(pixels).resize((CELL, CELL), Image.Resampling.BILINEAR), (x0, y0))
        if is_query:
            draw.rectangle((x0, y0, x0 + CELL - 1, y0 + CELL - 1), outline=QUERY_COLOUR, width=4)
        draw.text((x0, y0 + CELL + 2), line1, fill=QUERY_COLOUR if is_query else "black", font=font)
        draw.text((x0, y0 + CELL + 15), line2, fill="dimgray", font=font)
    return sheet


def _wrap(text: str, width: int) -> str:
    return "\n".join(text[i:i + width] for i in range(0, len(text), width))
