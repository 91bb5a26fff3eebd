"""Errors of stage two. They join the project's hierarchy so ``fs`` prints them as one line."""

from featurestore.schemas import FsError


class ConfigError(FsError, ValueError):
    """A training option, task or head setting is invalid or does not fit the cohort.

    ``field`` names the config field a message starts with, so the CLI can show its flag instead.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RunDirError(FsError, FileNotFoundError):
    """A run directory is missing, incomplete, or already exists where a new run should go."""


def require(ok: bool, field: str, rule: str) -> None:
    """Raise ``ConfigError("<field> <rule>")`` unless ``ok``: every field check words its message this way."""
    if not ok:
        raise ConfigError(f"{field} {rule}", field=field)

