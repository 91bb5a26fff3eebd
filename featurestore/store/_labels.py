"""Labels: any columns from a CSV, matched to slides by file name or slide id."""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Literal

import pyarrow as pa
import pyarrow.csv as pacsv

from schemas import LabelsError

LabelKey = Literal["filename", "slide_id"]


def read_labels(csv_path: Path, key: LabelKey, slides: pa.Table) -> pa.Table:
    """Validate a labels CSV against the store's slides and return it with ``slide_id`` first.

    ``slides`` needs ``slide_id`` and ``path`` columns. Line numbers in errors count the header as line 1.
    """
    try:
        table = pacsv.read_csv(csv_path, convert_options=pacsv.ConvertOptions(
            column_types={key: pa.string()}, strings_can_be_null=True))
    except (pa.ArrowInvalid, OSError) as err:
        raise LabelsError(f"{csv_path}: cannot read as CSV ({str(err).splitlines()[0]}); "
                          "save it as comma-separated UTF-8 with a header row") from err
    if key not in table.column_names:
        raise LabelsError(f"{csv_path}: no '{key}' column (columns: {', '.join(table.column_names)}); "
                          f"add it, or pass --key {'slide_id' if key == 'filename' else 'filename'}")
    if "commit_id" in table.column_names:
        raise LabelsError(f"{csv_path}: column name 'commit_id' is reserved by the store; rename that column")
    values = [None if v is None else str(v) for v in table.column(key).to_pylist()]
    first_seen: dict[str, int] = {}
    for i, value in enumerate(values):
        line = i + 2
        if not value:
            raise LabelsError(f"{csv_path} line {line}: empty {key}; fill it in or delete the row")
        if value in first_seen:
            raise LabelsError(f"{csv_path} line {line}: duplicate {key} {value!r} (also on line "
                              f"{first_seen[value]}); keep one row per slide")
        first_seen[value] = line

    ids = slides.column("slide_id").to_pylist()
    if key == "slide_id":
        lookup = {s: s for s in ids}
    else:
        lookup = {}
        for sid, path in zip(ids, slides.column("path").to_pylist(), strict=True):
            name = PurePath(path).name
            if name in lookup and lookup[name] != sid:
                raise LabelsError(f"{csv_path}: two slides in the store are named {name!r}; "
                                  "match by slide id instead with --key slide_id")
            lookup[name] = sid
    for value, line in first_seen.items():
        if value not in lookup:
            raise LabelsError(f"{csv_path} line {line}: no slide with {key} {value!r} in the store; "
                              "add the slide first (fs slides add / fs extract) or remove the row")
    slide_ids = pa.array([lookup[v] for v in values], pa.string())
    if key == "slide_id":
        table = table.drop_columns(["slide_id"])
    table = table.cast(pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in table.schema]))
    return table.add_column(0, "slide_id", slide_ids)

