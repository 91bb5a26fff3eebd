"""Errors of stage two. They join the project's hierarchy so ``fs`` prints them as one line."""

from schemas import FsError


class ConfigError(FsError, ValueError):
    """A training option, task or head setting is invalid or does not fit the cohort."""


class RunDirError(FsError, FileNotFoundError):
    """A run directory is missing, incomplete, or already exists where a new run should go."""
