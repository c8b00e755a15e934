"""The contour preview of each finished job (issue 11, section 2): a PNG of three orthogonal slices with each
structure's outline in its colour, drawn after the job's sends, served over HTTP and listed by ``postbox status``."""

from __future__ import annotations

import datetime
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from _http import BODY_LUNGS, HttpSite
from conftest import read_job, wait_for
from PIL import Image

from pipeline import jobs, phantom, preview
from pipeline.config import Config
from pipeline.writers import read_series, write_rtstruct

# The phantom's lungs (pipeline/phantom.py): centres in patient coordinates, LPS mm.
LUNG_CENTRES = {"lung_right": (-75.0, -5.0, 0.0), "lung_left": (72.0, -5.0, 0.0)}


class Picture:
    """A preview PNG as a test reads it: its pixels, and its panels' geometry from its text chunk."""

    def __init__(self, data: bytes) -> None:
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        image = Image.open(io.BytesIO(data))
        self.size = image.size
        self.meta = json.loads(image.text["postbox-preview"])
        self.pixels = np.asarray(image.convert("RGB"))
        self.panels = {p["name"]: p for p in self.meta["panels"]}

    def color(self, name: str) -> tuple[int, int, int]:
        [found] = [tuple(s["color"]) for s in self.meta["structures"] if s["name"] == name]
        return found  # type: ignore[return-value]

    def drawn(self, panel: str, color: tuple[int, int, int]) -> np.ndarray:
        """The (row, column) of every pixel of ``color`` in ``panel``, relative to the panel."""
        x, y, w, h = self.panels[panel]["box"]
        return np.argwhere((self.pixels[y:y + h, x:x + w] == color).all(axis=-1))

    def to_patient(self, panel: str, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        p = self.panels[panel]
        return (np.array(p["origin"]) + np.outer(columns * p["spacing"], p["u"])
                + np.outer(rows * p["spacing"], p["v"]))


def rtstruct_colours(path: Path) -> dict[str, tuple[int, int, int]]:
    ds = pydicom.dcmread(path)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    return {names[int(c.ReferencedROINumber)]: tuple(int(v) for v in c.ROIDisplayColor)  # type: ignore[misc]
            for c in ds.ROIContourSequence}


def rtstruct_job(root: Path, grid: phantom.Grid, structures: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """A finished job folder as the worker leaves it for a DICOM series: truth masks, a checked RTSTRUCT."""
    job_id = jobs.new_job_id()
    job_dir = root / "outbox" / job_id
    series_dir = job_dir / "input" / "series-1"
    phantom.write_dicom(series_dir, grid)
    _, truth = phantom.sample(grid, noise=0)
    order = np.argsort(grid.slice_offsets)  # the series' slices, sorted along the normal
    series = read_series(series_dir)
    rtstruct = job_dir / "output" / "rtstruct.dcm"
    (job_dir / "output").mkdir()
    masks = {name: truth[name][order] for name in phantom.structure_names()}
    write_rtstruct(series, masks, rtstruct, structures=structures)
    outputs = [jobs.OutputRecord(id="rt", type="DICOM", path="output/rtstruct.dcm", parent="in-1",
                                 meta_data={"kind": "rtstruct"})]
    manifest = jobs.JobManifest(id=job_id, status=jobs.JobStatus.DONE, outputs=outputs,
                                inputs=[jobs.series_input(1, "series-1", series.series_instance_uid,
                                                          len(series.slices))])
    jobs.write_manifest(job_dir, manifest)
    return job_dir, rtstruct


@pytest.mark.parametrize("grid", [
    phantom.axial_grid(slices=40, size=96),
    phantom.patient_position_grid("FFP", slices=40, size=96),
    phantom.oblique_grid("sagittal", slices=40, size=96),
    phantom.oblique_grid("tilted", angle=25, slices=60, size=96),
    phantom.uneven_grid(size=96),
], ids=["axial", "feet-first-prone", "sagittal", "tilted", "uneven"])
def test_outlines_land_on_the_phantoms_structures_whatever_the_grid(tmp_path: Path, grid: phantom.Grid) -> None:
    job_dir, rtstruct = rtstruct_job(tmp_path, grid, {"lung_left": {"name": "Lung_L", "color": [0, 255, 0]}})
    png = preview.make_preview(Config.from_dict({}, base_dir=tmp_path), job_dir, jobs.read_manifest(job_dir))
    assert png is not None
    pic = Picture(png)
    assert pic.meta["source"] == "rtstruct"
    # Names and colours are the RTSTRUCT's own (ROI Name, ROI Display Color): what the planning system shows.
    colours = rtstruct_colours(rtstruct)
    assert {s["name"] for s in pic.meta["structures"]} == set(colours) == {"body", "Lung_L", "lung_right"}
    assert pic.color("Lung_L") == colours["Lung_L"] == (0, 255, 0)
    for panel in preview.PANELS:
        assert len(pic.drawn(panel, colours["body"])) > 50, panel  # the body's outline crosses every panel
    # Each lung's outline, mapped back to the patient through the panel's geometry, circles the truth's centre;
    # radiological: the patient's right lung on the image's left in the axial and coronal panels.
    for panel, axes in (("axial", (0, 1)), ("coronal", (0, 2))):
        seen = {}
        for name, truth in (("Lung_L", LUNG_CENTRES["lung_left"]), ("lung_right", LUNG_CENTRES["lung_right"])):
            drawn = pic.drawn(panel, colours[name])
            assert len(drawn) > 20, (panel, name)
            centre = pic.to_patient(panel, drawn[:, 0], drawn[:, 1]).mean(axis=0)
            assert np.allclose(centre[list(axes)], np.array(truth)[list(axes)], atol=8.0), (panel, name, centre)
            seen[name] = drawn[:, 1].mean()
        assert seen["lung_right"] < seen["Lung_L"], panel
    assert pic.size[0] < 1400 and pic.size[1] < 600


def test_masks_alone_are_drawn_named_and_coloured_as_the_writer_would(tmp_path: Path) -> None:
    """A NIfTI CT with its masks (no RTSTRUCT): the masks, with the algorithm's structure mapping."""
    grid = phantom.axial_grid(slices=30, size=64)
    job_id = jobs.new_job_id()
    job_dir = tmp_path / "outbox" / job_id
    phantom.write_nifti(job_dir / "input" / "ct.nii.gz", grid=grid)
    nifti = phantom.write_masks_nifti(job_dir / "output", grid)
    manifest = jobs.JobManifest(
        id=job_id, algorithm="seg", status=jobs.JobStatus.DONE,
        inputs=[jobs.InputRecord(id="in-1", type="FILE", path="input/ct.nii.gz")],
        outputs=[jobs.OutputRecord(id=f"o{i}", type="FILE", path=f"output/{p.name}")
                 for i, p in enumerate(nifti.values())])
    jobs.write_manifest(job_dir, manifest)
    cfg = Config.from_dict({"algorithms": [{"name": "seg", "function": "pipeline.bodylungs:segment", "structures": {
        "body": {"name": "External", "color": [255, 255, 0]}}}]}, base_dir=tmp_path)
    pic = Picture(preview.make_preview(cfg, job_dir, manifest) or b"")
    assert pic.meta["source"] == "masks"
    assert [s["name"] for s in pic.meta["structures"]] == ["External", "lung_left", "lung_right"]
    for panel in preview.PANELS:
        assert len(pic.drawn(panel, (255, 255, 0))) > 20, panel


def test_a_job_without_masks_has_no_preview(tmp_path: Path) -> None:
    job_id = jobs.new_job_id()
    job_dir = tmp_path / job_id
    job_dir.mkdir()
    manifest = jobs.JobManifest(id=job_id, status=jobs.JobStatus.DONE,
                                outputs=[jobs.OutputRecord(id="o", type="FILE", path="output/result.txt")])
    assert not preview.wants_preview(manifest)
    assert preview.make_preview(Config.from_dict({}, base_dir=tmp_path), job_dir, manifest) is None


# --- on a running service -------------------------------------------------------------------------------


def api(site: HttpSite, key: str, path: str) -> requests.Response:
    return requests.get(site.url + path, headers={"API_KEY": key}, timeout=30)


def wait_preview(site: HttpSite, job_dir: Path) -> dict[str, Any]:
    def drawn() -> dict[str, Any] | None:
        if not (job_dir / "job.yaml").is_file():
            return None  # not finished yet
        job = read_job(job_dir)
        assert job["status"] == "done", site.service_log()
        return job if job.get("preview") else None

    return wait_for(drawn, 60, what=f"the preview of {job_dir.name}")  # type: ignore[no-any-return]


def test_a_dicom_job_and_a_nifti_run_get_their_preview_served_to_their_owner_only(tmp_path: Path) -> None:
    site = HttpSite(tmp_path)
    try:
        site.config["algorithms"].append({**BODY_LUNGS, "outputs": ["rtstruct", "seg"],
                                          "structures": {"body": {"name": "External", "color": [255, 255, 0]}}})
        site.write_config(default_algorithm="body-lungs")
        alice, bob = site.key("alice"), site.key("bob")
        operator = site.cli("manage", "key", "--add", "operator", "--site").stdout.strip()
        site.start_http()

        # A DICOM series dropped into the inbox: the outlines come from the RTSTRUCT as written.
        grid = phantom.axial_grid(slices=24, size=96)
        phantom.write_dicom(tmp_path / "ct", grid)
        shutil.copytree(tmp_path / "ct", site.inbox / "ct")
        [job_dir] = site.done(1, timeout=90)
        job = wait_preview(site, job_dir)
        assert job["status"] == "done" and job["preview"] == "output/preview.png"
        assert "preview.png" not in {Path(o["path"]).name for o in job["outputs"]}  # not an algorithm output
        pic = Picture((job_dir / "output" / "preview.png").read_bytes())
        assert pic.meta["source"] == "rtstruct" and pic.color("External") == (255, 255, 0)
        for panel in preview.PANELS:
            assert len(pic.drawn(panel, (255, 255, 0))) > 50, panel
        assert not list((job_dir / "output").glob(".*"))  # no temporary file left behind
        shown = site.cli("status", job_dir.name).stdout
        assert "preview: output/preview.png" in shown
        assert json.loads(site.cli("status", job_dir.name, "--json").stdout)["preview"] == "output/preview.png"

        # A keyless door's job is a site dataset: the operator's key reads its preview, a plain key gets 404.
        [ds] = [d for d in requests.get(site.url + "/api/datasets", headers={"API_KEY": operator}, timeout=30).json()
                if d["last_job"] == job_dir.name]
        res = api(site, operator, f"/api/dataset/{ds['id']}/preview")
        assert res.status_code == 200 and res.headers["Content-Type"] == "image/png"
        assert res.content == (job_dir / "output" / "preview.png").read_bytes()
        assert api(site, alice, f"/api/dataset/{ds['id']}/preview").status_code == 404

        # A NIfTI CT run over HTTP by alice: her preview, drawn from the masks; 404 to bob, and 404 before any run.
        ct = phantom.write_nifti(tmp_path / "ct.nii.gz", grid=phantom.axial_grid(slices=20, size=64))
        headers = {"API_KEY": alice}
        dataset = requests.post(site.url + "/api/dataset", headers=headers, timeout=30).json()["id"]
        assert api(site, alice, f"/api/dataset/{dataset}/preview").status_code == 404
        requests.post(site.url + "/api/dataobject", headers=headers, timeout=30,
                      data={"dataset": dataset, "type": "FILE", "file_name": "ct.nii.gz"},
                      files={"file_data": ("ct.nii.gz", ct.read_bytes())}).raise_for_status()
        poll = requests.post(site.url + "/api/trigger", headers=headers, timeout=30,
                             data={"dataset": dataset, "algorithm": "body-lungs"}).json()["poll"]
        nifti_job = poll.rsplit("/", 1)[1]
        wait_preview(site, site.outbox / nifti_job)
        res = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
            api(site, alice, f"/api/dataset/{dataset}/preview")), 10, what="alice's preview")
        pic = Picture(res.content)
        assert pic.meta["source"] == "masks" and pic.color("External") == (255, 255, 0)
        for panel in preview.PANELS:
            assert len(pic.drawn(panel, (255, 255, 0))) > 20, panel
        missing = api(site, bob, f"/api/dataset/{dataset}/preview")
        assert missing.status_code == 404 and "error" in missing.json()
        # The preview is not one of the run's outputs a PlatiPy client downloads.
        outputs = requests.get(f"{site.url}/api/dataset/{dataset}", headers=headers, timeout=30).json()
        assert "preview.png" not in {o["path"] for o in outputs["output_data_objects"]}
        audit = site.cli("audit", "--job", nifti_job, "--json").stdout
        assert any(json.loads(line)["action"] == "download" for line in audit.splitlines())
    finally:
        site.close()


FIXED_MASKS = '''
from pipeline import DataObject, phantom

def run(data_objects, working_dir, settings):
    """The phantom's truth on the sagittal grid the test sends: masks where the structures are, no model."""
    grid = phantom.oblique_grid("sagittal", slices=40, size=64)
    paths = phantom.write_masks_nifti(working_dir, grid)
    return [DataObject(type="FILE", path=str(p), parent=data_objects[0]) for p in paths.values()]
'''


def test_a_sagittal_series_sent_by_storescu_is_previewed_after_its_results_are_sent(tmp_path: Path) -> None:
    """Non-axial: the outlines from the RTSTRUCT land on the phantom's lungs; drawn once the send is done."""
    from _peers import Destination, storescu

    dest = Destination()
    site = HttpSite(tmp_path)
    try:
        (tmp_path / "fixedmasks.py").write_text(FIXED_MASKS)
        site.config["algorithms"].append({"name": "fixed", "function": "fixedmasks:run",
                                          "outputs": ["rtstruct", "seg"]})
        site.write_config(default_algorithm="fixed", dicom={
            "enabled": True, "host": "127.0.0.1", "port": 0, "series_timeout": 1.0, "complete_on_release": True,
            "destinations": {"TPS": dest.config()}, "routes": [{"algorithm": "fixed", "destinations": ["TPS"]}]})
        proc = site.start()
        phantom.write_dicom(tmp_path / "ct", phantom.oblique_grid("sagittal", slices=40, size=64))
        storescu(site.doors(proc)["dicom"]["port"], tmp_path / "ct")
        [job_dir] = site.done(1, timeout=90)
        job = wait_preview(site, job_dir)
        assert job["sends"]["TPS"]["status"] == "sent" and len(dest.stored) == 2
        sent = datetime.datetime.fromisoformat(job["sends"]["TPS"]["sent"]).timestamp()
        assert (job_dir / "output" / "preview.png").stat().st_mtime >= sent - 0.01  # after the results left
        pic = Picture((job_dir / "output" / "preview.png").read_bytes())
        colours = rtstruct_colours(job_dir / "output" / "rtstruct.dcm")
        for panel in preview.PANELS:
            assert len(pic.drawn(panel, colours["body"])) > 30, panel
        for name, truth in LUNG_CENTRES.items():
            drawn = pic.drawn("axial", colours[name])
            centre = pic.to_patient("axial", drawn[:, 0], drawn[:, 1]).mean(axis=0)
            assert np.allclose(centre[:2], truth[:2], atol=8.0), (name, centre)
    finally:
        site.close()
        dest.close()
