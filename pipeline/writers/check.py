"""Check an RTSTRUCT before it leaves: rasterise its contours back onto the series and compare with the masks.

Issue 5 point 5: below a configured Dice per structure the job fails with the figure, instead of sending
misplaced contours. The rasteriser reads only the file and the series' geometry, so it catches a contour
mapped through the wrong slice, orientation or spacing as well as one damaged after writing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from pipeline.errors import InvalidInput
from pipeline.writers.series import Series, align_mask

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MIN_DICE", "check_rtstruct", "dice", "rasterise_rtstruct"]

DEFAULT_MIN_DICE = 0.95
# fillPoly takes in every pixel the polygon touches; filling on a grid this many times finer and keeping
# the samples at pixel centres turns that into a pixel-centre test, accurate to 1/(2 * _SUPERSAMPLE) pixel.
_SUPERSAMPLE = 4
_SHIFT = 8  # fractional bits of the fixed-point vertices given to fillPoly
# A contour point further than this from the plane of the image it references is on another slice (mm);
# ContourData holds 0.001 mm, other writers often 0.01 mm.
_PLANE_TOLERANCE = 0.05
_CONTOUR_DATA = Tag(0x3006, 0x0050)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two bool arrays; 1.0 when both are empty."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


def _fill(
    shape: tuple[int, int], columns: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, int, int] | None:
    """Pixel-centre fill of one polygon, as a patch and its top-left (row, column); None if off the image."""
    c0, c1 = max(int(np.floor(columns.min())), 0), min(int(np.ceil(columns.max())), shape[1] - 1)
    r0, r1 = max(int(np.floor(rows.min())), 0), min(int(np.ceil(rows.max())), shape[0] - 1)
    if c0 > c1 or r0 > r1:
        return None
    s = _SUPERSAMPLE
    fine = np.zeros((s * (r1 - r0) + 1, s * (c1 - c0) + 1), dtype=np.uint8)
    vertices = np.column_stack([(columns - c0) * s, (rows - r0) * s]) * (1 << _SHIFT)
    cv2.fillPoly(fine, [np.rint(vertices).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return fine[::s, ::s].astype(bool), r0, c0


def _points(contour: Dataset) -> np.ndarray:
    """ContourData as an ``(n, 3)`` array."""
    elem = contour.get_item(_CONTOUR_DATA)
    if elem is not None and elem.is_raw and isinstance(elem.value, bytes):
        # Parsed straight from the file's text: pydicom would build a DSfloat object per number first,
        # which is most of the check's time on a large CT.
        return np.array(elem.value.decode("ascii").strip(" \0").split("\\"), dtype=float).reshape(-1, 3)
    return np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)


def _roi_names(ds: Dataset) -> dict[int, str]:
    return {int(roi.ROINumber): str(roi.ROIName) for roi in ds.get("StructureSetROISequence", [])}


def _slice_of(
    series: Series, contour: Dataset, points: np.ndarray, roi_name: str
) -> tuple[int, np.ndarray, np.ndarray]:
    """The series slice a contour lies on (the image it references, which its points must lie in), and the
    points' column and row coordinates on it."""
    images = contour.get("ContourImageSequence", [])
    if images:
        uid = str(images[0].ReferencedSOPInstanceUID)
        try:
            k = series.index_of(uid)
        except KeyError:
            raise InvalidInput(f"structure {roi_name}: a contour references image {uid}, "
                               "which is not in the series") from None
    else:
        k = int(np.argmin(np.abs(series.offsets - float(points[0] @ series.normal))))
    columns, rows, distance = series.patient_to_pixel(k, points)
    off_plane = np.abs(distance).max()
    if off_plane > _PLANE_TOLERANCE:
        raise InvalidInput(f"structure {roi_name}: a contour lies {off_plane:.2f} mm off the plane of the "
                           f"image it belongs to ({series.slices[k].path.name})")
    return k, columns, rows


def _rasterise_slices(ds: Dataset, series: Series) -> dict[str, dict[int, np.ndarray]]:
    """:func:`rasterise_rtstruct` slice by slice: ROI name to slice index to a bool image, for the slices
    with contours only (issue 10: the check-back of a large CT no longer fills and compares whole volumes).
    """
    frames = {str(f.FrameOfReferenceUID) for f in ds.get("ReferencedFrameOfReferenceSequence", [])}
    if frames and series.frame_of_reference_uid not in frames:
        raise InvalidInput(f"RTSTRUCT references frame of reference {', '.join(sorted(frames))}, "
                           f"the series is in {series.frame_of_reference_uid}")
    names = _roi_names(ds)
    shape = (series.rows, series.columns)
    rois: dict[str, dict[int, np.ndarray]] = {}
    for roi_contour in ds.get("ROIContourSequence", []):
        name = names.get(int(roi_contour.ReferencedROINumber), f"ROI {roi_contour.ReferencedROINumber}")
        planes = rois.setdefault(name, {})
        for contour in roi_contour.get("ContourSequence", []):
            if contour.get("ContourGeometricType") != "CLOSED_PLANAR":
                continue
            k, columns, rows = _slice_of(series, contour, _points(contour), name)
            filled = _fill(shape, columns, rows)
            if filled is not None:
                patch, r0, c0 = filled
                plane = planes.get(k)
                if plane is None:
                    plane = planes[k] = np.zeros(shape, dtype=bool)
                plane[r0:r0 + patch.shape[0], c0:c0 + patch.shape[1]] ^= patch
    return rois


def _dice_of_slices(expected: np.ndarray, planes: Mapping[int, np.ndarray]) -> float:
    """:func:`dice` of ``expected`` and the volume that is ``planes`` where given and empty elsewhere."""
    total = int(np.count_nonzero(expected)) + sum(int(np.count_nonzero(p)) for p in planes.values())
    if total == 0:
        return 1.0
    return 2.0 * sum(int(np.count_nonzero(expected[k] & p)) for k, p in planes.items()) / total


def rasterise_rtstruct(rtstruct: Path | Dataset, series: Series) -> dict[str, np.ndarray]:
    """Fill every ROI's closed contours onto the series, XOR-ing contours on the same slice (holes).

    Parameters
    ----------
    rtstruct
        An RTSTRUCT file or dataset.
    series
        The series its contours reference.

    Returns
    -------
    dict of str to numpy.ndarray
        ROI name to a bool array ``series.shape``.

    Raises
    ------
    InvalidInput
        If the file references another frame of reference, or a contour references an image that is not
        in the series or lies off its plane.
    """
    ds = rtstruct if isinstance(rtstruct, Dataset) else pydicom.dcmread(rtstruct)
    volumes: dict[str, np.ndarray] = {}
    for name, planes in _rasterise_slices(ds, series).items():
        volumes[name] = np.zeros(series.shape, dtype=bool)
        for k, plane in planes.items():
            volumes[name][k] = plane
    return volumes


def check_rtstruct(
    rtstruct_file: Path,
    series: Series,
    masks: Mapping[str, sitk.Image | np.ndarray],
    min_dice: float = DEFAULT_MIN_DICE,
    *,
    names: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Compare each structure of an RTSTRUCT, rasterised onto the series, with the mask it came from.

    Parameters
    ----------
    rtstruct_file
        The RTSTRUCT written from ``masks``.
    series
        The series the masks are on.
    masks
        Mask name to mask, as given to :func:`~pipeline.writers.rtstruct.write_rtstruct`.
    min_dice
        The lowest Dice accepted for any structure.
    names
        Mask name to the ROI name it was written as, where they differ (a structure mapping).

    Returns
    -------
    dict of str to float
        Dice per mask name, in the order of ``masks``; an empty mask (left out of the file) is left out.

    Raises
    ------
    InvalidInput
        Naming each structure below ``min_dice`` and its figure ("structure lung_left: check-back Dice
        0.81 below 0.95"), or if the file cannot be rasterised onto the series.
    """
    names = names or {}
    rasterised = _rasterise_slices(pydicom.dcmread(Path(rtstruct_file)), series)
    figures: dict[str, float] = {}
    failures = []
    for key, mask in masks.items():
        expected = align_mask(series, key, mask)
        roi_name = names.get(key, key)
        if roi_name not in rasterised and not expected.any():
            continue
        figure = _dice_of_slices(expected, rasterised.get(roi_name, {}))
        figures[key] = figure
        log.info("structure %s: check-back Dice %.4f", key, figure)
        if figure < min_dice:
            shown = key if roi_name == key else f"{key} (ROI '{roi_name}')"
            failures.append(f"structure {shown}: check-back Dice {figure:.3f} below {min_dice:g}")
    if failures:
        raise InvalidInput("; ".join(failures))
    return figures
