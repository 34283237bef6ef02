"""User-facing error types.

Every error a user can cause by bad input derives from :class:`ScMMGPTError`; the CLI prints
its message (which names the problem and the fix) without a traceback.
"""

from __future__ import annotations


class ScMMGPTError(Exception):
    """Base class of errors caused by input, configuration or missing assets."""


class InputDataError(ScMMGPTError, ValueError):
    """The AnnData / h5ad given is unusable as it is (values, genes, labels, file)."""


class AssetMissingError(ScMMGPTError, FileNotFoundError):
    """An offline asset (model weights, ontology, gene table) is not installed."""


class ConfigError(ScMMGPTError, ValueError):
    """An invalid combination of configuration values."""


class CheckpointError(ScMMGPTError, RuntimeError):
    """A checkpoint is missing weights, has the wrong shapes or failed verification."""


class OutputError(ScMMGPTError, OSError):
    """A result could not be written (disk full, read-only folder, no permission); nothing partial
    was left at the destination."""


class ResourceError(ScMMGPTError, MemoryError):
    """The work would need more memory than the machine has; the message says how to shrink it."""


def check_config_keys(cls, d: dict, what: str) -> None:
    """Raise :class:`ConfigError` naming any key of ``d`` that is not a field of dataclass ``cls``."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"Unknown {what} config keys: {sorted(unknown)}; known: {sorted(known)}.")
