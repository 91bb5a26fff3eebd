"""The feature store: ``Store`` plus the commit record ``SlideCommit``."""

from featurestore.store.store import SlideCommit, Store, StoreInfo, TiledPixels, tiles_table

__all__ = ["SlideCommit", "Store", "StoreInfo", "TiledPixels", "tiles_table"]
