"""``fs view``: a local, read-only web viewer of a store — the cohort, deep-zoom slides with their tile
overlays and attention, and similarity search joined to SQL filters.

It reads through the store's public API, the index's ``search`` and the slide readers; nothing in it
writes. Starlette and uvicorn come with the ``view`` extra (``pip install 'featurestore-path[view]'``).
"""

from featurestore.viewer._app import AttentionRun, ViewerConfig, create_app

__all__ = ["AttentionRun", "ViewerConfig", "create_app"]
