"""Results leave as they are written (issue 10): the RTSTRUCT is at the destination while the SEG is still
being written, and what could not go early is sent after the job's finish, each file once.

A real service fed by dcmtk's storescu, and a destination in the test process that counts what it stores
per SOP Instance UID. ``POSTBOX_DELAY_AT=seg=...`` slows the SEG writer on purpose (tests only).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from _peers import HANG, OUT_OF_RESOURCES, SUCCESS, Destination, storescu
from conftest import Site, read_job, wait_for

from pipeline import crashpoints, phantom


@pytest.fixture
def destination() -> Iterator[Destination]:
    dest = Destination()
    yield dest
    dest.close()


def start(site: Site, dest: Destination, *, seg_delay: float = 0.0) -> subprocess.Popen[bytes]:
    site.config["algorithms"][0] = {"name": "noop", "function": "testalgos:lungs", "outputs": ["rtstruct", "seg"]}
    site.write_config(worker={"rescan_seconds": 0.5, "stop_timeout": 3}, dicom={
        "enabled": True, "host": "127.0.0.1", "port": 0, "series_timeout": 1.0, "complete_on_release": True,
        "destinations": {"TPS": dest.config()}, "routes": [{"algorithm": "noop", "destinations": ["TPS"]}],
        "send_backoff_max": 0.2, "send_retry_seconds": 60})
    env = {**site.env, crashpoints.DELAY_ENV: f"seg={seg_delay}"} if seg_delay else None
    return site.start(env)


def send_phantom(site: Site, proc: subprocess.Popen[bytes], tmp_path: Path) -> None:
    phantom.write_dicom(tmp_path / "ct", phantom.axial_grid(slices=12, size=32))
    storescu(site.doors(proc)["dicom"]["port"], tmp_path / "ct")


def test_the_rtstruct_reaches_the_destination_while_the_seg_is_still_being_written(
        site: Site, destination: Destination, tmp_path: Path) -> None:
    proc = start(site, destination, seg_delay=3.0)
    send_phantom(site, proc, tmp_path)
    wait_for(lambda: len(destination.stored) == 1, 30, what="the RTSTRUCT at the destination")
    # Meanwhile the job still runs, and its SEG is not written yet.
    [running] = [p for p in site.inbox.iterdir() if (p / "job.yaml").is_file()]
    assert read_job(running)["status"] == "running"
    assert list(running.glob("work/dicom-*/seg.dcm")) == []
    [job_dir] = site.done(1, timeout=60)
    job = read_job(job_dir)
    assert job["status"] == "done" and job["sends"]["TPS"]["status"] == "sent", job["sends"]
    files = [o["path"] for o in job["outputs"] if o["type"] == "DICOM"]
    kinds = {pydicom.dcmread(job_dir / f, stop_before_pixels=True).Modality: f for f in files}
    assert sorted(kinds) == ["RTSTRUCT", "SEG"]
    uid = {m: str(pydicom.dcmread(job_dir / f, stop_before_pixels=True).SOPInstanceUID) for m, f in kinds.items()}
    # The RTSTRUCT first, the SEG after it, each stored once, on one association.
    assert [r[1] for r in destination.requests] == [uid["RTSTRUCT"], uid["SEG"]]
    assert {r[0] for r in destination.requests} == {0}
    assert destination.stored == {uid["RTSTRUCT"]: 1, uid["SEG"]: 1}
    # Checked before it left, and recorded before the finish.
    assert all(d >= 0.95 for d in job["checks"]["in-1"].values()), job["checks"]
    assert sorted(job["early_sent"]["TPS"]) == sorted(uid.values())
    assert 0 < job["timings"]["results_seconds.TPS"] < 60


def test_what_cannot_go_early_is_sent_after_the_finish_once(site: Site, destination: Destination,
                                                             tmp_path: Path) -> None:
    # The destination refuses the first association's store: the rest waits for the sender and its retries.
    destination.answer = lambda association, number: OUT_OF_RESOURCES if association == 0 else SUCCESS
    proc = start(site, destination)
    send_phantom(site, proc, tmp_path)
    [job_dir] = site.done(1, timeout=60)
    state = wait_for(lambda: (s := read_job(job_dir)["sends"]["TPS"])["status"] == "sent" and s, 30,
                     what="the sender to deliver the rest")
    assert len(state["files"]) == 2 and all(state["files"].values())
    assert sorted(destination.stored.values()) == [1, 1], destination.requests
    assert read_job(job_dir).get("early_sent", {}) == {}


def test_sigterm_with_a_hung_early_send_stops_within_stop_timeout_and_the_rest_goes_after(
        site: Site, destination: Destination, tmp_path: Path) -> None:
    # The destination stores the RTSTRUCT, then never answers for the SEG.
    destination.answer = lambda association, number: HANG if (association, number) == (0, 1) else SUCCESS
    proc = start(site, destination)
    send_phantom(site, proc, tmp_path)
    assert destination.entered.wait(30), "the SEG never reached the destination"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, site.service_log()[-2000:]
    stop_timeout = site.config["worker"]["stop_timeout"]
    assert time.monotonic() - started < stop_timeout + 2
    site.start()
    [job_dir] = site.done(1, timeout=60)
    wait_for(lambda: read_job(job_dir)["sends"]["TPS"]["status"] == "sent", 30, what="the SEG sent after all")
    job = read_job(job_dir)
    files = [o["path"] for o in job["outputs"] if o["type"] == "DICOM"]
    sent = {str(pydicom.dcmread(job_dir / f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert set(destination.stored) == sent and all(n == 1 for n in destination.stored.values()), \
        destination.requests
