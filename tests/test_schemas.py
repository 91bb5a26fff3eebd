"""The data model: validation, dict and Arrow round trips, content ids."""

from __future__ import annotations

import dataclasses
import typing

import pyarrow as pa
import pytest

from featurestore.schemas import (
    TABLES,
    Bag,
    EmbeddingSet,
    Failure,
    InvalidRecordError,
    Run,
    SlideTiling,
    Tile,
    TilingSpec,
    arrow_schema,
    from_row,
    tile_id,
    to_row,
    to_table,
    utcnow,
)
from featurestore.schemas.tables import ID_COLUMNS
from featurestore.store import Store
from tests.conftest import make_encoder, make_slide

EXAMPLES = [
    make_slide(1),
    TilingSpec(target_mpp=0.5, tile_size=224, overlap=32, min_tissue=0.1, edge="drop"),
    Tile("a" * 32, "t" * 16, 3, 448, 896, 1, 112, 0.75),
    make_encoder(),
    EmbeddingSet("t" * 16, "e" * 16, "uni", 1024, "float16", 4),
    SlideTiling("a" * 32, "t" * 16, 10, True),
    Bag("s" * 16, "a" * 32, 10),
    Run("r1", "fs extract x", '{"torch": "2"}', "host", utcnow(), utcnow(), 3.5, 2.0, "ok"),
    Failure("/x.svs", "open", "SlideError", "cannot open", None, "r1"),
]


@pytest.mark.parametrize("record", EXAMPLES, ids=lambda r: type(r).__name__)
def test_dict_round_trip(record):
    assert type(record).from_dict(record.to_dict()) == record
    assert type(record).from_dict(record.to_json_dict()) == record


@pytest.mark.parametrize("record", EXAMPLES, ids=lambda r: type(r).__name__)
def test_arrow_round_trip_matches_schema(record):
    cls = type(record)
    table = to_table([record], cls, "c1")
    assert table.schema.remove(table.schema.get_field_index("commit_id")) == arrow_schema(cls)
    assert from_row(cls, table.to_pylist()[0]) == record


def test_every_table_has_an_example():
    assert {type(r) for r in EXAMPLES} == set(TABLES.values())


@pytest.mark.parametrize("record", EXAMPLES, ids=lambda r: type(r).__name__)
def test_arrow_schema_has_the_records_fields_and_types(record):
    """Columns are the dataclass fields in order (after the content id, before Tile's tile_id); each type is
    what Arrow infers from the example's value, and a column is nullable exactly when its field may be None."""
    cls = type(record)
    schema = arrow_schema(cls)
    fields = dataclasses.fields(cls)
    id_column = [ID_COLUMNS[cls]] if cls in ID_COLUMNS else []
    assert schema.names == id_column + [f.name for f in fields] + (["tile_id"] if cls is Tile else [])
    for name, dtype in [(n, pa.string()) for n in id_column] + ([("tile_id", pa.int64())] if cls is Tile else []):
        assert schema.field(name).type == dtype and not schema.field(name).nullable
    hints = typing.get_type_hints(cls)
    for f in fields:
        column = schema.field(f.name)
        assert column.nullable == (type(None) in typing.get_args(hints[f.name])), f.name
        value = getattr(record, f.name)
        if value is not None:
            assert column.type == pa.scalar(value).type, f.name


@pytest.mark.parametrize(("cls", "kwargs", "field"), [
    (TilingSpec, {"target_mpp": 0, "tile_size": 224}, "target_mpp"),
    (TilingSpec, {"target_mpp": 0.5, "tile_size": 224, "overlap": 224}, "overlap"),
    (TilingSpec, {"target_mpp": 0.5, "tile_size": 224, "min_tissue": 1.5}, "min_tissue"),
    (TilingSpec, {"target_mpp": 0.5, "tile_size": 224, "edge": "wrap"}, "edge"),
    (Tile, {"slide_id": "a", "tiling_id": "t", "tile_index": -1, "x": 0, "y": 0, "level": 0, "read_size": 1,
            "tissue_fraction": 0.5}, "tile_index"),
])
def test_invalid_values_name_the_field(cls, kwargs, field):
    with pytest.raises(InvalidRecordError, match=field):
        cls(**kwargs)


def test_encoder_validation():
    with pytest.raises(InvalidRecordError, match="pooling"):
        dataclasses.replace(make_encoder(), pooling="max")
    with pytest.raises(InvalidRecordError, match="sha256"):
        dataclasses.replace(make_encoder(), weights_sha256="abc")


def test_from_dict_rejects_unknown_and_missing_fields():
    d = TilingSpec(0.5, 224).to_dict()
    with pytest.raises(InvalidRecordError, match="unknown field"):
        TilingSpec.from_dict(d | {"stride": 3})
    d.pop("tile_size")
    with pytest.raises(InvalidRecordError, match="missing field"):
        TilingSpec.from_dict(d)


def test_content_ids_are_stable_and_sensitive():
    a, b = TilingSpec(0.5, 224), TilingSpec(0.5, 224)
    assert a.id == b.id and len(a.id) == 16
    assert TilingSpec(0.5, 256).id != a.id
    assert TilingSpec(0.5, 224, min_tissue=0.3).id != a.id
    enc = make_encoder()
    assert dataclasses.replace(enc, weights_sha256="cd" * 32).id != enc.id


def test_stored_id_must_match_content():
    row = to_row(TilingSpec(0.5, 224)) | {"tile_size": 256}
    with pytest.raises(InvalidRecordError, match="does not match"):
        from_row(TilingSpec, row)


def test_tile_ids_are_deterministic_int63_and_distinct():
    ids = [tile_id("a" * 32, "t" * 16, i) for i in range(20000)]
    assert ids == [tile_id("a" * 32, "t" * 16, i) for i in range(20000)]
    assert all(0 <= i < 2**63 for i in ids)
    assert len(set(ids)) == len(ids)
    assert tile_id("b" * 32, "t" * 16, 0) != ids[0]
    assert Tile("a" * 32, "t" * 16, 5, 0, 0, 0, 1, 1.0).tile_id == ids[5]


def test_whole_numbers_in_float_fields_keep_the_id_through_the_store(tmp_path):
    spec = TilingSpec(1, 224, min_sharpness=1000, max_pen=0)
    assert spec.id == TilingSpec(1.0, 224, min_sharpness=1000.0, max_pen=0.0).id
    store = Store.create(tmp_path / "s")
    store.register(spec)
    assert [t.id for t in Store.open(tmp_path / "s").tilings()] == [spec.id]
