"""Results sent on by C-STORE (issue 8), as real processes against a destination the test controls.

The destination is a pynetdicom SCP in the test process that counts what it stores per SOPInstanceUID, so a
file delivered twice shows; Postbox runs as ``postbox manage run`` and is fed by dcmtk's storescu.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from _peers import HANG, OUT_OF_RESOURCES, SUCCESS, Destination, storescu
from conftest import Site, read_job, wait_for

from pipeline import jobs, phantom
from pipeline.bodylungs import DEFAULT_SETTINGS

LEGACY = Path(__file__).resolve().parent / "data" / "legacy-0.1.0-job"


@pytest.fixture
def destination() -> Iterator[Destination]:
    dest = Destination()
    yield dest
    dest.close()


def routed_site(site: Site, dest: Destination) -> None:
    """DICOM door on any free port; every series runs body-lungs, whose RTSTRUCT and SEG go to ``TPS``.

    Sent by the sender after the job's finish (``send_early: false``): its retries and partial deliveries
    are what these tests are about; tests/test_early_send.py has the sends made while a job runs.
    """
    site.config["algorithms"].append({"name": "body-lungs", "function": "pipeline.bodylungs:segment",
                                      "outputs": ["rtstruct", "seg"], "default_settings": DEFAULT_SETTINGS})
    site.write_config(worker={"rescan_seconds": 0.5, "stop_timeout": 3}, dicom={
        "enabled": True, "host": "127.0.0.1", "port": 0, "series_timeout": 1.0, "complete_on_release": True,
        "destinations": {"TPS": dest.config()}, "routes": [{"algorithm": "body-lungs", "destinations": ["TPS"]}],
        "send_backoff_max": 0.5, "send_retry_seconds": 60, "send_early": False})


def send_phantom(site: Site, proc: subprocess.Popen[bytes], tmp_path: Path) -> Path:
    """storescu a 12-slice phantom CT to the service; returns its job folder once the job is done."""
    phantom.write_dicom(tmp_path / "ct", phantom.axial_grid(slices=12, size=32))
    storescu(site.doors(proc)["dicom"]["port"], tmp_path / "ct")
    [job_dir] = site.done(1, timeout=60)
    job = read_job(job_dir)
    assert job["status"] == "done", job["error"]
    return job_dir


def uids(job_dir: Path, files: list[str]) -> list[str]:
    return [str(pydicom.dcmread(job_dir / f, stop_before_pixels=True).SOPInstanceUID) for f in files]


def send_state(job_dir: Path, name: str = "TPS") -> dict[str, Any]:
    """The send to ``name`` as job.yaml has it now ({} while it is 0.1.0's, whose sends sit in ``extra``)."""
    return read_job(job_dir).get("sends", {}).get(name, {})  # type: ignore[no-any-return]


# --- defect 8: after a partial delivery, only what is missing goes again -----------------------------------


def test_after_a_partial_delivery_each_file_arrives_once(site: Site, destination: Destination,
                                                          tmp_path: Path) -> None:
    # The first association: the first file is stored, the second refused (out of resources); then all is taken.
    destination.answer = lambda association, number: OUT_OF_RESOURCES if (association, number) == (0, 1) else SUCCESS
    routed_site(site, destination)
    proc = site.start()
    job_dir = send_phantom(site, proc, tmp_path)
    state = wait_for(lambda: (lambda s: s if s["status"] != "pending" else None)(send_state(job_dir)), 30,
                     what="the send to end")
    files = sorted(state["files"])
    assert files == ["output/rtstruct.dcm", "output/seg.dcm"]
    assert state["status"] == "sent" and state["attempts"] == 2, state
    assert all(state["files"][f] for f in files), state  # each with the time the destination stored it
    assert destination.stored == collections.Counter(dict.fromkeys(uids(job_dir, files), 1))
    # Three C-STOREs in all: the first file once, the refused one twice; nothing went again once stored.
    assert [status for _, _, status in destination.requests] == [SUCCESS, OUT_OF_RESOURCES, SUCCESS]
    # Issue 10: the send's time in job.yaml runs from the job's finish to the last file stored, so it holds
    # the 0.5 s backoff between the two attempts.
    timings = read_job(job_dir)["timings"]
    assert 0.5 <= timings["send_seconds.TPS"] < time.time() - timings["finished"], timings


# --- defect 6: SIGTERM with a hung send ------------------------------------------------------------------------


def test_sigterm_with_a_hung_send_exits_within_stop_timeout_and_the_send_resumes(
        site: Site, destination: Destination, tmp_path: Path) -> None:
    # The destination accepts the association, stores the first file, and never answers for the second.
    destination.answer = lambda association, number: HANG if (association, number) == (0, 1) else SUCCESS
    routed_site(site, destination)
    stop_timeout = site.config["worker"]["stop_timeout"]
    proc = site.start()
    job_dir = send_phantom(site, proc, tmp_path)
    assert destination.entered.wait(30), "the send never reached the destination"
    (tmp_path / "later.txt").write_text("submitted after the SIGTERM")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    later = site.cli("submit", str(tmp_path / "later.txt")).stdout.strip()
    code = proc.wait(timeout=stop_timeout + 30)
    took = time.monotonic() - started
    assert code == 0, site.service_log()
    assert took < stop_timeout + 2, f"the service took {took:.1f} s to stop (worker.stop_timeout {stop_timeout})"
    state = send_state(job_dir)
    assert state["status"] == "pending" and state["attempts"] == 0, state
    # What the destination stored before the stop is written down: only the rest goes after the restart.
    assert state["files"]["output/rtstruct.dcm"] and state["files"]["output/seg.dcm"] is None, state
    assert (site.inbox / later).is_dir(), "a job submitted after the SIGTERM was taken by the stopping service"
    job = read_job(site.inbox / later)
    assert job["status"] == "pending" and job["attempts"] == 0, job

    site.start()  # the destination answers now: the pending send resumes, and the job left behind runs
    wait_for(lambda: send_state(job_dir).get("status") == "sent", 30, what="the resumed send")
    assert send_state(job_dir)["attempts"] == 1
    files = sorted(send_state(job_dir)["files"])
    assert destination.stored == collections.Counter(dict.fromkeys(uids(job_dir, files), 1))
    site.done(2)
    assert read_job(site.outbox / later)["status"] == "done"


# --- defect 3: a garbage job.yaml in the send queue --------------------------------------------------------------


def legacy_site(site: Site, dest: Destination) -> None:
    """A site whose destination ``tps`` (the one 0.1.0's job names) is the test's SCP."""
    site.write_config(worker={"rescan_seconds": 0.5, "stop_timeout": 3}, dicom={
        "enabled": True, "host": "127.0.0.1", "port": 0, "series_timeout": 1.0, "destinations": {"tps": dest.config()},
        "send_backoff_max": 0.5, "send_retry_seconds": 60})


def finished_job_with_a_send_pending(outbox: Path, job_id: str) -> Path:
    """A copy of 0.1.0's finished job under ``job_id``, finished just now, its send to ``tps`` not yet tried."""
    job_dir = outbox / job_id
    shutil.copytree(LEGACY, job_dir)
    data = yaml.safe_load((job_dir / "job.yaml").read_text())
    data["id"] = job_id
    data["timings"]["finished"] = time.time()
    data["extra"]["sends"]["tps"].update(attempts=0, next_try=0, error=None)
    (job_dir / "job.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return job_dir


def test_a_damaged_job_yaml_in_the_send_queue_is_set_aside_and_the_next_send_goes(
        site: Site, destination: Destination) -> None:
    destination.answer = lambda association, number: OUT_OF_RESOURCES  # refuses every file at first
    legacy_site(site, destination)
    stamp = jobs.new_job_id()[:-8]
    # The damaged one first in the queue: the sends behind it must still go.
    damaged = finished_job_with_a_send_pending(site.outbox, stamp + "00000001")
    good = finished_job_with_a_send_pending(site.outbox, stamp + "00000002")
    site.start()
    wait_for(lambda: all(send_state(d, "tps").get("attempts", 0) >= 1 for d in (damaged, good)), 30,
             what="both sends to be tried")
    garbage = b": not yaml [\n\x00\xff"
    with jobs.finished_lock(site.inbox, damaged.name):  # as the sender changes send state: never half-written
        (damaged / "job.yaml").write_bytes(garbage)
    destination.answer = lambda association, number: SUCCESS
    wait_for(lambda: send_state(good, "tps").get("status") == "sent", 30, what="the good job's send")
    wait_for(lambda: (damaged / "job.yaml.damaged").is_file(), 30, what="the damaged job to be set aside")
    assert (damaged / "job.yaml.damaged").read_bytes() == garbage
    job = read_job(damaged)
    assert job["status"] == "failed" and "job.yaml was damaged" in job["error"], job
    assert not job["sends"], "a job set aside sends nothing"
    assert destination.stored == collections.Counter(dict.fromkeys(uids(good, ["output/rtstruct.dcm",
                                                                               "output/seg.dcm"]), 1))
    assert site.procs[0].poll() is None


# --- a job folder made by Postbox 0.1.0 ------------------------------------------------------------------------


def test_a_legacy_job_with_a_send_pending_resumes_and_is_rewritten_typed(site: Site, destination: Destination) -> None:
    job_dir = site.outbox / LEGACY.name
    shutil.copytree(LEGACY, job_dir)
    job_id = read_job(job_dir)["id"]
    job_dir = job_dir.rename(site.outbox / job_id)
    legacy_site(site, destination)
    site.start()
    wait_for(lambda: send_state(job_dir, "tps").get("status") == "sent", 30, what="the resumed send")
    files = ["output/rtstruct.dcm", "output/seg.dcm"]
    assert destination.stored == collections.Counter(dict.fromkeys(uids(job_dir, files), 1))
    job = read_job(job_dir)
    assert "extra" not in job
    assert sorted(job["sends"]["tps"]["files"]) == files and all(job["sends"]["tps"]["files"].values())
    assert job["delivery"]["destinations"] == ["tps"]
    status = site.cli("status", job_id, check=False)
    assert status.returncode == 0, status.stderr
    assert "tps" in status.stdout and "sent" in status.stdout
