"""Shared machinery for frozen records: dict round trip and content ids."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import types
import typing
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

from featurestore.schemas.errors import InvalidRecordError


def utcnow() -> datetime:
    """Timestamps are UTC with microseconds so Parquet and DuckDB agree on them."""
    return datetime.now(UTC)


def content_id(payload: dict[str, Any], length: int = 16) -> str:
    """Stable hex id of a canonical JSON form: the same content always maps to the same id."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def _decode(value: Any, hint: Any) -> Any:
    """Undo ``to_dict``'s JSON-friendly encodings for one field."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        return _decode(value, inner[0]) if len(inner) == 1 else value
    if hint is datetime and isinstance(value, str):
        return datetime.fromisoformat(value)
    if origin is tuple and isinstance(value, list | tuple):
        return tuple(value)
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """Base of all records: frozen, validated in ``__post_init__``, dict round trip.

    Subclasses implement ``validate`` (raise ``InvalidRecordError`` naming the field).
    """

    KIND: ClassVar[str] = "record"

    def __post_init__(self) -> None:
        # A whole number given for a float field is stored as a float: 1000 and 1000.0 must hash to one id,
        # since a record read back from Parquet always carries the float.
        for name in _float_fields(type(self)):
            value = getattr(self, name)
            if type(value) is int:
                object.__setattr__(self, name, float(value))
        self.validate()

    def validate(self) -> None:
        """Check field values; the default accepts everything."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """Like ``to_dict`` but with datetimes as ISO strings, for JSON files."""
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in self.to_dict().items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise InvalidRecordError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}; valid: {sorted(names)}")
        missing = {f.name for f in dataclasses.fields(cls) if f.name not in data and _required(f)}
        if missing:
            raise InvalidRecordError(f"{cls.__name__}: missing field(s) {sorted(missing)}")
        return cls(**{k: _decode(v, hints[k]) for k, v in data.items()})


@functools.cache
def _float_fields(cls: type) -> tuple[str, ...]:
    hints = typing.get_type_hints(cls)
    return tuple(f.name for f in dataclasses.fields(cls) if hints[f.name] in (float, float | None))


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def require(cond: bool, record: str, message: str) -> None:
    """Raise a one-line ``InvalidRecordError`` when ``cond`` is false."""
    if not cond:
        raise InvalidRecordError(f"{record}: {message}")
