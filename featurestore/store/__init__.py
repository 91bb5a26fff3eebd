"""The feature store: ``Store`` (writes, maintenance) and ``Snapshot`` (every read, pinned to one version)."""

from featurestore.store._maintenance import CompactReport, MigrateReport, VacuumReport, VerifyReport, migrate
from featurestore.store.snapshot import Snapshot, StoreInfo
from featurestore.store.store import SlideCommit, Store, StoreDamageWarning, TiledPixels, tiles_table

__all__ = ["CompactReport", "MigrateReport", "SlideCommit", "Snapshot", "Store", "StoreDamageWarning", "StoreInfo",
           "TiledPixels", "VacuumReport", "VerifyReport", "migrate", "tiles_table"]
