"""Errors that the CLI turns into one red line and exit code 2.

Every message names the offending file or key and ends with a fix.
"""

from __future__ import annotations

__all__ = [
    "MedwsolError",
    "ConfigError",
    "DataError",
    "RegistryError",
    "CheckpointError",
    "PackageError",
    "TrackingError",
    "SlideError",
    "TrainingError",
    "NotAvailableError",
]


class MedwsolError(Exception):
    """Base of every error the user can fix; the CLI prints it as one line."""


class ConfigError(MedwsolError):
    """A pipeline YAML (or a --set override) is invalid."""


class DataError(MedwsolError):
    """A manifest, image, mask or dataset folder is invalid."""


class RegistryError(MedwsolError, KeyError):
    """An unknown name was looked up in a registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else ""


class CheckpointError(MedwsolError):
    """A checkpoint is missing, corrupted or does not match the model."""


class PackageError(CheckpointError):
    """A model package is missing, of a newer schema, corrupt, or does not fit its config."""


class TrackingError(MedwsolError):
    """The tracking server or model registry cannot be used."""


class SlideError(MedwsolError):
    """A slide cannot be opened or processed."""


class TrainingError(MedwsolError):
    """Training cannot go on (e.g. the loss became NaN)."""


class NotAvailableError(MedwsolError):
    """A stage or feature that is not implemented yet."""
