"""Check-back of an RTSTRUCT (Dice per structure, corrupted contours fail) and write_dicom_outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from _dicomtools import dciodvfy_errors

from pipeline import phantom
from pipeline.errors import InvalidInput
from pipeline.phantom import Grid
from pipeline.writers import (
    DicomOutputs,
    check_rtstruct,
    dice,
    rasterise_rtstruct,
    read_series,
    write_rtstruct,
)
from pipeline.writers import outputs as outputs_module

NAMES = phantom.structure_names()


Axial = tuple[Grid, Path, dict[str, np.ndarray], dict[str, Path]]


@pytest.fixture(scope="module")
def axial(tmp_path_factory: pytest.TempPathFactory) -> Axial:
    grid = phantom.axial_grid(slices=32, size=128)
    root = tmp_path_factory.mktemp("axial")
    phantom.write_dicom(root / "ct", grid)
    _, truth = phantom.sample(grid, noise=0.0)
    paths = phantom.write_masks_nifti(root / "masks", grid)
    return grid, root / "ct", {name: truth[name] for name in NAMES}, paths


def corrupt(path: Path, shift: tuple[float, float, float], roi_numbers: set[int] | None = None) -> None:
    """Move every contour point of the file (or of some ROIs) by ``shift`` mm, as a damaged file would."""
    ds = pydicom.dcmread(path)
    for roi in ds.ROIContourSequence:
        if roi_numbers is None or roi.ReferencedROINumber in roi_numbers:
            for contour in roi.ContourSequence:
                points = np.array(contour.ContourData, float).reshape(-1, 3) + shift
                contour.ContourData = [f"{v:.3f}" for v in points.ravel()]
    ds.save_as(path)


def test_dice() -> None:
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert dice(a, b) == 1.0
    a[0, :2] = True
    b[0, 1:3] = True
    assert dice(a, b) == pytest.approx(0.5)


def test_check_figure_per_structure(axial, tmp_path: Path) -> None:
    _, series_dir, masks, _ = axial
    series = read_series(series_dir)
    path = write_rtstruct(series, masks, tmp_path / "rs.dcm", structures={"body": {"name": "External"}})
    figures = check_rtstruct(path, series, masks, names={"body": "External"})
    assert list(figures) == list(NAMES)
    assert all(figure >= 0.95 for figure in figures.values())


def test_contours_shifted_after_writing_fail_the_check(axial, tmp_path: Path) -> None:
    _, series_dir, masks, _ = axial
    series = read_series(series_dir)
    path = write_rtstruct(series, masks, tmp_path / "rs.dcm")
    corrupt(path, (6.0, 0.0, 0.0))
    with pytest.raises(InvalidInput, match=r"structure lung_left: check-back Dice 0\.\d+ below 0.95"):
        check_rtstruct(path, series, masks)
    # The figure is the figure: a laxer threshold lets the same file through, with it recorded.
    figures = check_rtstruct(path, series, masks, min_dice=0.5)
    assert 0.5 < figures["lung_left"] < 0.95 and figures["body"] > figures["lung_left"]


def test_contour_moved_off_its_slice_fails(axial, tmp_path: Path) -> None:
    _, series_dir, masks, _ = axial
    series = read_series(series_dir)
    path = write_rtstruct(series, masks, tmp_path / "rs.dcm")
    corrupt(path, (0.0, 0.0, 1.0), roi_numbers={2})
    with pytest.raises(InvalidInput, match="structure lung_left: a contour lies 1.00 mm off the plane"):
        check_rtstruct(path, series, masks)


def test_contour_referencing_another_image_fails(axial, tmp_path: Path) -> None:
    _, series_dir, masks, _ = axial
    series = read_series(series_dir)
    path = write_rtstruct(series, masks, tmp_path / "rs.dcm")
    ds = pydicom.dcmread(path)
    ds.ROIContourSequence[0].ContourSequence[0].ContourImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    ds.save_as(path)
    with pytest.raises(InvalidInput, match="a contour references image 1.2.3.4, which is not in the series"):
        check_rtstruct(path, series, masks)


def test_missing_structure_fails(axial, tmp_path: Path) -> None:
    _, series_dir, masks, _ = axial
    series = read_series(series_dir)
    path = write_rtstruct(series, {"body": masks["body"]}, tmp_path / "rs.dcm")
    with pytest.raises(InvalidInput, match="structure lung_right: check-back Dice 0.000 below 0.95"):
        check_rtstruct(path, series, masks)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # rt-utils' use of pydicom 2 attributes
def test_rasterises_rt_utils_files_too(axial, tmp_path: Path) -> None:
    from rt_utils import RTStructBuilder

    _, series_dir, masks, _ = axial
    rtstruct = RTStructBuilder.create_new(dicom_series_path=str(series_dir))
    rtstruct.add_roi(mask=np.transpose(masks["lung_right"], (1, 2, 0)), name="lung_right")
    rtstruct.save(str(tmp_path / "rtutils.dcm"))
    back = rasterise_rtstruct(tmp_path / "rtutils.dcm", read_series(series_dir))
    assert dice(back["lung_right"], masks["lung_right"]) > 0.97


# ---------------------------------------------------------------- write_dicom_outputs


def test_outputs_written_checked_and_recorded(axial, tmp_path: Path) -> None:
    _, series_dir, _, paths = axial
    result = outputs_module.write_dicom_outputs(
        series_dir, paths, tmp_path / "out", kinds=("seg", "rtstruct"),
        structures={"lung_left": {"name": "Lung_L", "color": [0, 255, 255]}, "body": {"type": "EXTERNAL"}},
        algorithm_name="bodylungs", algorithm_version="2.0")
    assert isinstance(result, DicomOutputs)
    assert result.files == [tmp_path / "out" / "rtstruct.dcm", tmp_path / "out" / "seg.dcm"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rtstruct.dcm", "seg.dcm"]
    assert list(result.check) == list(NAMES) and min(result.check.values()) >= 0.95
    assert result.skipped == []
    rt = pydicom.dcmread(result.files[0])
    assert sorted(r.ROIName for r in rt.StructureSetROISequence) == ["Lung_L", "body", "lung_right"]
    assert [r.ROIDerivationAlgorithmIdentificationSequence[0].AlgorithmName
            for r in rt.StructureSetROISequence] == ["bodylungs"] * 3
    for path in result.files:
        assert dciodvfy_errors(path) == []


def test_failed_check_leaves_nothing_behind(axial, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, series_dir, _, paths = axial
    write = outputs_module.write_rtstruct

    def write_then_damage(*args, **kwargs):  # the file is damaged after it is written, before the check
        path = write(*args, **kwargs)
        corrupt(path, (6.0, 0.0, 0.0))
        return path

    monkeypatch.setattr(outputs_module, "write_rtstruct", write_then_damage)
    out = tmp_path / "out"
    with pytest.raises(InvalidInput, match="structure lung_left: check-back Dice"):
        outputs_module.write_dicom_outputs(series_dir, paths, out, kinds=("rtstruct", "seg"))
    assert list(out.iterdir()) == []


def test_outputs_refuse_bad_requests(axial, tmp_path: Path) -> None:
    _, series_dir, _, paths = axial
    out = tmp_path / "out"
    with pytest.raises(InvalidInput, match="unknown DICOM output kind"):
        outputs_module.write_dicom_outputs(series_dir, paths, out, kinds=("rtplan",))
    with pytest.raises(InvalidInput, match="min_dice must be between 0 and 1"):
        outputs_module.write_dicom_outputs(series_dir, paths, out, min_dice=1.5)
    with pytest.raises(InvalidInput, match="Interpreted Type"):
        outputs_module.write_dicom_outputs(series_dir, paths, out, structures={"body": {"type": "BODY"}})
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    with pytest.raises(InvalidInput, match="mask broken.nii.gz cannot be read"):
        outputs_module.write_dicom_outputs(series_dir, {"broken": tmp_path / "broken.nii.gz"}, out)
    out.mkdir(exist_ok=True)
    (out / "rtstruct.dcm").write_bytes(b"")
    with pytest.raises(FileExistsError, match="never overwrites"):
        outputs_module.write_dicom_outputs(series_dir, paths, out)


def test_empty_structure_is_reported_as_skipped(axial, tmp_path: Path) -> None:
    grid, series_dir, _, paths = axial
    empty = tmp_path / "empty.nii.gz"
    sitk.WriteImage(phantom.to_sitk(grid, np.zeros(grid.shape, bool)), str(empty))
    result = outputs_module.write_dicom_outputs(series_dir, {**paths, "empty": empty}, tmp_path / "out")
    assert result.skipped == ["empty"] and list(result.check) == list(NAMES)
