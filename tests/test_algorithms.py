"""Both algorithm forms: a PlatiPy service.py moved over by its imports alone, and a command line."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import Site, read_job, wait_for

from pipeline import DataObject, phantom
from pipeline.algorithms import merge_settings
from pipeline.config import AlgorithmConfig
from pipeline.errors import InvalidInput

# The seed's template, byte for byte but for its import lines (platipy.backend -> pipeline, no celery).
SERVICE_PY = '''
import os

import SimpleITK as sitk

from pipeline import app, DataObject


def my_segmentation_function(img):
    return sitk.BinaryThreshold(img, lowerThreshold=-300, upperThreshold=5000)


@app.register("My Segmentation Tool", default_settings={"outputContourName": "auto_contour_x"})
def my_segmentation_tool(data_objects, working_dir, settings):
    output_objects = []
    for d in data_objects:
        load_path = d.path
        if d.type == "DICOM":
            load_path = sitk.ImageSeriesReader().GetGDCMSeriesFileNames(d.path)
        img = sitk.ReadImage(load_path)
        mask = my_segmentation_function(img)
        mask_file = os.path.join(working_dir, "{0}.nii.gz".format(settings["outputContourName"]))
        sitk.WriteImage(mask, mask_file)
        output_objects.append(DataObject(type="FILE", path=mask_file, parent=d))
    return output_objects


if __name__ == "__main__":
    app.run(debug=True, host="127.0.0.1", port=PORT, dicom_listener_port=DPORT,
            dicom_listener_aetitle="SAMPLE_SERVICE")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_seed_template_runs_with_only_its_imports_changed(tmp_path: Path) -> None:
    (tmp_path / "service.py").write_text(SERVICE_PY.replace("PORT", str(free_port()), 1)
                                         .replace("DPORT", str(free_port())))
    log = open(tmp_path / "service.log", "wb")
    proc = subprocess.Popen([sys.executable, "service.py"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: b"worker: watching" in (tmp_path / "service.log").read_bytes() or proc.poll() is not None,
                 30)
        assert proc.poll() is None, (tmp_path / "service.log").read_text()
        grid = phantom.axial_grid(slices=10, size=48)
        phantom.write_dicom(tmp_path / "staged" / "ct", grid)
        shutil.move(tmp_path / "staged" / "ct", tmp_path / "inbox" / "ct")
        outbox = tmp_path / "outbox"
        job_dir = wait_for(lambda: next((p for p in outbox.iterdir() if (p / "job.yaml").exists()), None), 60)
        job = read_job(job_dir)
        assert job["status"] == "done", (job_dir / "job.log").read_text()
        assert job["algorithm"] == "My Segmentation Tool"
        mask = sitk.ReadImage(str(job_dir / "output" / "auto_contour_x.nii.gz"))
        _, truth = phantom.sample(grid)
        got = sitk.GetArrayFromImage(mask) > 0
        assert got.shape == truth["body"].shape
        # Body by threshold: the same voxels as the phantom's body outside its lungs, give or take noise.
        body = truth["body"] & ~truth["lung_left"] & ~truth["lung_right"]
        assert 2 * (got & body).sum() / (got.sum() + body.sum()) > 0.9
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        log.close()


COMMAND_TOOL = textwrap.dedent('''
    import json, pathlib, sys, time
    inp, out, settings = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), json.load(open(sys.argv[3]))
    print("tool sees", sorted(p.name for p in inp.rglob("*") if p.is_file()))
    if settings["mode"] == "hang":
        time.sleep(60)  # the external tool hanging (its own behaviour, not a wait in the test)
    if settings["mode"] == "fail":
        sys.exit(3)
    (out / "mask.txt").write_text(settings["mode"] + ":" + ",".join(p.name for p in inp.rglob("*") if p.is_file()))
''')


def test_command_form_runs_an_external_program(site: Site, tmp_path: Path) -> None:
    (site.root / "tool.py").write_text(COMMAND_TOOL)
    site.config["algorithms"].append({"name": "tool", "default_settings": {"mode": "ok"},
                                      "command": [sys.executable, str(site.root / "tool.py"), "{input}",
                                                  "{output}", "{settings}"]})
    site.write_config(worker={"job_timeout": 2})
    payload = tmp_path / "scan.txt"
    payload.write_text("x")
    ok = site.cli("submit", str(payload), "--algorithm", "tool").stdout.strip()
    fail = site.cli("submit", str(payload), "--algorithm", "tool", "--settings", '{"mode": "fail"}').stdout.strip()
    hang = site.cli("submit", str(payload), "--algorithm", "tool", "--settings", '{"mode": "hang"}').stdout.strip()
    site.start()
    site.done(3, timeout=60)
    assert (site.outbox / ok / "output" / "mask.txt").read_text() == "ok:scan.txt"
    assert read_job(site.outbox / ok)["outputs"][0]["type"] == "FILE"
    assert "tool sees ['scan.txt']" in (site.outbox / ok / "job.log").read_text()
    assert "failed (exit code 3)" in read_job(site.outbox / fail)["error"]
    assert "timed out after 2 s" in read_job(site.outbox / hang)["error"]


def test_settings_must_fit_the_defaults() -> None:
    alg = AlgorithmConfig(name="a", command=("x",), default_settings={"t": -300.0, "name": "body", "on": True})
    assert merge_settings(alg, {"t": -250}) == {"t": -250, "name": "body", "on": True}
    with pytest.raises(InvalidInput, match="setting 'x' is not a setting of algorithm 'a'"):
        merge_settings(alg, {"x": 1})
    with pytest.raises(InvalidInput, match="must be bool, not int"):
        merge_settings(alg, {"on": 1})
    with pytest.raises(InvalidInput, match="must be str, not float"):
        merge_settings(alg, {"name": 1.0})


def test_dataobject_validates_on_construction() -> None:
    assert DataObject(type="dicom", path=Path("/x")).type == "DICOM"
    with pytest.raises(ValueError, match="must be one of"):
        DataObject(type="PNG", path="/x")
    with pytest.raises(TypeError, match="parent must be a DataObject"):
        DataObject(type="FILE", path="/x", parent="p")  # type: ignore[arg-type]


def test_bundled_algorithm_settings_change_names(site: Site, tmp_path: Path) -> None:
    site.config["algorithms"].append({"name": "body-lungs", "function": "pipeline.bodylungs:segment",
                                      "outputs": [], "default_settings": {"body_name": "body"}})
    site.write_config()
    ct = phantom.write_nifti(tmp_path / "ct.nii.gz", slices=12, size=48)
    job_id = site.cli("submit", str(ct), "--algorithm", "body-lungs", "--settings",
                      json.dumps({"body_name": "External"})).stdout.strip()
    site.start()
    site.done(1, timeout=60)
    assert (site.outbox / job_id / "output" / "External.nii.gz").exists()
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(site.outbox / job_id / "output" / "External.nii.gz")))
    assert np.unique(arr).tolist() == [0, 1]


def test_a_command_dies_with_its_killed_worker(site: Site, tmp_path: Path) -> None:
    (site.root / "hang.py").write_text(textwrap.dedent('''
        import os, sys, time
        open(sys.argv[1], "w").write(str(os.getpid()))
        time.sleep(120)  # the tool's own long run, killed with its worker: not a wait
    '''))
    site.config["algorithms"].append({"name": "hang", "command": [sys.executable, str(site.root / "hang.py"),
                                                                  str(tmp_path / "pid")]})
    site.write_config(default_algorithm="hang")
    payload = tmp_path / "p.txt"
    payload.write_text("x")
    service = site.start()
    site.cli("submit", str(payload))
    pid = int(wait_for(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text(), 30))
    service.kill()
    service.wait()
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
             10, what="the command to die with its worker")


def test_a_missing_command_fails_its_job_clearly(site: Site, tmp_path: Path) -> None:
    site.config["algorithms"].append({"name": "nothere", "command": ["no-such-tool-anywhere", "{input}"]})
    site.write_config(default_algorithm="nothere")
    payload = tmp_path / "p.txt"
    payload.write_text("x")
    site.start()
    job_id = site.cli("submit", str(payload)).stdout.strip()
    site.done(1)
    assert "command 'no-such-tool-anywhere' cannot start: not found" in read_job(site.outbox / job_id)["error"]


# A model's own command-line tool as a user writes one: a script beside config.yaml, named by a relative path.
SEGMENT_SH = '''#!/bin/sh
# usage: segment.sh IN OUT [fail]
if [ "$3" = "fail" ]; then
    echo "loading model" >&2
    for i in 1 2 3 4 5 6 7; do echo "noise line $i" >&2; done
    echo "Traceback (most recent call last):" >&2
    echo "  File \\"$PWD/deep/inside/model.py\\", line 12, in predict" >&2
    echo "RuntimeError: CUDA out of memory" >&2
    exit 2
fi
echo "this goes to stdout"
ls "$1" > "$2/listing.txt"
'''


def test_command_form_relative_program_placeholders_and_stderr_in_the_error(site: Site, tmp_path: Path) -> None:
    tool = site.root / "tools" / "segment.sh"
    tool.parent.mkdir()
    tool.write_text(SEGMENT_SH)
    tool.chmod(0o755)
    site.config["algorithms"] += [
        {"name": "on-file", "command": ["./tools/segment.sh", "{input_file}", "{output}"]},
        {"name": "on-series", "command": ["tools/segment.sh", "{series}", "{output}"]},
        {"name": "failing", "command": ["./tools/segment.sh", "{input}", "{output}", "fail"]},
    ]
    site.write_config()
    payload = tmp_path / "scan.nii.gz"
    payload.write_bytes(b"not really")
    phantom.write_dicom(tmp_path / "ct", phantom.axial_grid(slices=3, size=16))
    on_file = site.cli("submit", str(payload), "--algorithm", "on-file").stdout.strip()
    on_series = site.cli("submit", str(tmp_path / "ct"), "--algorithm", "on-series").stdout.strip()
    file_on_series = site.cli("submit", str(tmp_path / "ct"), "--algorithm", "on-file").stdout.strip()
    series_on_file = site.cli("submit", str(payload), "--algorithm", "on-series").stdout.strip()
    failing = site.cli("submit", str(payload), "--algorithm", "failing").stdout.strip()
    site.start()
    site.done(5, timeout=60)
    jobs = {job_id: read_job(site.outbox / job_id) for job_id in (on_file, on_series, file_on_series,
                                                                   series_on_file, failing)}
    # {input_file} is the one file (ls prints it back); {series} the series folder (ls lists its slices).
    assert (site.outbox / on_file / "output" / "listing.txt").read_text().strip().endswith("/scan.nii.gz")
    assert len((site.outbox / on_series / "output" / "listing.txt").read_text().split()) == 3
    assert jobs[on_file]["status"] == jobs[on_series]["status"] == "done"
    assert "{input_file} needs a job of one input file" in jobs[file_on_series]["error"]
    assert "{series} needs a job of a DICOM series" in jobs[series_on_file]["error"]
    error = jobs[failing]["error"]
    assert "command './tools/segment.sh' failed (exit code 2); the end of its stderr: " in error
    assert error.endswith('noise line 6 | noise line 7 | Traceback (most recent call last): | '
                          'File "model.py", line 12, in predict | RuntimeError: CUDA out of memory'), error
    assert str(site.root) not in error and "loading model" not in error
    log = (site.outbox / failing / "job.log").read_text()
    assert "loading model" in log and "CUDA out of memory" in log  # the whole stderr stays in job.log


def test_a_relative_program_that_is_not_there_fails_naming_where_it_looked(site: Site, tmp_path: Path) -> None:
    site.config["algorithms"].append({"name": "gone", "command": ["./tools/gone.sh", "{input}"]})
    site.write_config(default_algorithm="gone")
    payload = tmp_path / "p.txt"
    payload.write_text("x")
    job_id = site.cli("submit", str(payload)).stdout.strip()
    site.start()
    site.done(1)
    error = read_job(site.outbox / job_id)["error"]
    assert "command './tools/gone.sh' cannot start: not found (looked in config.yaml's folder)" in error
