"""RTSTRUCT writer: contours on the right slices for any geometry, names mapped, bad input refused.

Round trips rasterise the written contours with a small even-odd rasteriser of this file, which maps each
contour through the DICOM header of the image it references (never through the code under test), and
with rt-utils' reader where its assumptions (even spacing, square pixels, axial) hold.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from _dicomtools import dciodvfy_errors, dice, make_series

from pipeline import phantom
from pipeline.errors import InvalidInput
from pipeline.phantom import Grid
from pipeline.writers import convert_nifti, read_series, write_rtstruct
from pipeline.writers.rtstruct import PALETTE, _ds_bytes, mask_contours

NAMES = phantom.structure_names()
MIN_DICE = 0.97


# ---------------------------------------------------------------- an independent rasteriser and helpers


def even_odd_fill(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside an odd number of polygons ((n, 2) column, row arrays)."""
    inside = np.zeros(shape, dtype=bool)
    columns = np.arange(shape[1])
    for polygon in polygons:
        x, y = polygon[:, 0], polygon[:, 1]
        x2, y2 = np.roll(x, -1), np.roll(y, -1)
        crossings = np.zeros(shape, dtype=bool)
        for r in range(shape[0]):
            # Edges that cross the row's centre line (half-open, so a vertex on it counts once).
            hit = (y <= r) != (y2 <= r)
            xs = x[hit] + (r - y[hit]) * (x2[hit] - x[hit]) / (y2[hit] - y[hit])
            crossings[r] = (np.count_nonzero(xs[:, None] < columns[None, :], axis=0) % 2) == 1
        inside ^= crossings
    return inside


def rasterise(rtstruct: pydicom.Dataset, series_dir: Path, grid: Grid) -> dict[str, np.ndarray]:
    """ROI name -> mask on ``grid``, each contour mapped through its referenced image's own header."""
    headers = {}
    for path in series_dir.glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        headers[ds.SOPInstanceUID] = ds
    positions = grid.slice_positions()
    names = {r.ROINumber: r.ROIName for r in rtstruct.StructureSetROISequence}
    out = {}
    for roi in rtstruct.ROIContourSequence:
        volume = np.zeros(grid.shape, dtype=bool)
        for contour in roi.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            ds = headers[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            ipp = np.array(ds.ImagePositionPatient, dtype=float)
            iop = np.array(ds.ImageOrientationPatient, dtype=float)
            row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
            points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
            assert len(points) == contour.NumberOfContourPoints
            rel = points - ipp
            # Every point lies in the plane of the image the contour references.
            assert np.abs(rel @ np.cross(iop[:3], iop[3:])).max() < 0.01
            polygon = np.column_stack([rel @ iop[:3] / column_spacing, rel @ iop[3:] / row_spacing])
            k = int(np.argmin(np.linalg.norm(positions - ipp, axis=1)))
            assert np.linalg.norm(positions[k] - ipp) < 0.01
            volume[k] ^= even_odd_fill([polygon], grid.shape[1:])
        out[names[roi.ReferencedROINumber]] = volume
    return out


@pytest.fixture(scope="module")
def axial(tmp_path_factory: pytest.TempPathFactory) -> tuple[Grid, Path, dict[str, np.ndarray]]:
    grid = phantom.axial_grid(slices=40, size=128)
    series_dir, masks = make_series(tmp_path_factory.mktemp("axial"), grid)
    return grid, series_dir, masks


# ---------------------------------------------------------------- round trips


def test_phantom_round_trip_dice_and_dciodvfy(axial, tmp_path: Path) -> None:
    grid, series_dir, masks = axial
    path = write_rtstruct(read_series(series_dir), masks, tmp_path / "rs.dcm")
    ds = pydicom.dcmread(path)
    back = rasterise(ds, series_dir, grid)
    for name in NAMES:
        assert dice(back[name], masks[name]) >= MIN_DICE, name
    # Contours run between the pixels, not through their centres: nothing is lost at the edges.
    assert all(np.array_equal(back[name], masks[name]) for name in NAMES)
    assert dciodvfy_errors(path) == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # rt-utils' use of pydicom 2 attributes
def test_rt_utils_reads_it_back(axial, tmp_path: Path) -> None:
    from rt_utils import RTStructBuilder

    grid, series_dir, masks = axial
    path = write_rtstruct(read_series(series_dir), masks, tmp_path / "rs.dcm")
    rtstruct = RTStructBuilder.create_from(dicom_series_path=str(series_dir), rt_struct_path=str(path))
    for name in NAMES:
        # rt-utils gives (rows, columns, slices), slices sorted along the normal like the phantom's.
        back = np.transpose(rtstruct.get_roi_mask_by_name(name), (2, 0, 1))
        assert dice(back, masks[name]) >= MIN_DICE, name


def test_references_study_series_frame_and_every_image(axial, tmp_path: Path) -> None:
    grid, series_dir, masks = axial
    path = write_rtstruct(read_series(series_dir), masks, tmp_path / "rs.dcm")
    ds = pydicom.dcmread(path)
    source = pydicom.dcmread(next(series_dir.glob("*.dcm")), stop_before_pixels=True)
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series_dir.glob("*.dcm")}
    assert ds.SOPClassUID == pydicom.uid.RTStructureSetStorage and ds.Modality == "RTSTRUCT"
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName
    assert ds.Manufacturer == "Postbox"
    [frame] = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == source.FrameOfReferenceUID
    [study] = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == source.StudyInstanceUID
    [series] = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ContourImageSequence} == uids
    for roi in ds.ROIContourSequence:
        assert {c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in roi.ContourSequence} <= uids
    assert [r.ROIGenerationAlgorithm for r in ds.StructureSetROISequence] == ["AUTOMATIC"] * 3


def ring_and_pair(grid: Grid) -> dict[str, np.ndarray]:
    """A ring (disk with a hole) and two separate disks on every slice of the middle of the grid."""
    rows, columns = np.mgrid[: grid.rows, : grid.columns]
    r, c = grid.rows / 2, grid.columns / 2
    distance = np.hypot(rows - r, columns - c)
    ring = (distance < grid.rows * 0.3) & (distance >= grid.rows * 0.12)
    pair = (np.hypot(rows - r, columns - c * 0.5) < grid.rows * 0.1) | (
        np.hypot(rows - r, columns - c * 1.5) < grid.rows * 0.1)
    masks = {"ring": np.zeros(grid.shape, bool), "pair": np.zeros(grid.shape, bool)}
    middle = slice(grid.shape[0] // 4, 3 * grid.shape[0] // 4)
    masks["ring"][middle] = ring
    masks["pair"][middle] = pair
    return masks


def test_hole_and_two_components_per_slice(axial, tmp_path: Path) -> None:
    grid, series_dir, _ = axial
    masks = ring_and_pair(grid)
    path = write_rtstruct(read_series(series_dir), masks, tmp_path / "rs.dcm")
    ds = pydicom.dcmread(path)
    back = rasterise(ds, series_dir, grid)
    for name in masks:
        assert dice(back[name], masks[name]) >= MIN_DICE, name
    # Two contours on each slice: outer and hole for the ring, one per disk for the pair.
    for roi in ds.ROIContourSequence:
        per_slice: dict[str, int] = {}
        for contour in roi.ContourSequence:
            uid = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
            per_slice[uid] = per_slice.get(uid, 0) + 1
        assert set(per_slice.values()) == {2}
    assert dciodvfy_errors(path) == []


def uneven_grid() -> Grid:
    """Axial, 2.5 mm then 5 mm then 1.25 mm slices across the lungs."""
    offsets = ([2.5 * k for k in range(12)] + [30 + 5 * k for k in range(8)]
               + [70 + 1.25 * k for k in range(12)])
    base = phantom.axial_grid(slices=len(offsets), size=96)
    middle = (offsets[0] + offsets[-1]) / 2
    return Grid(base.origin[:2] + (-middle,), base.row_direction, base.column_direction, base.pixel_spacing,
                base.rows, base.columns, tuple(offsets))


GEOMETRIES = {
    "reversed": (lambda: phantom.axial_grid(slices=30, size=96), "HFS", "reversed"),
    "tilted": (lambda: phantom.oblique_grid("tilted", slices=30, size=96), "HFS", "stored"),
    "sagittal": (lambda: phantom.oblique_grid("sagittal", slices=30, size=96, slice_thickness=10.0), "HFS",
                 "stored"),
    "coronal": (lambda: phantom.oblique_grid("coronal", slices=24, size=96, slice_thickness=10.0), "HFS",
                "stored"),
    "uneven": (uneven_grid, "HFS", "stored"),
    "HFP": (lambda: phantom.patient_position_grid("HFP", slices=30, size=96), "HFP", "stored"),
    "FFS": (lambda: phantom.patient_position_grid("FFS", slices=30, size=96), "FFS", "reversed"),
    "FFP": (lambda: phantom.patient_position_grid("FFP", slices=30, size=96), "FFP", "stored"),
}


@pytest.mark.parametrize("kind", list(GEOMETRIES))
def test_contours_on_the_right_slices_for_any_geometry(kind: str, tmp_path: Path) -> None:
    make_grid, position, order = GEOMETRIES[kind]
    grid = make_grid()
    series_dir, masks = make_series(tmp_path, grid, patient_position=position, order=order)
    path = write_rtstruct(read_series(series_dir), masks, tmp_path / "rs.dcm")
    ds = pydicom.dcmread(path)
    back = rasterise(ds, series_dir, grid)  # asserts each contour lies in its referenced image's plane
    for name in NAMES:
        assert dice(back[name], masks[name]) >= MIN_DICE, (kind, name)
    assert dciodvfy_errors(path) == []
    # The left lung is at patient +x whatever the orientation (prone flips are a reported bug elsewhere).
    names = {r.ROINumber: r.ROIName for r in ds.StructureSetROISequence}
    for roi in ds.ROIContourSequence:
        points = np.concatenate([np.array(c.ContourData, float).reshape(-1, 3) for c in roi.ContourSequence])
        if names[roi.ReferencedROINumber] == "lung_left":
            assert points[:, 0].mean() > 40
        if names[roi.ReferencedROINumber] == "lung_right":
            assert points[:, 0].mean() < -40


def test_uneven_spacing_contour_z_is_its_slice_z(tmp_path: Path) -> None:
    grid = uneven_grid()
    series_dir, masks = make_series(tmp_path, grid)
    ds = pydicom.dcmread(write_rtstruct(read_series(series_dir), masks, tmp_path / "rs.dcm"))
    z_of = {}
    for path in series_dir.glob("*.dcm"):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        z_of[header.SOPInstanceUID] = float(header.ImagePositionPatient[2])
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            z = np.array(contour.ContourData, float)[2::3]
            assert np.allclose(z, z_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID], atol=1e-3)


def test_oblique_is_dciodvfy_clean(tmp_path: Path) -> None:
    grid = phantom.oblique_grid("tilted", slices=20, size=64)
    series_dir, masks = make_series(tmp_path, grid)
    assert dciodvfy_errors(write_rtstruct(read_series(series_dir), masks, tmp_path / "rs.dcm")) == []


# ---------------------------------------------------------------- contours


def test_mask_contours_fill_back_exactly() -> None:
    mask = np.zeros((40, 40), bool)
    mask[5:30, 5:30] = True
    mask[10:20, 10:20] = False  # a hole
    mask[14:16, 14:16] = True  # an island in the hole
    mask[35, 35] = mask[36, 36] = True  # touching at a corner only
    contours = mask_contours(mask)
    assert len(contours) == 4
    assert np.array_equal(even_odd_fill(contours, mask.shape), mask)
    assert mask_contours(np.zeros((5, 5), bool)) == []


# ---------------------------------------------------------------- names the planning system expects


def test_mapped_names_colours_and_types(axial, tmp_path: Path) -> None:
    _, series_dir, masks = axial
    structures: dict[str, dict[str, object]] = {
        "lung_left": {"name": "Lung_L", "color": [0, 255, 255], "type": "ORGAN"},
        "lung_right": {"name": "Lung_R"},
        "body": {"name": "External"},
    }
    ds = pydicom.dcmread(write_rtstruct(read_series(series_dir), masks, tmp_path / "rs.dcm",
                                        structures=structures))
    names = {r.ROINumber: r.ROIName for r in ds.StructureSetROISequence}
    colours = {names[c.ReferencedROINumber]: [int(v) for v in c.ROIDisplayColor]
               for c in ds.ROIContourSequence}
    types = {names[o.ReferencedROINumber]: o.RTROIInterpretedType for o in ds.RTROIObservationsSequence}
    assert sorted(names.values()) == ["External", "Lung_L", "Lung_R"]
    assert colours["Lung_L"] == [0, 255, 255]
    assert colours["External"] == list(PALETTE[0]) and colours["Lung_R"] == list(PALETTE[2])
    assert types == {"External": "EXTERNAL", "Lung_L": "ORGAN", "Lung_R": "ORGAN"}


@pytest.mark.parametrize(("structures", "match"), [
    ({"body": {"type": "ORGANS"}}, "Interpreted Type"),
    ({"body": {"colour": [1, 2, 3]}}, "unknown keys"),
    ({"body": {"color": [1, 2]}}, "three integers"),
    ({"body": {"color": [0, 0, 256]}}, "three integers"),
    ({"body": {"name": "A\\B"}}, "ROI name"),
    ({"body": {"name": "Lung"}, "lung_left": {"name": "Lung"}}, "unique"),
])
def test_bad_mapping_refused(axial, tmp_path: Path, structures: dict, match: str) -> None:
    _, series_dir, masks = axial
    with pytest.raises(InvalidInput, match=match):
        write_rtstruct(read_series(series_dir), masks, tmp_path / "rs.dcm", structures=structures)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- PlatiPy's convert_nifti


def test_convert_nifti_with_platipy_arguments(axial, tmp_path: Path) -> None:
    grid, series_dir, masks = axial
    paths = phantom.write_masks_nifti(tmp_path / "masks", grid)
    one_file = next(series_dir.glob("*.dcm"))
    as_dict = convert_nifti(one_file, {n: str(p) for n, p in paths.items()}, tmp_path / "a.dcm",
                            color_map={"body": [1, 2, 3]})
    as_pairs = convert_nifti(series_dir, [f"{n},{p}" for n, p in paths.items()], str(tmp_path / "b.dcm"))
    as_paths = convert_nifti(str(series_dir), [str(p) for p in paths.values()], tmp_path / "c.dcm")
    as_images = convert_nifti(series_dir, {n: sitk.ReadImage(str(p)) for n, p in paths.items()},
                              tmp_path / "d.dcm")
    for path in (as_dict, as_pairs, as_paths, as_images):
        ds = pydicom.dcmread(path)
        assert sorted(r.ROIName for r in ds.StructureSetROISequence) == sorted(NAMES)
        back = rasterise(ds, series_dir, grid)
        assert min(dice(back[n], masks[n]) for n in NAMES) >= MIN_DICE
    colours = {c.ReferencedROINumber: [int(v) for v in c.ROIDisplayColor]
               for c in pydicom.dcmread(as_dict).ROIContourSequence}
    assert colours[1] == [1, 2, 3]
    with pytest.raises(FileExistsError, match="never overwrites"):
        convert_nifti(series_dir, {n: str(p) for n, p in paths.items()}, tmp_path / "a.dcm")


def test_mask_on_another_grid_is_resampled(axial, tmp_path: Path) -> None:
    grid, series_dir, masks = axial
    coarse = phantom.axial_grid(slices=20, size=64, slice_thickness=5.0)
    _, truth = phantom.sample(coarse, noise=0.0)
    image = phantom.to_sitk(coarse, truth["lung_left"])
    ds = pydicom.dcmread(write_rtstruct(read_series(series_dir), {"lung_left": image}, tmp_path / "rs.dcm"))
    back = rasterise(ds, series_dir, grid)["lung_left"]
    assert dice(back, masks["lung_left"]) > 0.85  # the coarse mask's own staircase, not a misplacement


def test_sitk_mask_of_an_uneven_series_is_taken_by_index(tmp_path: Path) -> None:
    grid = uneven_grid()
    series_dir, masks = make_series(tmp_path, grid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_dir)))
    ct = reader.Execute()  # SimpleITK puts the uneven series on a grid of mean spacing
    image = sitk.GetImageFromArray(masks["lung_left"].astype(np.uint8))
    image.CopyInformation(ct)
    ds = pydicom.dcmread(write_rtstruct(read_series(series_dir), {"lung_left": image}, tmp_path / "rs.dcm"))
    assert np.array_equal(rasterise(ds, series_dir, grid)["lung_left"], masks["lung_left"])


def test_empty_structure_is_skipped_with_a_warning(axial, tmp_path: Path, caplog) -> None:
    _, series_dir, masks = axial
    with caplog.at_level(logging.WARNING, logger="pipeline.writers.rtstruct"):
        with_empty = {**masks, "empty": np.zeros_like(masks["body"])}
        ds = pydicom.dcmread(write_rtstruct(read_series(series_dir), with_empty, tmp_path / "rs.dcm"))
    assert [r.ROIName for r in ds.StructureSetROISequence] == list(NAMES)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    with pytest.raises(InvalidInput, match="every mask is empty"):
        write_rtstruct(read_series(series_dir), {"empty": np.zeros_like(masks["body"])}, tmp_path / "e.dcm")


# ---------------------------------------------------------------- bad input


def test_mask_not_binary(axial, tmp_path: Path) -> None:
    _, series_dir, masks = axial
    labels = masks["lung_left"].astype(np.uint8) + 2 * masks["lung_right"]
    with pytest.raises(InvalidInput, match="'lungs' is not binary: it holds the values 0, 1, 2"):
        write_rtstruct(read_series(series_dir), {"lungs": labels}, tmp_path / "rs.dcm")
    probabilities = masks["body"] * np.linspace(0.2, 1.0, 128)  # a probability map, not a mask
    with pytest.raises(InvalidInput, match="not binary"):
        image = phantom.to_sitk(phantom.axial_grid(), probabilities)
        write_rtstruct(read_series(series_dir), {"body": image}, tmp_path / "rs.dcm")
    assert not list(tmp_path.iterdir())


def test_mask_whose_size_or_geometry_cannot_match(axial, tmp_path: Path) -> None:
    grid, series_dir, masks = axial
    series = read_series(series_dir)
    with pytest.raises(InvalidInput, match=r"'body' has shape \(39, 128, 128\), the series is \(40, 128, 1"):
        write_rtstruct(series, {"body": masks["body"][1:]}, tmp_path / "rs.dcm")
    shifted = phantom.to_sitk(grid, masks["body"])
    shifted.SetOrigin(tuple(v + d for v, d in zip(shifted.GetOrigin(), (4.0, 0.0, 0.0), strict=True)))
    with pytest.raises(InvalidInput, match="'body' has the series' size but not its geometry: .*4.00 mm"):
        write_rtstruct(series, {"body": shifted}, tmp_path / "rs.dcm")
    flipped = phantom.to_sitk(grid, masks["body"])
    flipped.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(InvalidInput, match="not its geometry: its direction"):
        write_rtstruct(series, {"body": flipped}, tmp_path / "rs.dcm")
    no_geometry = sitk.GetImageFromArray(np.ones((3, 9, 7), np.uint8))
    with pytest.raises(InvalidInput, match=r"'tumour' \(7x9x3\) has no geometry of its own"):
        write_rtstruct(series, {"tumour": no_geometry}, tmp_path / "rs.dcm")
    far = sitk.GetImageFromArray(np.ones((10, 10, 10), np.uint8))
    far.SetSpacing((2.0, 2.0, 2.0))
    far.SetOrigin((1000.0, 1000.0, 1000.0))
    with pytest.raises(InvalidInput, match="'body' lies mostly outside the series"):
        write_rtstruct(series, {"body": far}, tmp_path / "rs.dcm")
    assert not list(tmp_path.iterdir())


def _copy_series(series_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ct"
    shutil.copytree(series_dir, target)
    return target


def _edit(path: Path, **values: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def test_series_with_mixed_orientations(axial, tmp_path: Path) -> None:
    series_dir = _copy_series(axial[1], tmp_path)
    _edit(series_dir / "CT_0007.dcm", ImageOrientationPatient=[1, 0, 0, 0, 0.9659258, 0.2588190])
    with pytest.raises(InvalidInput, match="mixed orientations: CT_0007.dcm"):
        read_series(series_dir)


def test_series_with_a_missing_position(axial, tmp_path: Path) -> None:
    series_dir = _copy_series(axial[1], tmp_path)
    _edit(series_dir / "CT_0003.dcm", ImagePositionPatient=None)
    with pytest.raises(InvalidInput, match="CT_0003.dcm has no valid ImagePositionPatient"):
        read_series(series_dir)


def test_series_with_two_slices_at_one_position(axial, tmp_path: Path) -> None:
    series_dir = _copy_series(axial[1], tmp_path)
    shutil.copy(series_dir / "CT_0005.dcm", series_dir / "CT_9999.dcm")
    _edit(series_dir / "CT_9999.dcm", SOPInstanceUID=pydicom.uid.generate_uid())
    with pytest.raises(InvalidInput, match="two slices at the same position"):
        read_series(series_dir)
    shutil.copy(series_dir / "CT_0005.dcm", series_dir / "CT_9999.dcm")
    with pytest.raises(InvalidInput, match="SOPInstanceUID .* twice"):
        read_series(series_dir)


def test_series_with_mixed_sizes_or_frames_or_series(axial, tmp_path: Path) -> None:
    series_dir = _copy_series(axial[1], tmp_path)
    _edit(series_dir / "CT_0002.dcm", FrameOfReferenceUID=pydicom.uid.generate_uid())
    with pytest.raises(InvalidInput, match="mixed frames of reference"):
        read_series(series_dir)
    _edit(series_dir / "CT_0002.dcm", SeriesInstanceUID=pydicom.uid.generate_uid())
    with pytest.raises(InvalidInput, match="holds 2 series"):
        read_series(series_dir)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "mask.nii.gz").write_bytes(b"not DICOM")
    with pytest.raises(InvalidInput, match="holds no DICOM image"):
        read_series(tmp_path / "empty")


def test_series_reader_skips_non_images_and_sorts_along_the_normal(axial, tmp_path: Path) -> None:
    grid, source, masks = axial
    series_dir = _copy_series(source, tmp_path)
    write_rtstruct(read_series(series_dir), masks, series_dir / "rs.dcm")  # an RTSTRUCT next to the images
    (series_dir / "notes.txt").write_text("not DICOM")
    series = read_series(series_dir / "CT_0001.dcm")
    assert series.shape == grid.shape and series.slice_spacing == pytest.approx(2.5)
    assert np.allclose(series.positions, grid.slice_positions())


def test_contour_numbers_are_formatted_as_python_rounds_them() -> None:
    """ContourData is formatted for all the numbers of a contour at once (issue 10): the values are
    Python's own rounding to 0.001 mm, each a valid DS of at most 16 characters, the whole of even length."""
    rng = np.random.default_rng(0)
    edges = [0.0, -0.0, -0.0004, 0.0005, 0.0015, -0.0015, 0.25, -0.5, 12.5, -3.0, 100.001, 99999.9995, -999999.999]
    for points in (rng.uniform(-600, 600, (500, 3)), np.round(rng.uniform(-300, 300, (300, 3)) * 64) / 64,
                   np.array(edges[:12]).reshape(-1, 3), np.array([edges[12], 1e7, 1.5]).reshape(1, 3)):
        value = _ds_bytes(points)
        assert len(value) % 2 == 0
        numbers = value.decode("ascii").rstrip(" ").split("\\")
        assert all(0 < len(n) <= 16 and " " not in n for n in numbers), numbers
        assert np.array_equal(np.array(numbers, dtype=float), np.round(points, 3).ravel())
    assert _ds_bytes(np.array([[12.5, -3.0, -0.0004]])) == b"12.5\\-3\\0 "
