"""The viewer's web app: three pages (cohort, slide, search), their JSON endpoints, deep zoom tiles and
overlays. Every endpoint reads; none writes.

Requests name slides and tiles by id only; each id is looked up in the store with a bound parameter
before anything is opened, and files are opened by the paths the store recorded. A user's SQL predicate
goes through the store's read-only gate (``Snapshot.sql``). Errors are one-line JSON (or text for pages)
with an HTTP status, and the server keeps serving.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from featurestore.index import IndexMissingError, QueryError, StaleIndexError, index_status, search
from featurestore.schemas import FsError, InvalidArgumentError, ModelError, NotFoundError, SlideError
from featurestore.store import Store
from featurestore.viewer import _overlays
from featurestore.viewer._data import PredicateError, ViewerData, jsonable, parse_tile_id
from featurestore.viewer._deepzoom import DeepZoomCache, SlideFileGone, jpeg

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD = 20 * 2**20
MAX_UPLOAD_PIXELS = 4096 * 4096
"""A query is one tile; decoding is refused above this, so a small compressed file cannot fill the memory."""
MAX_K = 200
THUMB = 160
OVERLAYS_KEPT = 64


class AttentionRun(Protocol):
    """A trained run whose per-tile attention the slide page can overlay (``fs view --runs``)."""

    name: str
    tiling_id: str

    def attention(self, slide_id: str) -> np.ndarray:
        """Attention of the slide's tiles in ``tiling_id``, in tile_index order; ``NotFoundError`` when the
        run's embedding set has no bag for the slide."""


@dataclass(frozen=True)
class ViewerConfig:
    """What ``fs view`` serves: the store, the runs whose attention it can overlay, and how it embeds uploads."""

    store: Path
    runs: Sequence[AttentionRun] = ()
    device: str = "cpu"
    """Where uploads are embedded: ``cpu`` or ``cuda[:N]`` (the CLI resolves ``auto``)."""
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
    build_teacher: Callable[[str, str], Any] | None = field(default=None, compare=False)
    """(encoder name, device) → a built teacher for uploads; default ``featurestore.encoders.build_teacher``."""


def _status(err: Exception) -> int:
    if isinstance(err, SlideFileGone):
        return 410
    if isinstance(err, NotFoundError):
        return 404
    if isinstance(err, IndexMissingError | StaleIndexError):
        return 409
    if isinstance(err, SlideError | ModelError):
        return 422
    return 400


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


class _Lru:
    """A few encoded tissue masks (each takes a slide read), least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        return value


class Viewer:
    """Request handlers over one store."""

    def __init__(self, config: ViewerConfig) -> None:
        self.config = config
        self.data = ViewerData(Store.open(config.store, read_only=True))
        self.runs = {r.name: r for r in config.runs}
        self.deepzoom = DeepZoomCache()
        self.overlays = _Lru(OVERLAYS_KEPT)
        self._teachers: dict[str, Any] = {}
        self._teacher_lock = threading.Lock()

    # --- pages -----------------------------------------------------------------------------------

    def page(self, name: str) -> Callable[[Request], Response]:
        def handler(request: Request) -> Response:
            if "slide_id" in request.path_params:
                self.data.slide(self.data.snapshot(), request.path_params["slide_id"])
            return FileResponse(STATIC / f"{name}.html", media_type="text/html")

        return handler

    # --- JSON ------------------------------------------------------------------------------------

    def cohort(self, request: Request) -> Response:
        return JSONResponse(self.data.cohort(request.query_params.get("where")))

    def sets(self, request: Request) -> Response:
        snap = self.data.snapshot()
        out = []
        for view, es in snap.view_names().items():
            manifest, status = index_status(snap, view)
            state = "missing" if manifest is None else "fresh" if status.fresh else f"stale: {status.describe()}"
            out.append({"model": view, "encoder": es.encoder_name, "set_id": es.id, "tiling_id": es.tiling_id,
                        "dim": es.embed_dim, "index": state})
        return JSONResponse({"sets": out, "runs": [{"name": r.name, "tiling_id": r.tiling_id}
                                                   for r in self.runs.values()]})

    def slide(self, request: Request) -> Response:
        info = self.data.slide_info(request.path_params["slide_id"])
        tilings = {t["tiling_id"] for t in info["tilings"]}
        info["runs"] = [r.name for r in self.runs.values() if r.tiling_id in tilings]
        return JSONResponse(info)

    def tiles(self, request: Request) -> Response:
        slide, tiling_id, edge, table = self.data.tiles(request.path_params["slide_id"],
                                                        request.query_params.get("tiling"))
        return JSONResponse({"slide_id": slide.slide_id, "tiling_id": tiling_id, "footprint": edge,
                             "tiles": jsonable(table)})

    def search(self, request: Request) -> Response:
        q = request.query_params
        model = _required(q, "model")
        tile, slide = q.get("tile"), q.get("slide")
        if (tile is None) == (slide is None):
            raise QueryError("give exactly one of tile= (a tile id) or slide= (a slide id), or upload an image")
        where = q.get("where") or None
        snap = self.data.snapshot()
        if slide is not None:
            self.data.slide(snap, slide)
            table = _search(snap, model, where, slide_id=slide, k=_k(q))
        else:
            tile_id = parse_tile_id(tile)
            self.data.tile(tile_id)
            table = _search(snap, model, where, tile_id=tile_id, k=_k(q),
                            group_by="slide" if q.get("group_by") == "slide" else None)
        return JSONResponse(self._hits(snap, table))

    async def search_image(self, request: Request) -> Response:
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise InvalidArgumentError("upload the query tile as the form field 'image' (a PNG, JPEG or TIFF)")
            content = await upload.read(MAX_UPLOAD + 1)
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if len(content) > MAX_UPLOAD:
            raise InvalidArgumentError(f"the uploaded file is over {MAX_UPLOAD // 2**20} MiB; upload one tile")
        from starlette.concurrency import run_in_threadpool

        return JSONResponse(await run_in_threadpool(self._search_image, content, upload.filename or "upload",
                                                    fields))

    def _search_image(self, content: bytes, filename: str, fields: dict[str, str]) -> dict[str, Any]:
        from featurestore.index import embed_image

        model = _required(fields, "model")
        snap = self.data.snapshot()
        es = snap.embedding_set(model)
        tiling = next(t for t in snap.tilings() if t.id == es.tiling_id)
        pixels = _decode(content, filename, tiling.tile_size)
        vector = embed_image(snap, model, pixels, self._teacher(es.encoder_name))
        table = _search(snap, model, fields.get("where") or None, vector=vector, k=_k(fields))
        return self._hits(snap, table)

    def _teacher(self, encoder_name: str) -> Any:
        with self._teacher_lock:
            if encoder_name not in self._teachers:
                build = self.config.build_teacher or _build_teacher
                self._teachers[encoder_name] = build(encoder_name, self.config.device)
            return self._teachers[encoder_name]

    def _hits(self, snap: Any, table: Any) -> dict[str, Any]:
        """Search rows with each slide's file name and, per tile, where its thumbnail comes from."""
        rows = jsonable(table)
        ids = sorted({r["slide_id"] for r in rows})
        found = snap.sql("SELECT s.slide_id, s.path, bool_or(st.pixels) AS pixels FROM slides s LEFT JOIN "
                         "slide_tilings st USING (slide_id) WHERE list_contains(?, s.slide_id) GROUP BY ALL",
                         [ids]).to_pylist()
        slides = {r["slide_id"]: r for r in found}
        for r in rows:
            s = slides[r["slide_id"]]
            r["name"] = Path(s["path"]).name
            if "tile_id" in r:
                gone = not s["pixels"] and not Path(s["path"]).exists()
                r["pixels"] = f"slide file {r['name']} is gone and no pixels are cached" if gone else "ok"
        level = "slides" if rows and "tile_id" not in rows[0] else "tiles"
        return {"level": level, "hits": rows}

    # --- images ----------------------------------------------------------------------------------

    def dzi(self, request: Request) -> Response:
        slide = self.data.slide(self.data.snapshot(), request.path_params["slide_id"])
        dz = self.deepzoom.get(slide.slide_id, Path(slide.path))
        return Response(dz.dzi(), media_type="application/xml")

    def dz_tile(self, request: Request) -> Response:
        p = request.path_params
        slide = self.data.slide(self.data.snapshot(), p["slide_id"])
        dz = self.deepzoom.get(slide.slide_id, Path(slide.path))
        return Response(jpeg(dz.tile(p["level"], p["col"], p["row"])), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    def tile_image(self, request: Request) -> Response:
        tile = self.data.tile(parse_tile_id(request.path_params["tile_id"]))
        pixels = self.data.tile_pixels(tile)
        if isinstance(pixels, str):
            raise SlideFileGone(f"tile {tile.tile_id}: {pixels}; no pixels are cached for its slide")
        image = Image.fromarray(pixels).resize((THUMB, THUMB), Image.Resampling.BILINEAR)
        return Response(jpeg(image, 85), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    def overlay(self, request: Request) -> Response:
        layer = request.path_params["layer"]
        slide, tiling_id, edge, table = self.data.tiles(request.path_params["slide_id"],
                                                        request.query_params.get("tiling"))
        snap = self.data.snapshot()
        if layer == "tissue":
            spec = next(t for t in snap.tilings() if t.id == tiling_id)
            if not slide.file_present:
                raise SlideFileGone(f"{slide.path}: the slide file is gone, and the tissue mask is recomputed "
                                    "from it; restore the file at this path")
            key: tuple = (snap.version, slide.slide_id, tiling_id, layer)
            encoded = self.overlays.get(
                key, lambda: _overlays.png(_overlays.tissue_layer(Path(slide.path), spec, slide.mpp_x)))
            return Response(encoded, media_type="image/png")
        x, y = table.column("x").to_numpy(), table.column("y").to_numpy()
        if layer == "grid":
            values = None
        elif layer == "attention":
            run = self._run(request.query_params.get("run"), tiling_id)
            values = _overlays.scaled("attention", run.attention(slide.slide_id))
            if len(values) != table.num_rows:
                raise NotFoundError(f"run {run.name} has {len(values)} attention weights for slide {slide.name}, "
                                    f"which has {table.num_rows} tiles now; re-run fs train on this store")
        elif layer == "annotation":
            overlap = self.data.annotation_overlap(slide.slide_id, tiling_id, request.query_params.get("class", ""))
            values = np.array([overlap.get(i, np.nan) for i in table.column("tile_index").to_pylist()], np.float64)
        elif layer in table.column_names and layer != "tile_id":
            values = _overlays.scaled(layer, table.column(layer).to_numpy(zero_copy_only=False).astype(np.float64))
        else:
            choices = ["tissue", "grid", "attention", "annotation", *(c for c in table.column_names if c not in
                                                         ("tile_id", "tile_index", "x", "y"))]
            raise NotFoundError(f"overlay {layer[:40]!r} is not available for this slide; choose one of "
                                f"{', '.join(choices)}")
        image = _overlays.tile_layer(slide.width, slide.height, x, y, edge, values)
        return Response(_overlays.png(image), media_type="image/png")

    def _run(self, name: str | None, tiling_id: str) -> AttentionRun:
        if not self.runs:
            raise NotFoundError("no training runs are loaded; start fs view with --runs RUN_DIR")
        run = self.runs.get(name or next(iter(self.runs)))
        if run is None:
            raise NotFoundError(f"run {name[:60]!r} is not loaded; choose one of {', '.join(self.runs)}")
        if run.tiling_id != tiling_id:
            raise NotFoundError(f"run {run.name} was trained on tiling {run.tiling_id}, not {tiling_id}")
        return run


def _required(params: Any, name: str) -> str:
    value = params.get(name)
    if not value:
        raise InvalidArgumentError(f"missing {name}=; e.g. {name}=uni (see /api/sets)")
    return value


def _k(params: Any) -> int:
    text = params.get("k") or "12"
    if not text.isdigit() or not 1 <= int(text) <= MAX_K:
        raise InvalidArgumentError(f"k={text[:20]!r} must be a whole number from 1 to {MAX_K}")
    return int(text)


def _search(snap: Any, model: str, where: str | None, **query: Any) -> Any:
    try:
        return search(snap, model, where=where, **query)
    except QueryError as err:
        if where and str(err).startswith("where "):
            raise PredicateError(str(err)) from err
        raise


def _decode(content: bytes, filename: str, size: int) -> np.ndarray:
    """An uploaded image as RGB uint8 (size, size, 3), transparency on white, as ``fs search --image`` reads it."""
    try:
        with Image.open(io.BytesIO(content)) as img:
            if img.width * img.height > MAX_UPLOAD_PIXELS:
                raise InvalidArgumentError(f"{filename[:80]}: {img.width} x {img.height} px is a region, not a tile; "
                                           f"upload one tile (at most {MAX_UPLOAD_PIXELS:,} pixels)")
            rgba = img.convert("RGBA")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise InvalidArgumentError(f"{filename[:80]}: not an image ({str(err).splitlines()[0][:80]}); "
                                   "upload a PNG, JPEG or TIFF tile") from err
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return np.array(rgb.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def _build_teacher(name: str, device: str) -> Any:
    from featurestore.encoders import build_teacher

    return build_teacher(name, device=device)


def create_app(config: ViewerConfig) -> Starlette:
    """The viewer as an ASGI app (``uvicorn.run(create_app(config))``)."""
    v = Viewer(config)

    def error(request: Request, err: Exception) -> Response:
        status = err.status_code if isinstance(err, HTTPException) else _status(err) if isinstance(
            err, FsError) else 500
        detail = err.detail if isinstance(err, HTTPException) else str(err) if isinstance(err, FsError) else (
            f"internal error: {type(err).__name__}: {err}")
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": _one_line(detail)}, status_code=status)
        return PlainTextResponse(_one_line(detail) + "\n", status_code=status)

    slide_id = "{slide_id:str}"
    routes = [
        Route("/", v.page("cohort")),
        Route(f"/slide/{slide_id}", v.page("slide")),
        Route("/search", v.page("search")),
        Route("/api/cohort", v.cohort),
        Route("/api/sets", v.sets),
        Route(f"/api/slides/{slide_id}", v.slide),
        Route(f"/api/slides/{slide_id}/tiles", v.tiles),
        Route("/api/search", v.search),
        Route("/api/search/image", v.search_image, methods=["POST"]),
        Route(f"/dz/{slide_id}.dzi", v.dzi),
        Route(f"/dz/{slide_id}_files/{{level:int}}/{{col:int}}_{{row:int}}.jpeg", v.dz_tile),
        Route(f"/overlay/{slide_id}/{{layer:str}}.png", v.overlay),
        Route("/tiles/{tile_id:str}.jpeg", v.tile_image),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    # A page on another site could make a browser send requests here under a name that resolves to
    # 127.0.0.1 (DNS rebinding); only the names the server was started for are answered.
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(config.allowed_hosts))]
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        v.deepzoom.close()

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan, max_body_size=MAX_UPLOAD + 2**20,
                    exception_handlers={HTTPException: error, FsError: error, Exception: error})
    app.state.viewer = v
    return app
