"""Search an embedding set: by tile, vector, SQL or image (tiles), or by slide (pooled vectors).

A ``where`` predicate is plain SQL over ``tiles t``, ``slides s`` and ``labels l`` (joined on
``slide_id``); it is resolved with ``Store.sql`` to the allowed tile ids before the index is
asked, so a filtered search ranks exactly the tiles the predicate selects.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pyarrow as pa

from featurestore.index._build import TileIndex, first_view, load_index, quote
from featurestore.index._errors import QueryError
from featurestore.index._slide_sets import is_slide_set, search_slide_set
from featurestore.schemas import EncoderSpec, SqlError
from featurestore.store import Snapshot, Store

if TYPE_CHECKING:
    import torch

TILE_COLUMNS = ("rank", "score", "slide_id", "tile_id", "tile_index", "x", "y")
SLIDE_COLUMNS = ("rank", "score", "slide_id", "n_tiles")


def search(store: Store | Snapshot, model: str, *, tile_id: int | None = None, slide_id: str | None = None,
           vector: np.ndarray | list[float] | None = None, query_sql: str | None = None, k: int = 10,
           where: str | None = None, group_by: str | None = None) -> pa.Table:
    """Ranked nearest neighbours by cosine similarity, with label columns joined, as Arrow.

    Give exactly one query. ``tile_id``, ``vector`` and ``query_sql`` (one row whose
    ``embedding`` column, or only column, is the vector) rank tiles: rank, score, slide_id,
    tile_id, tile_index, x, y, labels...; ``group_by="slide"`` keeps each slide's best tile.
    ``slide_id`` ranks slides by their pooled vectors: rank, score, slide_id, n_tiles, labels...; when
    ``model`` names a slide embedding set of ``fs slide-encode`` (e.g. ``titan:conch-v1.5``), by its vectors.
    ``where`` is an SQL predicate over ``tiles t``, ``slides s`` and ``labels l`` (slide-level
    search: ``slides s`` and ``labels l``), e.g. ``"l.label = 1 AND t.tissue_fraction > 0.5"``.
    The index must match the set (``StaleIndexError`` otherwise); see ``build_index``.
    """
    given = [name for name, value in (("tile_id", tile_id), ("slide_id", slide_id), ("vector", vector),
                                      ("query_sql", query_sql)) if value is not None]
    if len(given) != 1:
        raise QueryError(f"give exactly one query (tile, slide, vector, SQL or image), got "
                         f"{' and '.join(given) if given else 'none'}")
    if k < 1:
        raise QueryError(f"k must be >= 1, got {k}")
    if group_by not in (None, "slide"):
        raise QueryError(f"group_by {group_by!r} is not supported; use 'slide' or nothing")
    store = store.snapshot() if isinstance(store, Store) else store
    if slide_id is not None and is_slide_set(store, model):
        allowed = None if where is None else allowed_slides(store, where)
        return _with_labels(store, search_slide_set(store, model, slide_id, k, allowed))
    index = load_index(store, model)
    if slide_id is not None:
        return _slide_search(store, index, slide_id, k, where)
    q = _query_vector(store, index, tile_id, vector, query_sql)
    allowed = None if where is None else allowed_tiles(store, index, where)
    scores, ids = (_best_per_slide(store, index, q, k, allowed) if group_by == "slide"
                   else index.search(q, k, allowed))
    hits = pa.table({"rank": pa.array(np.arange(1, len(ids) + 1), pa.int32()),
                     "score": pa.array(scores, pa.float32()), "tile_id": pa.array(ids, pa.int64())})
    tiles = _tiles(store, index, ids)
    return _with_labels(store, hits.join(tiles, "tile_id").sort_by("rank").select(list(TILE_COLUMNS)))


def _query_vector(store: Snapshot, index: TileIndex, tile_id: int | None, vector,
                  query_sql: str | None) -> np.ndarray:
    dim = index.es.embed_dim
    if tile_id is not None:
        return first_view(store.read_by_tile_ids(index.es, [tile_id]))[0]
    if query_sql is not None:
        table = store.sql(query_sql)
        if table.num_rows != 1 or ("embedding" not in table.column_names and table.num_columns != 1):
            view = next(iter(store.view_names()), "emb_<model>")
            raise QueryError(f"--query must return one row with an 'embedding' column (or one column), got "
                             f"{table.num_rows} rows of {', '.join(table.column_names)}; e.g. "
                             f"SELECT embedding FROM {view} WHERE tile_id = 123")
        vector = table.column("embedding" if "embedding" in table.column_names else 0)[0].as_py()
    try:
        q = np.asarray(vector, np.float32).reshape(-1)
    except (TypeError, ValueError) as err:
        raise QueryError(f"the query vector is not a list of numbers: {str(err).splitlines()[0]}") from err
    if q.shape != (dim,):
        raise QueryError(f"the query vector has {q.size} values; {index.es.encoder_name} vectors have {dim}")
    return q


def _filter(store: Snapshot, query: str, where: str, tables: str) -> pa.Table:
    try:
        return store.sql(query)
    except SqlError as err:
        raise QueryError(f"where {where!r}: {str(err).splitlines()[0]}; write an SQL predicate over "
                         f"{tables}, e.g. \"l.label = 1 AND s.mpp_x < 0.3\"") from err


def allowed_tiles(store: Snapshot, index: TileIndex, where: str) -> np.ndarray:
    """Tile ids of the indexed set satisfying ``where`` (SQL over ``tiles t``, ``slides s``, ``labels l``)."""
    es = index.es
    query = ("SELECT t.tile_id FROM tiles t JOIN slides s USING (slide_id) "
             f"LEFT JOIN labels l USING (slide_id) WHERE t.tiling_id = {quote(es.tiling_id)} "
             f"AND t.slide_id IN (SELECT slide_id FROM bags WHERE set_id = {quote(es.id)}) AND ({where})")
    return _filter(store, query, where, "tiles t, slides s and labels l").column("tile_id").to_numpy()


def allowed_slides(store: Snapshot, where: str) -> set[str]:
    """Slide ids satisfying ``where`` (SQL over ``slides s`` and ``labels l``)."""
    query = f"SELECT s.slide_id FROM slides s LEFT JOIN labels l USING (slide_id) WHERE ({where})"
    return set(_filter(store, query, where, "slides s and labels l").column("slide_id").to_pylist())


def _tiles(store: Snapshot, index: TileIndex, ids: np.ndarray) -> pa.Table:
    """slide_id, tile_index, x, y of tiles by id (order not kept)."""
    listed = ", ".join(str(int(i)) for i in ids) or "NULL"
    return store.sql(f"SELECT tile_id, slide_id, tile_index, x, y FROM tiles "
                     f"WHERE tiling_id = {quote(index.es.tiling_id)} AND tile_id IN ({listed})")


def _best_per_slide(store: Snapshot, index: TileIndex, q: np.ndarray, k: int,
                    allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Each slide's best tile, top ``k`` slides: fetch more tiles until k slides appear or none are left."""
    total = index.manifest.n_vectors if allowed is None else len(np.unique(allowed))
    fetch = min(total, max(64, 16 * k))
    while True:
        scores, ids = index.search(q, fetch, allowed)
        tiles = _tiles(store, index, ids)
        slide_of = dict(zip(tiles.column("tile_id").to_pylist(), tiles.column("slide_id").to_pylist(),
                            strict=True))
        best: dict[str, int] = {}
        for pos, tile in enumerate(ids.tolist()):
            best.setdefault(slide_of[tile], pos)
        if len(best) >= k or fetch >= total:
            break
        fetch = min(total, fetch * 4)
    keep = np.array(list(best.values())[:k], np.int64)
    return scores[keep], ids[keep]


def _slide_search(store: Snapshot, index: TileIndex, slide_id: str, k: int, where: str | None) -> pa.Table:
    slide_ids, vectors, n_tiles = index.pooled()
    if slide_id not in slide_ids:
        raise QueryError(f"slide {slide_id} has no embeddings in {index.es.encoder_name} (set "
                         f"{index.es.id}); list the indexed slides: fs sql \"SELECT slide_id FROM bags\"")
    scores = vectors @ vectors[slide_ids.index(slide_id)]
    keep = np.arange(len(slide_ids))
    if where is not None:
        ok = allowed_slides(store, where)
        keep = np.array([i for i, s in enumerate(slide_ids) if s in ok], np.int64)
    order = keep[np.argsort(-scores[keep], kind="stable")][:k]
    table = pa.table({"rank": pa.array(np.arange(1, len(order) + 1), pa.int32()),
                      "score": pa.array(scores[order], pa.float32()),
                      "slide_id": pa.array([slide_ids[i] for i in order], pa.string()),
                      "n_tiles": pa.array(n_tiles[order], pa.int64())})
    return _with_labels(store, table)


def _with_labels(store: Snapshot, table: pa.Table) -> pa.Table:
    """Append the slides' label columns (prefixed ``label_`` where a name is taken), keeping rank order."""
    slide_ids = sorted({s for s in table.column("slide_id").to_pylist() if s is not None})
    listed = ", ".join(quote(s) for s in slide_ids) or "NULL"
    labels = store.sql(f"SELECT * EXCLUDE (commit_id) FROM labels WHERE slide_id IN ({listed})")
    labels = labels.rename_columns([c if c == "slide_id" or c not in table.column_names else f"label_{c}"
                                    for c in labels.column_names])
    return table.join(labels, "slide_id", join_type="left outer").sort_by("rank")


class ImageEncoder(Protocol):
    """What ``embed_image`` runs: a built teacher (``featurestore.encoders.build_teacher``), uint8 RGB tiles
    ``(n, h, w, 3)`` in, ``(n, dim)`` vectors out, with the spec of the encoder it is."""

    spec: EncoderSpec

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...


def embed_image(store: Store | Snapshot, model: str, image: str | Path | np.ndarray,
                teacher: ImageEncoder) -> np.ndarray:
    """The vector of an image tile, computed by the set's own teacher (same weights, same preprocessing).

    The image is taken to be at the set's tiling resolution and resized to its tile size, as
    extraction feeds tiles to the teacher. ``teacher`` must have the encoder id of the set's
    encoder, so a different checkpoint is refused rather than silently compared.
    """
    es = store.embedding_set(model)
    encoder = next(e for e in store.encoders() if e.id == es.encoder_id)
    if teacher.spec.id != encoder.id:
        raise QueryError(f"teacher {teacher.spec.name} is encoder {teacher.spec.id}, but {es.encoder_name} vectors "
                         f"were made by {encoder.id} (weights sha256 {encoder.weights_sha256[:12]}…); build the "
                         "teacher with the extraction's checkpoint (--weights)")
    tiling = next(t for t in store.tilings() if t.id == es.tiling_id)
    pixels = image if isinstance(image, np.ndarray) else read_image(Path(image), tiling.tile_size)
    import torch

    with torch.inference_mode():
        out = teacher(torch.from_numpy(np.ascontiguousarray(pixels[None])))
    return out.float().cpu().numpy()[0]


def read_image(path: Path, size: int) -> np.ndarray:
    """An image file as an RGB uint8 (size, size, 3) array (transparency composited on white)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgba = img.convert("RGBA")
    except (OSError, UnidentifiedImageError) as err:
        raise QueryError(f"{path}: cannot read as an image ({str(err).splitlines()[0]}); "
                         "use a PNG, JPEG or TIFF tile") from err
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.array(rgb, dtype=np.uint8)
