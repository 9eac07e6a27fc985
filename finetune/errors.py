"""Exceptions that say what went wrong and how to fix it — without leaking credentials."""

from __future__ import annotations

import re
from typing import Any

# `scheme://user:password@host` (or a bare token before the @)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")
# query parameters that carry secrets in signed or authenticated URLs (S3, GCS, Azure SAS, …)
_SECRET_PARAMETER = re.compile(
    r"(?P<name>[?&;][^=&#\s]*(?:sig|token|key|secret|password|passwd|credential|auth|session)"
    r"[^=&#\s]*=)[^&#\s]+", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the credentials of any URL in it replaced by `***`: user and password,
    and the values of secret-looking query parameters (`X-Amz-Signature`, `token`, `sig`, …).
    Every library error passes its message through it; use it for any other message that
    may quote a URL (a mirror, a download link)."""
    return _SECRET_PARAMETER.sub(r"\g<name>***", _USERINFO.sub(r"\g<scheme>***@", text))


class FinetuneError(Exception):
    """Base class of every error the library raises on purpose; its message is `redact`ed."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class ArchitectureError(FinetuneError, ValueError):
    """An unknown architecture, or a model whose head or groups cannot be found."""


class WeightsUnavailableError(FinetuneError, RuntimeError):
    """Requested weights cannot be had: not cached, no network, or the wrong file."""


class CheckpointError(FinetuneError, RuntimeError):
    """A checkpoint that does not fit the model it is loaded into, or cannot be read."""


class DataError(FinetuneError, ValueError):
    """A dataset folder, archive or image that cannot be used as given."""


class DeviceError(FinetuneError, RuntimeError):
    """The requested device is not there (CUDA asked for on a machine without it)."""


class DiskFullError(FinetuneError, OSError):
    """A write ran out of disk space (or quota); nothing partial was left behind."""
