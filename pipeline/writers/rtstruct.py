"""Binary masks on a DICOM series to an RT Structure Set that a planning system accepts (issue 5).

Contours come from OpenCV's ``findContours``, traced on a doubled grid so that they run through the
midpoints of the pixel edges between inside and outside (the marching-squares line) rather than through
the centres of the boundary pixels: a planning system that fills a contour by testing pixel centres then
gets back exactly the mask, where pixel-centre contours lose half a pixel on every side. Holes are written
as separate CLOSED_PLANAR contours on the same slice, which planning systems XOR (the common practice;
keyholes would need a cut that shows as a sliver in some viewers). Each contour maps to patient coordinates
through its own slice's position, so uneven spacing, any orientation and any patient position come out on
the right slice. The file is written with pydicom: rt-utils writes files that dciodvfy flags, and highdicom
has no RT Structure Set.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    generate_uid,
)

from pipeline.errors import InvalidInput
from pipeline.writers import _encoding as enc
from pipeline.writers.check import check_rtstruct
from pipeline.writers.series import Series, align_mask, load_mask, read_series

log = logging.getLogger(__name__)

__all__ = [
    "PALETTE",
    "RT_ROI_INTERPRETED_TYPES",
    "Structure",
    "convert_nifti",
    "mask_contours",
    "resolve_structures",
    "write_rtstruct",
]

# RT ROI Interpreted Type (3006,00A4), defined terms of PS3.3 C.8.8.8.
RT_ROI_INTERPRETED_TYPES = frozenset({
    "EXTERNAL", "PTV", "CTV", "GTV", "TREATED_VOLUME", "IRRAD_VOLUME", "OAR", "BOLUS", "AVOIDANCE", "ORGAN",
    "MARKER", "REGISTRATION", "ISOCENTER", "CONTRAST_AGENT", "CAVITY", "BRACHY_CHANNEL", "BRACHY_ACCESSORY",
    "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD", "SUPPORT", "FIXATION", "DOSE_REGION", "CONTROL", "DOSE_MEASUREMENT",
})
# Colours for structures the mapping leaves without one, given in mask order so that they differ in a file.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 128, 0), (0, 200, 255), (255, 0, 255), (0, 220, 0), (255, 230, 0), (160, 80, 255),
    (255, 0, 0), (0, 128, 255), (0, 255, 160), (255, 120, 180), (140, 90, 40), (128, 128, 128),
)
_EXTERNAL_NAMES = {"body", "external", "skin", "outline", "patient", "bodyoutline"}
_TARGET_PREFIXES = ("gtv", "ctv", "ptv")
_MAPPING_KEYS = {"name", "color", "type"}
# The RT Referenced Study Sequence names the study by the (retired) Detached Study Management SOP Class,
# as planning systems write and expect it; dciodvfy accepts it.
_STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
# A run of collinear marching-squares points is one edge; this tolerance (pixels) removes only those.
_SIMPLIFY = 0.1

ColorMap = Mapping[str, Sequence[int]] | Callable[[int], Sequence[float]]


@dataclass(frozen=True)
class Structure:
    """How one mask appears in the RTSTRUCT (and SEG).

    Parameters
    ----------
    key
        The mask's own name (a file stem such as ``lung_left``).
    name
        ROI Name written for the planning system (``Lung_L``).
    color
        ROI Display Color, RGB 0-255.
    type
        RT ROI Interpreted Type (ORGAN, EXTERNAL, PTV...).
    """

    key: str
    name: str
    color: tuple[int, int, int]
    type: str


def _normalised(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _default_type(key: str, name: str) -> str:
    for candidate in (_normalised(key), _normalised(name)):
        if candidate in _EXTERNAL_NAMES:
            return "EXTERNAL"
        for prefix in _TARGET_PREFIXES:
            if candidate.startswith(prefix):
                return prefix.upper()
    return "ORGAN"


def _color(key: str, value: Any) -> tuple[int, int, int]:
    try:
        rgb = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb) or any(isinstance(v, float) and v != int(v)
                                                                     for v in value):
        raise InvalidInput(f"structure '{key}': color must be three integers 0-255 [r, g, b], not {value!r}")
    return (rgb[0], rgb[1], rgb[2])


def resolve_structures(
    keys: Sequence[str],
    structures: Mapping[str, Mapping[str, Any]] | None = None,
    color_map: ColorMap | None = None,
) -> dict[str, Structure]:
    """Decide each mask's ROI name, colour and interpreted type.

    Parameters
    ----------
    keys
        The masks' names, in the order they will be written.
    structures
        Optional mapping from a mask name to ``{name: str, color: [r, g, b], type: str}``, each entry
        optional (issue 5 point 4: ``lungs: {name: Lungs, color: [0, 255, 255], type: ORGAN}``).
    color_map
        PlatiPy's ``convert_nifti`` argument: a dict of mask name to ``[r, g, b]``, or a matplotlib-style
        colormap called with a number 0-255 and returning floats 0-1.

    Returns
    -------
    dict of str to Structure
        In the order of ``keys``. Unmapped masks keep their name, take a colour from :data:`PALETTE` and
        are ORGAN, or EXTERNAL for a name like body or external, or GTV/CTV/PTV for names starting so.

    Raises
    ------
    InvalidInput
        For an entry with an unknown key, a name that DICOM cannot hold, a colour that is not three
        integers 0-255, an unknown interpreted type, or two masks mapped to the same name.
    """
    structures = structures or {}
    resolved: dict[str, Structure] = {}
    for i, key in enumerate(keys):
        entry = structures.get(key) or {}
        if not isinstance(entry, Mapping):
            raise InvalidInput(f"structure mapping for '{key}' must be a mapping of name, color, type")
        unknown = set(entry) - _MAPPING_KEYS
        if unknown:
            raise InvalidInput(f"structure mapping for '{key}' has unknown keys {sorted(unknown)}; "
                               f"expected {sorted(_MAPPING_KEYS)}")
        name = str(entry.get("name", key)).strip()
        # ROI Name is LO: 64 characters, no backslash (the value separator) and no control characters.
        if not name or len(name) > 64 or "\\" in name or any(ord(c) < 32 for c in name):
            raise InvalidInput(f"structure '{key}': ROI name {name!r} must be 1-64 characters without "
                               "backslash or control characters")
        if "color" in entry:
            color = _color(key, entry["color"])
        elif isinstance(color_map, Mapping) and key in color_map:
            color = _color(key, color_map[key])
        elif callable(color_map):
            # PlatiPy picks a colormap entry from a hash of the name; crc32 keeps it the same every run.
            rgba = color_map(zlib.crc32(key.encode()) % 256)
            color = _color(key, [round(float(c) * 255) for c in list(rgba)[:3]])
        else:
            color = PALETTE[i % len(PALETTE)]
        roi_type = str(entry.get("type", _default_type(key, name))).strip().upper()
        if roi_type not in RT_ROI_INTERPRETED_TYPES:
            raise InvalidInput(f"structure '{key}': RT ROI Interpreted Type {roi_type!r} is not one of "
                               f"{', '.join(sorted(RT_ROI_INTERPRETED_TYPES))}")
        resolved[key] = Structure(key, name, color, roi_type)
    names = [s.name for s in resolved.values()]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidInput(f"structures map several masks to the ROI name(s) {twice}; "
                           "ROI names must be unique")
    return resolved


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Contours of a 2-D binary mask, outer boundaries and holes alike, in pixel coordinates.

    Parameters
    ----------
    mask
        Bool array ``(rows, columns)``.

    Returns
    -------
    list of numpy.ndarray
        One ``(n, 2)`` float array of ``(column, row)`` points per contour (pixel centres are integers).
        Each runs through the midpoints of the edges between inside and outside pixels, so that filling
        the contours with the even-odd rule by pixel-centre test gives back ``mask`` exactly.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return []
    columns = np.flatnonzero(mask.any(axis=0))
    r0, c0 = rows[0], columns[0]
    sub = mask[r0:rows[-1] + 1, c0:columns[-1] + 1]
    # On a grid of twice the resolution (and a margin), pixel (r, c) sits at (2r + 2, 2c + 2) and its
    # corners at odd coordinates; dilating makes each pixel cover its closed square, so findContours
    # traces the pixel edges, and keeping only the points with one odd coordinate leaves the edge midpoints.
    doubled = np.zeros((2 * sub.shape[0] + 3, 2 * sub.shape[1] + 3), dtype=np.uint8)
    doubled[2:-1:2, 2:-1:2] = sub
    doubled = cv2.dilate(doubled, np.ones((3, 3), dtype=np.uint8))
    found, _ = cv2.findContours(doubled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    contours = []
    for contour in found:
        midpoints = contour[(contour[:, 0, 0] + contour[:, 0, 1]) % 2 == 1]
        simple = cv2.approxPolyDP(midpoints, 2 * _SIMPLIFY, True)[:, 0, :]
        points = simple.astype(float) / 2 - 1
        points[:, 0] += c0
        points[:, 1] += r0
        contours.append(points)
    return contours


def _word(text: bytes) -> int:
    return int.from_bytes(text, "little")


# _ds_bytes writes each number as 16 bytes, four little-endian 32-bit words each looked up whole: the sign;
# the thousands of the integer part; its last three digits and the point; three decimals and the separator.
# It then keeps only the bytes the number uses (no leading zeros, no trailing zeros in the decimals, no
# point for a whole number, no sign for a positive one), in one numpy pass for all the numbers of a contour
# where Python's str() of each number took a third of the RTSTRUCT's time on a large CT (issue 10).
_SIGN = _word(b"   -")
_THOUSANDS = np.array([_word(b"%03d " % i) for i in range(1000)], dtype=np.uint32)
_UNITS = np.array([_word(b"%03d." % i) for i in range(1000)], dtype=np.uint32)
_DECIMALS = np.array([_word(b"%03d\\" % i) for i in range(1000)], dtype=np.uint32)
# Bytes kept (1) of each word, by the number of digits of the integer part (1 to 6) or by the decimals;
# _LAST keeps a word's fourth byte: the sign, the point or the separator.
_LAST = _word(b"\0\0\0\1")
_KEEP_THOUSANDS = np.array([_word(bytes([j >= 6 - n for j in range(3)] + [0])) for n in range(7)], dtype=np.uint32)
_KEEP_UNITS = np.array([_word(bytes([j >= 3 - n for j in range(3)] + [0])) for n in range(7)], dtype=np.uint32)
_KEEP_DECIMALS = np.array([_word(bytes([j < len((b"%03d" % i).rstrip(b"0")) for j in range(3)] + [1]))
                           for i in range(1000)], dtype=np.uint32)
_TENS = 10 ** np.arange(1, 6)


def _ds_bytes(points: np.ndarray) -> bytes:
    """``x\\y\\z\\...`` with 0.001 mm resolution, padded to even length, as a DS value's bytes."""
    thousandths = np.rint(np.asarray(points, dtype=float).ravel() * 1000).astype(np.int64)
    if thousandths.size == 0 or np.abs(thousandths).max() >= 10**9:  # a kilometre: never a patient's
        text = "\\".join(map(str, np.round(points, 3).ravel().tolist())).encode("ascii")
        return text + b" " if len(text) % 2 else text
    whole, fraction = np.divmod(np.abs(thousandths), 1000)
    thousands, units = np.divmod(whole, 1000)
    digits = np.searchsorted(_TENS, whole, side="right") + 1
    words = np.empty((thousandths.size, 4), dtype=np.uint32)
    keep = np.empty_like(words)
    words[:, 0], keep[:, 0] = _SIGN, (thousandths < 0) * _LAST
    words[:, 1], keep[:, 1] = _THOUSANDS[thousands], _KEEP_THOUSANDS[digits]
    words[:, 2], keep[:, 2] = _UNITS[units], _KEEP_UNITS[digits] | (fraction > 0) * _LAST
    words[:, 3], keep[:, 3] = _DECIMALS[fraction], _KEEP_DECIMALS[fraction]
    keep[-1, 3] &= ~np.uint32(_LAST)  # no separator after the last number
    text = words.view(np.uint8)[keep.view(bool)].tobytes()
    return text + b" " if len(text) % 2 else text


def _contour_item(series: Series, k: int, points: np.ndarray, number: int) -> bytes:
    """One item of the Contour Sequence, as bytes: a large CT's RTSTRUCT has thousands, which pydicom took
    most of the file's time to write element by element (issue 10)."""
    image = (enc.element(0x00081150, "UI", enc.uid(series.slices[k].sop_class_uid))  # ReferencedSOPClassUID
             + enc.element(0x00081155, "UI", enc.uid(series.slices[k].sop_instance_uid)))  # ...SOPInstanceUID
    return (enc.sequence(0x30060016, [image])  # ContourImageSequence
            + enc.element(0x30060042, "CS", enc.text("CLOSED_PLANAR"))  # ContourGeometricType
            + enc.element(0x30060046, "IS", enc.text(str(len(points))))  # NumberOfContourPoints
            + enc.element(0x30060048, "IS", enc.text(str(number)))  # ContourNumber
            # pydicom would turn each number into a DSfloat object (about 1 us each, most of rt-utils' time
            # on a large CT); the value is formatted once here, all the numbers of the contour at once.
            + enc.element(0x30060050, "DS", _ds_bytes(points)))  # ContourData


def _structure_contours(series: Series, mask: np.ndarray) -> list[bytes]:
    items: list[bytes] = []
    for k in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)):
        for contour in mask_contours(mask[k]):
            points = series.pixel_to_patient(int(k), contour[:, 0], contour[:, 1])
            items.append(_contour_item(series, int(k), points, len(items) + 1))
    return items


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")


# Patient and General Study modules: copied from the source so the RTSTRUCT files under the same patient
# and study; the type 2 ones are written empty when the source lacks them.
_COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")
_COPIED_OPTIONAL = ("SpecificCharacterSet", "IssuerOfPatientID", "PatientBirthTime",
                    "OtherPatientIDsSequence", "PatientComments", "StudyDescription",
                    "PatientIdentityRemoved", "DeidentificationMethod")


def _base_dataset(
    series: Series,
    *,
    modality: str,
    sop_class_uid: str,
    series_number: int,
    series_description: str,
    algorithm_name: str,
    algorithm_version: str,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> Dataset:
    """File meta, SOP Common, Patient, General Study, Series and General Equipment modules.

    The SOP Instance and Series Instance UIDs are new ones unless given (a job's own: issue 10).
    """
    sop_uid = UID(sop_instance_uid) if sop_instance_uid else generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    ds = Dataset()
    ds.file_meta = meta
    source = series.headers[0]
    for keyword in _COPIED_OPTIONAL:
        if keyword in source:
            ds[keyword] = source[keyword]
    for keyword in _COPIED_TYPE2:
        if keyword in source:
            ds[keyword] = source[keyword]
        else:
            setattr(ds, keyword, "")
    date, time = _now()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.StudyInstanceUID = series.study_instance_uid
    ds.Modality = modality
    ds.SeriesInstanceUID = UID(series_instance_uid) if series_instance_uid else generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = series_description[:64]
    ds.OperatorsName = ""
    ds.Manufacturer = "Postbox"
    ds.ManufacturerModelName = "Postbox"
    ds.SoftwareVersions = [f"postbox {_postbox_version()}"[:64], f"{algorithm_name} {algorithm_version}"[:64]]
    return ds


def _postbox_version() -> str:
    try:
        from importlib.metadata import version

        return version("postbox")
    except Exception:  # not installed (a source checkout): the version is not worth failing a job for
        return "0"


def _algorithm_identification(name: str, version: str) -> DicomSequence:
    item = Dataset()
    family = Dataset()
    # DCM 123110 "Artificial Intelligence" from CID 7162, the family of a segmentation model.
    family.CodeValue = "123110"
    family.CodingSchemeDesignator = "DCM"
    family.CodeMeaning = "Artificial Intelligence"
    item.AlgorithmFamilyCodeSequence = DicomSequence([family])
    item.AlgorithmName = name[:64]
    item.AlgorithmVersion = version[:64]
    return DicomSequence([item])


def _referenced_frame(series: Series) -> Dataset:
    frame = Dataset()
    frame.FrameOfReferenceUID = series.frame_of_reference_uid
    study = Dataset()
    study.ReferencedSOPClassUID = _STUDY_SOP_CLASS
    study.ReferencedSOPInstanceUID = series.study_instance_uid
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series.series_instance_uid
    images = []
    for s in series.slices:
        image = Dataset()
        image.ReferencedSOPClassUID = s.sop_class_uid
        image.ReferencedSOPInstanceUID = s.sop_instance_uid
        images.append(image)
    referenced_series.ContourImageSequence = DicomSequence(images)
    study.RTReferencedSeriesSequence = DicomSequence([referenced_series])
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame


def _save(ds: Dataset, output_file: Path) -> Path:
    """Write under a temporary name beside ``output_file`` and rename: never a half-written file there."""
    output_file = Path(output_file)
    if output_file.exists():
        raise FileExistsError(f"{output_file} exists; Postbox never overwrites an output")
    output_file.parent.mkdir(parents=True, exist_ok=True)
    partial = output_file.with_name(f".{output_file.name}.partial")
    try:
        ds.save_as(partial, enforce_file_format=True)
        os.replace(partial, output_file)
    finally:
        partial.unlink(missing_ok=True)
    return output_file


def write_rtstruct(
    series: Series,
    masks: Mapping[str, sitk.Image | np.ndarray],
    output_file: Path,
    *,
    structures: Mapping[str, Mapping[str, Any]] | None = None,
    color_map: ColorMap | None = None,
    algorithm_name: str = "postbox",
    algorithm_version: str = "0.1",
    label: str = "Postbox",
    series_number: int = 9001,
    series_description: str | None = None,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> Path:
    """Write masks on ``series`` as an RT Structure Set in a new series of the source study.

    Parameters
    ----------
    series
        The image series the masks were made on (:func:`~pipeline.writers.series.read_series`).
    masks
        Mask name to a SimpleITK image (resampled onto the series if on another grid) or a numpy array
        ``(slices, rows, columns)`` in ``series.slices`` order; see
        :func:`~pipeline.writers.series.align_mask`. Written as ROIs in this order.
    output_file
        Where to write; an existing file is never overwritten.
    structures, color_map
        ROI names, colours and types; see :func:`resolve_structures`.
    algorithm_name, algorithm_version
        Identify the algorithm in each ROI and in SoftwareVersions.
    label
        StructureSetLabel (16 characters at most).
    series_number, series_description
        Of the new series.
    sop_instance_uid, series_instance_uid
        The file's own UIDs; new ones when not given. Give the same ones to write the same instance again
        (a job's rerun: :func:`~pipeline.writers.outputs.output_uids`), so that a PACS stores it once.

    Returns
    -------
    pathlib.Path
        ``output_file``.

    Raises
    ------
    InvalidInput
        If a mask cannot be put on the series (not binary, wrong size or geometry), the mapping is
        invalid, or every mask is empty. An empty mask alone is skipped with a warning.
    FileExistsError
        If ``output_file`` exists.
    """
    resolved = resolve_structures(list(masks), structures, color_map)
    ds = _base_dataset(
        series,
        modality="RTSTRUCT",
        sop_class_uid=RTStructureSetStorage,
        series_number=series_number,
        series_description=series_description or f"{algorithm_name} {algorithm_version} structures",
        algorithm_name=algorithm_name,
        algorithm_version=algorithm_version,
        sop_instance_uid=sop_instance_uid,
        series_instance_uid=series_instance_uid,
    )
    date, time = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.StructureSetLabel = label[:16]
    ds.StructureSetName = f"{algorithm_name} {algorithm_version}"[:64]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.InstanceNumber = 1
    # Frame of Reference module: dciodvfy's RT Structure Set IOD includes it (and refuses the file without).
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = series.headers[0].get("PositionReferenceIndicator", "")
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame(series)])

    rois: list[Dataset] = []
    roi_contours: list[Dataset] = []
    observations: list[Dataset] = []
    for key, mask in masks.items():
        structure = resolved[key]
        items = _structure_contours(series, align_mask(series, key, mask))
        if not items:
            log.warning("structure %s: mask is empty, left out of the RTSTRUCT", key)
            continue
        number = len(rois) + 1
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = series.frame_of_reference_uid
        roi.ROIName = structure.name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{algorithm_name} {algorithm_version}"[:64]
        roi.ROIDerivationAlgorithmIdentificationSequence = _algorithm_identification(algorithm_name,
                                                                                    algorithm_version)
        rois.append(roi)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = list(structure.color)
        enc.set_raw_sequence(roi_contour, 0x30060040, items)  # ContourSequence
        roi_contours.append(roi_contour)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = structure.type
        observation.ROIInterpreter = ""
        observations.append(observation)
        log.debug("structure %s: %d contours as ROI %d '%s'", key, len(items), number, structure.name)
    if not rois:
        raise InvalidInput(f"every mask is empty ({', '.join(masks)}); there is no structure to write")
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    if any(not s.name.isascii() for s in resolved.values()) and "SpecificCharacterSet" not in ds:
        ds.SpecificCharacterSet = "ISO_IR 192"
    # Declare each ROI's contours, and the file above them, already in the file's encoding, as pydicom's docs
    # advise for raw elements: otherwise the writer parses every Contour Sequence to encode it again.
    for roi_contour in roi_contours:
        enc.keep_raw(roi_contour)
    enc.keep_raw(ds)
    path = _save(ds, Path(output_file))
    log.info("RTSTRUCT %s: %d structures on series %s", path.name, len(rois), series.series_instance_uid)
    return path


def _mask_inputs(mask_input: Mapping[str, Any] | Sequence[str | Path]) -> dict[str, sitk.Image | Path]:
    """PlatiPy's mask_input: a dict, or a list of ``"name,path"`` strings or of paths named by file."""
    if isinstance(mask_input, Mapping):
        return {str(k): v if isinstance(v, sitk.Image) else Path(v) for k, v in mask_input.items()}
    masks: dict[str, sitk.Image | Path] = {}
    for entry in mask_input:
        text = str(entry)
        if "," in text and not Path(text).exists():
            name, _, location = text.partition(",")
            masks[name.strip()] = Path(location.strip())
        else:
            path = Path(text)
            masks[re.sub(r"\.nii(\.gz)?$|\.[^.]+$", "", path.name)] = path
    return masks


def convert_nifti(
    dcm_path: str | Path,
    mask_input: Mapping[str, Any] | Sequence[str | Path],
    output_file: str | Path,
    color_map: ColorMap | None = None,
) -> Path:
    """Convert masks to an RTSTRUCT on a DICOM series: PlatiPy's function of the same name and meaning.

    The written file is checked back (contours rasterised onto the series and compared with the masks,
    Dice at least 0.95 per structure) before this returns.

    Parameters
    ----------
    dcm_path
        One file of the source series, or its folder.
    mask_input
        A dict of structure name to a NIfTI (or other image) path or a SimpleITK image; or a list of
        ``"name,path"`` strings (PlatiPy) or of paths, each named by its file name without extension.
    output_file
        The RTSTRUCT file to write; never overwritten.
    color_map
        A dict of structure name to ``[r, g, b]`` (0-255), or a matplotlib colormap as in PlatiPy; by
        default a fixed palette.

    Returns
    -------
    pathlib.Path
        ``output_file``.

    Raises
    ------
    InvalidInput
        For a series or mask that cannot be used (see :func:`write_rtstruct`), or a failed check-back.
    """
    series = read_series(Path(dcm_path))
    masks = {}
    for name, mask in _mask_inputs(mask_input).items():
        if not isinstance(mask, sitk.Image):
            mask = load_mask(mask)
        masks[name] = align_mask(series, name, mask)
    path = write_rtstruct(series, masks, Path(output_file), color_map=color_map)
    try:
        check_rtstruct(path, series, masks)
    except InvalidInput:
        path.unlink(missing_ok=True)
        raise
    return path
