"""Tests of the analytic CT phantom: intensities, truth masks, geometry and the DICOM it writes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pipeline import phantom
from pipeline.phantom import Grid

SPECIAL_GRIDS = {
    "HFP": (lambda: phantom.patient_position_grid("HFP", slices=30, size=64), "HFP"),
    "FFS": (lambda: phantom.patient_position_grid("FFS", slices=30, size=64), "FFS"),
    "FFP": (lambda: phantom.patient_position_grid("FFP", slices=30, size=64), "FFP"),
    "tilted": (lambda: phantom.oblique_grid("tilted", slices=30, size=64), "HFS"),
    "sagittal": (lambda: phantom.oblique_grid("sagittal", slices=30, size=64, slice_thickness=10.0), "HFS"),
    "coronal": (lambda: phantom.oblique_grid("coronal", slices=24, size=64, slice_thickness=10.0), "HFS"),
    "uneven": (lambda: phantom.uneven_grid(size=64), "HFS"),
}


@pytest.fixture(scope="module")
def axial() -> tuple[Grid, np.ndarray, dict[str, np.ndarray]]:
    grid = phantom.axial_grid(slices=40, size=128)
    ct, masks = phantom.sample(grid, seed=3)
    return grid, ct, masks


def _read_series(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))]


def _patient_points(ds: pydicom.Dataset, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Map pixel (row, column) indices to patient coordinates from the DICOM header alone."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return (
        np.asarray(ds.ImagePositionPatient, dtype=float)
        + columns[:, None] * column_spacing * iop[:3]
        + rows[:, None] * row_spacing * iop[3:]
    )


def test_intensities_in_the_right_places(axial) -> None:
    _, ct, masks = axial
    assert ct.dtype == np.int16 and ct.shape == (40, 128, 128)
    lungs = masks["lung_left"] | masks["lung_right"]
    outside = ~ndimage.binary_dilation(masks["body"], iterations=8)  # clear of body and table
    assert abs(np.median(ct[outside]) - (-1000)) < 5
    assert abs(np.median(ct[lungs]) - (-850)) < 5
    tissue = masks["body"] & ~lungs & ~masks["spine"]
    assert abs(np.median(ct[tissue]) - 40) < 5
    assert abs(np.median(ct[masks["spine"]]) - 700) < 5
    assert 10 < ct[lungs].std() < 20  # the noise is there, and is about 15 HU


def test_masks_disjoint_lungs_inside_body(axial) -> None:
    grid, _, masks = axial
    assert set(phantom.structure_names()) == {"body", "lung_left", "lung_right"}
    left, right, body = masks["lung_left"], masks["lung_right"], masks["body"]
    assert left.any() and right.any()
    assert not (left & right).any()
    # Lungs keep clear of the skin: they stay inside the body shrunk by 3 voxels in-plane (~9 mm).
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    inner = ndimage.binary_erosion(body, structure=in_plane, iterations=3)
    assert not ((left | right) & ~inner).any()
    # The lungs lie within the scanned length, not on its first or last slice.
    assert not (left | right)[[0, -1]].any()
    # Left lung at patient +x, right at -x; the right lung is the larger.
    assert grid.index_to_patient(ndimage.center_of_mass(left))[0] > 50
    assert grid.index_to_patient(ndimage.center_of_mass(right))[0] < -50
    assert right.sum() > 1.1 * left.sum()


def test_size_changes_resolution_not_anatomy() -> None:
    volumes = {}
    for size in (64, 128):
        grid = phantom.axial_grid(slices=40, size=size)
        _, masks = phantom.sample(grid, noise=0)
        voxel = grid.pixel_spacing[0] * grid.pixel_spacing[1] * 2.5
        volumes[size] = {name: mask.sum() * voxel for name, mask in masks.items()}
    for name in phantom.structure_names():
        assert volumes[64][name] == pytest.approx(volumes[128][name], rel=0.03)


def test_seed_makes_it_deterministic() -> None:
    grid = phantom.axial_grid(slices=4, size=32)
    a, _ = phantom.sample(grid, seed=7)
    b, _ = phantom.sample(grid, seed=7)
    c, _ = phantom.sample(grid, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_grid_refuses_bad_geometry() -> None:
    good = phantom.axial_grid(slices=2, size=4)
    with pytest.raises(ValueError, match="orthogonal"):
        Grid(good.origin, (1, 0, 0), (1, 0, 0), good.pixel_spacing, 4, 4, (0.0, 1.0))
    with pytest.raises(ValueError, match="repeat"):
        Grid(good.origin, (1, 0, 0), (0, 1, 0), good.pixel_spacing, 4, 4, (0.0, 0.0))
    with pytest.raises(ValueError, match="uneven"):
        phantom.to_sitk(phantom.uneven_grid(size=8), np.zeros(phantom.uneven_grid(size=8).shape))


def test_nifti_files(tmp_path: Path, axial) -> None:
    grid, _, masks = axial
    ct_path = phantom.write_nifti(tmp_path, slices=40, size=128, seed=3)
    assert ct_path == tmp_path / "ct.nii.gz"
    image = sitk.ReadImage(str(ct_path))
    assert image.GetSize() == (128, 128, 40)
    assert np.allclose(image.GetOrigin(), grid.slice_positions()[0], atol=1e-3)
    assert np.array_equal(sitk.GetArrayFromImage(image), axial[1])
    mask_paths = phantom.write_masks_nifti(tmp_path / "truth", grid)
    assert set(mask_paths) == set(phantom.structure_names())
    left = sitk.ReadImage(str(mask_paths["lung_left"]))
    assert left.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(left).astype(bool), masks["lung_left"])


def test_dicom_series_reads_back(tmp_path: Path) -> None:
    grid = phantom.axial_grid(slices=20, size=64)
    files = phantom.write_dicom(tmp_path, grid, seed=1, study_uid="1.2.3.4", series_uid="1.2.3.4.5")
    assert [f.name for f in files] == [f"CT_{n:04d}.dcm" for n in range(1, 21)]
    expected, _ = phantom.sample(grid, seed=1)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    reference = phantom.to_sitk(grid, expected)
    assert np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    assert np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    assert np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(image), expected)

    datasets = [pydicom.dcmread(f) for f in files]
    assert len({ds.SOPInstanceUID for ds in datasets}) == 20
    assert {ds.StudyInstanceUID for ds in datasets} == {"1.2.3.4"}
    assert {ds.SeriesInstanceUID for ds in datasets} == {"1.2.3.4.5"}
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    for k, ds in enumerate(datasets):
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.Modality == "CT" and ds.PatientPosition == "HFS" and ds.InstanceNumber == k + 1
        assert ds.ImagesInAcquisition == 20 and float(ds.SliceThickness) == 2.5
        assert np.allclose(ds.ImagePositionPatient, grid.slice_positions()[k], atol=1e-3)
        assert float(ds.SliceLocation) == pytest.approx(grid.slice_positions()[k][2], abs=1e-3)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(hu, expected[k])
    with pytest.raises(FileExistsError, match="CT_0001"):
        phantom.write_dicom(tmp_path, grid)


def test_dciodvfy_finds_no_error(tmp_path: Path) -> None:
    dciodvfy = shutil.which("dciodvfy")
    assert dciodvfy is not None, "dciodvfy (dicom3tools) must be installed for this test"
    files = phantom.write_dicom(tmp_path, phantom.oblique_grid("tilted", slices=2, size=32))
    # dciodvfy's exit status does not tell errors from warnings; its output does.
    result = subprocess.run(
        [dciodvfy, str(files[0])], check=False, capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert "Error" not in output, output


def test_reversed_order_numbers_instances_backwards(tmp_path: Path) -> None:
    grid = phantom.axial_grid(slices=5, size=16)
    files = phantom.write_dicom(tmp_path, grid, order="reversed")
    datasets = [pydicom.dcmread(f) for f in files]
    assert [ds.InstanceNumber for ds in datasets] == [1, 2, 3, 4, 5]
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert z == sorted(z, reverse=True)  # instance 1 is the last stored slice


@pytest.mark.parametrize("name", sorted(SPECIAL_GRIDS))
def test_special_grids_keep_left_lung_at_patient_left(tmp_path: Path, name: str) -> None:
    make_grid, position = SPECIAL_GRIDS[name]
    grid = make_grid()
    ct, masks = phantom.sample(grid, seed=0)
    phantom.write_dicom(tmp_path, grid, patient_position=position)
    datasets = sorted(_read_series(tmp_path), key=lambda ds: ds.InstanceNumber)
    assert {ds.PatientPosition for ds in datasets} == {position}
    # Map each truth voxel through the DICOM headers alone (stored order = InstanceNumber order).
    centroids = {}
    for structure in ("lung_left", "lung_right"):
        points = []
        for k, ds in enumerate(datasets):
            assert np.array_equal(ds.pixel_array.astype(int) + int(ds.RescaleIntercept), ct[k])
            rows, columns = np.nonzero(masks[structure][k])
            points.append(_patient_points(ds, rows, columns))
        centroids[structure] = np.concatenate(points).mean(axis=0)
        # The grid's own mapping agrees with the headers.
        index_centroid = np.asarray(ndimage.center_of_mass(masks[structure]))
        if name != "uneven":  # a centroid index maps linearly only on even spacing
            assert np.allclose(grid.index_to_patient(index_centroid), centroids[structure], atol=0.5)
    assert centroids["lung_left"][0] > 50
    assert centroids["lung_right"][0] < -50


@pytest.mark.parametrize("position", ["HFP", "FFS", "FFP"])
def test_simpleitk_geometry_for_patient_positions(tmp_path: Path, position: str) -> None:
    grid = phantom.patient_position_grid(position, slices=30, size=64)
    phantom.write_dicom(tmp_path, grid, patient_position=position, order="reversed")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    # From the image content alone: the larger lung (the right) must sit at physical -x.
    hu = sitk.GetArrayFromImage(image)
    lungs = sitk.GetImageFromArray(((hu > -925) & (hu < -775)).astype(np.uint8))
    lungs.CopyInformation(image)
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(lungs), sortByObjectSize=True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(labels)
    assert stats.GetPhysicalSize(1) > 1.1 * stats.GetPhysicalSize(2)
    assert stats.GetCentroid(1)[0] < -50 and stats.GetCentroid(2)[0] > 50
