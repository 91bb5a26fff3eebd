"""The data model every other package speaks: typed records, their Arrow schemas, and errors."""

from featurestore.schemas._record import utcnow
from featurestore.schemas.errors import (
    BagNotFoundError,
    FsError,
    InvalidArgumentError,
    InvalidRecordError,
    LabelsError,
    MissingDependencyError,
    MissingMppError,
    ModelError,
    NotAStoreError,
    NotFoundError,
    PixelsNotCachedError,
    ReadOnlyError,
    SlideError,
    SqlError,
    StoreDamageError,
    StoreExistsError,
    StoreVersionError,
    StoreWriteError,
    TileIdsNotFoundError,
    TilesNotFoundError,
    UnknownEmbeddingSetError,
)
from featurestore.schemas.records import (
    FORMAT_VERSION,
    Bag,
    EmbeddingSet,
    EncoderSpec,
    Failure,
    Run,
    Slide,
    SlideTiling,
    Tile,
    TilingSpec,
    tile_id,
)
from featurestore.schemas.tables import (
    FREE_TABLES,
    IMPORTS_SCHEMA,
    LABELS_SCHEMA,
    PREDICTIONS_SCHEMA,
    SLIDE_EMBEDDINGS_SCHEMA,
    TABLES,
    arrow_schema,
    from_row,
    stored_schema,
    to_row,
    to_table,
)

__all__ = [
    "FORMAT_VERSION", "FREE_TABLES", "IMPORTS_SCHEMA", "LABELS_SCHEMA", "PREDICTIONS_SCHEMA",
    "SLIDE_EMBEDDINGS_SCHEMA", "TABLES", "Bag", "BagNotFoundError", "EmbeddingSet",
    "EncoderSpec", "Failure", "FsError", "InvalidArgumentError",
    "InvalidRecordError", "LabelsError", "MissingDependencyError", "MissingMppError", "ModelError", "NotAStoreError",
    "NotFoundError", "PixelsNotCachedError", "ReadOnlyError", "Run", "Slide", "SlideError", "SlideTiling", "SqlError",
    "StoreDamageError", "StoreExistsError", "StoreVersionError", "StoreWriteError", "Tile", "TileIdsNotFoundError",
    "TilesNotFoundError", "TilingSpec", "UnknownEmbeddingSetError", "arrow_schema",
    "from_row", "stored_schema", "tile_id", "to_row", "to_table", "utcnow",
]
