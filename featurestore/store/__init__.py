"""The feature store: ``Store`` (writes, maintenance) and ``Snapshot`` (every read, pinned to one version)."""

from featurestore.store._maintenance import CompactReport, VacuumReport, VerifyReport, migrate
from featurestore.store.snapshot import Snapshot, StoreInfo
from featurestore.store.store import SlideCommit, Store, StoreDamageWarning, TiledPixels, tiles_table

__all__ = ["CompactReport", "SlideCommit", "Snapshot", "Store", "StoreDamageWarning", "StoreInfo", "TiledPixels",
           "VacuumReport", "VerifyReport", "migrate", "tiles_table"]
