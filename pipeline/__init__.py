"""Postbox's job pipeline: ``from pipeline import app, DataObject`` in a PlatiPy-style service.py."""

from __future__ import annotations

import logging
from typing import Any

from .dataobject import DataObject
from .errors import PostboxError
from .jobs import JobStatus

__all__ = ["DataObject", "JobStatus", "PostboxError", "app"]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    # The service object pulls in the worker and its dependencies; the algorithm's child process,
    # which imports this package for DataObject, should not pay for that.
    if name == "app":
        from .service import app

        return app
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
