"""The completeness gate: a DICOM series that is not one whole volume never runs silently."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from conftest import Site, read_job

from pipeline import gate, phantom
from pipeline.errors import InvalidInput


def series(tmp_path: Path, name: str = "ct", slices: int = 10) -> list[Path]:
    return phantom.write_dicom(tmp_path / name, phantom.axial_grid(slices=slices, size=32, slice_thickness=5.0))


def test_whole_series_passes(tmp_path: Path) -> None:
    series(tmp_path)
    assert gate.problems(tmp_path / "ct") == []


def test_missing_slice_is_named_with_its_gap(tmp_path: Path) -> None:
    files = series(tmp_path)
    z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files]
    files[4].unlink()
    found = gate.problems(tmp_path / "ct")
    assert f"gap between z={z[3]:.1f} and z={z[5]:.1f}: 1 slice missing" in found
    assert "9 of the 10 images announced (ImagesInAcquisition) have arrived" in found


def test_two_missing_slices_and_uneven_spacing(tmp_path: Path) -> None:
    files = series(tmp_path)
    files[2].unlink()
    files[3].unlink()
    assert any("2 slices missing" in p for p in gate.problems(tmp_path / "ct"))
    grid = phantom.Grid(origin=(-100.0, -100.0, 0.0), row_direction=(1.0, 0.0, 0.0),
                        column_direction=(0.0, 1.0, 0.0), pixel_spacing=(6.0, 6.0), rows=32, columns=32,
                        slice_offsets=(0.0, 5.0, 10.0, 15.0, 22.0, 27.0))
    phantom.write_dicom(tmp_path / "uneven", grid)
    found = gate.problems(tmp_path / "uneven")
    assert found == ["uneven spacing between z=15.0 and z=22.0: 7.00 mm where the series steps 5.00 mm"]


def test_mixed_orientation_and_duplicates_are_refused(tmp_path: Path) -> None:
    files = series(tmp_path)
    ds = pydicom.dcmread(files[3])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8660254, 0.5]
    ds.save_as(files[3])
    with pytest.raises(InvalidInput, match="mixed orientations"):
        gate.problems(tmp_path / "ct")
    files = series(tmp_path, "dup")
    ds = pydicom.dcmread(files[2])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(files[2].with_name("copy.dcm"))
    with pytest.raises(InvalidInput, match="two slices at the same position"):
        gate.problems(tmp_path / "dup")


@pytest.mark.parametrize("mode", ["fail", "run"])
def test_incomplete_series_dropped_in_inbox_fails_or_runs_with_warning(site: Site, tmp_path: Path,
                                                                      mode: str) -> None:
    site.write_config(dicom={"incomplete": mode})
    files = series(tmp_path)
    files[6].unlink()
    site.start()
    shutil.copytree(tmp_path / "ct", site.inbox / "ct")
    [job_dir] = site.done(1)
    job = read_job(job_dir)
    if mode == "fail":
        assert job["status"] == "failed"
        assert "incomplete series in-1: gap between z=" in job["error"] and "1 slice missing" in job["error"]
        assert site.runs() == []
    else:
        assert job["status"] == "done"
        assert any("1 slice missing" in w for w in job["warnings"])
        assert "running anyway" in (job_dir / "job.log").read_text()
