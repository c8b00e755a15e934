"""A zip archive produced as a stream of byte chunks, never whole in memory or on disk.

The server sends a folder (an unpacked DICOM series) this way, and the client uploads a series folder
this way: ``zipfile`` writes to a sink without ``seek``, so it uses data descriptors, which every unzip
tool reads.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["zip_stream"]

CHUNK = 1 << 20


class _Sink:
    """A write-only file for ZipFile that hands out what was written so far."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        self.size = 0
        return data


def zip_stream(files: Iterable[tuple[Path, str]], *, compress: bool = False) -> Iterator[bytes]:
    """Yield a zip of ``files`` (path, name in the archive) in chunks of about 1 MiB.

    ``compress`` deflates at level 1 (fast; worth it over a network for CT, which has many equal pixels).
    """
    sink = _Sink()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(sink, "w", compression=method, compresslevel=1 if compress else None) as zf:
        for path, arcname in files:
            info = zipfile.ZipInfo.from_file(path, arcname)
            info.compress_type = method
            with open(path, "rb") as src, zf.open(info, "w") as dst:
                while piece := src.read(CHUNK):
                    dst.write(piece)
                    if sink.size >= CHUNK:
                        yield sink.take()
            if sink.size:
                yield sink.take()
    if sink.size:
        yield sink.take()
