"""The input checks every door shares: safe names, ignored names, DICOM UIDs, DICOM sniffing, JSON objects.

Each check either answers a question (``is_*``, ``looks_like_*``) or returns the checked value and raises
:class:`~pipeline.errors.InvalidInput` naming the input and the fix, which each door translates at its own
edge (HTTP 400, DICOM 0xC000, CLI exit 2). Before issue 9 these lived in five modules, with three UID
validators that disagreed.

The one rule for UIDs
---------------------
PS3.5 section 9.1 says a UID is at most 64 characters of components of digits separated by ``.``, and that a
component has no leading zero (``0`` itself excepted). :func:`is_uid` keeps all of that but the leading-zero
rule:

* Every caller checks a UID it *receives*: a SOP Instance UID from a modality or a PACS (the DICOM node,
  C-GET) or a Series Instance UID a client names so that we find that series at a PACS (HTTP
  ``seriesUID``). Real modalities do send components such as ``.01.`` and a PACS stores them as sent;
  refusing them would refuse real instances (0xC000) and make such a series impossible to ask for.
* A leading zero is harmless where a UID becomes a file name (``<SOPInstanceUID>.dcm``). What is not
  harmless is refused everywhere, so the rule is as strict as a file name needs: only ASCII digits and
  dots (no ``/``, no Unicode digits such as ``²`` that ``str.isdigit`` takes), no empty component (so no
  ``..`` and no leading dot, which would make a hidden file the pipeline then ignores), at most 64.
"""

from __future__ import annotations

import json
import re
import unicodedata
import warnings
from pathlib import Path
from typing import Any

from .errors import InvalidInput

__all__ = [
    "MAX_NAME_BYTES",
    "MAX_UID_LENGTH",
    "check_uid",
    "dicom_series_uid",
    "is_ignored",
    "is_uid",
    "json_object",
    "looks_like_dicom",
    "safe_name",
]

MAX_NAME_BYTES = 200
MAX_UID_LENGTH = 64  # PS3.5 9.1
# Editors, browsers and copy tools write these while a file is not yet whole.
_PARTIAL_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".download", ".swp", "~")
# [0-9], not \d: \d (like str.isdigit) also takes other scripts' digits.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_PREAMBLE = 128  # PS3.10 7.1: a 128-byte preamble, then the prefix "DICM", then the file meta information
_PREFIX = b"DICM"
_SERIES_UID_TAG = 0x0020000E


def is_ignored(name: str) -> bool:
    """Whether the pipeline never takes a file or folder of this name as input (design.md).

    Hidden names (``.x``), editor and lock files (``~x``, ``#x#``, ``x~``), partial downloads and
    temporary files (``x.part``, ``x.crdownload``, ``x.tmp``...) and ``Thumbs.db``.

    Parameters
    ----------
    name
        One path component, not a path.

    Returns
    -------
    bool
        True if the file is to be left alone.
    """
    return name.startswith((".", "~", "#")) or name.lower().endswith(_PARTIAL_SUFFIXES) or name == "Thumbs.db"


def safe_name(name: str) -> str:
    """Reduce a client's file name to one safe path component.

    The name is NFC-normalised (a macOS client sends decomposed accents), and only the last component of
    a POSIX or Windows path is kept (``../../etc/passwd`` -> ``passwd``, ``C:\\scans\\ct.nii.gz`` ->
    ``ct.nii.gz``); control characters go; leading dots go, since a hidden file is never taken as input.

    Parameters
    ----------
    name
        The name as the client gave it.

    Returns
    -------
    str
        A non-empty name with no separator, at most :data:`MAX_NAME_BYTES` bytes in UTF-8.

    Raises
    ------
    InvalidInput
        If nothing usable is left, the name is too long, or it is one the pipeline ignores (``x.part``,
        ``x.tmp``, ``x~``).
    """
    base = unicodedata.normalize("NFC", str(name)).replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if unicodedata.category(c)[0] != "C").strip()
    base = base.lstrip(".~# ").rstrip(" .") if base not in (".", "..") else ""
    if not base:
        raise InvalidInput(f"file name {name!r} has no usable base name; send a plain name such as ct.nii.gz")
    if len(base.encode("utf-8")) > MAX_NAME_BYTES:
        raise InvalidInput(f"file name {base[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
    if is_ignored(base):
        raise InvalidInput(f"file name {base!r} looks temporary or partial (the pipeline would ignore it); "
                           "rename the file")
    return base


def is_uid(text: str) -> bool:
    """Whether ``text`` is a DICOM UID by this service's one rule (see the module docstring).

    Parameters
    ----------
    text
        The value as received, not stripped.

    Returns
    -------
    bool
        True for 1 to 64 characters of ASCII-digit components joined by single dots; a component may have
        leading zeros, which PS3.5 forbids but modalities send.
    """
    return isinstance(text, str) and len(text) <= MAX_UID_LENGTH and _UID.fullmatch(text) is not None


def check_uid(text: str, what: str) -> str:
    """``text`` if it is a DICOM UID by :func:`is_uid`.

    Parameters
    ----------
    text
        The value as received.
    what
        The field or attribute it came in, for the message (``seriesUID``).

    Returns
    -------
    str
        ``text`` unchanged.

    Raises
    ------
    InvalidInput
        If it is not.
    """
    if not is_uid(text):
        raise InvalidInput(f"{what} must be a DICOM UID (digits and dots, at most {MAX_UID_LENGTH}), not {text!r}")
    return text


def looks_like_dicom(source: Path | bytes) -> bool:
    """Whether a file is DICOM by its content: the ``DICM`` prefix after the 128-byte preamble (PS3.10 7.1).

    A file without preamble and prefix (a bare data set, as some old tools write) is not taken as DICOM,
    whatever its name: it becomes a plain file input.

    Parameters
    ----------
    source
        A path, or the file's first bytes (at least 132 of them to say yes).

    Returns
    -------
    bool
        False also for a folder, a device or FIFO, or a file that cannot be read.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        head = bytes(source[:_PREAMBLE + len(_PREFIX)])
    else:
        try:
            if not Path(source).is_file():  # a folder, or a FIFO, which open() would wait on for ever
                return False
            with open(source, "rb") as fh:
                head = fh.read(_PREAMBLE + len(_PREFIX))
        except OSError:
            return False
    return head[_PREAMBLE:] == _PREFIX


def dicom_series_uid(path: Path) -> str | None:
    """The SeriesInstanceUID of a DICOM file, found by content (not by name).

    Parameters
    ----------
    path
        A file to look at.

    Returns
    -------
    str or None
        The series UID as written, or None if the file is not DICOM (:func:`looks_like_dicom`).

    Raises
    ------
    InvalidInput
        A file that claims to be DICOM but does not parse or has no SeriesInstanceUID.
    """
    if not looks_like_dicom(path):
        return None
    import pydicom  # only needed for DICOM input; keeps the CLI quick to start

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a broken file is refused below, not warned about
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[_SERIES_UID_TAG])
    except Exception as exc:  # pydicom raises many types for a broken file
        raise InvalidInput(f"{path.name}: DICOM file does not parse ({exc})") from None
    uid = ds.get("SeriesInstanceUID")
    if not uid:
        raise InvalidInput(f"{path.name}: DICOM file has no SeriesInstanceUID")
    return str(uid)


def json_object(text: str, field: str, *, holding: str = "") -> dict[str, Any]:
    """Parse a field that must hold a JSON object (``meta_data``, an algorithm's ``config``, ``--settings``).

    Parameters
    ----------
    text
        The field's value.
    field
        Its name as the client wrote it, for the message.
    holding
        What the object holds, for the message (``"the algorithm's settings"``).

    Returns
    -------
    dict
        The object.

    Raises
    ------
    InvalidInput
        If ``text`` is not JSON, is nested too deeply to parse, or is JSON but not an object.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{field} is not JSON: {exc}") from None
    except RecursionError:  # "[[[[..." a few thousand deep: the parser's stack, not a server fault
        raise InvalidInput(f"{field} is nested too deeply") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{field} must be a JSON object" + (f" of {holding}" if holding else ""))
    return value
