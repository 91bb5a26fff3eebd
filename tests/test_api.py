"""The notebook API (featurestore.open, Store.sql/tiles, bags, collate_bags, search, vectors) and its errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
import typer
from torch.utils.data import DataLoader

import featurestore as fs
from featurestore.cli._common import friendly
from featurestore.index import build_index
from featurestore.schemas import TilingSpec
from featurestore.store import SlideCommit, Store, tiles_table
from tests.conftest import make_encoder, make_slide

TILING = TilingSpec(target_mpp=0.5, tile_size=224)
DIM = 8
SIZES = (7, 12, 9)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Three slides whose tiles sit on a shuffled grid (tile_index order is neither coordinate nor tile_id order),
    float32 embeddings, and labels for slides 0 and 1 only."""
    root = tmp_path_factory.mktemp("api") / "store"
    store = Store.create(root)
    enc = make_encoder("uni", DIM)
    rng = np.random.default_rng(0)
    written = {}
    for i, n in enumerate(SIZES):
        slide = make_slide(i)
        cells = rng.permutation(20)[:n]
        tiles = tiles_table(slide.slide_id, TILING.id, cells % 5 * 448 + 1000, cells // 5 * 448 + 500, 0, 448,
                            rng.uniform(0.3, 1, n))
        emb = rng.standard_normal((n, DIM)).astype(np.float32)
        store.commit_slide(SlideCommit(slide, TILING, tiles, {enc: emb}, dtype="float32"))
        written[slide.slide_id] = emb
    csv = root.parent / "labels.csv"
    csv.write_text("slide_id,label,grade,site\n"
                   f"{make_slide(0).slide_id},1,2.5,a\n{make_slide(1).slide_id},0,1.0,b\n")
    store.import_labels(csv)
    return root, written


def tiles_by_id(store: Store) -> dict[int, dict]:
    return {r["tile_id"]: r for r in store.sql("SELECT tile_id, slide_id, tile_index, x, y FROM tiles").to_pylist()}


def test_bag_rows_are_aligned_features_coords_and_tile_ids(built):
    root, written = built
    store = fs.open(root)
    table = tiles_by_id(store)
    ds = fs.bags(store, "uni")
    assert ds.slide_ids == sorted(written) and len(ds) == 3
    for i, sid in enumerate(ds.slide_ids):
        bag = ds[i]
        assert isinstance(bag, fs.SlideBag) and bag.slide_id == sid and bag.target is None and bag.index == i
        assert bag.features.dtype == torch.float32 and bag.features.shape == (SIZES[int(sid, 16)], DIM)
        for row, tile in enumerate(bag.tile_ids.tolist()):
            stored = table[tile]
            assert stored["slide_id"] == sid and stored["tile_index"] == row, "rows follow tile_index"
            assert bag.coords[row].tolist() == [stored["x"], stored["y"]]
            np.testing.assert_array_equal(bag.features[row].numpy(), written[sid][stored["tile_index"]])
        assert bag.tile_ids.tolist() != sorted(bag.tile_ids.tolist()), "tile_id order differs from row order"


def test_a_tile_cap_keeps_rows_aligned(built):
    root, written = built
    store = fs.open(root)
    table = tiles_by_id(store)
    bag = fs.bags(store, "uni", max_tiles=5, seed=1)[1]
    sid = bag.slide_id
    index = [table[t]["tile_index"] for t in bag.tile_ids.tolist()]
    assert len(index) == 5 and index == sorted(index), "a subset keeps tile order"
    np.testing.assert_array_equal(bag.features.numpy(), written[sid][index])
    assert bag.coords.tolist() == [[table[t]["x"], table[t]["y"]] for t in bag.tile_ids.tolist()]


def test_targets_come_from_the_label_column_in_the_order_of_slides(built):
    root, _ = built
    store = fs.open(root)
    s0, s1, s2 = (make_slide(i).slide_id for i in range(3))
    ds = fs.bags(store, "uni", label="label", slides=[s1, s0])
    assert ds.slide_ids == [s1, s0]
    assert [ds[0].target.item(), ds[1].target.item()] == [0.0, 1.0]
    assert fs.bags(store, "uni", label="grade", slides=[s0])[0].target.item() == 2.5
    with pytest.raises(fs.InvalidArgumentError, match=f"no value for 1 of the 3 slides: {s2}"):
        fs.bags(store, "uni", label="label")
    with pytest.raises(fs.InvalidArgumentError, match="no label column 'grde'.*label, grade, site"):
        fs.bags(store, "uni", label="grde", slides=[s0])
    with pytest.raises(fs.InvalidArgumentError, match="'site' holds string"):
        fs.bags(store, "uni", label="site", slides=[s0])


def test_collate_pads_and_a_data_loader_batches(built):
    root, written = built
    store = fs.open(root)
    s0, s1 = make_slide(0).slide_id, make_slide(1).slide_id
    ds = fs.bags(store, "uni", label="label", slides=[s0, s1])
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=fs.collate_bags)))
    assert isinstance(batch, fs.BagBatch) and batch.slide_ids == (s0, s1)
    assert batch.x.shape == (2, 12, DIM) and batch.mask.sum(1).tolist() == [7, 12]
    assert batch.y.tolist() == [1.0, 0.0] and batch.index.tolist() == [0, 1] and batch.coords is None
    assert (batch.tile_ids[0, 7:] == -1).all() and torch.equal(batch.tile_ids[0, :7], ds[0].tile_ids)
    np.testing.assert_array_equal(batch.x[1].numpy(), written[s1])
    assert fs.collate_bags([fs.bags(store, "uni")[0]]).y is None, "no label, no targets"
    with_grid = fs.collate_bags([fs.bags(store, "uni", grid=True)[0]])
    assert with_grid.coords is not None and with_grid.coords.min() == 0


def test_the_positional_bag_dataset_call_still_works(built):
    root, _ = built
    reader = fs.BagReader(Store.open(root, read_only=True), fs.open(root).embedding_set("uni"))
    ds = fs.BagDataset(reader, reader.slide_ids, np.ones((3, 2)), max_tiles=4, coords=True)
    batch = fs.collate_bags([ds[0], ds[2]])
    assert batch.y.shape == (2, 2) and batch.x.shape == (2, 4, DIM) and batch.coords.shape == (2, 4, 2)
    with pytest.raises(fs.InvalidArgumentError, match="targets has 2 rows for 3 slides"):
        fs.BagDataset(reader, reader.slide_ids, np.ones((2, 2)))
    with pytest.raises(fs.InvalidArgumentError, match="max_tiles must be a whole number >= 1"):
        fs.BagDataset(reader, reader.slide_ids, max_tiles=0)
    with pytest.raises(fs.BagNotFoundError, match="1 of the 2 slides have no bag in uni: nope"):
        fs.BagDataset(reader, ["nope", reader.slide_ids[0]])


def test_tiles_carry_their_embeddings_in_tile_index_order(built):
    root, written = built
    store = fs.open(root)
    s2, s0 = make_slide(2).slide_id, make_slide(0).slide_id
    tiles = store.tiles("uni", slides=[s2, s0], columns=["slide_id", "tile_index", "tile_id", "x", "y",
                                                         "tissue_fraction"])
    assert tiles.column_names == ["slide_id", "tile_index", "tile_id", "x", "y", "tissue_fraction", "embedding"]
    assert tiles.column("slide_id").to_pylist() == [s2] * SIZES[2] + [s0] * SIZES[0], "slides in the order given"
    assert tiles.column("tile_index").to_pylist() == [*range(SIZES[2]), *range(SIZES[0])]
    vectors = fs.vectors(tiles)
    assert vectors.shape == (SIZES[2] + SIZES[0], DIM) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, np.concatenate([written[s2], written[s0]]))
    es = store.embedding_set("uni")
    ids = tiles.column("tile_id").to_pylist()[::-1]
    np.testing.assert_array_equal(store.read_by_tile_ids(es, ids), vectors[::-1], "read_by_tile_ids keeps the order")
    table = tiles_by_id(store)
    assert all(table[r["tile_id"]]["x"] == r["x"] for r in tiles.to_pylist())
    assert store.tiles("uni").num_rows == sum(SIZES)
    with pytest.raises(fs.InvalidArgumentError, match="no tile column 'colour'; choose from slide_id"):
        store.tiles("uni", columns=["colour"])


def test_vectors_of_an_sql_result_match_the_bags(built):
    root, written = built
    store = fs.open(root)
    sid = make_slide(1).slide_id
    result = store.sql("SELECT tile_index, embedding FROM emb_uni WHERE slide_id = ? ORDER BY tile_index", [sid])
    np.testing.assert_array_equal(fs.vectors(result), written[sid])
    with pytest.raises(fs.InvalidArgumentError, match="holds int64, not vectors"):
        fs.vectors(result, "tile_index")


def test_unknown_model_and_slides_say_what_exists(built):
    root, _ = built
    store = fs.open(root)
    unknown = "'virchow2' matches no embedding set; choose one of: emb_uni"
    with pytest.raises(fs.UnknownEmbeddingSetError, match=unknown):
        fs.bags(store, "virchow2")
    with pytest.raises(fs.UnknownEmbeddingSetError, match="emb_uni"):
        store.tiles("virchow2")
    s0 = make_slide(0).slide_id
    with pytest.raises(fs.BagNotFoundError, match="2 of the 3 slides given have no bag in uni.*: nope, gone;") as err:
        fs.bags(store, "uni", slides=["nope", s0, "gone"])
    assert isinstance(err.value, KeyError) and isinstance(err.value, fs.FsError)
    with pytest.raises(fs.BagNotFoundError, match="nope"):
        store.tiles("uni", slides=[s0, "nope"])
    with pytest.raises(fs.InvalidArgumentError, match=r"slides must be a list of slide ids, got the string"):
        fs.bags(store, "uni", slides=s0)
    with pytest.raises(fs.TilesNotFoundError):
        store.read_tiles(TILING.id, "nope")
    with pytest.raises(fs.PixelsNotCachedError, match="--cache-pixels"):
        store.read_pixels(TILING.id, s0)
    with pytest.raises(fs.TileIdsNotFoundError, match="1 of 1: 42"):
        store.read_by_tile_ids(store.embedding_set("uni"), [42])


def test_repr_says_what_is_inside(built):
    root, _ = built
    store = fs.open(root)
    text = repr(store)
    assert text.startswith(f"Store({str(root)!r}, read_only=True) at version {store.version}: ")
    assert f"3 slides, {sum(SIZES)} tiles, 2 labelled, 1 embedding set\n" in text
    assert f"emb_uni: uni ({DIM}-d float32), 3 slides, {sum(SIZES)} tiles" in text
    assert repr(store.snapshot()).startswith(f"Snapshot({str(root)!r}) at version {store.version}: 3 slides")
    info = store.info()
    assert [(t.tiling_id, t.description, t.slides, t.tiles) for t in info.tilings] == \
        [(TILING.id, "224 px @ 0.5 µm/px", 3, sum(SIZES))]


def test_open_is_read_only_unless_asked(built, tmp_path):
    root, _ = built
    csv = tmp_path / "more.csv"
    csv.write_text(f"slide_id,extra\n{make_slide(2).slide_id},3\n")
    with fs.open(root) as store:
        assert store.read_only
        with pytest.raises(fs.ReadOnlyError, match="read_only=False"):
            store.import_labels(csv)
    assert "extra" not in fs.open(root).sql("SELECT * FROM labels").column_names
    with pytest.raises(fs.NotAStoreError, match="not a feature store"):
        fs.open(tmp_path)
    with pytest.raises(fs.InvalidArgumentError, match="read_only must be True or False"):
        fs.open(root, read_only="no")


def test_a_dataframe_on_request_or_one_clear_line(built, monkeypatch):
    root, _ = built
    store = fs.open(root)
    monkeypatch.setitem(sys.modules, "pandas", None)  # what an environment without pandas looks like
    with pytest.raises(fs.MissingDependencyError, match="`pip install pandas`") as err:
        store.sql("SELECT 1 AS x", pandas=True)
    assert isinstance(err.value, ImportError) and "\n" not in str(err.value)
    assert store.sql("SELECT 1 AS x").column("x").to_pylist() == [1], "Arrow needs no pandas"


def test_a_dataframe_when_pandas_is_installed(built):
    pytest.importorskip("pandas")
    store = fs.open(built[0])
    df = store.sql("SELECT slide_id, label FROM labels ORDER BY slide_id", pandas=True)
    assert list(df.columns) == ["slide_id", "label"] and df["label"].tolist() == [1, 0]


def test_sql_errors_are_one_line_sql_errors(built):
    store = fs.open(built[0])
    for query, words in [("SELEC 1", "syntax error"), ("SELECT * FROM nope", "nope does not exist"),
                         ("SELECT nope FROM slides", '"nope" not found')]:
        with pytest.raises(fs.SqlError, match=words) as err:
            store.sql(query)
        assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    with pytest.raises(fs.InvalidArgumentError, match="params must be a list"):
        store.sql("SELECT ?", "x")


def test_search_runs_over_a_built_index(built):
    root, _ = built
    build_index(Store.open(root), "uni")
    store = fs.open(root)
    tile = store.sql("SELECT tile_id FROM tiles ORDER BY tile_id LIMIT 1").column(0)[0].as_py()
    hits = fs.search(store, "uni", tile_id=tile, k=3)
    assert hits.num_rows == 3 and hits.column("tile_id")[0].as_py() == tile and "label" in hits.column_names


def test_friendly_turns_only_our_errors_into_one_line():
    @friendly
    def ours() -> None:
        raise fs.SqlError("Parser Error: nope")

    @friendly
    def a_bug() -> None:
        raise KeyError("not ours")

    with pytest.raises(typer.Exit) as stop:
        ours()
    assert stop.value.exit_code == 2
    with pytest.raises(KeyError, match="not ours"):
        a_bug()


def test_every_public_name_resolves_and_importing_a_reader_stays_light():
    for name in fs.__all__:
        assert getattr(fs, name) is not None
    assert isinstance(fs.vectors(pa.array([[1.0, 2.0]], pa.list_(pa.float32(), 2))), np.ndarray)
    code = ("import sys, featurestore, featurestore.slides\n"
            "print(sorted(m for m in ('duckdb', 'zarr', 'torch', 'faiss', 'featurestore.store') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
