"""The folder door: what a person drops into inbox/ becomes one job, whatever state it is found in."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml
from conftest import Site, outbox_jobs, read_job, wait_for

from pipeline import jobs, phantom


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def use_bundled(site: Site) -> None:
    site.config["algorithms"].append({"name": "body-lungs", "function": "pipeline.bodylungs:segment",
                                      "outputs": [], "default_settings": {"body_name": "body"}})
    site.write_config(default_algorithm="body-lungs")


def test_phantom_dicom_folder_dropped_gives_matching_masks(site: Site, tmp_path: Path) -> None:
    use_bundled(site)
    grid = phantom.axial_grid(slices=24, size=96)
    series = tmp_path / "ct-series"
    phantom.write_dicom(series, grid)
    _, truth = phantom.sample(grid)
    site.start()
    shutil.copytree(series, site.inbox / "ct-series")
    [job_dir] = site.done(1, timeout=60)
    job = read_job(job_dir)
    assert job["status"] == "done", job["error"]
    assert [i["type"] for i in job["inputs"]] == ["DICOM"]
    assert job["inputs"][0]["meta_data"]["instances"] == 24
    for name in ("body", "lung_left", "lung_right"):
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(job_dir / "output" / f"{name}.nii.gz"))) > 0
        assert dice(mask, truth[name]) > 0.9, name


def test_phantom_nifti_file_dropped(site: Site, tmp_path: Path) -> None:
    use_bundled(site)
    ct = phantom.write_nifti(tmp_path / "ct.nii.gz", slices=20, size=64)
    site.start()
    shutil.copy(ct, site.inbox / "ct.nii.gz")
    [job_dir] = site.done(1, timeout=60)
    job = read_job(job_dir)
    assert job["status"] == "done", job["error"]
    assert job["inputs"] == [{"id": "in-1", "type": "FILE", "path": "input/ct.nii.gz", "meta_data": {}}]
    assert sorted(o["path"] for o in job["outputs"]) == [
        "output/body.nii.gz", "output/lung_left.nii.gz", "output/lung_right.nii.gz"]


def test_folder_copied_file_by_file_becomes_one_job(site: Site) -> None:
    site.write_config(worker={"settle_seconds": 1.0})
    site.start()
    target = site.inbox / "slow-copy"
    target.mkdir()
    for i in range(6):
        (target / f"part-{i}.txt").write_text(str(i))
        threading.Event().wait(0.3)  # a person copying slowly: pauses shorter than the settle time
    [job_dir] = site.done(1)
    job = read_job(job_dir)
    assert sorted(i["path"] for i in job["inputs"]) == [f"input/slow-copy/part-{i}.txt" for i in range(6)]
    assert len(outbox_jobs(site.outbox)) == 1
    assert not target.exists()


def test_dicom_grouped_by_series_by_content_and_junk_ignored(site: Site, tmp_path: Path) -> None:
    grid = phantom.axial_grid(slices=4, size=32)
    drop = tmp_path / "mixed"
    a = phantom.write_dicom(tmp_path / "a", grid)
    b = phantom.write_dicom(tmp_path / "b", grid)
    drop.mkdir()
    for i, f in enumerate(a + b):
        shutil.copy(f, drop / f"img{i}")  # no .dcm suffix: content decides
    (drop / "notes.txt").write_text("hello")
    for junk in (".DS_Store", "x.tmp", "y.part", "~lock"):
        (drop / junk).write_text("junk")
    site.start()
    shutil.copytree(drop, site.inbox / "mixed")
    [job_dir] = site.done(1)
    job = read_job(job_dir)
    dicom = [i for i in job["inputs"] if i["type"] == "DICOM"]
    files = [i for i in job["inputs"] if i["type"] == "FILE"]
    assert [d["meta_data"]["instances"] for d in dicom] == [4, 4]
    assert len({d["meta_data"]["series_instance_uid"] for d in dicom}) == 2
    # A stray file beside the series is kept in the input, given to no algorithm, and warned about.
    assert files == [] and (job_dir / "input" / "mixed" / "notes.txt").read_text() == "hello"
    assert job["status"] == "done" and len(job["warnings"]) == 1 and "input/mixed/notes.txt" in job["warnings"][0]
    for d in dicom:
        assert len(list((job_dir / d["path"]).iterdir())) == 4
    names = {p.name for p in (job_dir / "input").rglob("*")}
    assert not names & {".DS_Store", "x.tmp", "y.part", "~lock"}


def test_a_stray_file_beside_a_series_is_kept_and_the_series_runs(site: Site, tmp_path: Path) -> None:
    use_bundled(site)
    series = tmp_path / "ct"
    phantom.write_dicom(series, phantom.axial_grid(slices=12, size=48))
    (series / "notes.txt").write_text("scanned on the old CT")
    site.start()
    shutil.copytree(series, site.inbox / "ct")  # the folder door
    submitted = site.cli("submit", str(series)).stdout.strip()  # and the command line
    for job_dir in site.done(2, timeout=60):
        job = read_job(job_dir)
        assert job["status"] == "done", job["error"]
        assert [i["type"] for i in job["inputs"]] == ["DICOM"]
        assert (job_dir / "input" / "ct" / "notes.txt").read_text() == "scanned on the old CT"
        assert job["warnings"] == ["input/ct/notes.txt is not DICOM and lies beside a DICOM series: kept in the "
                                   "input, not given to the algorithm"]
        assert sorted(Path(o["path"]).name for o in job["outputs"]) == ["body.nii.gz", "lung_left.nii.gz",
                                                                        "lung_right.nii.gz"]
    assert submitted in [p.name for p in outbox_jobs(site.outbox)]


def test_dropped_folder_with_its_own_job_yaml(site: Site, tmp_path: Path) -> None:
    drop = tmp_path / "request"
    drop.mkdir()
    (drop / "data.txt").write_text("x")
    (drop / "job.yaml").write_text(yaml.safe_dump({"algorithm": "noop", "settings": {"label": "mine"}}))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data.txt").write_text("x")
    (bad / "job.yaml").write_text(yaml.safe_dump({"algorithm": "no-such-model"}))
    site.start()
    shutil.copytree(drop, site.inbox / "request")
    shutil.copytree(bad, site.inbox / "bad")
    done = site.done(2)
    by_status = {read_job(p)["status"]: p for p in done}
    ok = read_job(by_status["done"])
    assert ok["settings"] == {"label": "mine"}
    assert "mine" in (by_status["done"] / "output" / "result.txt").read_text()
    assert [i["path"] for i in ok["inputs"]] == ["input/request/data.txt"]
    failed = read_job(by_status["failed"])
    assert "unknown algorithm 'no-such-model'" in failed["error"]
    assert (by_status["failed"] / "input" / "bad" / "data.txt").read_text() == "x"  # nothing lost


def test_jobs_placed_while_no_worker_runs_are_done_at_start(site: Site, tmp_path: Path) -> None:
    payload = tmp_path / "p.txt"
    payload.write_text("x")
    ids = [site.cli("submit", str(payload)).stdout.strip() for _ in range(3)]
    shutil.copy(payload, site.inbox / "dropped-early.txt")
    site.start()
    done = site.done(4)
    assert set(ids) <= {p.name for p in done}
    assert all(read_job(p)["status"] == "done" for p in done)


def test_crash_states_in_staging_and_before_the_final_move_are_recovered(site: Site, tmp_path: Path) -> None:
    # A drop moved into staging when the service died, before its job was written:
    half = site.inbox / ".staging" / jobs.new_job_id()
    (half / "dropped").mkdir(parents=True)
    (half / "dropped" / "scan.txt").write_text("x")
    # A job fully staged (manifest written) but not yet renamed into the inbox:
    staged = jobs.stage(site.inbox)
    (staged / "input" / "a.txt").write_text("a")
    manifest = jobs.JobManifest(id=staged.name, algorithm="noop",
                                inputs=[{"id": "in-1", "type": "FILE", "path": "input/a.txt", "meta_data": {}}])
    jobs.write_manifest(staged, manifest)
    # A job written as done whose move to the outbox did not happen:
    payload = tmp_path / "p.txt"
    payload.write_text("p")
    finished = jobs.submit(site.inbox, [payload], algorithm="noop")
    finished.status = jobs.JobStatus.DONE
    finished.attempts = 1
    jobs.write_manifest(site.inbox / finished.id, finished)

    site.start()
    done = site.done(3)
    assert all(read_job(p)["status"] == "done" for p in done)
    assert {staged.name, finished.id} <= {p.name for p in done}
    assert len(site.runs()) == 2, "the job already done must not run again"
    assert list((site.inbox / ".staging").iterdir()) == []
    assert [p.name for p in site.inbox.iterdir() if not p.name.startswith(".")] == []


def test_symlinks_are_not_followed_out_of_a_drop(site: Site, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not take me")
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "real.txt").write_text("x")
    os.symlink(secret, drop / "link.txt")
    site.start()
    shutil.copytree(drop, site.inbox / "drop", symlinks=True)
    [job_dir] = site.done(1)
    assert [i["path"] for i in read_job(job_dir)["inputs"]] == ["input/drop/real.txt"]


def test_settle_wait_is_by_event_not_by_rescan(site: Site) -> None:
    site.write_config(worker={"settle_seconds": 0.2, "rescan_seconds": 30})
    site.start()
    (site.inbox / "quick.txt").write_text("x")
    # With a 30 s rescan, only the watchdog event and the settle timer can start this job in time.
    wait_for(lambda: outbox_jobs(site.outbox), 10, what="the dropped file to be run")
