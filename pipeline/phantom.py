"""A synthetic CT phantom defined analytically in patient coordinates, with exact truth masks.

The anatomy is fixed in DICOM patient coordinates (LPS, millimetres: +x patient left, +y posterior,
+z head) and sampled at voxel centres, so any grid (axial, oblique, prone, feet-first, uneven slice
spacing) gives a CT whose truth masks are exact by construction. Tests, benchmarks and demos build their
inputs from here; no algorithm depends on it.

Anatomy (all sizes in mm, centred on the patient origin):

- body: elliptic cylinder along z, semi-axes 160 (x) by 110 (y), soft tissue 40 HU under a 10 mm fat
  layer of -100 HU; it runs through the whole scanned length;
- lungs: ellipsoids of -850 HU centred at y = -5, z = 0: the right one at x = -75 with semi-axes 55 (x),
  70 (y), 40 (z), the left one at x = +72, smaller (48, 64, 40) as in a real chest, so that a left-right
  flip shows in the image content and not only in its geometry;
- spine: bone cylinder (700 HU) of radius 15 at x = 0, y = +70 (posterior);
- table: a 10 mm slab of 100 HU 15 mm below the body as the image is displayed (posterior for supine
  grids, anterior for prone ones), not part of any truth mask, so that segmentation must pick the body
  out of several components.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

log = logging.getLogger(__name__)

__all__ = [
    "Grid",
    "axial_grid",
    "oblique_grid",
    "patient_position_grid",
    "sample",
    "structure_names",
    "to_sitk",
    "uneven_grid",
    "write_dicom",
    "write_masks_nifti",
    "write_nifti",
]

# Hounsfield units of each material.
AIR_HU = -1000
FAT_HU = -100
SOFT_TISSUE_HU = 40
LUNG_HU = -850
BONE_HU = 700
TABLE_HU = 100

# Anatomy in patient coordinates (mm). Fixed whatever the grid, which is what makes the truth exact.
BODY_SEMI_AXES = (160.0, 110.0)
FAT_THICKNESS = 10.0
# name -> (centre, semi-axes); +x is patient left in LPS.
LUNGS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "lung_left": ((72.0, -5.0, 0.0), (48.0, 64.0, 40.0)),
    "lung_right": ((-75.0, -5.0, 0.0), (55.0, 70.0, 40.0)),
}
SPINE_CENTRE_Y = 70.0
SPINE_RADIUS = 15.0
TABLE_GAP = 15.0  # wide enough that the table never touches the body at 6 mm pixels
TABLE_THICKNESS = 10.0
TABLE_HALF_WIDTH = 190.0

# The stored pixel range: 12 bits unsigned with RescaleIntercept -1024.
RESCALE_INTERCEPT = -1024
MIN_HU = RESCALE_INTERCEPT
MAX_HU = RESCALE_INTERCEPT + 4095

PATIENT_POSITIONS = ("HFS", "HFP", "FFS", "FFP", "HFDR", "HFDL", "FFDR", "FFDL")

_STRUCTURES = ("body", "lung_left", "lung_right")

Vector = tuple[float, float, float]


@dataclass(frozen=True)
class Grid:
    """Where to sample the phantom: the geometry of one image series, in LPS millimetres.

    Parameters
    ----------
    origin
        Centre of the first voxel (row 0, column 0) of the plane at offset 0; ImagePositionPatient of
        a slice is ``origin + offset * normal``.
    row_direction
        Direction of increasing column index (ImageOrientationPatient[0:3]).
    column_direction
        Direction of increasing row index (ImageOrientationPatient[3:6]).
    pixel_spacing
        ``(row spacing, column spacing)`` in DICOM order: distance between rows, then between columns.
    rows, columns
        Number of rows and columns of each slice.
    slice_offsets
        Position of each slice along the normal (``row_direction x column_direction``) relative to
        ``origin``, in mm, in stored order; may be uneven or decreasing, but never repeated.

    Raises
    ------
    ValueError
        If the directions are not orthonormal, a size or spacing is not positive, or an offset repeats.
    """

    origin: Vector
    row_direction: Vector
    column_direction: Vector
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    slice_offsets: tuple[float, ...]

    def __post_init__(self) -> None:
        # Coerce to tuples of floats so that numpy arrays or lists given by a caller hash and compare.
        for name, length in (
            ("origin", 3),
            ("row_direction", 3),
            ("column_direction", 3),
            ("pixel_spacing", 2),
        ):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != length or not all(math.isfinite(v) for v in value):
                raise ValueError(f"Grid {name} must be {length} finite numbers, not {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        offsets = tuple(float(v) for v in self.slice_offsets)
        object.__setattr__(self, "slice_offsets", offsets)
        for name in ("rows", "columns"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"Grid {name} must be an int, not {type(value).__name__}")
            if value < 1:
                raise ValueError(f"Grid {name} must be at least 1, not {value}")
            object.__setattr__(self, name, int(value))
        row, col = np.array(self.row_direction), np.array(self.column_direction)
        if abs(np.linalg.norm(row) - 1) > 1e-4 or abs(np.linalg.norm(col) - 1) > 1e-4:
            raise ValueError("Grid row_direction and column_direction must be unit vectors")
        if abs(float(row @ col)) > 1e-4:
            raise ValueError("Grid row_direction and column_direction must be orthogonal")
        if min(self.pixel_spacing) <= 0:
            raise ValueError(f"Grid pixel_spacing must be positive, not {self.pixel_spacing}")
        if not offsets or not all(math.isfinite(v) for v in offsets):
            raise ValueError("Grid slice_offsets must hold at least one finite number")
        if len(set(offsets)) != len(offsets):
            raise ValueError("Grid slice_offsets must not repeat a position")

    @property
    def normal(self) -> Vector:
        """The slice normal, ``row_direction x column_direction`` (as DICOM readers compute it)."""
        n = np.cross(self.row_direction, self.column_direction)
        return (float(n[0]), float(n[1]), float(n[2]))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(slices, rows, columns)`` of a volume sampled on this grid."""
        return (len(self.slice_offsets), self.rows, self.columns)

    @property
    def slice_spacing(self) -> float | None:
        """The signed distance between consecutive slices if it is even, else None (one slice: None)."""
        steps = np.diff(self.slice_offsets)
        if steps.size == 0 or not np.allclose(steps, steps[0], rtol=0, atol=1e-3):
            return None
        return float(steps.mean())

    def slice_positions(self) -> np.ndarray:
        """ImagePositionPatient of every slice, shape ``(slices, 3)``, in stored order."""
        offsets = np.asarray(self.slice_offsets)[:, None]
        return np.asarray(self.origin) + offsets * np.asarray(self.normal)

    def index_to_patient(self, index: Sequence[float] | np.ndarray) -> np.ndarray:
        """Map voxel indices ``(slice, row, column)`` to patient coordinates (LPS mm).

        Parameters
        ----------
        index
            One index or an array of shape ``(..., 3)``; fractional values (a centroid) are fine, the
            slice offset is interpolated between neighbouring slices.

        Returns
        -------
        numpy.ndarray
            Points of shape ``(..., 3)``.
        """
        idx = np.asarray(index, dtype=float)
        k, i, j = idx[..., 0], idx[..., 1], idx[..., 2]
        offsets = np.asarray(self.slice_offsets)
        if offsets.size == 1:
            offset = np.full_like(k, offsets[0])
        else:
            # Linear extrapolation is not needed: indices come from inside the volume.
            offset = np.interp(k, np.arange(offsets.size), offsets)
        row_spacing, column_spacing = self.pixel_spacing
        return (
            np.asarray(self.origin)
            + offset[..., None] * np.asarray(self.normal)
            + (i * row_spacing)[..., None] * np.asarray(self.column_direction)
            + (j * column_spacing)[..., None] * np.asarray(self.row_direction)
        )


def _centred_grid(
    row_direction: Vector,
    column_direction: Vector,
    *,
    size: int,
    fov: float,
    offsets: Sequence[float],
) -> Grid:
    """A square grid of ``size`` pixels over ``fov`` mm whose slab is centred on the patient origin."""
    if size < 1:
        raise ValueError(f"size must be at least 1, not {size}")
    if fov <= 0:
        raise ValueError(f"fov must be positive, not {fov}")
    spacing = fov / size
    row, col = np.asarray(row_direction, float), np.asarray(column_direction, float)
    normal = np.cross(row, col)
    middle = (min(offsets) + max(offsets)) / 2
    half = (size - 1) / 2 * spacing
    origin = -half * row - half * col - middle * normal
    return Grid(
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        row_direction=row_direction,
        column_direction=column_direction,
        pixel_spacing=(spacing, spacing),
        rows=size,
        columns=size,
        slice_offsets=tuple(float(v) for v in offsets),
    )


def axial_grid(
    *, slices: int = 40, size: int = 128, slice_thickness: float = 2.5, fov: float = 400.0
) -> Grid:
    """An axial head-first-supine grid centred on the phantom.

    Parameters
    ----------
    slices
        Number of slices.
    size
        Pixels per row and column; the field of view stays ``fov``, so this changes resolution only.
    slice_thickness
        Distance between slices in mm.
    fov
        Field of view in mm (square).

    Returns
    -------
    Grid
        IOP ``1,0,0,0,1,0``, slices stored head-ward (increasing z).
    """
    return patient_position_grid("HFS", slices=slices, size=size, slice_thickness=slice_thickness, fov=fov)


def patient_position_grid(
    position: str,
    *,
    slices: int = 40,
    size: int = 128,
    slice_thickness: float = 2.5,
    fov: float = 400.0,
) -> Grid:
    """An axial grid as a scanner writes it for a patient position.

    Pass the same ``position`` to :func:`write_dicom` so that PatientPosition agrees with the geometry.

    Parameters
    ----------
    position
        ``"HFS"`` (IOP ``1,0,0,0,1,0``), ``"HFP"`` (``-1,0,0,0,-1,0``), ``"FFS"`` (``-1,0,0,0,1,0``) or
        ``"FFP"`` (``1,0,0,0,-1,0``). Head-first grids store slices with increasing z, feet-first ones
        with decreasing z (the normal points to the feet).
    slices, size, slice_thickness, fov
        As for :func:`axial_grid`.

    Returns
    -------
    Grid

    Raises
    ------
    ValueError
        For any other position.
    """
    orientations: dict[str, tuple[Vector, Vector]] = {
        "HFS": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
        "HFP": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
        "FFS": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
        "FFP": ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    }
    if position not in orientations:
        raise ValueError(f"patient position must be one of {tuple(orientations)}, not {position!r}")
    if slices < 1:
        raise ValueError(f"slices must be at least 1, not {slices}")
    if slice_thickness <= 0:
        raise ValueError(f"slice_thickness must be positive, not {slice_thickness}")
    row, col = orientations[position]
    return _centred_grid(row, col, size=size, fov=fov, offsets=[k * slice_thickness for k in range(slices)])


def oblique_grid(
    kind: str = "tilted",
    *,
    angle: float = 20.0,
    slices: int = 40,
    size: int = 128,
    slice_thickness: float | None = None,
    fov: float = 400.0,
) -> Grid:
    """A non-axial grid centred on the phantom.

    Parameters
    ----------
    kind
        ``"tilted"``: axial rotated by ``angle`` degrees about the patient x axis (gantry tilt), IOP
        ``1,0,0,0,cos,sin``; ``"sagittal"``: IOP ``0,1,0,0,0,-1``, slices from patient left to right;
        ``"coronal"``: IOP ``1,0,0,0,0,-1``, slices from posterior to anterior.
    angle
        Tilt in degrees, for ``"tilted"`` only.
    slices, size, fov
        As for :func:`axial_grid`.
    slice_thickness
        Distance between slices in mm; by default 2.5 for ``"tilted"`` and 7.5 for the others, so that
        40 slices cross both lungs.

    Returns
    -------
    Grid

    Raises
    ------
    ValueError
        For an unknown kind.
    """
    if kind == "tilted":
        a = math.radians(angle)
        row: Vector = (1.0, 0.0, 0.0)
        col: Vector = (0.0, math.cos(a), math.sin(a))
        default_thickness = 2.5
    elif kind == "sagittal":
        row, col = (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)
        default_thickness = 7.5
    elif kind == "coronal":
        row, col = (1.0, 0.0, 0.0), (0.0, 0.0, -1.0)
        default_thickness = 7.5
    else:
        raise ValueError(f"oblique grid kind must be 'tilted', 'sagittal' or 'coronal', not {kind!r}")
    thickness = default_thickness if slice_thickness is None else slice_thickness
    if slices < 1 or thickness <= 0:
        raise ValueError(f"need at least one slice and a positive thickness, not {slices} x {thickness}")
    return _centred_grid(row, col, size=size, fov=fov, offsets=[k * thickness for k in range(slices)])


def uneven_grid(
    *,
    blocks: Sequence[tuple[int, float]] = ((24, 2.5), (12, 5.0)),
    size: int = 128,
    fov: float = 400.0,
) -> Grid:
    """An axial head-first-supine grid with uneven slice spacing, centred on the phantom.

    Parameters
    ----------
    blocks
        ``(count, spacing)`` pairs: ``count`` steps of ``spacing`` mm each, in order. The default, 24
        steps of 2.5 mm then 12 of 5 mm, gives 37 slices over 120 mm.
    size, fov
        As for :func:`axial_grid`.

    Returns
    -------
    Grid
    """
    offsets = [0.0]
    for count, spacing in blocks:
        if count < 0 or spacing <= 0:
            raise ValueError(f"each block needs a count >= 0 and a spacing > 0, not {(count, spacing)}")
        base = offsets[-1]  # fixed before extending: the generator would otherwise see the list grow
        offsets.extend(base + spacing * (n + 1) for n in range(count))
    return _centred_grid((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), size=size, fov=fov, offsets=offsets)


def structure_names() -> tuple[str, ...]:
    """Names of the truth structures every caller can rely on: body, then left and right lung."""
    return _STRUCTURES


def _ellipse(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    return (x / a) ** 2 + (y / b) ** 2 <= 1.0


def _structures(points: np.ndarray, *, table_posterior: bool) -> dict[str, np.ndarray]:
    """Membership of each point (array ``(..., 3)``) in each material region."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    a, b = BODY_SEMI_AXES

    def lung(name: str) -> np.ndarray:
        (cx, cy, cz), (lx, ly, lz) = LUNGS[name]
        return ((x - cx) / lx) ** 2 + ((y - cy) / ly) ** 2 + ((z - cz) / lz) ** 2 <= 1.0

    body = _ellipse(x, y, a, b)
    if table_posterior:
        table_y0 = b + TABLE_GAP
        table = (y >= table_y0) & (y <= table_y0 + TABLE_THICKNESS)
    else:
        table_y0 = -b - TABLE_GAP
        table = (y <= table_y0) & (y >= table_y0 - TABLE_THICKNESS)
    return {
        "body": body,
        "lung_left": lung("lung_left"),
        "lung_right": lung("lung_right"),
        "spine": x**2 + (y - SPINE_CENTRE_Y) ** 2 <= SPINE_RADIUS**2,
        "soft": _ellipse(x, y, a - FAT_THICKNESS, b - FAT_THICKNESS),
        "table": table & (np.abs(x) <= TABLE_HALF_WIDTH),
    }


def sample(grid: Grid, *, seed: int = 0, noise: float = 15.0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Sample the phantom at the voxel centres of ``grid``.

    Parameters
    ----------
    grid
        Where to sample.
    seed
        Seed of the noise generator: the same grid, seed and noise give the same array.
    noise
        Standard deviation of the Gaussian noise in HU (0 for none).

    Returns
    -------
    ct : numpy.ndarray
        int16 HU of shape ``(slices, rows, columns)``, clipped to the stored range [-1024, 3071].
    masks : dict of str to numpy.ndarray
        Truth as bool arrays of the same shape: every name of :func:`structure_names`, plus ``"spine"``.
        The body includes the lungs and spine; the lungs are disjoint.
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0, not {noise}")
    # The table lies below the patient as the image is displayed: posterior unless the rows run anterior.
    table_posterior = grid.column_direction[1] >= 0
    shape = grid.shape
    ct = np.empty(shape, dtype=np.float32)
    masks = {name: np.zeros(shape, dtype=bool) for name in (*_STRUCTURES, "spine")}
    rows, columns = np.meshgrid(np.arange(grid.rows), np.arange(grid.columns), indexing="ij")
    # One slice at a time keeps memory flat for 512 x 512 grids.
    for k in range(shape[0]):
        index = np.stack([np.full(rows.shape, k), rows, columns], axis=-1)
        regions = _structures(grid.index_to_patient(index), table_posterior=table_posterior)
        hu = np.full(rows.shape, AIR_HU, dtype=np.float32)
        hu[regions["table"]] = TABLE_HU
        hu[regions["body"]] = FAT_HU
        hu[regions["soft"]] = SOFT_TISSUE_HU
        hu[regions["spine"]] = BONE_HU
        hu[regions["lung_left"] | regions["lung_right"]] = LUNG_HU
        ct[k] = hu
        for name, mask in masks.items():
            mask[k] = regions[name]
    if noise > 0:
        ct += np.random.default_rng(seed).normal(0.0, noise, size=shape).astype(np.float32)
    ct_hu = np.clip(np.rint(ct), MIN_HU, MAX_HU).astype(np.int16)
    return ct_hu, masks


def to_sitk(grid: Grid, array: np.ndarray) -> sitk.Image:
    """Wrap an array sampled on ``grid`` as a SimpleITK image with the grid's geometry.

    Parameters
    ----------
    grid
        The grid of ``array``; its slices must be evenly spaced.
    array
        Shape ``(slices, rows, columns)``; a bool array becomes uint8.

    Returns
    -------
    SimpleITK.Image
        Origin at the first stored slice, spacing ``(column, row, slice)``, direction columns
        ``row_direction, column_direction, normal`` (the normal reversed when offsets decrease, so
        that the stored order is kept).

    Raises
    ------
    ValueError
        If the slices are unevenly spaced or the shape does not match the grid.
    """
    if array.shape != grid.shape:
        raise ValueError(f"array shape {array.shape} does not match grid shape {grid.shape}")
    step = grid.slice_spacing
    if step is None:
        if len(grid.slice_offsets) > 1:
            raise ValueError("to_sitk needs evenly spaced slices; this grid's spacing is uneven")
        step = 1.0  # one slice: any spacing describes it
    normal = np.asarray(grid.normal) * math.copysign(1.0, step)
    image = sitk.GetImageFromArray(array.astype(np.uint8) if array.dtype == bool else array)
    image.SetOrigin(tuple(float(v) for v in grid.slice_positions()[0]))
    row_spacing, column_spacing = grid.pixel_spacing
    image.SetSpacing((column_spacing, row_spacing, abs(step)))
    direction = np.column_stack([grid.row_direction, grid.column_direction, normal])
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def _nifti_path(out: Path, default_name: str) -> Path:
    out = Path(out)
    if out.name.endswith((".nii", ".nii.gz")):
        out.parent.mkdir(parents=True, exist_ok=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    return out / default_name


def write_nifti(
    out: Path,
    *,
    slices: int = 40,
    size: int = 128,
    seed: int = 0,
    grid: Grid | None = None,
) -> Path:
    """Write the phantom CT (int16 HU) as NIfTI.

    Parameters
    ----------
    out
        A ``.nii``/``.nii.gz`` file path, or a folder (created if missing) to write ``ct.nii.gz`` into.
    slices, size
        Of the :func:`axial_grid` to sample; ignored when ``grid`` is given.
    seed
        Noise seed.
    grid
        Another (evenly spaced) grid to sample instead.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    grid = grid if grid is not None else axial_grid(slices=slices, size=size)
    ct, _ = sample(grid, seed=seed)
    path = _nifti_path(out, "ct.nii.gz")
    sitk.WriteImage(to_sitk(grid, ct), str(path), useCompression=True)
    log.debug("phantom CT written to %s", path)
    return path


def write_masks_nifti(
    out_dir: Path,
    grid: Grid | None = None,
    *,
    names: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write the truth masks as uint8 (0/1) NIfTI files ``<name>.nii.gz``.

    Parameters
    ----------
    out_dir
        Folder to write into, created if missing.
    grid
        An evenly spaced grid; by default :func:`axial_grid`.
    names
        Which masks; by default :func:`structure_names`. ``"spine"`` is also available.

    Returns
    -------
    dict of str to pathlib.Path
        Name to file written.
    """
    grid = grid if grid is not None else axial_grid()
    _, masks = sample(grid, noise=0.0)
    wanted = tuple(names) if names is not None else _STRUCTURES
    unknown = set(wanted) - set(masks)
    if unknown:
        raise ValueError(f"unknown mask names {sorted(unknown)}; known: {sorted(masks)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in wanted:
        path = out_dir / f"{name}.nii.gz"
        sitk.WriteImage(to_sitk(grid, masks[name]), str(path), useCompression=True)
        paths[name] = path
    return paths


def _ds(value: float) -> str:
    """Format a number for a DS element: at most 16 characters, no needless digits."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        text = f"{value:.8g}"
    return text


def write_dicom(
    out_dir: Path,
    grid: Grid | None = None,
    *,
    seed: int = 0,
    patient_position: str = "HFS",
    order: str = "stored",
    patient_name: str = "Phantom^Postbox",
    patient_id: str = "PBX-PHANTOM-001",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_description: str = "Postbox phantom CT",
    frame_of_reference_uid: str | None = None,
) -> list[Path]:
    """Write the phantom as a CT Image Storage series, one file per slice.

    Parameters
    ----------
    out_dir
        Folder to write into, created if missing; files are named ``CT_0001.dcm``... by InstanceNumber
        and an existing file is never overwritten.
    grid
        Where to sample; by default :func:`axial_grid`.
    seed
        Noise seed.
    patient_position
        PatientPosition; give the position the grid was made for (:func:`patient_position_grid`).
    order
        ``"stored"``: InstanceNumber follows the grid's slice order; ``"reversed"``: the opposite, as a
        scanner that sends its slices the other way round.
    patient_name, patient_id, series_description
        Written as given.
    study_uid, series_uid, frame_of_reference_uid
        Generated when not given.

    Returns
    -------
    list of pathlib.Path
        The files, in InstanceNumber order.

    Raises
    ------
    ValueError
        For an unknown patient position or order.
    FileExistsError
        If a file of that name already exists in ``out_dir``.
    """
    if patient_position not in PATIENT_POSITIONS:
        raise ValueError(f"patient_position must be one of {PATIENT_POSITIONS}, not {patient_position!r}")
    if order not in ("stored", "reversed"):
        raise ValueError(f"order must be 'stored' or 'reversed', not {order!r}")
    grid = grid if grid is not None else axial_grid()
    ct, _ = sample(grid, seed=seed)
    stored = (ct.astype(np.int32) - RESCALE_INTERCEPT).astype(np.uint16)

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    steps = np.abs(np.diff(grid.slice_offsets))
    # A scanner reconstructs every slice with one thickness; for uneven spacing take the finest step.
    thickness = float(steps.min()) if steps.size else 1.0
    positions = grid.slice_positions()
    normal = np.asarray(grid.normal)
    n = len(grid.slice_offsets)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[tuple[int, Path]] = []
    for k in range(n):
        instance = k + 1 if order == "stored" else n - k
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]

        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = time
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "Postbox phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Postbox phantom"
        ds.SeriesDescription = series_description
        ds.ManufacturerModelName = "Analytic phantom"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = _ds(thickness)
        ds.KVP = "120"
        ds.PatientPosition = patient_position
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [_ds(v) for v in positions[k]]
        ds.ImageOrientationPatient = [_ds(v) for v in (*grid.row_direction, *grid.column_direction)]
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        # Position along the normal: orders slices the way a reader sorts them, whatever the orientation.
        ds.SliceLocation = _ds(float(positions[k] @ normal))
        ds.ImagesInAcquisition = n
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = grid.rows
        ds.Columns = grid.columns
        ds.PixelSpacing = [_ds(v) for v in grid.pixel_spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = str(RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<u2").tobytes()

        path = out_dir / f"CT_{instance:04d}.dcm"
        ds.save_as(path, enforce_file_format=True, overwrite=False)
        paths.append((instance, path))
    log.debug("phantom series %s: %d slices written to %s", series_uid, n, out_dir)
    return [path for _, path in sorted(paths)]
