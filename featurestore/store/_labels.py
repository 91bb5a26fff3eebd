"""Labels: any columns from a CSV, matched to slides by slide id, file name or file stem.

Everything is decoded and typed here, before a commit: a cell that is not UTF-8, or does not fit
its column's type, is an error naming the file, line, column and value. An import updates the
columns it brings and keeps the slide's other label columns as they were.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path, PurePath

import pyarrow as pa

from featurestore.schemas import LabelsError

KEY_COLUMNS = ("slide_id", "filename", "slide", "wsi", "file", "path")
"""Columns tried, in order, when no key column is named: what real cohort tables call it."""

_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(nan|inf|infinity)$", re.IGNORECASE)
_BOOL = {"true": True, "false": False}


@dataclass(frozen=True)
class LabelsImport:
    """What an import writes: full label rows (old columns kept) and how many rows it skipped."""

    table: pa.Table
    skipped: int

    @property
    def rows(self) -> int:
        return self.table.num_rows


def _first_row(line: bytes) -> list[str]:
    """The cells of one raw line for an error message; a stray carriage return ends the row, as in the file."""
    return next(csv.reader(io.StringIO(line.decode("utf-8", "replace"), newline="")), [])


def _decode(csv_path: Path) -> str:
    data = csv_path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line_no = data.count(b"\n", 0, err.start) + 1
        header = _first_row(data.split(b"\n", 1)[0])
        cells = _first_row(data[line_start:data.find(b"\n", err.start) if b"\n" in data[err.start:] else len(data)])
        column = next((header[i] if i < len(header) else f"#{i + 1}" for i, c in enumerate(cells) if "\ufffd" in c),
                      "?")
        raise LabelsError(f"{csv_path} line {line_no}, column {column!r}: byte 0x{data[err.start]:02x} is not UTF-8 "
                          "text; save the file as UTF-8 (e.g. 'CSV UTF-8' in Excel)") from err


def _infer(values: list[str | None]) -> pa.DataType:
    """The column's type. A mostly numeric column stays numeric, so its odd cells (a date, a typo) are
    reported rather than turning every value into text."""
    present = [v for v in values if v is not None]
    numeric = [v for v in present if _FLOAT.match(v)]
    if not present:
        return pa.string()
    if 2 * len(numeric) > len(present):
        return pa.int64() if all(_INT.match(v) for v in numeric) else pa.float64()
    if all(v.lower() in _BOOL for v in present):
        return pa.bool_()
    return pa.string()


def _convert(value: str, kind: pa.DataType) -> object:
    """``value`` as ``kind``; ValueError when it does not fit."""
    if pa.types.is_integer(kind):
        if not _INT.match(value):
            raise ValueError
        return int(value)
    if pa.types.is_floating(kind):
        if not _FLOAT.match(value):
            raise ValueError
        return float(value)
    if pa.types.is_boolean(kind):
        return _BOOL[value.lower()]
    return value


def _slide_lookup(slides: pa.Table) -> dict[str, list[str]]:
    """Slide id, file name and file stem of every slide → the slide ids they name."""
    lookup: dict[str, list[str]] = {}
    for sid, path in zip(slides.column("slide_id").to_pylist(), slides.column("path").to_pylist(), strict=True):
        name = PurePath(path).name
        stem = PurePath(name).stem
        for key in dict.fromkeys((sid, name, stem, stem.removesuffix(".ome"))):
            ids = lookup.setdefault(key, [])
            if sid not in ids:
                ids.append(sid)
    return lookup


def read_labels(csv_path: Path, key_column: str | None, slides: pa.Table, current: pa.Table, *,
                skip_unknown: bool = False) -> LabelsImport:
    """Validate a labels CSV against the store's slides and merge it into their current labels.

    ``slides`` needs ``slide_id`` and ``path``; ``current`` is the labels view without ``commit_id``.
    Line numbers count the header as line 1.
    """
    try:
        text = _decode(csv_path)
    except OSError as err:
        raise LabelsError(f"{csv_path}: cannot read ({err.strerror}); check the path") from err
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise LabelsError(f"{csv_path}: no header row; the first line must name the columns")
    header = [c.strip() for c in rows[0]]
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes or "" in header:
        what = f"duplicate column {dupes[0]!r}" if dupes else "a column has no name"
        raise LabelsError(f"{csv_path} line 1: {what}; give every column one unique name")
    if "commit_id" in header:
        raise LabelsError(f"{csv_path}: column name 'commit_id' is reserved by the store; rename that column")
    key = key_column or next((c for c in KEY_COLUMNS if c in header), None)
    if key is None or key not in header:
        raise LabelsError(f"{csv_path}: no {repr(key) if key else 'slide'} column (columns: {', '.join(header)}); "
                          "name the one holding slide ids or file names with --key-column COL")
    k = header.index(key)

    lookup = _slide_lookup(slides)
    first_seen: dict[str, int] = {}
    matched: list[tuple[int, str, list[str]]] = []
    unknown: list[tuple[int, str]] = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise LabelsError(f"{csv_path} line {line}: {len(row)} cells for {len(header)} columns; "
                              "fix the row (a comma inside a value needs quotes)")
        value = row[k].strip()
        if not value:
            raise LabelsError(f"{csv_path} line {line}: empty {key}; fill it in or delete the row")
        if value in first_seen:
            raise LabelsError(f"{csv_path} line {line}: duplicate {key} {value!r} (also on line "
                              f"{first_seen[value]}); keep one row per slide")
        first_seen[value] = line
        ids = lookup.get(value, [])
        if len(ids) > 1:
            raise LabelsError(f"{csv_path} line {line}: {key} {value!r} names {len(ids)} slides in the store; "
                              "match by slide id instead (a slide_id column, or --key-column)")
        if not ids:
            unknown.append((line, value))
        else:
            matched.append((line, ids[0], row))
    if not matched and not unknown:
        raise LabelsError(f"{csv_path}: no rows under the header; nothing to import")
    if unknown and not skip_unknown:
        line, value = unknown[0]
        raise LabelsError(f"{csv_path} line {line}: no slide with {key} {value!r} in the store "
                          f"({len(unknown)} such rows); add the slides first (fs slides add / fs extract), "
                          "or pass --skip-unknown to import the others")

    columns = [c for i, c in enumerate(header) if i != k and c != "slide_id"]
    old_types = {f.name: f.type for f in current.schema if f.name != "slide_id"}
    types = {}
    for c in columns:
        i = header.index(c)
        cells = [row[i].strip() or None for _, _, row in matched]
        kind = old_types.get(c)
        if kind is None or pa.types.is_null(kind):
            kind = _infer(cells)
        types[c] = kind
        for (line, _, _), cell in zip(matched, cells, strict=True):
            if cell is None:
                continue
            try:
                _convert(cell, kind)
            except (ValueError, KeyError):
                raise LabelsError(f"{csv_path} line {line}, column {c!r}: {cell!r} is not {kind} like the "
                                  "column's other values; fix the cell, or import it under another column name"
                                  ) from None

    old = {r["slide_id"]: r for r in current.to_pylist()}
    out_columns = list(dict.fromkeys([*(f.name for f in current.schema if f.name != "slide_id"), *columns]))
    if key != "slide_id" and key not in out_columns:
        out_columns.append(key)
        types[key] = pa.string()
    data: dict[str, list] = {"slide_id": []} | {c: [] for c in out_columns}
    for _, sid, row in matched:
        previous = old.get(sid, {})
        data["slide_id"].append(sid)
        for c in out_columns:
            if c in columns:
                cell = row[header.index(c)].strip()
                data[c].append(_convert(cell, types[c]) if cell else None)
            elif c == key:
                data[c].append(row[k].strip())
            else:
                data[c].append(previous.get(c))
    schema = pa.schema([("slide_id", pa.string())] + [
        (c, types.get(c) or (old_types[c] if not pa.types.is_null(old_types[c]) else pa.string()))
        for c in out_columns])
    return LabelsImport(pa.table(data, schema=schema), len(unknown))
