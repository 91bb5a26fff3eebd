"""FAISS retrieval: defaults, recall, exactness of filters, incremental builds and stale detection."""

from __future__ import annotations

import json
import math
import os
import time

import faiss
import numpy as np
import pytest

from featurestore.index import (
    KINDS,
    IndexConfigError,
    IndexMissingError,
    QueryError,
    StaleIndexError,
    _faiss,
    build_index,
    contact_sheet,
    default_params,
    embed_image,
    index_status,
    load_index,
    search,
    vacuum,
)
from featurestore.schemas import ReadOnlyError, Slide, StoreVersionError
from featurestore.store import SlideCommit, Store, tiles_table
from tests.conftest import commit_random_slide, make_encoder, make_slide


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres, like tissue-type clusters of tile embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim)).astype(np.float32)
    return _faiss.normalize(x)


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row-wise ids of the k largest inner products (as sets: order within the top k is not needed)."""
    return np.argpartition(-(queries @ vectors.T), k, axis=1)[:, :k]


@pytest.fixture
def store(tmp_path, tiling):
    """Six slides of 16-d float32 embeddings (40..65 tiles), labels 0/1 alternating, pixels cached."""
    store = Store.create(tmp_path / "s")
    enc = make_encoder("uni", 16)
    for i in range(6):
        commit_random_slide(store, i, tiling, [enc], 40 + 5 * i, dtype="float32", pixels=True)
    csv = tmp_path / "labels.csv"
    rows = "".join(f"slide_{i}.svs,{i % 2},{'ab'[i // 3]}\n" for i in range(6))
    csv.write_text("filename,label,site\n" + rows)
    store.import_labels(csv)
    return store


def all_vectors(store: Store, where: str = "TRUE") -> tuple[np.ndarray, np.ndarray]:
    """(tile ids, unit vectors) of tiles matching ``where``, by brute force through SQL."""
    table = store.sql("SELECT e.tile_id, e.embedding FROM emb_uni e JOIN tiles t USING (tile_id) "
                      "JOIN slides s ON s.slide_id = t.slide_id "
                      "LEFT JOIN labels l ON l.slide_id = t.slide_id "
                      f"WHERE {where} ORDER BY e.tile_id")
    vectors = np.array(table.column("embedding").to_pylist(), np.float32)
    return table.column("tile_id").to_numpy(), _faiss.normalize(vectors)


def brute_force(store: Store, query_tile: int, k: int, where: str = "TRUE") -> tuple[np.ndarray, np.ndarray]:
    ids, vectors = all_vectors(store)
    q = vectors[np.searchsorted(ids, query_tile)]
    ids, vectors = all_vectors(store, where)
    scores = vectors @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order], scores[order]


def some_tile(store: Store, offset: int = 7) -> int:
    query = f"SELECT tile_id FROM tiles ORDER BY tile_id LIMIT 1 OFFSET {offset}"
    return store.sql(query).column(0)[0].as_py()


def test_defaults_follow_size_and_are_overridable():
    assert default_params(99_999, 1024).kind == "flat"
    p = default_params(1_000_000, 1024)
    assert (p.kind, p.nlist, p.nprobe) == ("ivf", 4000, 125)
    pq = default_params(1_000_000, 1024, "ivf-pq")
    assert (pq.pq_m, pq.pq_bits, pq.rerank) == (64, 8, 10) and 1024 % pq.pq_m == 0
    assert default_params(200_000, 1280, "ivf-pq").pq_m == 80
    assert default_params(5_000, 64, "ivf").nlist == 5_000 // 39, "at least 39 training points per list"
    assert default_params(1_000_000, 1024, nprobe=7).nprobe == 7
    with pytest.raises(IndexConfigError, match="applies to ivf"):
        default_params(1000, 64, "flat", nlist=10)
    with pytest.raises(IndexConfigError, match="exceeds --nlist"):
        default_params(1_000_000, 64, nlist=10, nprobe=11)
    with pytest.raises(IndexConfigError, match="does not divide"):
        default_params(1_000_000, 64, "ivf-pq", pq_m=6)
    with pytest.raises(IndexConfigError, match="unknown index parameter"):
        default_params(1000, 64, nlists=3)


def test_ivf_recall_at_default_settings_on_clustered_200k():
    """The index layer on numpy data (64-d keeps it fast): recall@10 against exact search."""
    n, dim = 200_000, 64
    data = clustered(n + 200, dim, clusters=1000, seed=0)
    queries, vectors = data[:200], data[200:]
    params = default_params(n, dim)
    assert params.kind == "ivf" and params.nlist == round(4 * math.sqrt(n))
    index = _faiss.new_index(params, dim)
    size = params.nlist * _faiss.TRAIN_POINTS_PER_LIST
    index.train(vectors[np.random.default_rng(0).choice(n, size, replace=False)])
    index.add_with_ids(vectors, np.arange(n, dtype=np.int64) * 3)
    _, got = _faiss.search(index, params, queries, 10)
    truth = exact_top(vectors, queries, 10) * 3
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
    assert recall >= 0.95, recall
    _, self_hit = _faiss.search(index, params, vectors[:50], 1)
    assert np.array_equal(self_hit[:, 0], np.arange(50) * 3)


@pytest.mark.parametrize("kind", KINDS)
def test_self_query_returns_itself_first(store, kind):
    build_index(store, "uni", kind=kind)
    tile = some_tile(store)
    result = search(store, "uni", tile_id=tile, k=5)
    assert result.column("tile_id")[0].as_py() == tile
    assert result.column("score")[0].as_py() == pytest.approx(1.0, abs=1e-5)
    assert result.column_names[:7] == ["rank", "score", "slide_id", "tile_id", "tile_index", "x", "y"]
    assert {"label", "site"} <= set(result.column_names)
    assert result.column("rank").to_pylist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("kind", KINDS)
def test_filtered_search_equals_filtered_brute_force(store, kind):
    build_index(store, "uni", kind=kind)
    tile = some_tile(store)
    where = "l.label = 1 AND t.x >= 448 AND s.mpp_x = 0.5"
    expected_ids, expected_scores = brute_force(store, tile, 10, where)
    result = search(store, "uni", tile_id=tile, k=10, where=where)
    assert result.column("tile_id").to_pylist() == expected_ids.tolist()
    np.testing.assert_allclose(result.column("score").to_numpy(), expected_scores, rtol=1e-5, atol=1e-6)
    assert set(result.column("label").to_pylist()) == {1}


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_selector_path_is_exact_when_the_index_is(store, kind):
    """Large filters go through a FAISS ID selector; a flat (or fully probed IVF) index answers exactly."""
    overrides = {"nlist": 8, "nprobe": 8} if kind == "ivf" else {}
    build_index(store, "uni", kind=kind, **overrides)
    index = load_index(store, "uni")
    tile = some_tile(store)
    where = "l.site = 'b'"
    allowed, _ = all_vectors(store, where)
    scores, ids = index.search(index.vectors(np.array([tile]))[0], 10, allowed, exact_max=0)
    expected_ids, expected_scores = brute_force(store, tile, 10, where)
    assert ids.tolist() == expected_ids.tolist()
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)


def test_group_by_slide_keeps_each_slides_best_tile(store):
    build_index(store, "uni")
    tile = some_tile(store)
    ids, vectors = all_vectors(store)
    tiles = store.sql("SELECT tile_id, slide_id FROM tiles")
    slide_of = dict(zip(tiles.column("tile_id").to_pylist(), tiles.column("slide_id").to_pylist(),
                        strict=True))
    scores = vectors @ vectors[np.searchsorted(ids, tile)]
    best: dict[str, float] = {}
    for i in np.argsort(-scores, kind="stable"):
        best.setdefault(slide_of[int(ids[i])], float(scores[i]))
    result = search(store, "uni", tile_id=tile, k=4, group_by="slide")
    assert result.column("slide_id").to_pylist() == list(best)[:4]
    np.testing.assert_allclose(result.column("score").to_numpy(), list(best.values())[:4], rtol=1e-5)


def test_slide_search_uses_stored_pooled_vectors(store):
    build_index(store, "uni")
    pooled = store.sql("SELECT count(*) AS n FROM slide_embeddings").column("n")[0].as_py()
    assert pooled == len(store.slides()), "pooled vectors committed, one per slide"
    es = store.embedding_set("uni")
    target = make_slide(2).slide_id
    mean = _faiss.normalize(_faiss.normalize(store.read_bag(es, target)).mean(0, keepdims=True))[0]
    slide_ids, vectors, n_tiles = load_index(store, "uni").pooled()
    np.testing.assert_allclose(vectors[slide_ids.index(target)], mean, rtol=1e-5, atol=1e-6)
    result = search(store, "uni", slide_id=target, k=3)
    assert result.column_names[:4] == ["rank", "score", "slide_id", "n_tiles"]
    assert result.column("slide_id")[0].as_py() == target and result.column("n_tiles")[0].as_py() == 50
    assert result.column("score")[0].as_py() == pytest.approx(1.0, abs=1e-5)
    odd = search(store, "uni", slide_id=target, k=10, where="l.label = 1")
    assert set(odd.column("label").to_pylist()) == {1} and odd.num_rows == 3


def test_query_by_sql_and_by_vector(store):
    build_index(store, "uni")
    tile = some_tile(store)
    by_tile = search(store, "uni", tile_id=tile, k=5)
    by_sql = search(store, "uni", query_sql=f"SELECT embedding FROM emb_uni WHERE tile_id = {tile}", k=5)
    assert by_sql.column("tile_id").to_pylist() == by_tile.column("tile_id").to_pylist()
    vector = store.read_by_tile_ids(store.embedding_set("uni"), [tile])[0] * 3.0
    by_vector = search(store, "uni", vector=vector, k=5)
    assert by_vector.column("tile_id").to_pylist() == by_tile.column("tile_id").to_pylist()
    with pytest.raises(QueryError, match="one row"):
        search(store, "uni", query_sql="SELECT embedding FROM emb_uni LIMIT 2")
    with pytest.raises(QueryError, match="exactly one query"):
        search(store, "uni", tile_id=tile, slide_id="x")
    with pytest.raises(QueryError, match="16"):
        search(store, "uni", vector=[1.0, 2.0])


def test_incremental_add_equals_a_rebuild(tmp_path, tiling):
    """Adding slides to an index answers exactly like an index built from scratch over all of them."""
    enc = make_encoder("uni", 16)
    grown, fresh = Store.create(tmp_path / "grown"), Store.create(tmp_path / "fresh")
    for i in range(3):
        commit_random_slide(grown, i, tiling, [enc], 60, dtype="float32")
    for kind, overrides in [("flat", {}), ("ivf", {"nlist": 4, "nprobe": 4})]:
        first = build_index(grown, "uni", kind=kind, rebuild=True, **overrides)
        assert first.action in ("built", "rebuilt")
    for i in range(3, 5):
        commit_random_slide(grown, i, tiling, [enc], 60, dtype="float32")
    for i in range(5):
        commit_random_slide(fresh, i, tiling, [enc], 60, dtype="float32")
    report = build_index(grown, "uni")
    summary = (report.action, report.slides_added, report.vectors_added, report.n_vectors)
    assert summary == ("extended", 2, 120, 300)
    assert report.params.nlist == 4, "an IVF quantizer is trained once and kept"
    build_index(fresh, "uni", kind="ivf", nlist=4, nprobe=4)
    for offset in (0, 100, 250):
        tile = some_tile(fresh, offset)
        a = search(grown, "uni", tile_id=tile, k=10)
        b = search(fresh, "uni", tile_id=tile, k=10)
        assert a.column("tile_id").to_pylist() == b.column("tile_id").to_pylist()
        np.testing.assert_allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), rtol=1e-6)
    assert build_index(grown, "uni").action == "up to date"


def test_stale_index_is_detected_and_never_used(store, tiling):
    build_index(store, "uni")
    tile = some_tile(store)
    commit_random_slide(store, 9, tiling, [make_encoder("uni", 16)], 30, dtype="float32")
    with pytest.raises(StaleIndexError, match="1 slide added.*adds only the new slides"):
        search(store, "uni", tile_id=tile)
    assert build_index(store, "uni").action == "extended"
    commit_random_slide(store, 3, tiling, [make_encoder("uni", 16)], 20, dtype="float32", seed=99)
    manifest, status = index_status(store, "uni")
    assert status.changed == (make_slide(3).slide_id,) and not status.extendable
    with pytest.raises(StaleIndexError, match="1 slide re-written.*rebuilds it"):
        search(store, "uni", tile_id=tile)
    report = build_index(store, "uni")
    assert report.action == "rebuilt" and "re-written" in report.reason
    new_tile = store.sql(f"SELECT tile_id FROM tiles WHERE slide_id = '{make_slide(3).slide_id}' "
                         "AND tile_index = 5").column(0)[0].as_py()
    assert search(store, "uni", tile_id=new_tile, k=1).column("tile_id").to_pylist() == [new_tile]
    assert len(list((store.root / "indexes").rglob("*.faiss"))) == 1, "replaced index files are removed"


def test_manifest_records_bags_and_remembers_the_request(store):
    build_index(store, "uni", kind="hnsw", ef_search=64)
    manifest = json.loads(next((store.root / "indexes").rglob("manifest.json")).read_text())
    bags = store.sql("SELECT slide_id, commit_id FROM bags ORDER BY slide_id").to_pylist()
    assert [b[:2] for b in manifest["bags"]] == [[b["slide_id"], b["commit_id"]] for b in bags]
    assert manifest["params"]["kind"] == "hnsw" and manifest["params"]["ef_search"] == 64
    report = build_index(store, "uni", rebuild=True)
    assert (report.params.kind, report.params.ef_search) == ("hnsw", 64)
    assert build_index(store, "uni", kind="flat").reason == "kind changed from hnsw to flat"
    path = next((store.root / "indexes").rglob("manifest.json"))
    path.write_text(json.dumps(json.loads(path.read_text()) | {"manifest_version": 99}))
    with pytest.raises(StoreVersionError, match="newer than this code reads"):
        search(store, "uni", tile_id=some_tile(store))


def test_missing_index_and_read_only_store(store):
    with pytest.raises(IndexMissingError, match="fs index build --model uni"):
        search(store, "uni", tile_id=some_tile(store))
    with pytest.raises(ReadOnlyError):
        build_index(Store.open(store.root, read_only=True), "uni")


@pytest.mark.parametrize("damage", ["truncated manifest", "garbage manifest", "deleted index file",
                                    "truncated index file"])
def test_damaged_derived_index_is_stale_with_the_fix_and_a_rebuild_recovers(store, damage):
    build_index(store, "uni")
    tile = some_tile(store)
    expected = search(store, "uni", tile_id=tile, k=5)
    manifest = next((store.root / "indexes").rglob("manifest.json"))
    index_file = next((store.root / "indexes").rglob("*.faiss"))
    if damage == "truncated manifest":
        manifest.write_text(manifest.read_text()[:50])
    elif damage == "garbage manifest":
        manifest.write_text('{"manifest_version": 1, "bags": 3}')
    elif damage == "deleted index file":
        index_file.unlink()
    else:
        index_file.write_bytes(index_file.read_bytes()[:100])
    with pytest.raises(StaleIndexError, match="--rebuild"):
        search(store, "uni", tile_id=tile, k=5)
    if damage == "deleted index file":
        assert index_status(store, "uni")[1].file_missing
    assert build_index(store, "uni", rebuild=True).action in ("built", "rebuilt")
    assert search(store, "uni", tile_id=tile, k=5) == expected


def test_contact_sheet_from_cached_pixels(store, tmp_path):
    from PIL import Image

    build_index(store, "uni")
    tile = some_tile(store)
    results = search(store, "uni", tile_id=tile, k=7)
    path = contact_sheet(store, "uni", results, tmp_path / "hits.png", query_tile=tile)
    with Image.open(path) as img:
        assert img.size == (6 + 6 * (192 + 6), 6 + 2 * (192 + 30 + 6))
        assert img.getpixel((6 + 96, 6 + 96)) != (200, 200, 200), "pixels were drawn, not a placeholder"
    with pytest.raises(QueryError, match="slide-level"):
        contact_sheet(store, "uni", search(store, "uni", slide_id=make_slide(0).slide_id), tmp_path / "x.png")


def test_contact_sheet_reads_the_slide_when_no_pixels_are_cached(tmp_path, tiling, real_slide):
    store = Store.create(tmp_path / "s")
    slide = Slide(slide_id="f" * 32, path=str(real_slide), bytes=real_slide.stat().st_size, vendor="aperio",
                  width=2220, height=2967, mpp_x=0.499, mpp_y=0.499, objective_power=20.0, level_count=1)
    xs, ys = np.meshgrid(np.arange(4) * 448, np.arange(4) * 448)
    tiles = tiles_table(slide.slide_id, tiling.id, xs.ravel(), ys.ravel(), 0, 448, np.ones(16))
    enc = make_encoder("uni", 16)
    emb = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    store.commit_slide(SlideCommit(slide, tiling, tiles, {enc: emb}, dtype="float32"))
    build_index(store, "uni")
    tile = some_tile(store, 0)
    results = search(store, "uni", tile_id=tile, k=3)
    path = contact_sheet(store, "uni", results, tmp_path / "s.png", query_tile=tile)
    from PIL import Image

    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))[6:198, 6:198]
    assert rgb.std() > 5, "tissue from the real slide, not a flat placeholder"


def test_image_query_runs_the_sets_teacher(tmp_path, tiling):
    import torch
    from PIL import Image

    from featurestore.encoders import build_teacher

    teacher = build_teacher("test/tiny-cnn", device="cpu")
    store = Store.create(tmp_path / "s")
    size = tiling.tile_size
    pixels = np.random.default_rng(0).integers(0, 255, (6, size, size, 3), dtype=np.uint8)
    with torch.inference_mode():
        emb = teacher(torch.from_numpy(pixels)).float().numpy()
    slide = make_slide(0)
    tiles = tiles_table(slide.slide_id, tiling.id, np.arange(6) * 448, np.zeros(6), 0, 448, np.ones(6))
    store.commit_slide(SlideCommit(slide, tiling, tiles, {teacher.spec: emb}, dtype="float32"))
    build_index(store, teacher.spec.name)
    Image.fromarray(pixels[4]).save(tmp_path / "q.png")
    vector = embed_image(store, teacher.spec.name, tmp_path / "q.png", teacher)
    hit = search(store, teacher.spec.name, vector=vector, k=1)
    assert hit.column("tile_index").to_pylist() == [4]
    with pytest.raises(QueryError, match=f"made by {teacher.spec.id}"):
        embed_image(store, teacher.spec.name, tmp_path / "q.png", build_teacher("test/tiny-vit", device="cpu"))


def test_faiss_ids_are_tile_ids(store):
    build_index(store, "uni", kind="ivf", nlist=4)
    index = load_index(store, "uni")
    ivf = faiss.extract_index_ivf(index.index)
    stored = np.concatenate([faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)).copy()
                             for i in range(ivf.nlist)])
    assert sorted(stored.tolist()) == sorted(store.sql("SELECT tile_id FROM tiles").column(0).to_pylist())


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_vacuum_removes_old_index_files_no_manifest_names(store, tiling):
    build_index(store, "uni")
    directory = next((store.root / "indexes").iterdir())
    live = directory / json.loads((directory / "manifest.json").read_text())["index_file"]
    old, young = directory / "00000000000000000001-dead.faiss", directory / "00000000000000000002-dead.faiss"
    old.write_bytes(b"x" * 1000)
    young.write_bytes(b"y" * 10)
    for path in (old, live):
        _age(path, 7200)
    unreadable = store.root / "indexes" / "other-set"
    unreadable.mkdir()
    (unreadable / "manifest.json").write_text("{")
    stray = unreadable / "stray.faiss"
    stray.write_bytes(b"z")
    _age(stray, 7200)

    report = vacuum(store, 3600)
    assert (report.files, report.bytes_freed) == (1, 1000)
    assert not old.exists() and young.exists() and live.exists() and stray.exists(), \
        "young files, the named file and directories without a readable manifest are kept"
    assert vacuum(store, 0).files == 1 and not young.exists()
    tile = some_tile(store)
    assert search(store, "uni", tile_id=tile, k=1).column("tile_id").to_pylist() == [tile]
    with pytest.raises(ReadOnlyError):
        vacuum(Store.open(store.root, read_only=True), 0)
