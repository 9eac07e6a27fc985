"""Exceptions that say what went wrong and how to fix it."""


class FinetuneError(Exception):
    """Base class of every error the library raises on purpose."""


class ArchitectureError(FinetuneError, ValueError):
    """An unknown architecture, or a model whose head or groups cannot be found."""


class WeightsUnavailableError(FinetuneError, RuntimeError):
    """Requested weights cannot be had: not cached, no network, or the wrong file."""


class CheckpointError(FinetuneError, RuntimeError):
    """A checkpoint that does not fit the model it is loaded into, or cannot be read."""


class DataError(FinetuneError, ValueError):
    """A dataset folder, archive or image that cannot be used as given."""
