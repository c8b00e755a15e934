"""The completeness gate: a DICOM series runs only when it is one whole volume.

Every door's DICOM input passes here before its algorithm runs (design.md: a series that is not whole is
never run silently). The series must be one geometry (one orientation, size and pixel spacing, one frame of
reference, one series, no position or SOPInstanceUID twice: the checks of the series reader,
:func:`pipeline.writers.series.read_series`, with its messages), and on top of that a volume: positions
evenly spaced with no gap where slices are missing, and the image count the images themselves announce.

The gate streams (issue 8, defect 10: it held every header of a series at once, ~200 MB for 2,000
instances). Each image is reduced to a :class:`Geometry`, a few numbers and UIDs read from the tags up to
:data:`LAST_TAG`, and :func:`problems_of` keeps only a UID, a name and an offset per image. The DICOM node
builds the records from the headers it parses as instances arrive, so that completing a series reads no
file; :func:`problems` reads a folder once, one header at a time.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import struct
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidInput

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.tag import BaseTag

log = logging.getLogger(__name__)

__all__ = ["LAST_TAG", "TAGS", "Geometry", "check", "past_last_tag", "problems", "problems_of", "summary"]

# What a Geometry is read from: keyword -> (tag, VR). A header parsed up to LAST_TAG (PixelSpacing) has all.
_ELEMENTS = {
    "SOPInstanceUID": (0x00080018, "UI"),
    "Modality": (0x00080060, "CS"),
    "SeriesInstanceUID": (0x0020000E, "UI"),
    "ImagePositionPatient": (0x00200032, "DS"),
    "ImageOrientationPatient": (0x00200037, "DS"),
    "FrameOfReferenceUID": (0x00200052, "UI"),
    "ImagesInAcquisition": (0x00201002, "IS"),
    "NumberOfFrames": (0x00280008, "IS"),
    "Rows": (0x00280010, "US"),
    "Columns": (0x00280011, "US"),
    "PixelSpacing": (0x00280030, "DS"),
}
TAGS: tuple[int, ...] = tuple(sorted(tag for tag, _ in _ELEMENTS.values()))
LAST_TAG = TAGS[-1]

# The series reader's tolerances and its list of objects that are not images, copied rather than imported:
# pipeline.writers.series loads SimpleITK, which costs the service process ~90 MB of RSS and 0.1 s to gate
# a series (issue 8, defect 10). tests/test_gate.py checks that the copies stay equal.
_ORIENTATION_TOLERANCE = 1e-4  # direction cosines differ in their last written digits between slices
_DUPLICATE_TOLERANCE = 1e-2  # mm along the normal: closer than this is the same slice sent twice
_SPACING_TOLERANCE = 1e-4  # mm: PixelSpacing written with different digits is still one spacing
_NOT_IMAGES = frozenset({"RTSTRUCT", "SEG", "RTDOSE", "RTPLAN", "RTRECORD", "REG", "SR", "KO", "PR"})

# A step this much longer than the usual one is not rounding: slices are missing or spacing changes.
_STEP_TOLERANCE = 0.05  # relative
_AXES = ("x", "y", "z")


def past_last_tag(tag: BaseTag | int, vr: str | None, length: int) -> bool:
    """A ``stop_when`` for pydicom's ``read_dataset``/``read_partial``: True past :data:`LAST_TAG`."""
    return tag > LAST_TAG


@dataclass(frozen=True, slots=True)
class Geometry:
    """What the gate needs of one image of a series, read from its header; the dataset is not kept.

    Build one with :meth:`from_dataset` (a header parsed up to :data:`LAST_TAG` is enough) or
    :meth:`from_file`; both answer None for an object that is not an image.

    Parameters
    ----------
    name
        How messages name the image: its file name, or its SOPInstanceUID.
    sop_instance_uid, series_instance_uid, frame_of_reference_uid
        The image's UIDs; ``""`` where the header has none (the gate refuses that).
    modality
        Modality, ``""`` if absent.
    rows, columns
        Image size; ``columns`` is 0 if the header has none.
    frames
        NumberOfFrames, 1 when absent or empty.
    orientation
        ImageOrientationPatient (6 floats), or None where the header has no six values.
    position
        ImagePositionPatient (3 floats, mm), or None where the header has no three values.
    pixel_spacing
        PixelSpacing (2 floats, mm, row spacing first), or None where the header has no two values.
    images_in_acquisition
        ImagesInAcquisition, or None if absent or unreadable.

    Raises
    ------
    TypeError
        If a field has the wrong type.
    ValueError
        If a vector has the wrong length or a value that is not finite, or a count is negative.
    """

    name: str
    sop_instance_uid: str
    series_instance_uid: str
    modality: str
    rows: int
    columns: int
    frames: int
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    frame_of_reference_uid: str
    images_in_acquisition: int | None = None

    def __post_init__(self) -> None:
        for key in ("name", "sop_instance_uid", "series_instance_uid", "modality", "frame_of_reference_uid"):
            if not isinstance(getattr(self, key), str):
                raise TypeError(f"Geometry {key} must be a str, not {type(getattr(self, key)).__name__}")
        if not self.name:
            raise ValueError("Geometry name must not be empty: messages name the image by it")
        for key, least in (("rows", 0), ("columns", 0), ("frames", 1), ("images_in_acquisition", 0)):
            value = getattr(self, key)
            if value is None and key == "images_in_acquisition":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"Geometry {key} must be an int, not {type(value).__name__}")
            if value < least:
                raise ValueError(f"Geometry {key} must be at least {least}, not {value}")
            object.__setattr__(self, key, int(value))
        for key, length in (("orientation", 6), ("position", 3), ("pixel_spacing", 2)):
            value = getattr(self, key)
            if value is None:
                continue
            try:
                floats = tuple(float(v) for v in value)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"Geometry {key} must be {length} numbers, not {value!r}") from exc
            if len(floats) != length or not all(math.isfinite(v) for v in floats):
                raise ValueError(f"Geometry {key} must be {length} finite numbers, not {value!r}")
            object.__setattr__(self, key, floats)

    @classmethod
    def from_dataset(cls, ds: Dataset, *, name: str | None = None) -> Geometry | None:
        """The record of one image's header, or None for an object that is not an image.

        Parameters
        ----------
        ds
            The header; the tags of :data:`TAGS` are all that is read, so a header parsed with
            ``stop_when=past_last_tag`` will do, and pixel data is never touched.
        name
            How messages name the image; by default its SOPInstanceUID.

        Returns
        -------
        Geometry or None
            None if the object has no Rows, or is an RTSTRUCT, SEG, RTDOSE, RTPLAN, RTRECORD, REG, SR, KO
            or PR: such objects can sit in a series folder but are not slices of it.

        Raises
        ------
        InvalidInput
            If ImageOrientationPatient, ImagePositionPatient, PixelSpacing or NumberOfFrames holds text
            that is not a (finite) number. The series reader refuses (or fails on) such an image too, but
            only when it comes to it; here the refusal comes as the header is read.
        """
        header = _Header(ds)
        rows = header.get("Rows")
        modality = str(header.get("Modality") or "")
        if rows is None or modality in _NOT_IMAGES:
            return None
        sop_instance_uid = str(header.get("SOPInstanceUID") or "")
        name = name or sop_instance_uid or "(no SOPInstanceUID)"
        try:
            frames = int(header.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError) as exc:  # pydicom converts IS on access and raises on other text
            raise InvalidInput(f"series image {name} has an unreadable NumberOfFrames: {exc}") from exc
        try:
            announced = header.get("ImagesInAcquisition")
            count = None if announced in (None, "") else int(announced)
        except (TypeError, ValueError):
            count = None  # an unreadable count promises nothing
        return cls(
            name=name,
            sop_instance_uid=sop_instance_uid,
            # Shared by every image of a series: one copy for all the records a node holds.
            series_instance_uid=sys.intern(str(header.get("SeriesInstanceUID") or "")),
            modality=sys.intern(modality),
            rows=int(rows),
            columns=int(header.get("Columns") or 0),
            frames=max(frames, 1),  # 0 or less is no frame count at all; the reader took it as one frame
            orientation=_floats(header, "ImageOrientationPatient", 6, name),
            position=_floats(header, "ImagePositionPatient", 3, name),
            pixel_spacing=_floats(header, "PixelSpacing", 2, name),
            frame_of_reference_uid=sys.intern(str(header.get("FrameOfReferenceUID") or "")),
            images_in_acquisition=count if count is None or count >= 0 else None,
        )

    @classmethod
    def from_file(cls, path: Path) -> Geometry | None:
        """The record of the image in file ``path``, read up to :data:`LAST_TAG`; None if not an image.

        Raises
        ------
        pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError
            If the file is not DICOM or cannot be read.
        InvalidInput
            As :meth:`from_dataset`.
        """
        return cls.from_dataset(_read_header(path), name=Path(path).name)


def problems_of(records: Iterable[Geometry], *, series_dir: Path | None = None) -> list[str]:
    """What keeps a series from being one whole volume, from its images' records alone; empty when whole.

    The records are consumed one by one; per image only its SOPInstanceUID, name and offset along the
    normal are kept. Their order matters only for messages: the first record is the one every other image
    is compared with, as the first file (by name) is in :func:`pipeline.writers.series.read_series`.

    Parameters
    ----------
    records
        One per image; objects that are not images have none (:meth:`Geometry.from_dataset`).
    series_dir
        The series folder, named when the images belong to several series.

    Returns
    -------
    list of str
        Gaps ("gap between z=... and z=...: N slice(s) missing"), uneven steps and images announced by
        ImagesInAcquisition that are not there; empty when the series is whole or has no image at all.

    Raises
    ------
    InvalidInput
        When the series is not one geometry at all (several series, mixed orientations, sizes, pixel spacings
        or frames of reference, a position, orientation, spacing or frame of reference missing, a
        multi-frame image, a SOPInstanceUID or a position twice): running it is never an option.
    """
    volume = _Volume()
    for record in records:
        volume.add(record)
    return volume.verdict(series_dir)


def problems(series_dir: Path) -> list[str]:
    """What keeps the series in ``series_dir`` from being one whole volume; empty when it is.

    Each file is read once, up to :data:`LAST_TAG`, and dropped as soon as its :class:`Geometry` is built.
    Hidden files and files that are not DICOM are skipped; a folder with no image (only an RTSTRUCT, say)
    has nothing to check.

    Raises
    ------
    InvalidInput
        When the series is not one geometry at all (mixed orientations or sizes, another frame of
        reference, a position twice): running it is never an option. See :func:`problems_of`.
    """
    series_dir = Path(series_dir)
    return problems_of(_read_records(series_dir), series_dir=series_dir)


def summary(found: list[str], most: int = 3) -> str:
    """The problems in one line, the first few named (an uneven series can have dozens)."""
    text = "; ".join(found[:most])
    return text + (f"; and {len(found) - most} more" if len(found) > most else "")


def check(series_dir: Path) -> None:
    """Raise InvalidInput naming the problems of the series, or return when it is whole."""
    found = problems(series_dir)
    if found:
        raise InvalidInput("incomplete series: " + summary(found))


class _Volume:
    """The gate's state while records stream in: the first image's geometry, and a little per image.

    A refusal is kept, not raised, until every record is in: "several series" is the reader's first check,
    over all images, and wins over any other refusal.
    """

    def __init__(self) -> None:
        self.first: Geometry | None = None
        self.series_uids: set[str] = set()
        self.refusal: InvalidInput | None = None
        self.orientation: tuple[float, ...] = ()
        self.normal = np.zeros(3)
        self.names: list[str] = []
        self.offsets: list[float] = []
        self.seen: dict[str, int] = {}  # SOPInstanceUID -> index in names
        self.announced: set[int] = set()
        self.all_announce = True

    def add(self, record: Geometry) -> None:
        self.series_uids.add(record.series_instance_uid)
        if self.refusal is not None:
            return  # the verdict is made; only the series count can still change the message
        try:
            if self.first is None:
                self._begin(record)
            self._compare(record)
        except InvalidInput as exc:
            self.refusal = exc
            self.names, self.offsets, self.seen = [], [], {}  # given back: nothing more is needed

    def _begin(self, first: Geometry) -> None:
        cosines = _vector(first, "ImageOrientationPatient", first.orientation)
        _, _, self.normal = slice_axes(cosines, first.name)
        spacing = _vector(first, "PixelSpacing", first.pixel_spacing)
        if min(spacing) <= 0:
            raise InvalidInput(f"series image {first.name} has a PixelSpacing that is not positive: "
                               f"{list(spacing)}")
        self.first = first
        self.orientation = cosines

    def _compare(self, record: Geometry) -> None:
        # Every image must agree with the first; name the first that does not, and how (read_series' order).
        first = self.first
        assert first is not None and first.pixel_spacing is not None
        orientation = _vector(record, "ImageOrientationPatient", record.orientation)
        if not _close(orientation, self.orientation, _ORIENTATION_TOLERANCE):
            raise InvalidInput(f"series has mixed orientations: {record.name} has ImageOrientationPatient "
                               f"{list(orientation)}, {first.name} has {list(self.orientation)}")
        if (record.rows, record.columns) != (first.rows, first.columns):
            raise InvalidInput(f"series has mixed image sizes: {record.name} is {record.rows}x{record.columns}, "
                               f"{first.name} is {first.rows}x{first.columns}")
        spacing = _vector(record, "PixelSpacing", record.pixel_spacing)
        if not _close(spacing, first.pixel_spacing, _SPACING_TOLERANCE):
            raise InvalidInput(f"series has mixed pixel spacings: {record.name} has {list(spacing)}, "
                               f"{first.name} has {list(first.pixel_spacing)}")
        if record.frame_of_reference_uid != first.frame_of_reference_uid:
            raise InvalidInput(f"series has mixed frames of reference: {record.name} and {first.name}")
        if record.frames > 1:
            raise InvalidInput(f"series image {record.name} is multi-frame; "
                               "only series of single-frame images are supported")
        uid = record.sop_instance_uid
        if not uid:
            raise InvalidInput(f"series image {record.name} has no SOPInstanceUID")
        if uid in self.seen:
            raise InvalidInput(f"series has SOPInstanceUID {uid} twice ({self.names[self.seen[uid]]} and "
                               f"{record.name})")
        position = _vector(record, "ImagePositionPatient", record.position)
        self.seen[uid] = len(self.names)
        self.names.append(record.name)
        # The same arithmetic as the reader's (a numpy dot on the position), so offsets agree to the bit.
        self.offsets.append(float(np.array(position) @ self.normal))
        if record.images_in_acquisition is None:
            self.all_announce = False
        else:
            self.announced.add(record.images_in_acquisition)

    def verdict(self, series_dir: Path | None) -> list[str]:
        if not self.series_uids:
            return []  # no image at all: an RTSTRUCT or other object has no volume to check
        if len(self.series_uids) > 1:
            uids = sorted(self.series_uids)
            where = f"series folder {series_dir} holds" if series_dir is not None else "the images belong to"
            raise InvalidInput(f"{where} {len(uids)} series ({', '.join(uids)}); send one series per job")
        if self.refusal is not None:
            raise self.refusal
        assert self.first is not None
        if not self.first.frame_of_reference_uid:
            raise InvalidInput(f"series image {self.first.name} has no FrameOfReferenceUID")
        # Python's sort is stable, as the reader's argsort(kind="stable"): equal offsets keep file order.
        order = sorted(range(len(self.offsets)), key=self.offsets.__getitem__)
        for a, b in itertools.pairwise(order):
            if self.offsets[b] - self.offsets[a] < _DUPLICATE_TOLERANCE:
                raise InvalidInput(f"series has two slices at the same position, {self.offsets[a]:.3f} mm along "
                                   f"the normal: {self.names[a]} and {self.names[b]}")
        offsets = np.array([self.offsets[k] for k in order])
        found = _gaps(offsets, _axis_name(self.normal))
        # Only a count every image agrees on is a promise; scanners differ on what an acquisition spans.
        if self.all_announce and len(self.announced) == 1:
            announced = next(iter(self.announced))
            if announced > len(offsets):
                found.append(f"{len(offsets)} of the {announced} images announced (ImagesInAcquisition) "
                             "have arrived")
        return found


def slice_axes(cosines: Sequence[float], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The row and column directions of an ImageOrientationPatient, normalised, and the slice normal.

    Raises
    ------
    InvalidInput
        If the six values are not two orthogonal unit vectors (naming the image ``name``).
    """
    orientation = np.array([float(v) for v in cosines])
    row_direction, column_direction = orientation[:3], orientation[3:]
    if (abs(np.linalg.norm(row_direction) - 1) > 1e-3 or abs(np.linalg.norm(column_direction) - 1) > 1e-3
            or abs(row_direction @ column_direction) > 1e-3):
        raise InvalidInput(f"series image {name} has an ImageOrientationPatient that is not two "
                           f"orthogonal unit vectors: {orientation.tolist()}")
    row_direction = row_direction / np.linalg.norm(row_direction)
    column_direction = column_direction / np.linalg.norm(column_direction)
    return row_direction, column_direction, np.cross(row_direction, column_direction)


def _gaps(offsets: np.ndarray, axis: str) -> list[str]:
    """Gaps and uneven steps between sorted offsets along the normal."""
    found: list[str] = []
    if len(offsets) < 3:
        return found
    steps = np.diff(offsets)
    step = _usual_step(steps)
    for k, gap in enumerate(steps):
        if abs(gap - step) <= _STEP_TOLERANCE * step:
            continue
        missing = gap / step - 1
        where = f"between {axis}={offsets[k]:.1f} and {axis}={offsets[k + 1]:.1f}"
        if gap > step and abs(missing - round(missing)) <= _STEP_TOLERANCE * max(1.0, missing):
            n = int(round(missing))
            found.append(f"gap {where}: {n} slice{'s' if n > 1 else ''} missing")
        else:
            found.append(f"uneven spacing {where}: {gap:.2f} mm where the series steps {step:.2f} mm")
    return found


def _usual_step(steps: np.ndarray) -> float:
    # The most common step (rounded to 0.01 mm) is the series' own; a median would be pulled by gaps.
    counts = Counter(np.round(steps, 2).tolist())
    return float(max(counts.items(), key=lambda kv: (kv[1], -kv[0]))[0])


def _axis_name(normal: np.ndarray) -> str:
    k = int(np.argmax(np.abs(normal)))
    return _AXES[k] if abs(normal[k]) > 0.999 else "position"


def _vector(record: Geometry, keyword: str, value: tuple[float, ...] | None) -> tuple[float, ...]:
    if value is None:
        raise InvalidInput(f"series image {record.name} has no valid {keyword}; every image needs one")
    return value


def _close(a: Sequence[float], b: Sequence[float], tolerance: float) -> bool:
    # np.allclose(a, b, atol=tolerance, rtol=0) for finite values, without making two arrays per image.
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def _floats(header: _Header, keyword: str, length: int, name: str) -> tuple[float, ...] | None:
    """The ``length`` numbers of a DS element; None if absent or of another length (the gate says so)."""
    try:
        value: Any = header.get(keyword)
    except (TypeError, ValueError) as exc:  # pydicom converts DS on access and raises on other text
        raise InvalidInput(f"series image {name} has an unreadable {keyword}: {exc}") from exc
    if value is None or isinstance(value, (str, bytes, float, int)):
        return None  # absent, empty, or one value where the standard wants several
    if len(value) != length:
        return None
    try:
        floats = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"series image {name} has an unreadable {keyword}: {value!r}") from exc
    if not all(math.isfinite(v) for v in floats):
        raise InvalidInput(f"series image {name} has an unreadable {keyword}: {value!r}")
    return floats


class _Header:
    """``ds.get(keyword)`` for the tags of a Geometry, decoding raw elements of the usual form itself.

    pydicom decodes an element on first access at ~15 us each, which was a third of the gate's time per file
    (issue 8, defect 10). An element still raw (as read, never accessed) whose value is of the plain form
    is decoded here to what pydicom would give: one text value (UI, CS) without trailing spaces and NULs, an
    IS that int() reads, DS values that float() reads and that are finite, a US of two bytes. Anything else
    (several text values, an odd VR, text that is no number, an element already decoded) goes to pydicom, so
    the values, the warnings and the messages for odd headers stay pydicom's.
    """

    __slots__ = ("ds",)

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def get(self, keyword: str, default: Any = None) -> Any:
        from pydicom.dataelem import RawDataElement

        tag, vr = _ELEMENTS[keyword]
        elem = self.ds.get_item(tag)
        if elem is None:
            return default
        if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes) and elem.VR in (None, vr):
            value = self._decode(elem.value, vr, elem.is_little_endian)
            if value is not None:
                return value
        return self.ds.get(keyword, default)

    @staticmethod
    def _decode(raw: bytes, vr: str, little_endian: bool) -> Any:
        """The value pydicom would give for ``raw``, or None to let pydicom decode it."""
        if vr == "US":
            return struct.unpack("<H" if little_endian else ">H", raw)[0] if len(raw) == 2 else None
        text = raw.decode("latin-1").rstrip(" \x00")  # pydicom's default encoding and padding for these VRs
        if vr == "DS":
            try:
                values = [float(v) for v in text.split("\\")]
            except ValueError:
                return None
            if not all(math.isfinite(v) for v in values):
                return None
            return values[0] if len(values) == 1 else values
        if "\\" in text:
            return None
        if vr == "IS":
            if not text.strip():
                return text
            try:
                return int(text)
            except ValueError:
                return None
        return text  # UI, CS


def _read_header(path: Path) -> Dataset:
    """The header of DICOM file ``path`` up to :data:`LAST_TAG`, only the tags of :data:`TAGS` decoded.

    read_partial with a stop: measured on 512x512 CT files, 1.1 to 1.3x faster than
    ``dcmread(stop_before_pixels=True)`` with or without ``specific_tags``, which parse on to the pixel
    data; the more a header holds after PixelSpacing (private groups, sequences), the more it saves.
    """
    from pydicom.filereader import read_partial  # pydicom only for DICOM jobs: the folder door stays light

    tags: list[BaseTag | int] = list(TAGS)
    with open(path, "rb") as fh:
        return read_partial(fh, stop_when=past_last_tag, specific_tags=tags)


def _files(folder: Path) -> Iterator[Path]:
    """Files under ``folder`` in the order of ``sorted(folder.rglob("*"))``, hidden files left out.

    One folder's names at a time, not a Path for every file of the tree at once. Like rglob, it does not
    follow links to folders; a folder that does not exist (or is a file) has no files.
    """
    try:
        with os.scandir(folder) as it:
            entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
    except (NotADirectoryError, FileNotFoundError):
        return
    for name, is_dir in entries:
        path = folder / name
        if is_dir:
            yield from _files(path)
        elif not name.startswith(".") and path.is_file():
            yield path


def _read_records(series_dir: Path) -> Iterator[Geometry]:
    from pydicom.errors import InvalidDicomError

    # What the series reader takes for "not DICOM, skip it".
    not_dicom = (InvalidDicomError, OSError, ValueError, EOFError)
    for path in _files(series_dir):
        try:
            ds = _read_header(path)
        except not_dicom as exc:
            log.debug("series %s: %s is not DICOM (%s), skipped", series_dir, path.name, type(exc).__name__)
            continue
        record = Geometry.from_dataset(ds, name=path.name)
        del ds  # the header goes now: only the record is kept, and only until problems_of has read it
        if record is None:
            log.debug("series %s: %s is not an image, skipped", series_dir, path.name)
            continue
        yield record
