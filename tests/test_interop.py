"""HDF5 interop: TRIDENT, CLAM and STAMP feature files in, the same files out, bit for bit.

The input files are written here the way each tool writes them (dataset names, dtypes and
attributes as in their code), since real ones cannot be downloaded in tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featurestore.cli.search import Layout
from featurestore.index import build_index, search
from featurestore.pipelines.interop import LAYOUTS, ImportOptions, InteropError, export_features, import_features
from featurestore.schemas import TilingSpec
from featurestore.store import SlideCommit, Store, tiles_table
from tests.conftest import commit_random_slide, make_encoder

h5py = pytest.importorskip("h5py")


def grid(n: int, step: int) -> np.ndarray:
    xs, ys = np.divmod(np.arange(n), 7)
    return np.stack([xs * step, ys * step], axis=1).astype(np.int64)


def write_trident(path: Path, features: np.ndarray, coords: np.ndarray) -> None:
    """As TRIDENT < 0.2.2's ``extract_patch_features``: int coords attrs from its patching, features attrs name/dir."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        f["features"].attrs.update({"name": path.stem, "savetodir": str(path.parent)})
        f.create_dataset("coords", data=coords)
        f["coords"].attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                                  "target_magnification": 20, "overlap": 0, "name": path.stem,
                                  "savetodir": "/jobs/20x_256px_0px_overlap"})


def write_clam(path: Path, features: np.ndarray, coords: np.ndarray, attrs: bool) -> None:
    """As CLAM's ``extract_features_fp`` (no attrs), or with its patch file's coords attrs."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("coords", data=coords)
        if attrs:
            f["coords"].attrs.update({"patch_level": 0, "patch_size": 256, "downsample": np.array([1.0, 1.0]),
                                      "level_dim": np.array([40000, 30000]), "name": path.stem})


def write_stamp(path: Path, features: np.ndarray, coords_um: np.ndarray) -> None:
    """As STAMP 2's ``extract_``: float16 ``feats``, float32 µm ``coords``, attrs on the file."""
    with h5py.File(path, "w") as f:
        f["coords"] = coords_um
        f["feats"] = features
        f.attrs.update({"stamp_version": "2.2.0", "extractor": "uni2", "unit": "um", "tile_size_um": 256.0,
                        "tile_size_px": 224, "code_hash": "1a2b3c4d", "feat_type": "tile"})


def trident_magnification(mpp: float) -> int:
    """TRIDENT 0.3.1 ``trident/wsi_objects/WSI.py::WSI._fetch_magnification``: µm/px binned to an objective."""
    for below, mag in ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5)):
        if mpp < below:
            return mag
    raise ValueError(f"Identified mpp is very low: mpp={mpp}")


def trident_save_h5(save_path: Path, assets: dict, attributes: dict | None = None, mode: str = "w") -> None:
    """TRIDENT 0.3.1 ``trident/IO.py::save_h5`` (new datasets): row chunks, resizable, dicts as JSON, None as 'None'."""
    with h5py.File(save_path, mode) as file:
        for key, val in assets.items():
            data_shape = val.shape
            chunk_shape = (1, ) + data_shape[1:]
            maxshape = (None, ) + data_shape[1:]
            dset = file.create_dataset(key, shape=data_shape, maxshape=maxshape, chunks=chunk_shape, dtype=val.dtype)
            dset[:] = val
            if attributes is not None and key in attributes:
                for attr_key, attr_val in attributes[key].items():
                    if isinstance(attr_val, dict):
                        attr_val = json.dumps(attr_val)
                    elif attr_val is None:
                        attr_val = "None"
                    dset.attrs[attr_key] = attr_val


def write_trident_03(job_dir: Path, name: str, features: np.ndarray, coords: np.ndarray, *, mpp: float, width: int,
                     height: int, patch_size: int, mag: float, overlap: int, encoder: str) -> Path:
    """The feature file ``run_batch_of_slides.py --task all`` of TRIDENT 0.3.1 leaves for one slide.

    ``--mag`` is parsed as a float and ``--patch_size``/``--overlap`` as ints; ``WSI.extract_tissue_coords``
    calls ``IO.coords_to_h5`` with the slide's ``mag`` (binned), ``width`` and ``height``;
    ``WSI.extract_patch_features`` reads the patch file with ``IO.read_coords`` and saves features and coords.
    """
    src_mag, target_mag = trident_magnification(mpp), mag
    save_coords = str(job_dir / f"{mag:g}x_{patch_size}px_{overlap}px_overlap")
    patches = Path(save_coords) / "patches" / f"{name}_patches.h5"
    patches.parent.mkdir(parents=True)
    attributes = {  # IO.coords_to_h5
        'patch_size': patch_size,
        'patch_size_level0': patch_size * src_mag // target_mag,
        'level0_magnification': src_mag,
        'target_magnification': target_mag,
        'overlap': overlap,
        'name': name,
        'savetodir': save_coords,
        'level0_width': width,
        'level0_height': height
    }
    trident_save_h5(patches, assets={'coords': np.asarray(coords, dtype=np.int64)},
                    attributes={'coords': attributes}, mode='w')
    with h5py.File(patches, 'r') as f:  # IO.read_coords
        coords_attrs = dict(f['coords'].attrs)
        coords = f['coords'][:]
    save_features = str(Path(save_coords) / f"features_{encoder}")
    Path(save_features).mkdir()
    model_name = encoder
    out = Path(save_features) / f"{name}.h5"
    trident_save_h5(out, assets={'features': features, 'coords': coords},
                    attributes={'features': {'name': name, 'savetodir': save_features, 'encoder': model_name},
                                'coords': coords_attrs}, mode='w')
    return out


def attr_types(path: Path) -> dict[str, dict[str, str]]:
    """Each attribute's stored HDF5 type ('str', or dtype and shape), by where it sits: 'file' or a dataset."""
    def kind(attr) -> str:
        return "str" if h5py.check_string_dtype(attr.dtype) else f"{attr.dtype.str}{attr.shape}"

    with h5py.File(path, "r") as f:
        places = {"file": f} | {name: f[name] for name in f}
        return {where: {k: kind(obj.attrs.get_id(k)) for k in obj.attrs} for where, obj in places.items()}


def read_all(path: Path) -> dict:
    """Every dataset (value and dtype) and attribute (value and dtype) of a file."""
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = {k: (np.asarray(v).tolist(), np.asarray(v).dtype.str) for k, v in f.attrs.items()}
        for name, ds in f.items():
            out[name] = (ds[...], ds.dtype.str,
                         {k: (np.asarray(v).tolist(), np.asarray(v).dtype.str) for k, v in ds.attrs.items()})
    return out


def assert_same_file(a: Path, b: Path) -> None:
    fa, fb = read_all(a), read_all(b)
    assert fa.keys() == fb.keys() and fa["attrs"] == fb["attrs"]
    for name in fa.keys() - {"attrs"}:
        assert fa[name][1] == fb[name][1], f"{name} dtype"
        assert fa[name][0].tobytes() == fb[name][0].tobytes(), f"{name} values are not bit-identical"
        assert fa[name][2] == fb[name][2], f"{name} attrs"


@pytest.fixture
def files(tmp_path):
    """Two slides in each layout, like each tool's output folder."""
    rng = np.random.default_rng(0)
    made = {}
    for layout in ("trident", "clam", "clam_bare", "stamp"):
        folder = tmp_path / ("features_uni_v1" if layout == "trident" else layout)
        folder.mkdir()
        for i, n in enumerate((30, 45)):
            path = folder / f"case_{i}.h5"
            if layout == "trident":
                write_trident(path, rng.standard_normal((n, 24)).astype(np.float32), grid(n, 512))
            elif layout.startswith("clam"):
                features = rng.standard_normal((n, 24)).astype(np.float32)
                write_clam(path, features, grid(n, 256), layout == "clam")
            else:
                coords = (grid(n, 1) * 256.0).astype(np.float32)
                write_stamp(path, rng.standard_normal((n, 24)).astype(np.float16), coords)
        made[layout] = folder
    return made


@pytest.mark.parametrize(("layout", "options", "model"), [
    ("trident", ImportOptions(), "uni_v1"),
    ("clam", ImportOptions(assume_mpp=0.25, model_name="resnet50_trunc"), "resnet50_trunc"),
    ("stamp", ImportOptions(), "uni2"),
])
def test_import_then_export_is_lossless(tmp_path, files, layout, options, model):
    store = Store.create(tmp_path / "s")
    report = import_features(store, [files[layout]], options)
    assert [Path(p).name for p, *_ in report.imported] == ["case_0.h5", "case_1.h5"]
    assert store.info().tiles == 75 and store.info().slides == 2
    es = store.embedding_set(model)
    assert es.dtype == ("float16" if layout == "stamp" else "float32")
    out = tmp_path / "out"
    exported = export_features(store, model, out, layout)
    assert exported.verbatim == 2
    for name in ("case_0.h5", "case_1.h5"):
        assert_same_file(files[layout] / name, out / name)
    again = import_features(store, [files[layout]], options)
    assert (len(again.imported), len(again.skipped)) == (0, 2), "unchanged files are skipped"


def test_layouts_map_onto_slides_and_tilings(tmp_path, files):
    store = Store.create(tmp_path / "s")
    import_features(store, [files["trident"]])
    import_features(store, [files["stamp"]])
    tilings = {t.tile_size: t for t in store.tilings()}
    assert tilings[256].target_mpp == 0.5, "TRIDENT 20x target"
    assert tilings[224].target_mpp == pytest.approx(256 / 224), "STAMP tile_size_um / tile_size_px"
    slides = store.sql("SELECT path, mpp_x, mpp_assumed, width FROM slides ORDER BY path, mpp_x").to_pylist()
    assert sorted({round(s["mpp_x"], 6) for s in slides}) == [0.25, round(256 / 224, 6)]
    assert all(s["mpp_assumed"] for s in slides)
    tiles = store.sql("SELECT x, y, read_size FROM tiles t JOIN slides s USING (slide_id) "
                      "WHERE s.path LIKE '%stamp%' AND tile_index = 8").to_pylist()
    assert tiles == [{"x": 224, "y": 224, "read_size": 224}] * 2, "µm coordinates on the tiles' pixel frame"
    rows = store.sql("SELECT count(*) AS n FROM runs WHERE status = 'ok'").column("n")[0].as_py()
    assert rows == 2


def test_clam_without_attributes_needs_the_patch_size(tmp_path, files):
    store = Store.create(tmp_path / "s")
    with pytest.raises(InteropError, match=r"case_0\.h5: .*--patch-size"):
        import_features(store, [files["clam_bare"]], ImportOptions(assume_mpp=0.5, model_name="r50"))
    with pytest.raises(InteropError, match="--assume-mpp"):
        import_features(store, [files["clam_bare"]], ImportOptions(patch_size=256, model_name="r50"))
    assert store.info().slides == 0, "nothing is written when a file is refused"
    enough = ImportOptions(patch_size=256, assume_mpp=0.5, model_name="r50")
    import_features(store, [files["clam_bare"]], enough)
    assert export_features(store, "r50", tmp_path / "clam_out", "clam").verbatim == 2, "written back as it came"
    assert export_features(store, "r50", tmp_path / "trident", "trident").verbatim == 0
    with h5py.File(tmp_path / "trident" / "case_1.h5") as f:
        attrs = {k: f["coords"].attrs[k] for k in ("patch_size", "patch_size_level0", "target_magnification")}
    assert attrs == {"patch_size": 256, "patch_size_level0": 256, "target_magnification": 20}


def test_a_second_model_over_the_same_patches_shares_the_slides(tmp_path, files):
    second = tmp_path / "features_conch_v15"
    second.mkdir()
    for src in sorted(files["trident"].glob("*.h5")):
        with h5py.File(src) as f:
            coords, n = f["coords"][...], f["features"].shape[0]
        write_trident(second / src.name, np.ones((n, 8), np.float32), coords)
    store = Store.create(tmp_path / "s")
    import_features(store, [files["trident"], second])
    info = store.info()
    assert (info.slides, info.tiles) == (2, 75)
    assert sorted(s.encoder_name for s in store.embedding_sets()) == ["conch_v15", "uni_v1"]


def test_bad_files_are_refused_with_the_file_named(tmp_path, files):
    store = Store.create(tmp_path / "s")
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f["embeddings"] = np.zeros((3, 4), np.float32)
    with pytest.raises(InteropError, match=r"bad\.h5: neither 'features'"):
        import_features(store, [files["trident"], bad])
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(InteropError, match=r"text\.h5: cannot read as HDF5"):
        import_features(store, [text])
    with pytest.raises(InteropError, match="no such file"):
        import_features(store, [tmp_path / "missing"])
    assert store.info().slides == 0


def test_export_of_extracted_features_reimports_identically(tmp_path, tiling):
    """A set made here goes out in each layout and comes back with the same vectors and positions."""
    store = Store.create(tmp_path / "s")
    enc = make_encoder("uni", 12)
    written = {f"slide_{i}": commit_random_slide(store, i, tiling, [enc], 20, dtype="float32")["uni"]
               for i in range(2)}
    positions = np.stack(np.divmod(np.arange(20), 50), axis=1) * 448
    for layout in ("trident", "clam", "stamp"):
        out = tmp_path / layout
        report = export_features(store, "uni", out, layout)
        assert report.verbatim == 0 and len(report.files) == 2
        with h5py.File(out / "slide_1.h5") as f:
            assert np.array_equal(f["feats" if layout == "stamp" else "features"][...], written["slide_1"])
            scale = 0.5 if layout == "stamp" else 1
            assert np.array_equal(f["coords"][...], positions * scale)
        back = Store.create(tmp_path / f"back-{layout}")
        import_features(back, [out], ImportOptions(model_name="uni", assume_mpp=0.5))
        es = back.embedding_set("uni")
        for slide in back.slides():
            name = Path(slide.path).stem
            assert np.array_equal(back.read_bag(es, slide.slide_id), written[name])
            tiles = back.read_tiles(es.tiling_id, slide.slide_id)
            assert np.array_equal(np.stack([tiles.column("x").to_numpy(), tiles.column("y").to_numpy()], 1),
                                  positions)


def test_imported_features_are_searchable(tmp_path, files):
    store = Store.create(tmp_path / "s")
    import_features(store, [files["trident"]])
    build_index(store, "uni_v1")
    tile = store.sql("SELECT tile_id FROM tiles LIMIT 1").column(0)[0].as_py()
    assert search(store, "uni_v1", tile_id=tile, k=3).column("tile_id")[0].as_py() == tile


def test_slides_folder_gives_real_slide_ids(tmp_path, real_slide):
    pytest.importorskip("featurestore.slides", reason="slide readers not written yet")
    from featurestore.pipelines.discover import fingerprint

    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "CMU-1-Small-Region.svs").symlink_to(real_slide)
    feats = tmp_path / "features_uni_v1"
    feats.mkdir()
    write_trident(feats / "CMU-1-Small-Region.h5", np.ones((4, 8), np.float32), grid(4, 512))
    store = Store.create(tmp_path / "s")
    report = import_features(store, [feats], ImportOptions(slides_dir=slides))
    assert report.imported[0][1] == fingerprint(real_slide)
    slide = store.slides()[0]
    assert (slide.width, slide.height, slide.mpp_assumed) == (2220, 2967, False)


def test_export_never_replaces_a_users_files_unless_asked(tmp_path, tiling):
    store = Store.create(tmp_path / "s")
    commit_random_slide(store, 0, tiling, [make_encoder("uni", 4)], 5)
    mine = tmp_path / "out" / "slide_0.h5"
    mine.parent.mkdir()
    mine.write_bytes(b"my own analysis")
    with pytest.raises(InteropError, match=r"slide_0.h5: exists \(1 of the 1 files.*--overwrite"):
        export_features(store, "uni", tmp_path / "out", "trident")
    assert mine.read_bytes() == b"my own analysis"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InteropError, match="afile: is a file"):
        export_features(store, "uni", tmp_path / "afile", "trident")
    assert len(export_features(store, "uni", tmp_path / "out", "trident", overwrite=True).files) == 1
    with h5py.File(mine) as f:
        assert f["features"].shape == (5, 4)


def test_every_registered_layout_is_detected_in_its_own_files(tmp_path, tiling):
    """Files exported in each registered layout import as that layout without being told; the CLI offers
    exactly the registered names, and an unknown name is refused with them."""
    store = Store.create(tmp_path / "s")
    commit_random_slide(store, 0, tiling, [make_encoder("uni", 4)], 5)
    for name in LAYOUTS:
        export_features(store, "uni", tmp_path / name, name)
        back = Store.create(tmp_path / f"back-{name}")
        import_features(back, [tmp_path / name], ImportOptions(model_name="uni", assume_mpp=0.5))
        assert back.sql("SELECT layout FROM imports").column(0).to_pylist() == [name]
    assert [choice.value for choice in Layout] == list(LAYOUTS) == ["trident", "clam", "stamp"]
    with pytest.raises(InteropError, match="layout 'qupath' is unknown; choose one of trident, clam, stamp"):
        import_features(store, [tmp_path / "stamp"], ImportOptions(layout="qupath"))


@pytest.fixture
def slide_0499(tmp_path, real_slide):
    """A store holding the real 0.499 µm/px slide cut as the tiler cuts it, 224 px at 0.5 µm/px: 224.45 level-0 px
    apart. Returns the store, the slide, its tile grid and the float32 embeddings written."""
    pytest.importorskip("featurestore.slides", reason="slide readers not written yet")
    from featurestore.pipelines.discover import fingerprint
    from featurestore.pipelines.register import describe_slide
    from featurestore.slides.tiling import SlideGeometry, tile_grid

    slide = describe_slide(real_slide, fingerprint(real_slide))
    tiling = TilingSpec(target_mpp=0.5, tile_size=224, tissue_method="none")
    cut = tile_grid(SlideGeometry((slide.width, slide.height)), tiling, None, mpp=slide.mpp_x)
    features = np.random.default_rng(0).standard_normal((len(cut), 8)).astype(np.float32)
    tiles = tiles_table(slide.slide_id, tiling.id, cut.x, cut.y, cut.level, cut.read_size, cut.tissue_fraction)
    store = Store.create(tmp_path / "s")
    store.commit_slide(SlideCommit(slide, tiling, tiles, {make_encoder("uni_v1", 8): features}, dtype="float32"))
    return store, slide, cut, features


def test_trident_export_writes_tridents_attributes_and_the_true_pitch(tmp_path, slide_0499):
    store, slide, cut, features = slide_0499
    assert slide.mpp_x == 0.499, "a slide whose µm/px is not the tiling's"
    exported = export_features(store, "uni_v1", tmp_path / "out", "trident").files[0]
    with h5py.File(exported) as f:
        coords = f["coords"][...]
    reference = write_trident_03(tmp_path / "job", exported.stem, features, coords, mpp=slide.mpp_x,
                                 width=slide.width, height=slide.height, patch_size=224, mag=20.0, overlap=0,
                                 encoder="uni_v1")
    ours, theirs = attr_types(exported), attr_types(reference)
    extra = {where: sorted(k for k in names if k.startswith("featurestore_")) for where, names in ours.items()}
    assert extra == {"file": ["featurestore_set_id", "featurestore_slide_id"], "features": [],
                     "coords": ["featurestore_stride_level0"]}
    assert {where: {k: t for k, t in names.items() if k not in extra[where]} for where, names in ours.items()} == theirs
    with h5py.File(exported) as f, h5py.File(reference) as g:
        for where in ("features", "coords"):
            assert {k: v for k, v in f[where].attrs.items() if k != "savetodir" and k not in extra[where]} == \
                {k: v for k, v in g[where].attrs.items() if k != "savetodir"}, f"{where} attribute values"
        assert (f["features"].dtype, f["coords"].dtype) == (g["features"].dtype, g["coords"].dtype)
        level0_size, stride = f["coords"].attrs["patch_size_level0"], f["coords"].attrs["featurestore_stride_level0"]
    assert level0_size == 224 * trident_magnification(0.499) // 20.0 == cut.footprint == 224
    assert stride == pytest.approx(224 * 0.5 / 0.499)
    xs = np.unique(coords[:, 0])
    assert np.array_equal(xs, np.floor(np.arange(len(xs)) * stride + 0.5)), "the pitch the tiles were cut at"
    assert xs[4] == 898, "a 224 px pitch would put the fifth column at 896"


def test_trident_export_round_trips_through_import(tmp_path, slide_0499, real_slide):
    store, slide, cut, features = slide_0499
    out = tmp_path / "out"
    export_features(store, "uni_v1", out, "trident")
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / real_slide.name).symlink_to(real_slide)
    for i, opts in enumerate((ImportOptions(slides_dir=slides), ImportOptions())):
        back = Store.create(tmp_path / f"back-{i}")
        import_features(back, [out], opts)  # no --model-name: 'out' is no features_<name> folder, the file says it
        es = back.embedding_set("uni_v1")
        (got,) = back.slides()
        tiles = back.read_tiles(es.tiling_id, got.slide_id)
        assert np.array_equal(tiles.column("x").to_numpy(), cut.x)
        assert np.array_equal(tiles.column("y").to_numpy(), cut.y)
        assert set(tiles.column("read_size").to_pylist()) == {cut.read_size}
        assert np.array_equal(back.read_bag(es, got.slide_id), features)
        assert got.mpp_x == pytest.approx(0.499), "from the slide file, else from the exact pitch"
        assert (got.slide_id == slide.slide_id) == (opts.slides_dir is not None)


def test_trident_03_files_import_and_go_back_verbatim(tmp_path):
    features = np.random.default_rng(1).standard_normal((30, 12)).astype(np.float32)
    path = write_trident_03(tmp_path / "job", "case_0", features, grid(30, 512), mpp=0.25, width=40000,
                            height=30000, patch_size=256, mag=20.0, overlap=0, encoder="conch_v15")
    with h5py.File(path) as f:
        assert f["coords"].attrs["patch_size_level0"].dtype == np.float64, "TRIDENT 0.3's batch writes a float"
    store = Store.create(tmp_path / "s")
    import_features(store, [path])
    es = store.embedding_set("conch_v15")
    (tiling,) = store.tilings()
    assert (tiling.tile_size, tiling.target_mpp) == (256, 0.5)
    assert store.sql("SELECT DISTINCT read_size FROM tiles").column(0).to_pylist() == [512]
    (slide,) = store.slides()
    assert np.array_equal(store.read_bag(es, slide.slide_id), features)
    out = tmp_path / "out"
    assert export_features(store, "conch_v15", out, "trident").verbatim == 1
    assert_same_file(path, out / "case_0.h5")
