"""The service as a real process (issue 8): start, stop, damaged jobs, jobs that wait, several services.

Each test runs ``postbox manage run`` (and ``postbox submit``) as separate processes and judges by the folders,
the ready file and the service log, never by mocks of our own components.
"""

from __future__ import annotations

import collections
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from _peers import Destination, storescu
from conftest import Site, outbox_jobs, read_job, wait_for

from pipeline import jobs, phantom
from pipeline.bodylungs import DEFAULT_SETTINGS

FAST = {"worker": {"rescan_seconds": 0.2, "stop_timeout": 3, "settle_seconds": 0.2},
        "dicom": {"series_timeout": 1.0, "send_backoff_max": 0.5, "send_retry_seconds": 60}}


def fast(site: Site, **changes: dict) -> None:
    """Every timeout short (the suite's time), then ``changes`` section by section."""
    site.write_config(**{k: {**FAST.get(k, {}), **changes.get(k, {})} for k in {*FAST, *changes}})


def submit(site: Site, path: Path, *args: str) -> str:
    return site.cli("submit", str(path), *args).stdout.strip()


def lines_with(log: str, *words: str) -> list[str]:
    return [line for line in log.splitlines() if all(w in line for w in words)]


def pending_job(inbox: Path, job_id: str, payload: Path) -> Path:
    """Commit a pending job under a chosen id through the job protocol (as the doors do)."""
    sdir = jobs.stage(inbox, job_id)
    (sdir / "input" / payload.name).write_bytes(payload.read_bytes())
    manifest = jobs.JobManifest(id=job_id, source="cli",
                                inputs=[jobs.InputRecord(id="in-1", type="FILE", path=f"input/{payload.name}")])
    return jobs.commit(inbox, sdir, manifest)


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    p = tmp_path / "payload.txt"
    p.write_text("input")
    return p


# --- defect 3: a garbage job.yaml at start ------------------------------------------------------------------------


def test_garbage_job_yaml_at_start_is_set_aside_and_the_service_runs_on(site: Site, payload: Path) -> None:
    fast(site)
    stamp = jobs.new_job_id()[:-8]
    pending, finished = stamp + "0000000a", stamp + "0000000b"
    garbage = {pending: b": not yaml [\n", finished: b"id: [unclosed\n\x00\xfe garbage"}
    for box, job_id in ((site.inbox, pending), (site.outbox, finished)):
        (box / job_id / "input").mkdir(parents=True)
        (box / job_id / "input" / "payload.txt").write_text("input")
        (box / job_id / "job.yaml").write_bytes(garbage[job_id])
    proc = site.start()
    good = submit(site, payload)
    wait_for(lambda: (site.outbox / good).is_dir() and (site.outbox / pending).is_dir(), 30,
             what="the good job done and the damaged one set aside")
    assert read_job(site.outbox / good)["status"] == "done"
    for job_id in (pending, finished):
        job_dir = site.outbox / job_id
        assert (job_dir / "job.yaml.damaged").read_bytes() == garbage[job_id]
        job = read_job(job_dir)
        assert job["status"] == "failed" and "job.yaml was damaged" in job["error"], job
        assert (job_dir / "input" / "payload.txt").read_text() == "input", "set aside, nothing deleted"
    assert not (site.inbox / pending).exists()
    assert proc.poll() is None
    assert site.stop(proc) == 0
    log = site.service_log()
    for job_id in (pending, finished):
        assert len(lines_with(log, job_id, "damaged")) == 1, lines_with(log, job_id, "damaged")
    assert "Traceback" not in log


# --- defect 3: a fatal start error exits non-zero ------------------------------------------------------------------


@pytest.mark.parametrize("folder", [".staging", ".locks"])
def test_a_worker_that_cannot_start_ends_the_service_non_zero_with_the_reason(site: Site, folder: str) -> None:
    fast(site)
    (site.inbox / folder).write_text("a file where a folder of the inbox belongs")
    proc = site.launch()
    wait_for(lambda: proc.poll() is not None, 15, what="the service to end on a fatal start error")
    log = site.service_log()
    assert proc.returncode != 0, log
    assert lines_with(log, "the worker cannot run", folder), log
    assert not site.ready_file(proc).exists(), "a service that never served leaves no ready file"


# --- defects 4 and 11: one job that cannot be claimed waits alone, said once ---------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One service for the tests of jobs that wait: each test has its own jobs, and counts lines by job id."""
    site = Site(tmp_path_factory.mktemp("shared"))
    fast(site)
    site.start()
    yield site
    for proc in site.procs:
        site.stop(proc)


def test_a_claim_error_on_one_job_stops_nothing_else(shared: Site, payload: Path) -> None:
    # A directory where the job's lock file belongs: taking the lock raises an OSError (IsADirectoryError).
    stuck = jobs.new_job_id()[:-8] + "00000000"  # first in the queue: every later job comes behind it
    lock = shared.inbox / ".locks" / f"{stuck}.lock"
    lock.mkdir(parents=True)
    pending_job(shared.inbox, stuck, payload)
    later = []
    for _ in range(3):  # one after the other: each one dispatched passes the stuck job again
        later.append(submit(shared, payload))
        wait_for(lambda: (shared.outbox / later[-1]).is_dir(), 30, what="a later job to run")
    assert [read_job(shared.outbox / j)["status"] for j in later] == ["done"] * 3
    job = read_job(shared.inbox / stuck)
    assert job["status"] == "pending" and job["attempts"] == 0, job
    log = shared.service_log()
    [said] = lines_with(log, stuck, "waits")
    assert "its lock cannot be taken" in said and "Is a directory" in said, said
    assert "Traceback" not in log
    lock.rmdir()  # the problem goes: the job runs, by itself
    wait_for(lambda: (shared.outbox / stuck).is_dir(), 30, what="the job to run once its lock can be taken")
    assert read_job(shared.outbox / stuck)["status"] == "done"
    assert len(lines_with(shared.service_log(), stuck, "waits")) == 1


def test_a_job_locked_by_another_process_waits_said_once_and_runs_when_freed(shared: Site, payload: Path) -> None:
    job_id = jobs.new_job_id()
    lock = shared.inbox / ".locks" / f"{job_id}.lock"
    hold = ("import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); sys.stdin.read()")  # holds the lock until its stdin closes
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        pending_job(shared.inbox, job_id, payload)
        wait_for(lambda: lines_with(shared.service_log(), job_id, "waits"), 10, what="the job to be said waiting")
        other = submit(shared, payload)  # runs meanwhile: the worker passed the held job more than once
        wait_for(lambda: (shared.outbox / other).is_dir(), 30, what="another job to run")
        job = read_job(shared.inbox / job_id)
        assert job["status"] == "pending" and job["attempts"] == 0, job
        [said] = lines_with(shared.service_log(), job_id, "waits")
        assert "another process holds its lock" in said, said
    finally:
        assert holder.stdin is not None
        holder.stdin.close()  # the holder exits, and its lock goes with it
        holder.wait(timeout=10)
    wait_for(lambda: (shared.outbox / job_id).is_dir(), 30, what="the job to run once its lock is free")
    assert read_job(shared.outbox / job_id)["status"] == "done"
    assert [r["job"] for r in shared.runs()].count(job_id) == 1
    assert len(lines_with(shared.service_log(), job_id, "waits")) == 1


# --- defect 9: two services on one config.yaml -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_services_on_one_config_each_job_runs_once_and_each_result_arrives_once(
        site: Site, payload: Path, tmp_path: Path) -> None:
    destination = Destination()
    try:
        destination.answer = lambda association, number: 0xA700  # down at first: both senders keep at it
        dicom_port, http_port = free_port(), free_port()
        site.config["algorithms"].append({"name": "body-lungs", "function": "pipeline.bodylungs:segment",
                                          "outputs": ["rtstruct", "seg"], "default_settings": DEFAULT_SETTINGS})
        fast(site, worker={"processes": 2}, http={"port": http_port}, dicom={
            "enabled": True, "host": "127.0.0.1", "port": dicom_port, "complete_on_release": True,
            "destinations": {"TPS": destination.config()},
            "routes": [{"algorithm": "body-lungs", "destinations": ["TPS"]}]})
        first = site.start()
        second = site.start()
        assert site.doors(first) == {"http": {"port": http_port, "scheme": "http"},
                                     "dicom": {"port": dicom_port, "ae_title": "POSTBOX"}}
        assert site.doors(second) == {}, "the second service has no door of its own"
        second_log = (site.root / "service-1.log").read_text()
        for door in ("dicom", "http"):
            [said] = lines_with(second_log, f"{door}: cannot listen on 127.0.0.1:")
            assert "stays closed" in said, said
        assert "Traceback" not in second_log

        series = []
        for name in ("ct1", "ct2"):
            phantom.write_dicom(tmp_path / name, phantom.axial_grid(slices=12, size=32))
            storescu(dicom_port, tmp_path / name)
            series.append(str(pydicom.dcmread(next((tmp_path / name).iterdir())).SeriesInstanceUID))
        submitted = [submit(site, payload) for _ in range(6)]
        site.done(8, timeout=60)
        jobs_done = {d.name: read_job(d) for d in outbox_jobs(site.outbox)}
        assert all(j["status"] == "done" and j["attempts"] == 1 for j in jobs_done.values()), jobs_done
        dicom_jobs = [d for d, j in jobs_done.items() if j["source"] == "dicom"]
        received = sorted(jobs_done[d]["inputs"][0]["meta_data"]["series_instance_uid"] for d in dicom_jobs)
        assert received == sorted(series), "each series sent is one job"
        runs = collections.Counter(r["job"] for r in site.runs())
        assert runs == collections.Counter(dict.fromkeys(submitted, 1)), "each submitted job ran exactly once"

        # Both services' senders have the sends in hand (each was refused at least once), then the destination
        # comes up: whichever sender takes a send, each file must arrive once.
        wait_for(lambda: all(lines_with((site.root / f"service-{n}.log").read_text(), "sending to TPS failed")
                             for n in (0, 1)), 30, what="both services to try the sends")
        destination.answer = lambda association, number: 0x0000
        wait_for(lambda: all(read_job(site.outbox / d)["sends"]["TPS"]["status"] == "sent" for d in dicom_jobs),
                 30, what="every result to be sent")
        results = [str(pydicom.dcmread(site.outbox / d / f, stop_before_pixels=True).SOPInstanceUID)
                   for d in dicom_jobs for f in read_job(site.outbox / d)["sends"]["TPS"]["files"]]
        assert len(results) == 4
        assert destination.stored == collections.Counter(dict.fromkeys(results, 1)), destination.requests

        assert site.stop(first) == 0
        after = submit(site, payload)
        wait_for(lambda: (site.outbox / after).is_dir(), 30, what="the second service to run a job alone")
        assert read_job(site.outbox / after)["status"] == "done"
        assert [r["service"] for r in site.runs() if r["job"] == after] == [second.pid]
        assert second.poll() is None
    finally:
        destination.close()


def test_the_service_takes_the_hard_limit_on_open_files(site: Site) -> None:
    # A guard holds each waiting connection as a descriptor: 1,024 (a common soft default) is soon reached.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY or hard > 4096 else hard
    assert want > 256, "the machine's own hard limit is too low to test this"

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, want))

    with open(site.root / "service-limits.log", "wb") as log:
        proc = subprocess.Popen([*site.cli_argv(), "manage", "run"], stdout=log, stderr=subprocess.STDOUT,
                                env=site.env, preexec_fn=low_soft_limit)
    site.procs.append(proc)
    wait_for(lambda: site.ready_file(proc).is_file() or proc.poll() is not None, 30, what="the service to be ready")
    limits = Path(f"/proc/{proc.pid}/limits").read_text()
    [line] = [ln for ln in limits.splitlines() if ln.startswith("Max open files")]
    assert line.split()[3:5] == [str(want), str(want)], line
    assert site.stop(proc) == 0
