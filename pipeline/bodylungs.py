"""The bundled algorithm: body and lung masks of a chest CT by thresholds and connected components.

It keeps the PlatiPy contract, ``segment(data_objects, working_dir, settings) -> [DataObject]``, so the
service runs it like any other algorithm, and it is fast enough (well under a second on a 40 x 128 x 128
volume) to exercise every door in tests. Method:

1. body: voxels above ``body_threshold_hu``, the largest connected component (which drops the table
   and noise), holes filled slice by slice so that the lungs lie inside it (``fill_holes`` false keeps
   the body's holes in the output, but lungs are still looked for inside the filled body);
2. lungs: voxels below ``lung_threshold_hu`` inside the filled body, the two largest components of at
   least ``min_lung_volume_ml``, holes (vessels) filled;
3. sides: the component whose physical centroid has the larger x is the left lung (DICOM LPS: +x is
   patient left), so prone, feet-first and oblique images come out right. Image indices are never used
   to decide a side.

A chest in which the lungs touch (through the trachea, as at real CT resolution) comes out as one lung,
assigned to the side of its centroid; the phantom this project tests with has separate lungs.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pipeline.dataobject import DataObject
from pipeline.errors import InvalidInput

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SETTINGS", "segment", "segment_image"]

DEFAULT_SETTINGS: dict[str, Any] = {
    "body_threshold_hu": -300.0,
    "lung_threshold_hu": -400.0,
    "min_lung_volume_ml": 10.0,
    "fill_holes": True,
    "body_name": "body",
    "lung_left_name": "lung_left",
    "lung_right_name": "lung_right",
}

_NAME_KEYS = ("body_name", "lung_left_name", "lung_right_name")
_NUMBER_KEYS = ("body_threshold_hu", "lung_threshold_hu", "min_lung_volume_ml")
# Names become file names: keep them to one safe path component.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Fills holes within each slice (array axis 0) and never across slices: a lung that reaches the first
# or last slice is open in 3D but still enclosed by the body in every slice.
_IN_SLICE = np.zeros((3, 3, 3), dtype=bool)
_IN_SLICE[1] = ndimage.generate_binary_structure(2, 1)


def _options(settings: dict[str, Any] | None) -> dict[str, Any]:
    """Settings over the defaults, checked; raises InvalidInput naming the bad key."""
    given = dict(settings or {})
    unknown = sorted(set(given) - set(DEFAULT_SETTINGS))
    if unknown:
        log.warning("bodylungs: ignoring unknown settings %s", ", ".join(unknown))
    opts = {key: given.get(key, default) for key, default in DEFAULT_SETTINGS.items()}
    for key in _NUMBER_KEYS:
        if isinstance(opts[key], bool) or not isinstance(opts[key], (int, float)):
            raise InvalidInput(f"setting '{key}' must be a number, not {opts[key]!r}")
    if not isinstance(opts["fill_holes"], bool):
        raise InvalidInput(f"setting 'fill_holes' must be true or false, not {opts['fill_holes']!r}")
    for key in _NAME_KEYS:
        if not isinstance(opts[key], str) or not _SAFE_NAME.match(opts[key]):
            raise InvalidInput(
                f"setting '{key}' must be a plain name (letters, digits, '_', '-', '.'; at most 64), "
                f"not {opts[key]!r}"
            )
    if len({opts[key] for key in _NAME_KEYS}) != len(_NAME_KEYS):
        raise InvalidInput(f"settings {', '.join(_NAME_KEYS)} must be three different names")
    if opts["lung_threshold_hu"] > opts["body_threshold_hu"]:
        log.warning(
            "bodylungs: lung_threshold_hu %s is above body_threshold_hu %s; lungs may overlap tissue",
            opts["lung_threshold_hu"],
            opts["body_threshold_hu"],
        )
    return opts


def _short(error: Exception) -> str:
    """The informative line of an ITK error, which spans several lines of file and line numbers."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("Description:"):
            return line.removeprefix("Description:").strip()
    return lines[-1] if lines else type(error).__name__


def _read_dicom(series_dir: Path) -> sitk.Image:
    if not series_dir.is_dir():
        raise InvalidInput(f"DICOM input {series_dir} must be a series folder")
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(series_dir))
    if not series_ids:
        raise InvalidInput(f"DICOM input {series_dir}: no DICOM image series found in the folder")
    files_by_series = {
        sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir), sid) for sid in series_ids
    }
    series_id = max(files_by_series, key=lambda sid: len(files_by_series[sid]))
    if len(series_ids) > 1:
        log.warning(
            "bodylungs: %s holds %d series; using %s (%d files), the one with most files",
            series_dir,
            len(series_ids),
            series_id,
            len(files_by_series[series_id]),
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files_by_series[series_id])
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InvalidInput(
            f"DICOM input {series_dir}: cannot read series {series_id}: {_short(error)}"
        ) from None


def _read(data_object: DataObject) -> sitk.Image:
    """The input as a 3D float32 image in HU; raises InvalidInput when it is not one."""
    path = Path(data_object.path)
    if not path.exists():
        raise InvalidInput(f"input {path} does not exist")
    if data_object.type == "DICOM":
        image = _read_dicom(path)
    else:
        if path.is_dir():
            raise InvalidInput(f"FILE input {path} is a folder; give an image file (NIfTI, NRRD, MHA...)")
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            raise InvalidInput(f"input {path} cannot be read as an image: {_short(error)}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidInput(
            f"input {path} must be a 3D greyscale CT, not {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    return sitk.Cast(image, sitk.sitkFloat32)


def _components(
    mask: np.ndarray, reference: sitk.Image
) -> tuple[sitk.Image, sitk.LabelShapeStatisticsImageFilter]:
    """Connected components, label 1 the largest, with their physical shape statistics."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(reference)
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(image), sortByObjectSize=True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(labels)
    return labels, stats


def _as_image(mask: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def segment_image(image: sitk.Image, settings: dict[str, Any] | None = None) -> dict[str, sitk.Image]:
    """Segment body and lungs of one CT image.

    Parameters
    ----------
    image
        A 3D CT in Hounsfield units, any orientation.
    settings
        Keys of :data:`DEFAULT_SETTINGS`; missing keys take their default.

    Returns
    -------
    dict of str to SimpleITK.Image
        Structure name (from the ``*_name`` settings) to a uint8 0/1 mask with the geometry of
        ``image``, body first, then the left and right lung (a lung not found is an empty mask).

    Raises
    ------
    InvalidInput
        If a setting is wrong, or no voxel lies above the body threshold.
    """
    opts = _options(settings)
    ct = sitk.GetArrayViewFromImage(image)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0

    above = ct > opts["body_threshold_hu"]
    if not above.any():
        raise InvalidInput(
            f"no body found: no voxel is above body_threshold_hu {opts['body_threshold_hu']} "
            f"(image range {float(ct.min()):.0f} to {float(ct.max()):.0f}); is it a CT in HU?"
        )
    labels, _ = _components(above, image)
    body = sitk.GetArrayViewFromImage(labels) == 1
    # The lungs are holes in the thresholded body: the filled body tells them from the air outside.
    filled = ndimage.binary_fill_holes(body, structure=_IN_SLICE)
    if opts["fill_holes"]:
        body = filled

    candidates = filled & (ct < opts["lung_threshold_hu"])
    lungs: list[tuple[float, np.ndarray]] = []  # (physical centroid x, mask)
    if candidates.any():
        labels, stats = _components(candidates, image)
        label_array = sitk.GetArrayViewFromImage(labels)
        for label in stats.GetLabels()[:2]:
            volume_ml = stats.GetNumberOfPixels(label) * voxel_ml
            if volume_ml < opts["min_lung_volume_ml"]:
                break  # labels are sorted by size: the rest are smaller still
            lungs.append((stats.GetCentroid(label)[0], label_array == label))
    if not lungs:
        log.warning(
            "bodylungs: no lung found (nothing below %s HU of at least %s ml inside the body)",
            opts["lung_threshold_hu"],
            opts["min_lung_volume_ml"],
        )

    empty = np.zeros(ct.shape, dtype=bool)
    left, right = empty, empty
    if len(lungs) == 2:
        # LPS: the larger physical x is the patient's left, whatever the image direction.
        (_, right), (_, left) = sorted(lungs, key=lambda lung: lung[0])
    elif len(lungs) == 1:
        _, body_stats = _components(filled, image)
        body_x = body_stats.GetCentroid(1)[0]
        lung_x, only = lungs[0]
        log.warning("bodylungs: found one lung only; assigning it by its side of the body centre")
        left, right = (only, empty) if lung_x > body_x else (empty, only)
    if opts["fill_holes"]:
        # Vessels inside a lung are above the threshold; the lung contour includes them.
        left = ndimage.binary_fill_holes(left, structure=_IN_SLICE) if left.any() else left
        right = ndimage.binary_fill_holes(right, structure=_IN_SLICE) if right.any() else right

    return {
        opts["body_name"]: _as_image(body, image),
        opts["lung_left_name"]: _as_image(left, image),
        opts["lung_right_name"]: _as_image(right, image),
    }


def segment(data_objects: list[DataObject], working_dir: str, settings: dict[str, Any]) -> list[DataObject]:
    """Segment body and lungs of each input CT (the PlatiPy algorithm entry point).

    Parameters
    ----------
    data_objects
        Inputs: ``DICOM`` objects are series folders (the series with most files is used when a folder
        holds several), ``FILE`` objects are images SimpleITK reads (NIfTI, NRRD, MHA...).
    working_dir
        Where to write the masks: ``<name>.nii.gz`` for one input, ``input_<n>/<name>.nii.gz`` (n from
        1, in input order) for several, so that names never collide.
    settings
        Keys of :data:`DEFAULT_SETTINGS`; missing keys take their default.

    Returns
    -------
    list of DataObject
        One ``FILE`` object per structure and input (uint8 0/1 NIfTI with the geometry of the input),
        its ``parent`` the input and ``meta_data["name"]`` the structure name.

    Raises
    ------
    InvalidInput
        If a setting is wrong, an input cannot be read as a 3D image, or no body is found in it.
    """
    opts = _options(settings)
    out_root = Path(working_dir)
    results: list[DataObject] = []
    for number, data_object in enumerate(data_objects, start=1):
        image = _read(data_object)
        masks = segment_image(image, opts)
        out_dir = out_root if len(data_objects) == 1 else out_root / f"input_{number}"
        out_dir.mkdir(parents=True, exist_ok=True)
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        volumes = []
        for name, mask in masks.items():
            path = out_dir / f"{name}.nii.gz"
            sitk.WriteImage(mask, str(path), useCompression=True)
            results.append(
                DataObject(type="FILE", path=str(path), parent=data_object, meta_data={"name": name})
            )
            volumes.append(f"{name} {float(sitk.GetArrayViewFromImage(mask).sum()) * voxel_ml:.0f} ml")
        log.info("bodylungs: %s: %s", data_object.path, ", ".join(volumes))
    return results
