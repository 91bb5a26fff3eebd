"""The feature store: ``Store`` plus the commit record ``SlideCommit``."""

from featurestore.store.store import SlideCommit, Store, StoreInfo, tiles_table

__all__ = ["SlideCommit", "Store", "StoreInfo", "tiles_table"]
