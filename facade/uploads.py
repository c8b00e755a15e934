"""Uploads at the HTTP door: multipart streamed to disk once, zipped DICOM series unpacked safely.

Nothing here knows about datasets or jobs: it turns a request body into files in a private folder, or
refuses it with :class:`~pipeline.errors.InvalidInput` (400) or :class:`TooLarge` (413). The caller removes
that folder whatever happens, so a refused upload leaves nothing behind. Names are made safe by
:func:`pipeline.checks.safe_name`, as at every door.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import multipart

from pipeline import jobs
from pipeline.checks import dicom_series_uid, is_ignored, safe_name
from pipeline.errors import InvalidInput

log = logging.getLogger(__name__)

__all__ = ["ClientGone", "TooLarge", "Upload", "read_multipart", "unpack_dicom_zip"]

CHUNK = 1 << 20  # read and write in 1 MiB pieces: big enough for speed, small enough for flat memory
MAX_FIELD = 64 * 1024  # a form field (dataset, type, meta_data...) is small; a file goes in file_data
FILE_FIELD = "file_data"
# DICOMDIR is an index of a media set, not an image; macOS puts resource forks in __MACOSX/.
_SKIPPED_IN_ZIP = ("DICOMDIR",)
# A zip's end record, its zip64 locator and zip64 end record (APPNOTE 4.3.14 to 4.3.16), and a central
# directory record (4.3.12), as far as the sizes go.
_EOCD = struct.Struct("<4sHHHHIIH")
_EOCD64_LOCATOR = struct.Struct("<4sIQI")
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")
_CD_RECORD = struct.Struct("<4s20xIHHH")  # signature, ..., uncompressed size, name, extra and comment lengths
_CD_RECORD_SIZE = 46
# A central directory record is 46 bytes, a name (a DICOM file's is rarely 100) and a few extras: a series
# zip needs far less than this per entry, and zipfile keeps an object per record it parses.
_CD_BYTES_PER_ENTRY = 512


class TooLarge(InvalidInput):
    """An upload over a configured limit (size, unpacked size, entries): HTTP 413."""


class ClientGone(InvalidInput):
    """The client closed the connection or stopped sending before the body was whole."""


@dataclass
class Upload:
    """A parsed multipart body: its small fields in memory and at most one file on disk (synced)."""

    fields: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    filename: str | None = None
    size: int = 0


# --- multipart ------------------------------------------------------------------------------------


def _boundary(content_type: str) -> str:
    kind, options = multipart.parse_options_header(content_type)
    if kind != "multipart/form-data" or not options.get("boundary"):
        raise InvalidInput("the body must be multipart/form-data with a boundary")
    return str(options["boundary"])


def _chunks(stream: BinaryIO, length: int | None) -> Iterator[bytes]:
    """The body in pieces; ClientGone if it ends before ``length`` bytes (a dropped connection)."""
    remaining = length
    while remaining is None or remaining > 0:
        try:
            chunk = stream.read(CHUNK if remaining is None else min(CHUNK, remaining))
        except OSError as exc:  # reset by peer, or cheroot's socket timeout on a stalled client
            raise ClientGone(f"the connection failed during the upload ({exc})") from None
        if not chunk:
            if remaining is not None:
                raise ClientGone(f"the client stopped sending with {remaining} byte(s) of the body missing")
            return
        if remaining is not None:
            remaining -= len(chunk)
        yield chunk


def read_multipart(stream: BinaryIO, content_type: str, length: int | None, folder: Path, *,
                   max_file: int) -> Upload:
    """Parse a multipart/form-data body as it arrives, writing its file part straight to ``folder``.

    The file is written once, in the order it arrives, and fsynced before this returns, so an answer
    sent after it means the data is on disk; memory use does not grow with its size (the multipart
    package's push parser keeps at most one chunk).

    Parameters
    ----------
    stream, content_type, length
        The request body, its Content-Type and Content-Length (None when chunked).
    folder
        An empty private folder for the file (``upload.bin``); the caller removes it afterwards.
    max_file
        Bytes the file may have; TooLarge past it (the rest of the body is not written).

    Raises
    ------
    InvalidInput
        A malformed body, a second file, an over-long field; TooLarge, ClientGone as named.
    """
    upload = Upload()
    target: BinaryIO | None = None
    name: str | None = None
    buffer = bytearray()
    try:
        with multipart.PushMultipartParser(_boundary(content_type), length if length is not None else -1,
                                           max_header_count=8, max_segment_count=32) as parser:
            # Leaving the block closes the parser, which raises if the closing boundary never came.
            for chunk in _chunks(stream, length):
                for event in parser.parse(chunk):
                    if isinstance(event, multipart.MultipartSegment):
                        name = event.name or ""
                        if event.filename is not None or name == FILE_FIELD:
                            if upload.path is not None:
                                raise InvalidInput(f"only one file per request (a second came in '{name}')")
                            upload.path = folder / "upload.bin"
                            upload.filename = event.filename
                            target = open(upload.path, "xb", buffering=0)  # noqa: SIM115 - closed below
                    elif event is None:  # end of a part
                        if target is not None:
                            target.flush()
                            os.fsync(target.fileno())
                            target.close()
                            target = None
                        elif name is not None:
                            upload.fields[name] = buffer.decode("utf-8", errors="replace")
                        buffer.clear()
                        name = None
                    elif target is not None:
                        upload.size += len(event)
                        if upload.size > max_file:
                            raise TooLarge(f"the file is over the upload limit of {_mb(max_file)}")
                        target.write(event)
                    else:
                        buffer += event
                        if len(buffer) > MAX_FIELD:
                            raise InvalidInput(f"form field '{name}' is longer than {MAX_FIELD} bytes; "
                                               f"send files in '{FILE_FIELD}'")
    except multipart.ParserLimitReached as exc:
        raise InvalidInput(f"multipart body refused: {exc}") from None
    except multipart.MultipartError as exc:
        raise InvalidInput(f"the multipart body does not parse: {exc}") from None
    finally:
        if target is not None:
            target.close()
    if upload.path is not None:
        jobs.fsync_dir(folder)
    return upload


def _mb(n: float) -> str:
    return f"{n / 1e6:g} MB"


# --- zipped DICOM series ----------------------------------------------------------------------------


def _entry_name(info: zipfile.ZipInfo) -> str | None:
    """The base name an entry unpacks to, None to skip it; InvalidInput if the entry is unsafe."""
    raw = info.filename
    parts = raw.replace("\\", "/").split("/")
    if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw) or ".." in parts:
        raise InvalidInput(f"zip entry {raw!r} points outside the archive (absolute path or '..')")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise InvalidInput(f"zip entry {raw!r} is a symbolic link; links are not taken as input")
    if info.flag_bits & 0x1:
        raise InvalidInput(f"zip entry {raw!r} is encrypted")
    if info.is_dir() or any(p.startswith("__MACOSX") for p in parts):
        return None
    base = parts[-1]
    if not base or base in _SKIPPED_IN_ZIP or is_ignored(base):
        return None
    return safe_name(base)


def _check_central_directory(archive: Path, *, max_entries: int, max_bytes: int) -> None:
    """Refuse a zip whose central directory is too big to parse, before zipfile parses it (issue 9).

    zipfile reads the whole directory into memory and makes an object per entry before anyone can count
    them: 5.5 MB of memory per MB uploaded. Here the end record's entry count and directory size come
    first (the directory may be at most ``_CD_BYTES_PER_ENTRY`` per entry allowed), then the records are
    counted and their declared sizes added up without keeping any, since the end record's count can lie.

    Raises
    ------
    TooLarge
        Over ``max_entries`` entries, a directory too big for them, or over ``max_bytes`` declared.
    InvalidInput
        No end record: not a zip file.
    """
    size = archive.stat().st_size
    with open(archive, "rb") as fh:
        tail_size = min(size, _EOCD.size + 0xFFFF)  # the end record, then a comment of up to 64 KiB
        fh.seek(size - tail_size)
        tail = fh.read(tail_size)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or tail_size - at < _EOCD.size:
            raise InvalidInput("not a readable zip file (no end of central directory record)")
        end = size - tail_size + at
        _, _, _, _, entries, cd_size, _, _ = _EOCD.unpack_from(tail, at)
        if (entries == 0xFFFF or cd_size == 0xFFFFFFFF) and end >= _EOCD64_LOCATOR.size:
            fh.seek(end - _EOCD64_LOCATOR.size)
            signature, _, end64, _ = _EOCD64_LOCATOR.unpack(fh.read(_EOCD64_LOCATOR.size))
            if signature == b"PK\x06\x07":
                fh.seek(end64)
                record = fh.read(_EOCD64.size)
                if len(record) == _EOCD64.size and record[:4] == b"PK\x06\x06":
                    entries, cd_size = _EOCD64.unpack(record)[7:9]
                    end = end64
        if entries > max_entries:
            raise TooLarge(f"the zip has {entries} entries; the limit is {max_entries}")
        if cd_size > max(max_entries, 1) * _CD_BYTES_PER_ENTRY:
            raise TooLarge(f"the zip's central directory is {_mb(cd_size)}, more than {max_entries} entries (the "
                           "limit) need")
        # Where zipfile reads it from too: just before the end record, whatever the offsets say.
        fh.seek(max(0, end - cd_size))
        directory = fh.read(cd_size)
    count = declared = 0
    at = 0
    while at + _CD_RECORD_SIZE <= len(directory):
        signature, file_size, name, extra, comment = _CD_RECORD.unpack_from(directory, at)
        if signature != b"PK\x01\x02":
            break  # zipfile says what is wrong with it
        count += 1
        declared += 0 if file_size == 0xFFFFFFFF else file_size  # zip64 sizes: counted while unpacking
        at += _CD_RECORD_SIZE + name + extra + comment
    if count > max_entries:
        raise TooLarge(f"the zip has {count} entries (its end record says {entries}); the limit is {max_entries}")
    if declared > max_bytes:
        raise TooLarge(f"the zip unpacks to {_mb(declared)}; the limit is {_mb(max_bytes)}")


def unpack_dicom_zip(archive: Path, dest: Path, *, max_entries: int, max_bytes: int) -> dict[str, Any] | None:
    """Unpack a zip of one DICOM series into ``dest`` (flat), checking it the way every input is checked.

    Every entry's name is checked (no absolute paths, no '..', no links) before anything is written;
    the entry count and the declared unpacked size are checked against the limits first, from the
    central directory's end record before zipfile parses the directory, and the bytes actually written
    are counted too, since a zip's declared sizes can lie.

    Returns
    -------
    dict or None
        ``{"series_instance_uid", "instances"}``, or None when the zip holds no DICOM at all (the caller
        keeps it as a plain file).

    Raises
    ------
    InvalidInput
        Unsafe or broken entries, DICOM mixed with other files, more than one series.
    TooLarge
        Over ``max_entries`` or ``max_bytes``.
    """
    _check_central_directory(archive, max_entries=max_entries, max_bytes=max_bytes)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidInput(f"not a readable zip file ({exc})") from None
    with zf:
        plan: list[tuple[zipfile.ZipInfo, str]] = []
        infos = zf.infolist()
        if len(infos) > max_entries:
            raise TooLarge(f"the zip has {len(infos)} entries; the limit is {max_entries}")
        for info in infos:
            base = _entry_name(info)
            if base is not None:
                plan.append((info, base))
        declared = sum(info.file_size for info, _ in plan)
        if declared > max_bytes:
            raise TooLarge(f"the zip unpacks to {_mb(declared)}; the limit is {_mb(max_bytes)}")
        dest.mkdir(parents=True, exist_ok=True)
        written = 0
        used: set[str] = set()
        for info, base in plan:
            name, n = base, 1
            while name in used:  # one series, flattened: same names in different folders stay apart
                stem, dot, suffix = base.partition(".")
                name, n = f"{stem}-{n}{dot}{suffix}", n + 1
            used.add(name)
            try:
                with zf.open(info) as src, open(dest / name, "xb") as out:
                    while piece := src.read(CHUNK):
                        written += len(piece)
                        if written > max_bytes:
                            raise TooLarge(f"the zip unpacks to more than {_mb(max_bytes)} (its sizes lie)")
                        out.write(piece)
            except (zipfile.BadZipFile, EOFError, NotImplementedError, ValueError) as exc:
                raise InvalidInput(f"zip entry {info.filename!r} cannot be read ({exc})") from None
    series: dict[str, int] = {}
    other: list[str] = []
    for path in sorted(dest.iterdir()):
        uid = dicom_series_uid(path)  # InvalidInput for a DICOM file that does not parse
        if uid is None:
            other.append(path.name)
        else:
            series[uid] = series.get(uid, 0) + 1
    if not series:
        return None
    if other:
        raise InvalidInput(f"the zip mixes a DICOM series with other files ({', '.join(other[:3])}); "
                           "send one series per zip")
    if len(series) > 1:
        raise InvalidInput(f"the zip holds {len(series)} DICOM series; send one series per zip (one data object)")
    jobs.fsync_tree(dest)
    uid, count = next(iter(series.items()))
    return {"series_instance_uid": uid, "instances": count}
