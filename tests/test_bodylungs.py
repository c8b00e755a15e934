"""Tests of the bundled body and lung segmentation against the phantom's exact truth."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline import bodylungs, phantom
from pipeline.dataobject import DataObject
from pipeline.errors import InvalidInput
from pipeline.phantom import Grid


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _check_against_truth(outputs: list[DataObject], grid: Grid, parent: DataObject) -> None:
    """Every structure is there, geometry follows the input, and each mask matches its truth."""
    assert [o.meta_data["name"] for o in outputs] == ["body", "lung_left", "lung_right"]
    _, truth = phantom.sample(grid, noise=0)
    for output in outputs:
        assert output.type == "FILE" and output.parent is parent
        assert Path(output.path).name == f"{output.meta_data['name']}.nii.gz"
        mask = sitk.ReadImage(output.path)
        assert mask.GetPixelID() == sitk.sitkUInt8
        # Resample the truth onto the output's own geometry, so that slice order and direction (prone,
        # feet-first) are whatever the reader chose; nearest neighbour on the same grid is exact.
        reference = phantom.to_sitk(grid, truth[output.meta_data["name"]])
        expected = sitk.Resample(reference, mask, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        got = sitk.GetArrayFromImage(mask)
        assert set(np.unique(got)) <= {0, 1}
        dice = _dice(got.astype(bool), sitk.GetArrayFromImage(expected).astype(bool))
        assert dice > 0.9, f"{output.meta_data['name']}: Dice {dice:.3f}"


def test_nifti_input(tmp_path: Path) -> None:
    grid = phantom.axial_grid(slices=40, size=128)
    ct = DataObject(type="FILE", path=str(phantom.write_nifti(tmp_path / "in", slices=40, size=128)))
    start = time.perf_counter()
    outputs = bodylungs.segment([ct], str(tmp_path / "work"), dict(bodylungs.DEFAULT_SETTINGS))
    assert time.perf_counter() - start < 1.0  # fast enough to run through every door in tests
    assert all(Path(o.path).parent == tmp_path / "work" for o in outputs)
    image = sitk.ReadImage(ct.path)
    mask = sitk.ReadImage(outputs[0].path)
    assert mask.GetSize() == image.GetSize()
    assert np.allclose(mask.GetOrigin(), image.GetOrigin())
    assert np.allclose(mask.GetDirection(), image.GetDirection())
    _check_against_truth(outputs, grid, ct)


@pytest.mark.parametrize(
    ("position", "order"),
    [("HFS", "stored"), ("HFP", "stored"), ("FFS", "reversed"), ("FFP", "stored")],
)
def test_dicom_input_any_patient_position(tmp_path: Path, position: str, order: str) -> None:
    grid = phantom.patient_position_grid(position, slices=30, size=96)
    phantom.write_dicom(tmp_path / "series", grid, patient_position=position, order=order)
    series = DataObject(type="DICOM", path=str(tmp_path / "series"))
    outputs = bodylungs.segment([series], str(tmp_path / "work"), {})
    _check_against_truth(outputs, grid, series)


def test_oblique_dicom_input(tmp_path: Path) -> None:
    grid = phantom.oblique_grid("tilted", slices=40, size=96)
    phantom.write_dicom(tmp_path / "series", grid)
    series = DataObject(type="DICOM", path=str(tmp_path / "series"))
    _check_against_truth(bodylungs.segment([series], str(tmp_path / "work"), {}), grid, series)


def test_folder_with_two_series_uses_the_larger(tmp_path: Path) -> None:
    grid = phantom.axial_grid(slices=24, size=64)
    phantom.write_dicom(tmp_path / "series", grid)
    small = phantom.axial_grid(slices=3, size=32)
    for path in phantom.write_dicom(tmp_path / "other", small):
        path.rename(tmp_path / "series" / f"scout_{path.name}")
    series = DataObject(type="DICOM", path=str(tmp_path / "series"))
    _check_against_truth(bodylungs.segment([series], str(tmp_path / "work"), {}), grid, series)


def test_several_inputs_write_apart(tmp_path: Path) -> None:
    inputs = [
        DataObject(type="FILE", path=str(phantom.write_nifti(tmp_path / f"ct{n}.nii.gz", slices=20, size=64)))
        for n in (1, 2)
    ]
    outputs = bodylungs.segment(inputs, str(tmp_path / "work"), {"lung_left_name": "LungL"})
    assert sorted(str(Path(o.path).relative_to(tmp_path / "work")) for o in outputs) == sorted(
        f"input_{n}/{name}.nii.gz" for n in (1, 2) for name in ("body", "LungL", "lung_right")
    )
    assert [o.parent for o in outputs] == [inputs[0]] * 3 + [inputs[1]] * 3


def test_body_keeps_its_holes_when_asked(tmp_path: Path) -> None:
    grid = phantom.axial_grid(slices=20, size=64)
    ct = sitk.ReadImage(str(phantom.write_nifti(tmp_path, slices=20, size=64)))
    masks = bodylungs.segment_image(ct, {"fill_holes": False})
    _, truth = phantom.sample(grid, noise=0)
    body = sitk.GetArrayFromImage(masks["body"]).astype(bool)
    assert not (body & truth["lung_left"]).any()
    assert _dice(sitk.GetArrayFromImage(masks["lung_left"]).astype(bool), truth["lung_left"]) > 0.9


def test_non_image_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image\n")
    with pytest.raises(InvalidInput, match=r"notes\.txt cannot be read as an image"):
        bodylungs.segment([DataObject(type="FILE", path=str(bad))], str(tmp_path / "work"), {})


def test_folder_without_dicom_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here\n")
    with pytest.raises(InvalidInput, match="no DICOM image series found"):
        bodylungs.segment([DataObject(type="DICOM", path=str(tmp_path / "empty"))], str(tmp_path / "w"), {})


def test_image_without_body_is_refused(tmp_path: Path) -> None:
    air = sitk.Image(16, 16, 4, sitk.sitkInt16) - 1000
    path = tmp_path / "air.nii.gz"
    sitk.WriteImage(air, str(path))
    with pytest.raises(InvalidInput, match="no body found"):
        bodylungs.segment([DataObject(type="FILE", path=str(path))], str(tmp_path / "work"), {})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"body_name": "../escape"}, "body_name"),
        ({"lung_left_name": "body"}, "different names"),
        ({"body_threshold_hu": "high"}, "body_threshold_hu"),
        ({"fill_holes": 1}, "fill_holes"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, settings: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        bodylungs.segment([], str(tmp_path), settings)
