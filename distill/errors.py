"""Errors of stage two. They join the project's hierarchy so ``fs`` prints them as one line."""

from pathlib import Path

from featurestore.schemas import FsError


class ConfigError(FsError, ValueError):
    """A training option, task or head setting is invalid or does not fit the cohort."""


class RunDirError(FsError, FileNotFoundError):
    """A run directory is missing, incomplete, or already exists where a new run should go."""


def check_new_run_dir(out: Path) -> None:
    """Refuse an ``--out`` that is a file or a directory with something in it: runs are never replaced."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: is a file; choose a new directory for --out")
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out}: run directory exists and is not empty; choose a new --out or delete it")
