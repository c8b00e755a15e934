"""Explicit VR little endian bytes of the long, repetitive sequences of an output file (issue 10).

pydicom writes a dataset element by element through several Python calls, about 15 us an element; the
thousands of small items of a SEG's per-frame functional groups or of an RTSTRUCT's contours took most of
each file's time on a 200 x 512 x 512 CT. Such a sequence is put together here as bytes, from elements of a
fixed layout and from parts pydicom encodes once (the codes that repeat in every item), and handed to
pydicom as a raw element, which it writes as it is (PS3.5 7.1.2 and 7.5: explicit VR little endian, items
of defined length). A file reads back like any other: pydicom parses the sequence when it is read.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_dataset
from pydicom.tag import Tag

log = logging.getLogger(__name__)

__all__ = ["element", "encoded", "keep_raw", "sequence", "set_raw_sequence", "text", "uid", "unsigned"]

# VRs with a 4-byte length after two reserved bytes (PS3.5 table 7.1-1); the others have a 2-byte length.
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_ITEM = struct.Struct("<HHI")  # (FFFE,E000) Item and its length
_SHORT = struct.Struct("<HH2sH")
_LONG = struct.Struct("<HH2sHI")


def element(tag: int, vr: str, value: bytes) -> bytes:
    """One data element: tag, VR, length and ``value`` (of even length, as :func:`text` and :func:`uid` give).

    A value too long for a 2-byte length is written as UN, as pydicom does (with its warning).
    """
    if vr not in _LONG_VRS and len(value) > 0xFFFF:
        log.warning("the value of (%04X,%04X) is %d bytes, too long for %s; written as UN", tag >> 16,
                    tag & 0xFFFF, len(value), vr)
        vr = "UN"
    if vr in _LONG_VRS:
        return _LONG.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), 0, len(value)) + value
    return _SHORT.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), len(value)) + value


def text(value: str) -> bytes:
    """A text value (CS, IS, DS, LO...) in ASCII, padded with a space to even length."""
    data = value.encode("ascii")
    return data + b" " if len(data) % 2 else data


def uid(value: str) -> bytes:
    """A UI value, padded with a NUL to even length."""
    data = str(value).encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def unsigned(vr: str, *values: int) -> bytes:
    """A US or UL value."""
    return struct.pack(f"<{len(values)}{'H' if vr == 'US' else 'I'}", *values)


def encoded(ds: Dataset) -> bytes:
    """The elements of ``ds`` as pydicom writes them in explicit VR little endian (an item's body)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _items(items: Iterable[bytes]) -> bytes:
    return b"".join(_ITEM.pack(0xFFFE, 0xE000, len(body)) + body for body in items)


def sequence(tag: int, items: Iterable[bytes]) -> bytes:
    """A sequence element of items of defined length, each given as the bytes of its elements."""
    return element(tag, "SQ", _items(items))


def set_raw_sequence(ds: Dataset, tag: int, items: Iterable[bytes]) -> None:
    """Put the sequence of :func:`sequence` in ``ds`` as a raw element, in place of any; see :func:`keep_raw`."""
    value = _items(items)
    ds[tag] = RawDataElement(Tag(tag), "SQ", len(value), value, 0, False, True, True, False)


def keep_raw(ds: Dataset) -> None:
    """Declare ``ds`` already in explicit VR little endian, so that pydicom writes its raw elements as they are.

    pydicom's writer otherwise corrects a new dataset's ambiguous VRs (OB or OW, US or SS) first, and in
    doing so parses every raw sequence in it or below it, to encode it again. Declare the dataset holding a
    raw sequence and each one above it, once their elements are set; the ambiguous VRs of the dataset's own
    elements are settled here as the writer would have (the items of its other sequences are still
    corrected by the writer).
    """
    for elem in ds.elements():
        if not elem.is_raw and elem.VR and " or " in elem.VR:
            correct_ambiguous_vr_element(elem, ds, True)
    ds.set_original_encoding(False, True, ds._character_set)
