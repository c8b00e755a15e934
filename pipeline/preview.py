"""A contour preview of each finished job: three orthogonal slices through its structures, as a PNG (issue 11).

For a job done with masks (on a DICOM series or a NIfTI CT), ``output/preview.png`` shows an axial, a
coronal and a sagittal slice through the centre of the structures, in patient orientation (radiological:
the patient's right on the image's left; anterior up in the axial, head up in the others), at the same
millimetres per pixel in all three so the aspect is the spacing's. The CT is shown at a soft-tissue window
(W400/L40) and each structure's outline in its colour, with a legend of the names. When the job wrote an
RTSTRUCT, the outlines are its contours rasterised back onto the series (``rasterise_rtstruct``) with its ROI
names and Display Colors: the picture shows what the planning system gets; otherwise the masks, named and
coloured as ``resolve_structures`` would write them.

Each panel is sampled directly from the arrays on the series grid, nearest neighbour, at the patient
points of its display pixels, so any orientation (axial, tilted, sagittal, coronal, uneven spacing) maps
through the same code and never needs a resampled volume. The outlines are drawn into the panels' pixels
and matplotlib (Agg) only places them and writes the names, so the picture takes well under a second on a
512x512x200 CT (``bench/writers.py``).

The PNG carries its panels' geometry as a text chunk ``postbox-preview`` (JSON): for each panel its box in
the picture (``[x, y, width, height]``, pixels from the top left), the patient point of its top-left pixel's
centre, the patient directions of its columns and rows and the millimetres per pixel; a reader (a test, a
viewer) can map any pixel back to the patient.

:class:`PreviewMaker` is the :class:`~pipeline.doors.Door` that makes them: it queues each job the worker
finishes and renders it in its own thread once the job's sends are no longer pending (or
:data:`SEND_WAIT_SECONDS` after the finish), so the preview never delays the results nor the finish that
issue 10 times. The file is written and named in job.yaml by :func:`pipeline.jobs.save_preview`.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import jobs
from .config import Config
from .errors import DamagedManifest, InvalidInput
from .index import Index
from .postprocess import mask_name

if TYPE_CHECKING:
    import SimpleITK as sitk

    from .writers.series import Series

log = logging.getLogger(__name__)

__all__ = ["PANELS", "SEND_WAIT_SECONDS", "Geometry", "PreviewMaker", "Structure", "make_preview", "render",
           "series_pixels", "series_preview"]

#: The CT window, Hounsfield units: soft tissue.
WINDOW_LEVEL, WINDOW_WIDTH = 40.0, 400.0
#: The longest side of a panel, pixels (a 512 x 512 x 200 CT is shown downsampled, a small one larger).
PANEL_PIXELS = 360
#: Longest wait for a job's sends before its preview is drawn anyway (a destination down retries for long).
SEND_WAIT_SECONDS = 10.0
#: How often a job waiting for its sends is looked at again.
_POLL_SECONDS = 0.25
#: Each panel's column and row directions in patient coordinates (LPS), left to right in the picture.
PANELS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),  # patient right on the left, anterior up
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),  # patient right on the left, head up
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),  # anterior on the left, head up
}
# The letters at each panel's left, right, top and bottom edges.
_EDGES = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}
_BACKGROUND = (24, 24, 28)  # the figure, and a panel's pixels outside the CT
_GAP = 10  # pixels between and around the panels
_LABEL = 22  # pixels above the panels for their names
_LEGEND = 170  # pixels to the right of the panels for the legend
_DPI = 100
_METADATA = "postbox-preview"
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class Structure:
    """One outline to draw: its name in the legend, its colour (RGB 0-255) and its mask on the CT's grid."""

    name: str
    color: tuple[int, int, int]
    mask: np.ndarray


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where the voxels of an array ``(slices, rows, columns)`` are in the patient (LPS, mm).

    Parameters
    ----------
    positions
        The patient point of each slice's first voxel, shape ``(slices, 3)``, in the array's slice order.
    row_direction, column_direction
        Directions of increasing column and row index.
    pixel_spacing
        ``(row spacing, column spacing)``: the distance between rows first, as DICOM has it.
    rows, columns
        The size of a slice.
    """

    positions: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int

    @classmethod
    def of_series(cls, series: Series) -> Geometry:
        """The geometry of a DICOM series' slices, in their order (each slice its own position)."""
        return cls(series.positions, series.row_direction, series.column_direction, series.pixel_spacing,
                   series.rows, series.columns)

    @classmethod
    def of_image(cls, image: sitk.Image) -> Geometry:
        """The geometry of ``sitk.GetArrayFromImage(image)``: slices along the image's third axis."""
        direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
        spacing = image.GetSpacing()
        steps = np.arange(image.GetSize()[2])[:, None] * spacing[2] * direction[:, 2]
        return cls(np.array(image.GetOrigin(), dtype=float) + steps, direction[:, 0], direction[:, 1],
                   (float(spacing[1]), float(spacing[0])), image.GetSize()[1], image.GetSize()[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.positions), self.rows, self.columns)

    def to_patient(self, k: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Patient points of (fractional) indices, shape ``(n, 3)``; a fractional slice between two positions."""
        k = np.clip(np.asarray(k, dtype=float), 0, len(self.positions) - 1)
        low = np.floor(k).astype(int)
        high = np.minimum(low + 1, len(self.positions) - 1)
        origin = self.positions[low] + (k - low)[:, None] * (self.positions[high] - self.positions[low])
        return (origin + np.outer(np.asarray(columns, dtype=float) * self.pixel_spacing[1], self.row_direction)
                + np.outer(np.asarray(rows, dtype=float) * self.pixel_spacing[0], self.column_direction))

    def corners(self) -> np.ndarray:
        """The patient points of the eight corner voxels' centres, shape ``(8, 3)``."""
        k = np.array([0, 0, 0, 0, 1, 1, 1, 1]) * (len(self.positions) - 1)
        rows = np.array([0, 0, 1, 1] * 2) * (self.rows - 1)
        columns = np.array([0, 1] * 4) * (self.columns - 1)
        return self.to_patient(k, rows, columns)

    def to_index(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The nearest voxel of each patient point: ``(slice, row, column, inside)``, indices clipped where
        not ``inside`` the array (half a voxel beyond its outer centres counts as inside)."""
        normal = np.cross(self.row_direction, self.column_direction)
        offsets = self.positions @ normal
        order = np.argsort(offsets, kind="stable")
        ordered = offsets[order]
        along = points @ normal
        if len(ordered) == 1:
            half = 0.5 * max(self.pixel_spacing)
            nearest = np.zeros(len(points), dtype=int)
            inside = np.abs(along - ordered[0]) <= half
        else:
            right = np.clip(np.searchsorted(ordered, along), 1, len(ordered) - 1)
            left = right - 1
            nearest = np.where(along - ordered[left] <= ordered[right] - along, left, right)
            first, last = ordered[1] - ordered[0], ordered[-1] - ordered[-2]
            inside = (along >= ordered[0] - first / 2) & (along <= ordered[-1] + last / 2)
        k = order[nearest]
        rel = points - self.positions[k]
        columns = np.rint(rel @ self.row_direction / self.pixel_spacing[1]).astype(int)
        rows = np.rint(rel @ self.column_direction / self.pixel_spacing[0]).astype(int)
        inside &= (columns >= 0) & (columns < self.columns) & (rows >= 0) & (rows < self.rows)
        return k, np.clip(rows, 0, self.rows - 1), np.clip(columns, 0, self.columns - 1), inside


@dataclass(frozen=True)
class _Panel:
    name: str
    origin: np.ndarray  # patient point of the top-left pixel's centre
    u: np.ndarray  # patient direction of the columns
    v: np.ndarray  # ... and of the rows
    spacing: float
    width: int
    height: int

    def points(self) -> np.ndarray:
        j, i = np.meshgrid(np.arange(self.width), np.arange(self.height))
        return (self.origin + (j.ravel() * self.spacing)[:, None] * self.u
                + (i.ravel() * self.spacing)[:, None] * self.v)


def _centre(geometry: Geometry, masks: Sequence[np.ndarray]) -> np.ndarray:
    """The patient point at the centre of the bounding box (in voxels) of every mask together."""
    lows, highs = [], []
    for mask in masks:
        slices = np.flatnonzero(np.any(mask.reshape(mask.shape[0], -1), axis=1))
        if slices.size == 0:
            continue
        plane = np.any(mask[slices[0]:slices[-1] + 1], axis=0)
        rows, columns = np.flatnonzero(np.any(plane, axis=1)), np.flatnonzero(np.any(plane, axis=0))
        lows.append((slices[0], rows[0], columns[0]))
        highs.append((slices[-1], rows[-1], columns[-1]))
    if not lows:
        low, high = np.zeros(3), np.array(geometry.shape, dtype=float) - 1
    else:
        low, high = np.min(lows, axis=0).astype(float), np.max(highs, axis=0).astype(float)
    box = np.array([[a, b, c] for a in (low[0], high[0]) for b in (low[1], high[1]) for c in (low[2], high[2])])
    return geometry.to_patient(box[:, 0], box[:, 1], box[:, 2]).mean(axis=0)


def _panels(geometry: Geometry, centre: np.ndarray, most: int) -> list[_Panel]:
    """The three panels through ``centre``, each spanning the CT, at one spacing: the longest side is ``most``."""
    corners = geometry.corners()
    low, high = corners.min(axis=0), corners.max(axis=0)
    # One spacing for the three, so each shows the patient's proportions; a small CT is shown larger than its
    # voxels (nearest neighbour), a large one smaller.
    spacing = max(float((high - low).max()), 1e-3) / max(most - 1, 1)
    panels = []
    for name, (u, v) in PANELS.items():
        u_axis, v_axis = np.array(u), np.array(v)
        fixed = 1.0 - np.abs(u_axis) - np.abs(v_axis)  # the axis the panel cuts across
        us, vs = corners @ u_axis, corners @ v_axis
        origin = us.min() * u_axis + vs.min() * v_axis + (centre @ fixed) * fixed
        panels.append(_Panel(name, origin, u_axis, v_axis, spacing, int((us.max() - us.min()) / spacing) + 1,
                             int((vs.max() - vs.min()) / spacing) + 1))
    return panels


def _hex(color: Sequence[int]) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in color)


def _outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of a 2-D mask with a 4-neighbour outside it (a 1-pixel inner outline)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[0, :] = inner[-1, :] = False
    inner[:, 0] = inner[:, -1] = False
    return mask & ~inner


def _panel_image(panel: _Panel, geometry: Geometry, hu: Any, structures: Sequence[Structure]) -> np.ndarray:
    """The panel's RGB pixels: the CT windowed, outside it the background, each outline in its colour."""
    k, rows, columns, inside = geometry.to_index(panel.points())
    values = hu(k, rows, columns)
    low = WINDOW_LEVEL - WINDOW_WIDTH / 2
    grey = (np.clip((values - low) / WINDOW_WIDTH, 0.0, 1.0) * 255).astype(np.uint8)
    rgb = np.repeat(grey[:, None], 3, axis=1)
    rgb[~inside] = _BACKGROUND
    rgb = rgb.reshape(panel.height, panel.width, 3)
    for s in structures:
        drawn = (s.mask[k, rows, columns] & inside).reshape(panel.height, panel.width)
        rgb[_outline(drawn)] = s.color
    return rgb


def render(ct: np.ndarray, geometry: Geometry, structures: Sequence[Structure], *,
           slope: np.ndarray | float = 1.0, intercept: np.ndarray | float = 0.0, source: str = "masks",
           most: int = PANEL_PIXELS) -> bytes:
    """Draw the preview of ``structures`` on ``ct``: a PNG's bytes.

    Parameters
    ----------
    ct
        The CT's stored values, ``(slices, rows, columns)`` on ``geometry``.
    geometry
        Where its voxels are in the patient.
    structures
        Each outline's name, colour and mask (bool, the CT's shape), drawn in this order.
    slope, intercept
        Hounsfield units are ``ct * slope + intercept``: numbers, or one per slice (a DICOM series).
    source
        What the outlines were drawn from (``"rtstruct"`` or ``"masks"``), said under the legend.
    most
        The longest side of a panel, pixels.

    Returns
    -------
    bytes
        The PNG, with its panels' geometry in the text chunk ``postbox-preview``.
    """
    from matplotlib.figure import Figure  # only the preview's thread pays for matplotlib
    from matplotlib.patches import Patch

    slopes = np.broadcast_to(np.asarray(slope, dtype=float), (ct.shape[0],))
    intercepts = np.broadcast_to(np.asarray(intercept, dtype=float), (ct.shape[0],))

    def hu(k: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        return ct[k, rows, columns] * slopes[k] + intercepts[k]

    panels = _panels(geometry, _centre(geometry, [s.mask for s in structures]), most)
    images = [_panel_image(p, geometry, hu, structures) for p in panels]
    width = _GAP + sum(p.width + _GAP for p in panels) + _LEGEND
    height = _LABEL + max(p.height for p in panels) + _GAP
    face = _hex(_BACKGROUND)
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor=face)
    x = _GAP
    boxes = []
    for panel, image in zip(panels, images, strict=True):
        fig.figimage(image, xo=x, yo=height - _LABEL - panel.height, origin="upper")
        boxes.append({"name": panel.name, "box": [x, _LABEL, panel.width, panel.height],
                      "origin": [round(float(c), 3) for c in panel.origin], "u": panel.u.tolist(),
                      "v": panel.v.tolist(), "spacing": round(panel.spacing, 6)})
        top = 1 - (_LABEL - 6) / height
        fig.text((x + panel.width / 2) / width, top, panel.name, color="white", fontsize=10, ha="center",
                 va="bottom")
        left, right, up, down = _EDGES[panel.name]
        middle = 1 - (_LABEL + panel.height / 2) / height
        for text, tx, ty, ha, va in ((left, x + 3, None, "left", "center"),
                                     (right, x + panel.width - 3, None, "right", "center"),
                                     (up, None, 1 - (_LABEL + 3) / height, "center", "top"),
                                     (down, None, 1 - (_LABEL + panel.height - 3) / height, "center", "bottom")):
            fig.text((tx if tx is not None else x + panel.width / 2) / width, ty if ty is not None else middle,
                     text, color="yellow", fontsize=8, ha=ha, va=va)
        x += panel.width + _GAP
    handles = [Patch(facecolor=_hex(s.color), edgecolor="none", label=s.name) for s in structures]
    legend = fig.legend(handles=handles, loc="upper left", bbox_to_anchor=((x + 4) / width, 1 - _LABEL / height),
                        frameon=False, labelcolor="white", fontsize=9, handlelength=1.2, borderaxespad=0)
    legend.set_in_layout(False)
    fig.text((x + 4) / width, _GAP / height, f"from the {'RTSTRUCT' if source == 'rtstruct' else 'masks'}\n"
             f"W{WINDOW_WIDTH:g} L{WINDOW_LEVEL:g}", color="#a0a0a0", fontsize=8, va="bottom")
    meta = {"panels": boxes, "source": source,
            "structures": [{"name": s.name, "color": list(s.color)} for s in structures]}
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, facecolor=face, metadata={_METADATA: json.dumps(meta)},
                pil_kwargs={"compress_level": 1})
    return buf.getvalue()


# --- a job's preview --------------------------------------------------------------------------------


def wants_preview(manifest: jobs.JobManifest) -> bool:
    """Whether a job has something to draw: done, with a mask or a DICOM output (an RTSTRUCT, perhaps)."""
    return manifest.status == jobs.JobStatus.DONE and any(
        o.type == "DICOM" or _is_image(o.path) for o in manifest.outputs)


def _is_image(path: str) -> bool:
    return path.lower().endswith(_IMAGE_SUFFIXES)


def _rtstruct_of(job_dir: Path, manifest: jobs.JobManifest, series_id: str, only: bool) -> Path | None:
    """The job's RTSTRUCT on input ``series_id``: Postbox's own (``kind: rtstruct``) or an algorithm's."""
    import pydicom

    candidates = [o for o in manifest.outputs if o.type == "DICOM" and (o.parent == series_id or
                                                                          (o.parent is None and only))]
    candidates.sort(key=lambda o: o.meta_data.get("kind") != "rtstruct")  # Postbox's own first
    for out in candidates:
        path = job_dir / out.path
        if out.meta_data.get("kind") == "rtstruct":
            return path
        if out.meta_data.get("kind") is None and path.is_file():
            try:
                if pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).Modality == "RTSTRUCT":
                    return path
            except Exception:  # not DICOM after all: not an RTSTRUCT
                continue
    return None


def _mask_structures(keys: Sequence[str], arrays: Sequence[np.ndarray],
                     mapping: Mapping[str, Any]) -> list[Structure]:
    """The masks named and coloured as the RTSTRUCT writer would (a mapping it would refuse: as they are)."""
    from .writers.rtstruct import resolve_structures

    try:
        resolved = resolve_structures(list(keys), mapping)
    except InvalidInput:
        resolved = resolve_structures(list(keys))
    return [Structure(resolved[k].name, resolved[k].color, a) for k, a in zip(keys, arrays, strict=True)]


def series_pixels(series: Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A series' stored pixel values in its slice order, and each slice's rescale slope and intercept."""
    import pydicom

    ct: np.ndarray | None = None
    for k, s in enumerate(series.slices):
        pixels = pydicom.dcmread(s.path).pixel_array
        if ct is None:
            ct = np.empty(series.shape, dtype=pixels.dtype)
        ct[k] = pixels
    assert ct is not None  # a Series has at least one slice
    slope = np.array([float(h.get("RescaleSlope", 1) or 1) for h in series.headers])
    intercept = np.array([float(h.get("RescaleIntercept", 0) or 0) for h in series.headers])
    return ct, slope, intercept


def _rtstruct_structures(path: Path, series: Series) -> list[Structure]:
    """Each ROI of an RTSTRUCT filled onto the series, with its ROI Name and Display Color, in file order."""
    import pydicom

    from .writers.check import rasterise_rtstruct
    from .writers.rtstruct import PALETTE

    ds = pydicom.dcmread(path)
    numbers = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    colors = {}
    for c in ds.get("ROIContourSequence", []):
        color = c.get("ROIDisplayColor")
        if color is not None and len(color) == 3:
            colors[numbers.get(int(c.ReferencedROINumber), "")] = tuple(int(v) for v in color)
    masks = rasterise_rtstruct(ds, series)
    return [Structure(name, colors.get(name) or PALETTE[i % len(PALETTE)], mask)  # type: ignore[arg-type]
            for i, (name, mask) in enumerate(masks.items())]


def series_preview(series_dir: Path, *, rtstruct: Path | None = None, masks: Mapping[str, Path] | None = None,
                   mapping: Mapping[str, Any] | None = None) -> bytes:
    """The preview of a DICOM series' structures: the RTSTRUCT's when given, else the masks (named and coloured
    by ``mapping``, as the RTSTRUCT writer would), read and put on the series' grid here.

    Raises
    ------
    InvalidInput
        If the series is not one geometry, or the RTSTRUCT or a mask cannot be put on it.
    """
    from .writers.series import align_masks, read_series

    series = read_series(series_dir)
    if rtstruct is not None:
        structures, source = _rtstruct_structures(rtstruct, series), "rtstruct"
    else:
        aligned = align_masks(series, dict(masks or {}))
        structures, source = _mask_structures(list(aligned), list(aligned.values()), mapping or {}), "masks"
    ct, slope, intercept = series_pixels(series)
    return render(ct, Geometry.of_series(series), structures, slope=slope, intercept=intercept, source=source)


def make_preview(config: Config, job_dir: Path, manifest: jobs.JobManifest) -> bytes | None:
    """The preview PNG of a finished job, or None when it has nothing to draw (no masks, no RTSTRUCT, no CT).

    Raises
    ------
    InvalidInput
        If its masks or RTSTRUCT cannot be put on its CT (then the job could not have written them either).
    """
    alg = config.algorithm(manifest.algorithm or config.default_algorithm)
    mapping = {**(alg.structures if alg is not None else {}), **manifest.delivery.structures}
    masks = [o for o in manifest.outputs if o.type == "FILE" and _is_image(o.path)]
    dicom = [i for i in manifest.inputs if i.type == "DICOM"]
    for series_input in dicom:
        only = len(dicom) == 1
        mine = [o for o in masks if o.parent == series_input.id or (o.parent is None and only)]
        rtstruct = _rtstruct_of(job_dir, manifest, series_input.id, only)
        if rtstruct is None and not mine:
            continue
        named = {mask_name(_as_object(job_dir, o)): job_dir / o.path for o in mine}
        try:
            return series_preview(job_dir / series_input.path, rtstruct=rtstruct, masks=named, mapping=mapping)
        except InvalidInput as exc:
            if rtstruct is None or not named:
                raise
            # An algorithm's own RTSTRUCT that does not fit the series: its masks still show where they are.
            log.warning("job %s: the preview shows the masks, the RTSTRUCT does not fit the series: %s",
                        manifest.id, exc)
            return series_preview(job_dir / series_input.path, masks=named, mapping=mapping)
    image_inputs = [i for i in manifest.inputs if i.type == "FILE" and _is_image(i.path)]
    if not image_inputs or not masks:
        return None
    return _nifti_preview(job_dir / image_inputs[0].path, [(mask_name(_as_object(job_dir, o)), job_dir / o.path)
                                                             for o in masks], mapping)


def _as_object(job_dir: Path, out: jobs.OutputRecord) -> Any:
    from .dataobject import DataObject

    return DataObject(type=out.type, path=str(job_dir / out.path), meta_data=dict(out.meta_data))


def _nifti_preview(ct_path: Path, masks: Sequence[tuple[str, Path]], mapping: Mapping[str, Any]) -> bytes:
    """The preview of masks on a CT image file (NIfTI, NRRD...): masks off its grid are resampled onto it."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(ct_path))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidInput(f"{ct_path.name} is not a 3-D CT")
    arrays = []
    for name, path in masks:
        mask = sitk.ReadImage(str(path))
        if mask.GetDimension() != 3:
            raise InvalidInput(f"mask '{name}' is not 3-D")
        same = (mask.GetSize() == image.GetSize() and np.allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-3)
                and np.allclose(mask.GetSpacing(), image.GetSpacing(), rtol=1e-4)
                and np.allclose(mask.GetDirection(), image.GetDirection(), atol=1e-4))
        if not same:
            mask = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        arrays.append(sitk.GetArrayViewFromImage(mask) != 0)
    structures = _mask_structures([n for n, _ in masks], arrays, mapping)
    return render(sitk.GetArrayViewFromImage(image), Geometry.of_image(image), structures, source="masks")


# --- the door ---------------------------------------------------------------------------------------


def _warm_up() -> None:
    """Import matplotlib and load its font: the first picture drawn cold took 1.4 s. Done while the first job
    queued waits for its sends, not at the start: a service that never draws one never loads matplotlib."""
    try:
        render(np.zeros((2, 2, 2), dtype=np.int16), Geometry(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
               np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), (1.0, 1.0), 2, 2),
               [Structure("warm-up", (255, 0, 0), np.ones((2, 2, 2), dtype=bool))])
    except Exception:  # the first real preview says what is wrong
        log.debug("preview: warm-up failed", exc_info=True)


class PreviewMaker:
    """Draws the preview of each job this service finishes, in its own thread, after the job's sends.

    A :class:`~pipeline.doors.Door` without a socket. What is queued when the service stops is dropped: a
    preview is a picture of outputs that stay, and a job finished by an earlier run gets none.
    """

    name = "preview"

    def __init__(self, config: Config, index: Index | None = None) -> None:
        self.config = config
        self.index = index
        self._queue: dict[str, float] = {}  # job id -> when to draw it even if its sends are still pending
        self._changed = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="preview", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop: a preview being drawn is finished (well under a second), the ones queued are dropped."""
        with self._changed:
            self._stop = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def on_ready(self) -> None:
        pass

    def on_job_finished(self, manifest: jobs.JobManifest) -> None:
        if not wants_preview(manifest):
            return
        with self._changed:
            self._queue[manifest.id] = time.monotonic() + SEND_WAIT_SECONDS
            self._changed.notify_all()

    def ready_info(self) -> dict[str, Any] | None:
        return None

    def _run(self) -> None:
        warm = False
        while True:
            with self._changed:
                while not self._stop and not self._queue:
                    self._changed.wait()
                if self._stop:
                    return
                queued = list(self._queue.items())
            if not warm:
                _warm_up()
                warm = True
            waiting = False
            for job_id, deadline in queued:
                if self._stopping():
                    return
                if self._due(job_id, deadline):
                    with self._changed:
                        self._queue.pop(job_id, None)
                    self.make(job_id)
                else:
                    waiting = True
            if waiting:
                with self._changed:
                    if not self._stop:
                        self._changed.wait(_POLL_SECONDS)

    def _stopping(self) -> bool:
        with self._changed:
            return self._stop

    def _due(self, job_id: str, deadline: float) -> bool:
        """Whether to draw now: its sends are no longer pending, or it has waited long enough (or is gone)."""
        if time.monotonic() >= deadline:
            return True
        try:
            return not jobs.read_manifest(self.config.outbox / job_id).sending
        except (FileNotFoundError, DamagedManifest):
            return True  # make() finds out and says so

    def make(self, job_id: str) -> Path | None:
        """Draw and save one finished job's preview now; its path, or None if it has none (never raises)."""
        cfg = self.config
        job_dir = cfg.outbox / job_id
        try:
            started = time.perf_counter()
            manifest = jobs.read_manifest(job_dir)
            png = make_preview(cfg, job_dir, manifest)
            if png is None:
                log.debug("job %s: nothing to preview", job_id)
                return None
            jobs.save_preview(cfg.inbox, cfg.outbox, job_id, png, index=self.index)
            log.info("job %s: preview drawn in %.2f s", job_id, time.perf_counter() - started)
            return job_dir / jobs.PREVIEW
        except FileNotFoundError:
            log.info("job %s: no preview, the job has left the outbox", job_id)
        except (InvalidInput, DamagedManifest) as exc:
            log.warning("job %s: no preview: %s", job_id, exc)
        except OSError as exc:  # a full disk, say: the job and its outputs are whole, only the picture is missing
            log.warning("job %s: no preview: %s", job_id, exc.strerror or type(exc).__name__)
        except Exception:
            log.exception("job %s: the preview could not be drawn", job_id)
        return None
