"""The software versions a run records (``runs.versions``), as sorted JSON."""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version


def versions(*packages: str) -> str:
    """Python's version and each installed package's; a package that is not installed is left out."""
    found = {"python": platform.python_version()}
    for pkg in packages:
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return json.dumps(found, sort_keys=True)
