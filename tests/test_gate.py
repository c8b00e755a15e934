"""The completeness gate: a DICOM series that is not one whole volume never runs silently."""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import Site, read_job
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from pipeline import gate, phantom
from pipeline.errors import InvalidInput
from pipeline.writers import series as writers_series
from pipeline.writers.series import read_series


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


# --- issue 8, defect 10: the gate streams small records instead of holding every header ----------------


def node_records(folder: Path) -> list[gate.Geometry]:
    """Records built the way the DICOM node builds them: each instance's encoded dataset (no file meta, as
    pynetdicom hands it over) parsed once with ``read_dataset`` up to ``gate.LAST_TAG``."""
    found = []
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, ds)
        header = read_dataset(io.BytesIO(buffer.getvalue()), is_implicit_VR=False, is_little_endian=True,
                              stop_when=gate.past_last_tag)
        assert max(header.keys()) <= gate.LAST_TAG  # nothing past PixelSpacing was parsed
        record = gate.Geometry.from_dataset(header, name=path.name)
        if record is not None:
            found.append(record)
    return found


def edit(path: Path, **changes: Any) -> None:
    """Set (or, for None, delete) attributes of one file of a series."""
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def copy_with(path: Path, name: str, **changes: Any) -> None:
    """Save a copy of one file of a series under ``name`` with some attributes changed."""
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path.with_name(name))


WHOLE_OR_NOT = {
    # name: (grid, slices to delete, what the verdict must hold)
    "axial whole": (phantom.axial_grid(slices=12, size=16, slice_thickness=5.0), [], None),
    "axial gap": (phantom.axial_grid(slices=12, size=16, slice_thickness=5.0), [4, 5], "gap between z="),
    "axial feet first": (phantom.patient_position_grid("FFS", slices=12, size=16), [3], "1 slice missing"),
    "first slice missing": (phantom.axial_grid(slices=12, size=16), [0], "11 of the 12 images announced"),
    "uneven spacing": (phantom.uneven_grid(blocks=((6, 2.5), (3, 4.0)), size=16), [], "uneven spacing between"),
    "tilted whole": (phantom.oblique_grid("tilted", slices=12, size=16), [], None),
    "tilted gap": (phantom.oblique_grid("tilted", angle=17.0, slices=12, size=16), [6], "gap between position="),
    "sagittal gap": (phantom.oblique_grid("sagittal", slices=12, size=16), [3], "gap between x="),
    "coronal whole": (phantom.oblique_grid("coronal", slices=12, size=16), [], None),
}


@pytest.mark.parametrize("case", list(WHOLE_OR_NOT))
def test_records_give_the_verdict_of_the_folder(tmp_path: Path, case: str) -> None:
    grid, missing, expected = WHOLE_OR_NOT[case]
    files = phantom.write_dicom(tmp_path / "ct", grid, order="reversed" if "feet" in case else "stored")
    for k in missing:
        files[k].unlink()
    found = gate.problems(tmp_path / "ct")
    assert gate.problems_of(node_records(tmp_path / "ct")) == found
    if expected is None:
        assert found == []
    else:
        assert any(expected in p for p in found), found
    if missing:
        n = len(grid.slice_offsets)
        assert f"{n - len(missing)} of the {n} images announced (ImagesInAcquisition) have arrived" in found


def test_announced_count_is_a_promise_only_when_every_image_makes_it(tmp_path: Path) -> None:
    files = series(tmp_path)
    for f in files:
        edit(f, ImagesInAcquisition=14)
    assert gate.problems_of(node_records(tmp_path / "ct")) == [
        "10 of the 14 images announced (ImagesInAcquisition) have arrived"]
    edit(files[0], ImagesInAcquisition=None)  # one image says nothing: no promise
    assert gate.problems_of(node_records(tmp_path / "ct")) == gate.problems(tmp_path / "ct") == []
    edit(files[0], ImagesInAcquisition=12)  # images disagree: no promise
    assert gate.problems_of(node_records(tmp_path / "ct")) == gate.problems(tmp_path / "ct") == []


REFUSALS: dict[str, tuple[Callable[[list[Path]], object], str]] = {
    "mixed orientations": (lambda f: edit(f[3], ImageOrientationPatient=[1, 0, 0, 0, 0.8660254, 0.5]),
                           r"mixed orientations: CT_0004.dcm has ImageOrientationPatient \[1.0, 0.0, 0.0, "
                           r"0.0, 0.8660254, 0.5\], CT_0001.dcm has \[1.0, 0.0, 0.0, 0.0, 1.0, 0.0\]"),
    "orientation not orthonormal": (lambda f: edit(f[0], ImageOrientationPatient=[1, 0, 0, 1, 0, 0]),
                                    r"CT_0001.dcm has an ImageOrientationPatient that is not two orthogonal unit "
                                    r"vectors: \[1.0, 0.0, 0.0, 1.0, 0.0, 0.0\]"),
    "mixed sizes": (lambda f: edit(f[5], Rows=16), "mixed image sizes: CT_0006.dcm is 16x32, CT_0001.dcm is 32x32"),
    "mixed pixel spacings": (lambda f: edit(f[5], PixelSpacing=[1, 2]),
                             r"mixed pixel spacings: CT_0006.dcm has \[1.0, 2.0\], CT_0001.dcm has \[12.5, 12.5\]"),
    "spacing not positive": (lambda f: [edit(x, PixelSpacing=[0, 2]) for x in f],
                             r"CT_0001.dcm has a PixelSpacing that is not positive: \[0.0, 2.0\]"),
    "mixed frames of reference": (lambda f: edit(f[5], FrameOfReferenceUID=pydicom.uid.generate_uid()),
                                  "mixed frames of reference: CT_0006.dcm and CT_0001.dcm"),
    "no frame of reference": (lambda f: [edit(x, FrameOfReferenceUID=None) for x in f],
                              "CT_0001.dcm has no FrameOfReferenceUID"),
    "several series": (lambda f: (edit(f[5], SeriesInstanceUID="1.2.3"), edit(f[2], ImagePositionPatient=None)),
                       r"holds 2 series \(1.2.3, .*\); send one series per job"),
    "multi-frame": (lambda f: edit(f[7], NumberOfFrames=3),
                    "CT_0008.dcm is multi-frame; only series of single-frame images are supported"),
    "SOPInstanceUID twice": (lambda f: copy_with(f[2], "copy.dcm", ImagePositionPatient=[0, 0, 999]),
                             r"SOPInstanceUID [0-9.]+ twice \(CT_0003.dcm and copy.dcm\)"),
    "position twice": (lambda f: copy_with(f[2], "copy.dcm", SOPInstanceUID=pydicom.uid.generate_uid()),
                       "two slices at the same position, -12.500 mm along the normal: CT_0003.dcm and copy.dcm"),
    "no position": (lambda f: edit(f[6], ImagePositionPatient=None),
                    "CT_0007.dcm has no valid ImagePositionPatient; every image needs one"),
    "position of two values": (lambda f: edit(f[6], ImagePositionPatient=[1, 2]),
                               "CT_0007.dcm has no valid ImagePositionPatient; every image needs one"),
    "no orientation": (lambda f: edit(f[0], ImageOrientationPatient=None),
                       "CT_0001.dcm has no valid ImageOrientationPatient; every image needs one"),
    "no pixel spacing": (lambda f: edit(f[4], PixelSpacing=None),
                         "CT_0005.dcm has no valid PixelSpacing; every image needs one"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_not_one_geometry_is_refused_from_records_as_from_the_folder(tmp_path: Path, case: str) -> None:
    mutate, message = REFUSALS[case]
    mutate(series(tmp_path))
    with pytest.raises(InvalidInput, match=message) as from_folder:
        gate.problems(tmp_path / "ct")
    with pytest.raises(InvalidInput, match=message) as from_records:
        gate.problems_of(node_records(tmp_path / "ct"), series_dir=tmp_path / "ct")
    assert from_records.value.reason == from_folder.value.reason
    if "[" not in message:
        # Where no numbers are printed, the words are the series reader's own (it prints numpy reprs).
        with pytest.raises(InvalidInput, match=".") as from_reader:
            read_series(tmp_path / "ct")
        assert from_folder.value.reason == from_reader.value.reason


def test_several_series_without_a_folder_name_the_images(tmp_path: Path) -> None:
    files = series(tmp_path)
    edit(files[5], SeriesInstanceUID="1.2.3")
    with pytest.raises(InvalidInput, match=r"^the images belong to 2 series \(1.2.3, "):
        gate.problems_of(node_records(tmp_path / "ct"))


def test_unreadable_value_is_refused_as_it_is_read(tmp_path: Path) -> None:
    files = series(tmp_path)
    ds = pydicom.dcmread(files[6])
    ds["ImagePositionPatient"] = DataElement(0x00200032, "DS", "1\\\\3")  # an empty middle value
    ds.save_as(files[6])
    with pytest.raises(InvalidInput, match=r"CT_0007.dcm has an unreadable ImagePositionPatient: \[1, '', 3\]"):
        gate.problems(tmp_path / "ct")


def test_no_image_has_nothing_to_check(tmp_path: Path) -> None:
    folder = tmp_path / "rt"
    folder.mkdir()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.RTStructureSetStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "RTSTRUCT"
    ds.save_as(folder / "rt.dcm", enforce_file_format=True)
    (folder / "notes.txt").write_text("not DICOM")
    assert gate.Geometry.from_file(folder / "rt.dcm") is None
    assert gate.problems(folder) == []
    assert gate.problems_of([]) == []
    assert gate.problems(tmp_path / "nowhere") == []


def test_other_objects_and_files_next_to_the_images_are_skipped(tmp_path: Path) -> None:
    files = series(tmp_path)
    (tmp_path / "ct" / "notes.txt").write_text("not DICOM")
    (tmp_path / "ct" / ".hidden").write_bytes(files[0].read_bytes())
    (tmp_path / "ct" / "sub").mkdir()
    files[3].rename(tmp_path / "ct" / "sub" / "CT_0004.dcm")  # the reader searches subfolders too
    ds = pydicom.dcmread(files[0])
    ds.Modality, ds.SOPInstanceUID = "SEG", pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "ct" / "seg.dcm")  # has Rows, is not a slice
    assert gate.problems(tmp_path / "ct") == []


def test_geometry_is_valid_once_built(tmp_path: Path) -> None:
    [path] = phantom.write_dicom(tmp_path / "one", phantom.axial_grid(slices=1, size=8))
    record = gate.Geometry.from_file(path)
    assert record is not None and record.name == "CT_0001.dcm" and record.rows == record.columns == 8
    assert record.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0) and record.images_in_acquisition == 1
    assert not hasattr(record, "__dict__")  # slotted: a node holds one per instance
    with pytest.raises(AttributeError, match="cannot assign"):
        record.rows = 3  # type: ignore[misc]
    fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    with pytest.raises(ValueError, match="orientation must be 6 finite numbers"):
        gate.Geometry(**{**fields, "orientation": (1.0, 0.0, 0.0)})
    with pytest.raises(ValueError, match="position must be 3 finite numbers"):
        gate.Geometry(**{**fields, "position": (0.0, float("nan"), 0.0)})
    with pytest.raises(TypeError, match="rows must be an int"):
        gate.Geometry(**{**fields, "rows": "8"})
    with pytest.raises(TypeError, match="sop_instance_uid must be a str"):
        gate.Geometry(**{**fields, "sop_instance_uid": None})
    with pytest.raises(ValueError, match="frames must be at least 1"):
        gate.Geometry(**{**fields, "frames": 0})
    assert gate.Geometry(**{**fields, "pixel_spacing": [2, 2]}).pixel_spacing == (2.0, 2.0)
    ds = pydicom.dcmread(path)
    del ds.Rows
    assert gate.Geometry.from_dataset(ds) is None  # no Rows: not an image


@pytest.mark.parametrize("syntax", [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
def test_raw_header_gives_the_record_pydicom_decodes(tmp_path: Path, syntax: pydicom.uid.UID) -> None:
    # The gate decodes plain raw values itself (pydicom's decoding was a third of its time per file).
    [path] = phantom.write_dicom(tmp_path / "one", phantom.axial_grid(slices=1, size=8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.ImagePositionPatient = ["-1.5E+02", "+3", "0.250"]
    ds.ImagesInAcquisition = "+12"
    ds.SOPInstanceUID = "1.2.3.4"  # odd length: padded with a NUL
    ds.NumberOfFrames = 1
    ds.save_as(path, enforce_file_format=True)
    raw = gate.Geometry.from_file(path)
    decoded = pydicom.dcmread(path)
    assert all(isinstance(elem, DataElement) for elem in decoded)  # iterating has pydicom decode every value
    assert isinstance(decoded.get_item(gate.LAST_TAG), DataElement)
    assert raw == gate.Geometry.from_dataset(decoded, name=path.name)
    assert raw is not None and raw.position == (-150.0, 3.0, 0.25) and raw.images_in_acquisition == 12
    assert raw.sop_instance_uid == "1.2.3.4" and raw.frames == 1


def test_constants_agree_with_the_series_reader() -> None:
    assert gate._ORIENTATION_TOLERANCE == writers_series.ORIENTATION_TOLERANCE
    assert gate._DUPLICATE_TOLERANCE == writers_series.DUPLICATE_TOLERANCE
    assert gate._NOT_IMAGES == writers_series._NOT_IMAGES
    keywords = ["SOPInstanceUID", "Modality", "SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient",
                "FrameOfReferenceUID", "ImagesInAcquisition", "NumberOfFrames", "Rows", "Columns", "PixelSpacing"]
    assert gate.TAGS == tuple(sorted(tag_for_keyword(k) for k in keywords))
    assert gate.LAST_TAG == tag_for_keyword("PixelSpacing") == max(gate.TAGS)


def test_gate_does_not_load_simpleitk(tmp_path: Path) -> None:
    # The service runs the gate; SimpleITK would cost it ~90 MB of RSS (the writers load it when they run).
    series(tmp_path)
    code = ("import sys; from pathlib import Path; from pipeline import gate; "
            f"assert gate.problems(Path({str(tmp_path / 'ct')!r})) == []; print('SimpleITK' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent, check=True)
    assert out.stdout.strip() == "False"


def test_gate_memory_stays_small(tmp_path: Path) -> None:
    n = 400
    phantom.write_dicom(tmp_path / "ct", phantom.axial_grid(slices=n, size=64, slice_thickness=1.0))
    folder = tmp_path / "ct"
    assert gate.problems(folder) == []  # once first: lazy imports and pydicom's caches are not the gate's
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        assert gate.problems(folder) == []
        _, gate_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]  # the old way
        _, headers_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(headers) == n
    assert gate_peak < 2048 * n, f"gate peak {gate_peak / n:.0f} B per image"
    assert gate_peak < headers_peak / 10, f"gate {gate_peak} B, headers {headers_peak} B"
