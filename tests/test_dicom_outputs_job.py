"""DICOM jobs get RTSTRUCT and SEG written by the pipeline, checked, with the configured names."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
from _dicomtools import dciodvfy_errors
from conftest import Site, read_job

from pipeline import phantom

MASK_ON_WRONG_GRID = '''
import os
import SimpleITK as sitk
from pipeline import DataObject

def run(data_objects, working_dir, settings):
    img = sitk.Image(7, 9, 3, sitk.sitkUInt8)   # no relation to the CT it came from
    img.SetSpacing((1.0, 1.0, 1.0))
    img.SetOrigin((5000.0, 5000.0, 5000.0))   # metres away from the patient
    path = os.path.join(working_dir, "tumour.nii.gz")
    sitk.WriteImage(img + 1, path)
    return [DataObject(type="FILE", path=path, parent=data_objects[0])]
'''


def bundled(site: Site, **extra: object) -> None:
    site.config["algorithms"].append({"name": "body-lungs", "function": "pipeline.bodylungs:segment",
                                      "default_settings": {"body_name": "body"}, **extra})
    site.write_config(default_algorithm="body-lungs")



def drop_series(site: Site, tmp_path: Path, grid: phantom.Grid) -> Path:
    """Start the service, copy a phantom series into its inbox by hand, and return the finished job."""
    phantom.write_dicom(tmp_path / "ct", grid)
    site.start()
    shutil.copytree(tmp_path / "ct", site.inbox / "ct")
    [job_dir] = site.done(1, timeout=90)
    return job_dir


def test_dicom_job_dropped_in_inbox_ends_with_checked_rtstruct_and_seg(site: Site, tmp_path: Path) -> None:
    bundled(site, outputs=["rtstruct", "seg"],
            structures={"lung_left": {"name": "Lung_L", "color": [0, 255, 255], "type": "ORGAN"},
                        "body": {"name": "External", "type": "EXTERNAL"}})
    grid = phantom.axial_grid(slices=20, size=96)
    files = phantom.write_dicom(tmp_path / "ct", grid)
    source = pydicom.dcmread(files[0])
    site.start()
    shutil.copytree(tmp_path / "ct", site.inbox / "ct")
    [job_dir] = site.done(1, timeout=90)
    job = read_job(job_dir)
    assert job["status"] == "done", (job_dir / "job.log").read_text()
    dicom_outputs = [o for o in job["outputs"] if o["type"] == "DICOM"]
    assert sorted(o["meta_data"]["kind"] for o in dicom_outputs) == ["rtstruct", "seg"]
    assert all(o["parent"] == "in-1" for o in dicom_outputs)
    rt_path = job_dir / next(o["path"] for o in dicom_outputs if o["meta_data"]["kind"] == "rtstruct")
    seg_path = job_dir / next(o["path"] for o in dicom_outputs if o["meta_data"]["kind"] == "seg")
    rt = pydicom.dcmread(rt_path)
    assert rt.Modality == "RTSTRUCT" and rt.StudyInstanceUID == source.StudyInstanceUID
    assert rt.SeriesInstanceUID != source.SeriesInstanceUID
    rois = {r.ROINumber: r.ROIName for r in rt.StructureSetROISequence}
    assert set(rois.values()) == {"External", "Lung_L", "lung_right"}
    colours = {rois[c.ReferencedROINumber]: [int(v) for v in c.ROIDisplayColor] for c in rt.ROIContourSequence}
    assert colours["Lung_L"] == [0, 255, 255]
    types = {rois[o.ReferencedROINumber]: o.RTROIInterpretedType for o in rt.RTROIObservationsSequence}
    assert types["External"] == "EXTERNAL"
    assert pydicom.dcmread(seg_path).Modality == "SEG"
    assert dciodvfy_errors(rt_path) == [] and dciodvfy_errors(seg_path) == []
    check = job["checks"]["in-1"]
    assert set(check) == {"body", "lung_left", "lung_right"} and min(check.values()) >= 0.95
    assert "check-back Dice" in (job_dir / "job.log").read_text()
    # Issue 10: where the time went after the algorithm, step by step, in seconds.
    timings = job["timings"]
    steps = ["dicom_read_seconds", "rtstruct_seconds", "check_seconds", "seg_seconds"]
    assert all(0 < timings[step] for step in steps), timings
    # The SEG is written while the RTSTRUCT is written and checked: the steps overlap.
    critical = timings["dicom_read_seconds"] + max(timings["rtstruct_seconds"] + timings["check_seconds"],
                                                   timings["seg_seconds"])
    assert critical < timings["finished"] - timings["algorithm_ended"], timings


def test_mask_that_cannot_match_the_series_fails_the_job_with_a_clear_error(site: Site, tmp_path: Path) -> None:
    (site.root / "wronggrid.py").write_text(MASK_ON_WRONG_GRID)
    site.config["algorithms"].append({"name": "wrong-grid", "function": "wronggrid:run", "outputs": ["rtstruct"]})
    site.write_config(default_algorithm="wrong-grid")
    job_dir = drop_series(site, tmp_path, phantom.axial_grid(slices=6, size=32))
    job = read_job(job_dir)
    assert job["status"] == "failed"
    assert "tumour" in job["error"]
    assert not (job_dir / "output").exists() or not list((job_dir / "output").rglob("*.dcm"))
    assert job["error"] in (job_dir / "job.log").read_text()


def test_nifti_job_gets_no_dicom_outputs(site: Site, tmp_path: Path) -> None:
    bundled(site, outputs=["rtstruct", "seg"])
    ct = phantom.write_nifti(tmp_path / "ct.nii.gz", slices=12, size=48)
    site.start()
    shutil.copy(ct, site.inbox / "ct.nii.gz")
    [job_dir] = site.done(1, timeout=60)
    job = read_job(job_dir)
    assert job["status"] == "done" and [o["type"] for o in job["outputs"]] == ["FILE"] * 3


# The seed's RTSTRUCT-writing template: PlatiPy's convert_nifti, only its import changed.
PLATIPY_RTSTRUCT_SERVICE = '''
import os

import SimpleITK as sitk

from pipeline import DataObject
from pipeline.writers import convert_nifti   # was: from platipy.dicom.io.nifti_to_rtstruct import convert_nifti


def run(data_objects, working_dir, settings):
    output_objects = []
    for d in data_objects:
        img = sitk.ReadImage(sitk.ImageSeriesReader().GetGDCMSeriesFileNames(d.path))
        mask = sitk.BinaryThreshold(img, lowerThreshold=-300, upperThreshold=5000)
        masks = {settings["outputContourName"]: mask}
        output_file = os.path.join(working_dir, "RS.dcm")
        dcm_file = os.path.join(d.path, os.listdir(d.path)[0])
        convert_nifti(dcm_file, masks, output_file)
        output_objects.append(DataObject(type="DICOM", path=output_file, parent=d))
    return output_objects
'''


def test_platipy_style_algorithm_writing_its_own_rtstruct(site: Site, tmp_path: Path) -> None:
    (site.root / "rsservice.py").write_text(PLATIPY_RTSTRUCT_SERVICE)
    site.config["algorithms"].append({"name": "rs", "function": "rsservice:run",
                                      "default_settings": {"outputContourName": "auto_contour"}})
    site.write_config(default_algorithm="rs")
    job_dir = drop_series(site, tmp_path, phantom.axial_grid(slices=10, size=64))
    job = read_job(job_dir)
    assert job["status"] == "done", (job_dir / "job.log").read_text()
    assert [(o["type"], o["path"]) for o in job["outputs"]] == [("DICOM", "output/RS.dcm")]
    rt = pydicom.dcmread(job_dir / "output" / "RS.dcm")
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["auto_contour"]
    assert dciodvfy_errors(job_dir / "output" / "RS.dcm") == []


# The seed's template as a user extends it: its own RTSTRUCT, and the mask it made it from.
OWN_RTSTRUCT_AND_MASK_SERVICE = PLATIPY_RTSTRUCT_SERVICE.replace(
    "        output_objects.append(DataObject(type=\"DICOM\", path=output_file, parent=d))\n",
    "        output_objects.append(DataObject(type=\"DICOM\", path=output_file, parent=d))\n"
    "        mask_file = os.path.join(working_dir, settings[\"outputContourName\"] + \".nii.gz\")\n"
    "        sitk.WriteImage(mask, mask_file)\n"
    "        output_objects.append(DataObject(type=\"FILE\", path=mask_file, parent=d))\n",
)


def test_an_algorithm_writing_its_own_rtstruct_gets_no_second_one(site: Site, tmp_path: Path) -> None:
    assert OWN_RTSTRUCT_AND_MASK_SERVICE != PLATIPY_RTSTRUCT_SERVICE
    (site.root / "rsservice.py").write_text(OWN_RTSTRUCT_AND_MASK_SERVICE)
    site.config["algorithms"].append({"name": "rs", "function": "rsservice:run", "outputs": ["rtstruct", "seg"],
                                      "default_settings": {"outputContourName": "auto_contour"}})
    site.write_config(default_algorithm="rs")
    job_dir = drop_series(site, tmp_path, phantom.axial_grid(slices=10, size=64))
    job = read_job(job_dir)
    assert job["status"] == "done", (job_dir / "job.log").read_text()
    dicom = [o for o in job["outputs"] if o["type"] == "DICOM"]
    modalities = sorted(pydicom.dcmread(job_dir / o["path"], stop_before_pixels=True).Modality for o in dicom)
    assert modalities == ["RTSTRUCT", "SEG"], job["outputs"]  # its own RTSTRUCT, and the automatic SEG only
    assert "output/RS.dcm" in [o["path"] for o in dicom]
    assert "no automatic RTSTRUCT written" in (job_dir / "job.log").read_text()


def test_outputs_empty_writes_no_dicom_outputs(site: Site, tmp_path: Path) -> None:
    bundled(site, outputs=[])
    job_dir = drop_series(site, tmp_path, phantom.axial_grid(slices=10, size=64))
    job = read_job(job_dir)
    assert job["status"] == "done", (job_dir / "job.log").read_text()
    assert [o["type"] for o in job["outputs"]] == ["FILE"] * 3
