"""The HTTP door's own errors, beside ``pipeline.errors``: each becomes one status code in ``app.py``."""

from __future__ import annotations

from pipeline.errors import PostboxError

__all__ = ["NotFound", "QuotaExceeded"]


class NotFound(PostboxError):
    """A dataset, data object, job or location this key may not see (or that does not exist): HTTP 404."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} not found")
        self.what = what

    def __reduce__(self):  # keep fields across process boundaries
        return (type(self), (self.what,))


class QuotaExceeded(PostboxError):
    """A key is over one of its quotas (``http.max_datasets_per_key``, ``http.max_stored_mb_per_key``): HTTP 429."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.reason,))
