"""DataObject: the PlatiPy contract for what an algorithm takes and returns."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

TYPES = ("DICOM", "FILE")


@dataclass
class DataObject:
    """One input or output of an algorithm.

    Parameters
    ----------
    type
        ``"DICOM"`` (``path`` is a series folder, or for an output one DICOM file or folder)
        or ``"FILE"`` (``path`` is a file, or a folder).
    path
        Where the data is on disk.
    parent
        The input this output was derived from, as in PlatiPy.
    meta_data
        Free key/values carried along (PlatiPy's ``meta_data``).
    """

    type: str = "FILE"
    path: str = ""
    parent: DataObject | None = None
    meta_data: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or self.type.upper() not in TYPES:
            raise ValueError(f"DataObject type must be one of {TYPES}, not {self.type!r}")
        self.type = self.type.upper()
        if not isinstance(self.path, (str, os.PathLike)):
            raise TypeError(f"DataObject path must be a str or path, not {type(self.path).__name__}")
        self.path = os.fspath(self.path)
        if self.parent is not None and not isinstance(self.parent, DataObject):
            raise TypeError("DataObject parent must be a DataObject or None")
        if self.meta_data is None:
            self.meta_data = {}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form; the parent is kept by id only."""
        return {
            "id": self.id,
            "type": self.type,
            "path": self.path,
            "parent": self.parent.id if self.parent is not None else None,
            "meta_data": dict(self.meta_data),
        }
