"""Read a DICOM image series into a geometry record, and put masks onto that series' grid.

A :class:`Series` holds each slice's own position, so that a contour maps through the slice it lies on
(issue 5: contours on the wrong slice where spacing varies is a reported bug of other tools); even slice
spacing is therefore not required. What is required, and refused with :class:`InvalidInput` naming the
problem, is one geometry: one orientation, one size and pixel spacing, one frame of reference, one series,
and no two slices at the same position.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipeline.errors import InvalidInput
from pipeline.gate import slice_axes

log = logging.getLogger(__name__)

__all__ = ["Series", "Slice", "align_mask", "align_masks", "load_mask", "read_series"]

# Direction cosines written with 6 decimals by most scanners differ in the last digits between slices.
ORIENTATION_TOLERANCE = 1e-4
# Two slices closer than this along the normal are the same slice sent twice (mm).
DUPLICATE_TOLERANCE = 1e-2
# A mask grid point this close to a series pixel centre is the same point (mm, relative to spacing):
# NIfTI stores geometry as float32, which rounds positions of a few hundred mm to about 1e-5.
POSITION_TOLERANCE = 1e-2
# Objects that can sit in a series folder with Rows but are not slices of it.
_NOT_IMAGES = {"RTSTRUCT", "SEG", "RTDOSE", "RTPLAN", "RTRECORD", "REG", "SR", "KO", "PR"}


@dataclass(frozen=True, eq=False)
class Slice:
    """One image of a series.

    Parameters
    ----------
    path
        The file it was read from.
    sop_instance_uid, sop_class_uid
        What a contour or segment frame references.
    position
        ImagePositionPatient (centre of the first pixel), mm.
    offset
        Position along the series normal, mm; slices are sorted by it.
    """

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    position: np.ndarray
    offset: float


@dataclass(frozen=True, eq=False)
class Series:
    """The geometry of one image series, slices sorted by position along the normal (ascending).

    Parameters
    ----------
    slices
        Every image, sorted by :attr:`Slice.offset`.
    row_direction
        Direction of increasing column index (ImageOrientationPatient[0:3]).
    column_direction
        Direction of increasing row index (ImageOrientationPatient[3:6]).
    pixel_spacing
        ``(row spacing, column spacing)`` in DICOM order: the distance between rows comes first.
    rows, columns
        Size of every image.
    study_instance_uid, series_instance_uid, frame_of_reference_uid
        Shared by every image.
    headers
        Each image's dataset without pixel data, in the order of ``slices``.
    """

    slices: tuple[Slice, ...]
    row_direction: np.ndarray
    column_direction: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    headers: tuple[Dataset, ...] = field(repr=False)

    @classmethod
    def from_folder(cls, series_dir: Path) -> Series:
        """Read the series in ``series_dir``; see :func:`read_series`."""
        return read_series(series_dir)

    @property
    def normal(self) -> np.ndarray:
        """The slice normal, ``row_direction x column_direction``."""
        return np.cross(self.row_direction, self.column_direction)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape ``(slices, rows, columns)`` of a mask aligned with this series."""
        return (len(self.slices), self.rows, self.columns)

    @property
    def positions(self) -> np.ndarray:
        """ImagePositionPatient of every slice, shape ``(slices, 3)``."""
        return np.array([s.position for s in self.slices])

    @property
    def offsets(self) -> np.ndarray:
        """Position of every slice along the normal, ascending, shape ``(slices,)``."""
        return np.array([s.offset for s in self.slices])

    @property
    def slice_spacing(self) -> float | None:
        """The distance between consecutive slices if the slices form one regular grid, else None.

        None for uneven spacing and for slices shifted in-plane against each other; a single slice gets
        the larger pixel spacing so that it still spans a volume.
        """
        if len(self.slices) == 1:
            return max(self.pixel_spacing)
        steps = np.diff(self.positions, axis=0)
        step = steps.mean(axis=0)
        if np.abs(steps - step).max() > POSITION_TOLERANCE:
            return None
        spacing = float(step @ self.normal)
        if np.linalg.norm(step - spacing * self.normal) > POSITION_TOLERANCE:
            return None
        return spacing

    def index_of(self, sop_instance_uid: str) -> int:
        """Index in :attr:`slices` of the image with that SOPInstanceUID.

        Raises
        ------
        KeyError
            If no image of the series has it.
        """
        return self._index[sop_instance_uid]

    @property
    def _index(self) -> dict[str, int]:
        cache = self.__dict__.get("_index_cache")
        if cache is None:
            cache = {s.sop_instance_uid: k for k, s in enumerate(self.slices)}
            object.__setattr__(self, "_index_cache", cache)
        return cache

    def pixel_to_patient(self, k: int, columns: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Map (fractional) pixel coordinates on slice ``k`` to patient coordinates.

        Parameters
        ----------
        k
            Slice index in :attr:`slices`.
        columns, rows
            Column (x) and row (y) pixel coordinates of the same length; pixel centres are integers.

        Returns
        -------
        numpy.ndarray
            Points, shape ``(n, 3)``, in mm.
        """
        row_spacing, column_spacing = self.pixel_spacing
        # PixelSpacing[0] is the distance between rows, i.e. along the column direction.
        return (
            self.slices[k].position
            + np.outer(np.asarray(columns, dtype=float) * column_spacing, self.row_direction)
            + np.outer(np.asarray(rows, dtype=float) * row_spacing, self.column_direction)
        )

    def patient_to_pixel(self, k: int, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Map patient points to (fractional) pixel coordinates on slice ``k``.

        Returns
        -------
        tuple of numpy.ndarray
            ``(columns, rows, distance)``: pixel coordinates and each point's signed distance from the
            slice plane along the normal, in mm.
        """
        row_spacing, column_spacing = self.pixel_spacing
        rel = np.asarray(points, dtype=float).reshape(-1, 3) - self.slices[k].position
        return (
            rel @ self.row_direction / column_spacing,
            rel @ self.column_direction / row_spacing,
            rel @ self.normal,
        )

    def reference_image(self, k: int | None = None) -> sitk.Image:
        """An empty SimpleITK image on this series' grid (or on slice ``k`` alone) to resample onto.

        Raises
        ------
        ValueError
            If ``k`` is None and the slices do not form one regular grid (:attr:`slice_spacing`).
        """
        if k is None:
            spacing = self.slice_spacing
            if spacing is None:
                raise ValueError("the slices do not form a regular grid; resample slice by slice")
            origin, depth = self.slices[0].position, len(self.slices)
        else:
            spacing, origin, depth = max(self.pixel_spacing), self.slices[k].position, 1
        image = sitk.Image(self.columns, self.rows, depth, sitk.sitkUInt8)
        image.SetOrigin(tuple(float(v) for v in origin))
        image.SetSpacing((self.pixel_spacing[1], self.pixel_spacing[0], float(spacing)))
        direction = np.column_stack([self.row_direction, self.column_direction, self.normal])
        image.SetDirection(tuple(float(v) for v in direction.ravel()))
        return image


def _vector(ds: Dataset, keyword: str, length: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != length:
        raise InvalidInput(f"series image {path.name} has no valid {keyword}; every image needs one")
    try:
        return np.array([float(v) for v in value])
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"series image {path.name} has an unreadable {keyword}: {value!r}") from exc


def _read_headers(series_dir: Path) -> list[tuple[Path, Dataset]]:
    """Every image dataset (pixel data not loaded) under ``series_dir``; other files are skipped."""
    found: list[tuple[Path, Dataset]] = []
    for path in sorted(p for p in series_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            log.debug("series %s: %s is not DICOM, skipped", series_dir, path.name)
            continue
        # An RTSTRUCT or SEG left next to the images is not one of them; an image without a position is,
        # and is refused below rather than skipped.
        if "Rows" not in ds or ds.get("Modality") in _NOT_IMAGES:
            log.debug("series %s: %s is not an image (%s), skipped", series_dir, path.name,
                      ds.get("Modality"))
            continue
        found.append((path, ds))
    return found


def read_series(series_dir: Path) -> Series:
    """Read a folder holding one DICOM image series into a :class:`Series`.

    Parameters
    ----------
    series_dir
        A folder of image files (searched recursively), or one file of the series: its folder is read.
        Hidden files, files that are not DICOM and DICOM objects that are not images are skipped.

    Returns
    -------
    Series
        Slices sorted by position along the normal.

    Raises
    ------
    InvalidInput
        If the folder holds no image, several series, images without position or orientation, mixed
        orientations, sizes, pixel spacings or frames of reference, multi-frame images, or two images at
        the same position or with the same SOPInstanceUID.
    """
    series_dir = Path(series_dir)
    if series_dir.is_file():
        series_dir = series_dir.parent
    if not series_dir.is_dir():
        raise InvalidInput(f"series folder {series_dir} does not exist")
    found = _read_headers(series_dir)
    if not found:
        raise InvalidInput(f"series folder {series_dir} holds no DICOM image")

    first_path, first = found[0]
    series_uids = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in found})
    if len(series_uids) > 1:
        raise InvalidInput(f"series folder {series_dir} holds {len(series_uids)} series "
                           f"({', '.join(series_uids)}); send one series per job")
    orientation = _vector(first, "ImageOrientationPatient", 6, first_path)
    row_direction, column_direction, normal = slice_axes(orientation.tolist(), first_path.name)
    pixel_spacing = _vector(first, "PixelSpacing", 2, first_path)
    if pixel_spacing.min() <= 0:
        raise InvalidInput(f"series image {first_path.name} has a PixelSpacing that is not positive: "
                           f"{list(pixel_spacing)}")
    size = (int(first.Rows), int(first.Columns))
    frame_of_reference = str(first.get("FrameOfReferenceUID", ""))

    slices: list[Slice] = []
    headers: list[Dataset] = []
    seen: dict[str, str] = {}
    for path, ds in found:
        # Every image must agree with the first; name the first that does not, and how.
        if not np.allclose(_vector(ds, "ImageOrientationPatient", 6, path), orientation,
                           atol=ORIENTATION_TOLERANCE, rtol=0):
            raise InvalidInput(f"series has mixed orientations: {path.name} has ImageOrientationPatient "
                               f"{list(ds.ImageOrientationPatient)}, {first_path.name} has "
                               f"{list(orientation)}")
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise InvalidInput(f"series has mixed image sizes: {path.name} is {ds.Rows}x{ds.Columns}, "
                               f"{first_path.name} is {size[0]}x{size[1]}")
        if not np.allclose(_vector(ds, "PixelSpacing", 2, path), pixel_spacing, atol=1e-4, rtol=0):
            raise InvalidInput(f"series has mixed pixel spacings: {path.name} has {list(ds.PixelSpacing)}, "
                               f"{first_path.name} has {list(pixel_spacing)}")
        if str(ds.get("FrameOfReferenceUID", "")) != frame_of_reference:
            raise InvalidInput(f"series has mixed frames of reference: {path.name} and {first_path.name}")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InvalidInput(f"series image {path.name} is multi-frame; "
                               "only series of single-frame images are supported")
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            raise InvalidInput(f"series has SOPInstanceUID {uid} twice ({seen[uid]} and {path.name})")
        seen[uid] = path.name
        position = _vector(ds, "ImagePositionPatient", 3, path)
        slices.append(Slice(path, uid, str(ds.SOPClassUID), position, float(position @ normal)))
        headers.append(ds)
    if not frame_of_reference:
        raise InvalidInput(f"series image {first_path.name} has no FrameOfReferenceUID")

    order = np.argsort([s.offset for s in slices], kind="stable")
    slices = [slices[k] for k in order]
    headers = [headers[k] for k in order]
    for a, b in itertools.pairwise(slices):
        if b.offset - a.offset < DUPLICATE_TOLERANCE:
            raise InvalidInput(f"series has two slices at the same position, {a.offset:.3f} mm along the "
                               f"normal: {a.path.name} and {b.path.name}")
    series = Series(
        slices=tuple(slices),
        row_direction=row_direction,
        column_direction=column_direction,
        pixel_spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])),
        rows=size[0],
        columns=size[1],
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=series_uids[0],
        frame_of_reference_uid=frame_of_reference,
        headers=tuple(headers),
    )
    if series.slice_spacing is None:
        log.info("series %s: slices unevenly spaced or shifted in-plane; each maps through its own position",
                 series.series_instance_uid)
    return series


def load_mask(path: Path) -> sitk.Image:
    """Read a mask image (NIfTI, NRRD, MHA...) with SimpleITK.

    Raises
    ------
    InvalidInput
        If the file is missing or SimpleITK cannot read it.
    """
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InvalidInput(f"mask {Path(path).name} cannot be read as an image: {reason}") from exc


def _binary(name: str, array: np.ndarray) -> np.ndarray:
    """``array != 0`` after checking that it holds at most one value besides 0."""
    if array.dtype == bool:
        return array
    if array.dtype.kind == "u" and array.max(initial=0) <= 1:
        # The usual mask, 0 and 1 in unsigned integers: one pass to check it (issue 10), not four.
        return array.astype(bool)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"mask '{name}' is not binary: it holds NaN or infinite values")
    foreground = array != 0
    count = np.count_nonzero(foreground)
    if count == 0:
        return foreground
    top = array.max()
    # One comparison pass more instead of np.unique, which sorts 50 million voxels on a 512x512x200 CT.
    if top <= 0 or np.count_nonzero(array == top) != count:
        values = np.unique(array)
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
        raise InvalidInput(f"mask '{name}' is not binary: it holds the values {shown}; "
                           "give one mask per structure with 0 outside and one value inside")
    return foreground


def _index_grid(series: Series, image: sitk.Image) -> np.ndarray | None:
    """For each series slice, the mask slice on the same plane if the mask's voxels sit on the series' pixels.

    Returns None if the mask's in-plane axes, spacing or size differ from the series', or if a series slice
    falls between mask slices or outside the mask.
    """
    if image.GetSize()[:2] != (series.columns, series.rows):
        return None
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    if (not np.allclose(direction[:, 0], series.row_direction, atol=ORIENTATION_TOLERANCE * 10)
            or not np.allclose(direction[:, 1], series.column_direction, atol=ORIENTATION_TOLERANCE * 10)
            or not np.allclose(spacing[:2], series.pixel_spacing[::-1], rtol=1e-4)):
        return None
    # The series' slice positions in the mask's continuous index space; in-plane they must land on 0, 0.
    rel = series.positions - np.array(image.GetOrigin())
    index = np.linalg.solve(direction * spacing, rel.T).T
    tolerance = POSITION_TOLERANCE / spacing
    if (np.abs(index[:, :2]) > tolerance[:2]).any():
        return None
    k = np.rint(index[:, 2])
    if (np.abs(index[:, 2] - k) > tolerance[2]).any() or k.min() < 0 or k.max() >= image.GetSize()[2]:
        return None
    return k.astype(int)


def _same_size_shifted(series: Series, image: sitk.Image) -> str | None:
    """How a mask of the series' own size but not on its grid is off, or None if it is on the grid."""
    origin = np.array(image.GetOrigin())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    first, last = series.positions[0], series.positions[-1]
    ends = (first, last) if direction[:, 2] @ series.normal >= 0 else (last, first)
    problems = []
    if not np.allclose(direction[:, 0], series.row_direction, atol=1e-3) or not np.allclose(
            direction[:, 1], series.column_direction, atol=1e-3):
        problems.append(f"its direction {np.round(direction.T.ravel()[:6], 4).tolist()} is not the series' "
                        f"{np.round(np.r_[series.row_direction, series.column_direction], 4).tolist()}")
    if not np.allclose(image.GetSpacing()[:2], series.pixel_spacing[::-1], rtol=1e-4):
        problems.append(f"its pixel spacing {image.GetSpacing()[:2]} is not the series' "
                        f"{series.pixel_spacing[::-1]}")
    shift = float(np.linalg.norm(origin - ends[0]))
    if shift > POSITION_TOLERANCE:
        problems.append(f"its origin is {shift:.2f} mm from the series' first voxel")
    return "; ".join(problems) or None


def _has_default_geometry(image: sitk.Image) -> bool:
    return (np.allclose(image.GetOrigin(), 0) and np.allclose(image.GetSpacing(), 1)
            and np.allclose(image.GetDirection(), np.eye(3).ravel()))


def _resample(series: Series, image: sitk.Image) -> np.ndarray:
    """Nearest-neighbour resampling of a binary mask onto the series, slice by slice if spacing is uneven."""
    if series.slice_spacing is not None:
        out = sitk.Resample(image, series.reference_image(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        return sitk.GetArrayViewFromImage(out).astype(bool)
    planes = [sitk.Resample(image, series.reference_image(k), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
              for k in range(len(series.slices))]
    return np.concatenate([sitk.GetArrayViewFromImage(p) for p in planes]).astype(bool)


def align_mask(series: Series, name: str, mask: sitk.Image | np.ndarray) -> np.ndarray:
    """Put one binary mask onto the series: a bool array ``(slices, rows, columns)`` in slice order.

    Parameters
    ----------
    series
        The series the mask was made on.
    name
        The structure's name, for messages.
    mask
        A numpy array already aligned with the series (shape ``series.shape``, slices in
        :attr:`Series.slices` order), or a SimpleITK image. An image whose voxels sit on the series'
        pixels is taken slice for slice; one read from an unevenly spaced series by SimpleITK (the series'
        size, origin and in-plane geometry, an average slice spacing) is taken by slice index, as it was
        made; any other image is resampled (nearest neighbour) onto the series, and must keep its content.

    Returns
    -------
    numpy.ndarray
        Bool array of ``series.shape``.

    Raises
    ------
    InvalidInput
        If the mask is not binary, an array of the wrong shape, an image of the series' size that is not on
        its grid (a shifted or flipped mask is never contoured silently), an image with the default
        geometry (origin 0, spacing 1) on another grid, not 3-D, or lies outside the series.
    """
    if isinstance(mask, np.ndarray):
        if mask.shape != series.shape:
            raise InvalidInput(f"mask '{name}' has shape {mask.shape}, the series is {series.shape} "
                               "(slices, rows, columns)")
        return _binary(name, mask)
    if not isinstance(mask, sitk.Image):
        raise InvalidInput(f"mask '{name}' is a {type(mask).__name__}, not a SimpleITK image or numpy array")
    if mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidInput(f"mask '{name}' is a {mask.GetDimension()}-D image with "
                           f"{mask.GetNumberOfComponentsPerPixel()} components; a 3-D scalar mask is needed")
    array = sitk.GetArrayViewFromImage(mask)
    binary = _binary(name, array)
    index = _index_grid(series, mask)
    if index is not None:
        return np.ascontiguousarray(binary[index])
    if mask.GetSize() == (series.columns, series.rows, len(series.slices)):
        problem = _same_size_shifted(series, mask)
        if problem is None and series.slice_spacing is None:
            # SimpleITK reads an uneven series onto a regular grid with the mean spacing; the mask it gave
            # back was made slice for slice, so map it back by index, flipped if its slices run backwards.
            direction = np.array(mask.GetDirection()).reshape(3, 3)
            flip = direction[:, 2] @ series.normal < 0
            log.debug("mask %s: taken by slice index on an unevenly spaced series", name)
            return np.ascontiguousarray(binary[::-1] if flip else binary)
        raise InvalidInput(f"mask '{name}' has the series' size but not its geometry: {problem}; "
                           "copy the CT's geometry onto the mask (SimpleITK CopyInformation)")
    if _has_default_geometry(mask):
        # Origin 0, spacing 1, no rotation: an array wrapped without CopyInformation, whose place in the
        # patient is unknown; resampling it would put contours wherever the default happens to fall.
        raise InvalidInput(f"mask '{name}' ({'x'.join(map(str, mask.GetSize()))}) has no geometry of its own "
                           "(origin 0, spacing 1) and is not on the series' grid "
                           f"({series.columns}x{series.rows}x{len(series.slices)}); "
                           "copy the CT's geometry onto the mask (SimpleITK CopyInformation)")
    resampled = _resample(series, sitk.Cast(mask != 0, sitk.sitkUInt8))
    # Compare physical volumes: a mask that mostly falls outside the series was made for another one.
    step = series.slice_spacing or float(np.diff(series.offsets).mean())
    before = np.count_nonzero(binary) * float(np.prod(mask.GetSpacing()))
    after = np.count_nonzero(resampled) * series.pixel_spacing[0] * series.pixel_spacing[1] * step
    if before > 0 and after < 0.5 * before:
        raise InvalidInput(f"mask '{name}' lies mostly outside the series: {after / before:.0%} of its "
                           "volume is left after resampling onto the series")
    log.info("mask %s: resampled from size %s onto the series grid", name, mask.GetSize())
    return resampled


def align_masks(
    series: Series, masks: Mapping[str, sitk.Image | np.ndarray | Path | str]
) -> dict[str, np.ndarray]:
    """:func:`align_mask` for each mask; paths are read with :func:`load_mask` first."""
    aligned = {}
    for name, mask in masks.items():
        if isinstance(mask, (str, Path)):
            mask = load_mask(Path(mask))
        aligned[name] = align_mask(series, name, mask)
    return aligned
