"""Kill -9 at every named crash point, restart, and check that each job and each acknowledged instance ends
exactly once (issue 8; pipeline/crashpoints.py). One test per point: a new step that writes state gets a
point, and the first test here fails until that point has a scenario of its own."""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from _peers import Destination
from conftest import Site, outbox_jobs, read_job, wait_for
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from pipeline import crashpoints, phantom

ROOT = Path(__file__).resolve().parent.parent
SLICES = 12

# Each point and the door whose work reaches it. Points of the protocol's commit are reached by every door
# that commits; they are killed once through the CLI and once through the DICOM node.
SCENARIOS: dict[str, tuple[str, ...]] = {
    "stage": ("cli", "dicom"),
    "commit.manifest": ("cli", "dicom"),
    "commit.renamed": ("cli", "dicom"),
    "adopt.moved": ("folder",),
    "claim": ("cli",),
    "start_attempt": ("cli",),
    "outputs.written": ("dicom",),
    "send.early_recorded": ("dicom",),
    "finish.manifest": ("cli",),
    "finish.moved": ("cli",),
    "requeue": ("cli",),
    "node.staged": ("dicom",),
    "node.stored": ("dicom",),
    "node.complete": ("dicom",),
    "send.claimed": ("dicom",),
    "send.stored": ("dicom",),
    "send.recorded": ("dicom",),
    "purge.moved": ("purge",),
    "preview.written": ("preview",),
}
REMOTE = ("remote.before_child", "remote.outputs_written", "remote.before_return", "attempt.promoted")
CASES = [(point, door) for point, doors in SCENARIOS.items() for door in doors]


def test_every_crash_point_in_the_code_is_listed_and_has_a_scenario() -> None:
    used = set()
    for path in (ROOT / "pipeline").rglob("*.py"):
        used |= set(re.findall(r"""crash_point\(["']([\w.]+)["']\)""", path.read_text()))
    assert used == set(crashpoints.POINTS), "crash points in the code and in crashpoints.POINTS differ"
    assert set(SCENARIOS) | set(REMOTE) == set(crashpoints.POINTS), "every crash point needs a scenario"
    # A GPU node's points, and the service's promotion of a remote attempt, are killed in tests/test_dask.py, on
    # a real Dask cluster.
    dask_tests = (ROOT / "tests" / "test_dask.py").read_text()
    assert all(f'"{point}"' in dask_tests for point in REMOTE)


@pytest.fixture
def destination() -> Iterator[Destination]:
    dest = Destination()
    yield dest
    dest.close()


def crash_env(site: Site, point: str) -> dict[str, str]:
    return {**site.env, crashpoints.ENV: point}


def died_at_point(proc: subprocess.Popen[bytes], site: Site) -> None:
    wait_for(lambda: proc.poll() is not None, 30, what="the process to be killed at its crash point")
    assert proc.returncode == -signal.SIGKILL, site.service_log()[-2000:]


def age_staging(site: Site, seconds: float = 2 * 3600) -> None:
    """Make what is in the staging area look untouched for ``seconds`` (an abandoned stage is removed after an hour)."""
    import os
    import time

    old = time.time() - seconds
    for path in (site.inbox / ".staging").rglob("*"):
        os.utime(path, (old, old))
    for path in (site.inbox / ".staging").iterdir():
        os.utime(path, (old, old))


def send_series(port: int, files: list[Path]) -> list[str]:
    """C-STORE the files over one association, as a modality does; the SOP UIDs acknowledged with Success."""
    ae = AE(ae_title="CT_SCANNER")
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="POSTBOX")
    assert assoc.is_established
    acknowledged = []
    for f in files:
        if not assoc.is_established:
            break
        ds = pydicom.dcmread(f)
        try:
            status = assoc.send_c_store(ds)
        except RuntimeError:  # pynetdicom: the association ended under us (the node was killed)
            break
        if getattr(status, "Status", None) == 0x0000:
            acknowledged.append(str(ds.SOPInstanceUID))
    if assoc.is_established:
        assoc.release()
    return acknowledged


def file_uids(path: Path) -> tuple[str, str]:
    """A DICOM file's SOP Instance and Series Instance UIDs."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)


def instances_in_jobs(site: Site) -> collections.Counter[str]:
    found: collections.Counter[str] = collections.Counter()
    for box in (site.inbox, site.outbox):
        for job_dir in box.iterdir():
            for path in job_dir.glob("input/*/*.dcm"):
                found[path.stem] += 1
    return found


def runs_per_job(site: Site) -> collections.Counter[str]:
    return collections.Counter(r["job"] for r in site.runs())


def check_each_job_once(site: Site, expected_jobs: int) -> list[dict[str, Any]]:
    """Every job in the outbox, done, its algorithm's work kept once; nothing left in the inbox or staging."""
    jobs_done = site.done(expected_jobs, timeout=60)
    assert len(jobs_done) == expected_jobs, [p.name for p in jobs_done]
    manifests = [read_job(p) for p in jobs_done]
    assert all(m["status"] == "done" for m in manifests), [(m["id"], m["error"]) for m in manifests]
    staging = site.inbox / ".staging"
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())
    assert [p for p in site.inbox.iterdir() if not p.name.startswith(".")] == []
    listed = site.cli("status", "--json").stdout
    assert all(m["id"] in listed for m in manifests), "the index lists every job after the restart"
    return manifests


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    p = tmp_path / "payload.txt"
    p.write_text("input")
    return p


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    return phantom.write_dicom(tmp_path / "ct", phantom.axial_grid(slices=SLICES, size=32))


@pytest.mark.parametrize(("point", "door"), CASES, ids=[f"{p}-{d}" for p, d in CASES])
def test_kill_at_crash_point_then_restart_ends_each_job_once(site: Site, point: str, door: str, payload: Path,
                                                             series: list[Path], destination: Destination) -> None:
    site.write_config(worker={"rescan_seconds": 0.5, "settle_seconds": 0.2, "stop_timeout": 5})
    if door == "dicom":
        routed = point.startswith("send.") or point == "outputs.written"
        writes = point in ("outputs.written", "send.early_recorded")
        site.write_config(dicom={
            "enabled": True, "host": "127.0.0.1", "port": 0, "series_timeout": 1.0, "incomplete": "run",
            "complete_on_release": True, "send_backoff_max": 0.2,
            "destinations": {"TPS": {"host": "127.0.0.1", "port": destination.port, "ae_title": "TPS"}},
            "routes": [{"algorithm": "noop", "destinations": ["TPS"] if routed else []}],
        })
        if writes:  # masks, from which the pipeline writes an RTSTRUCT and a SEG
            site.config["algorithms"][0] = {"name": "noop", "function": "testalgos:lungs",
                                            "outputs": ["rtstruct", "seg"]}
            site.write_config()
        elif routed:  # a DICOM output to send: the test algorithm hands its input series back as output
            site.config["algorithms"][0] = {"name": "noop", "function": "testalgos:echo_series"}
            site.write_config()
        _dicom(site, point, series, destination)
    elif door == "cli":
        _cli(site, point, payload)
    elif door == "purge":
        _purge(site, point, payload)
    elif door == "preview":
        _preview(site, point, series)
    else:
        _folder(site, point, payload)


def _cli(site: Site, point: str, payload: Path) -> None:
    if point in ("stage", "commit.manifest", "commit.renamed"):
        proc = subprocess.run([*site.cli_argv(), "submit", str(payload)], env=crash_env(site, point),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == -signal.SIGKILL and proc.stdout == "", "killed before it printed a job id"
        if point == "stage":
            age_staging(site)
        site.start()
        if point == "stage":
            # Nothing was acknowledged (no job id printed) and nothing was staged but an empty folder:
            # no job may come of it.
            site.cli("submit", str(payload))
            check_each_job_once(site, 1)
            assert len(outbox_jobs(site.outbox)) == 1
            return
        # The job was complete on disk before the kill: recovery commits it and it runs once.
        [job] = check_each_job_once(site, 1)
        assert runs_per_job(site) == {job["id"]: 1}
        return
    if point == "requeue":
        site.write_config(default_algorithm="slow")
        proc = site.start(crash_env(site, point))
        job_id = site.cli("submit", str(payload), "--settings", '{"seconds": 60}').stdout.strip()
        wait_for(lambda: site.runs(), 30, what="the slow job to start")
        proc.send_signal(signal.SIGTERM)  # the job is given back, and the process dies right after
        died_at_point(proc, site)
        job = read_job(site.inbox / job_id)
        assert job["status"] == "pending" and job["attempts"] == 0
        (site.inbox / job_id / "job.yaml").write_text((site.inbox / job_id / "job.yaml").read_text()
                                                      .replace("seconds: 60", "seconds: 0.1"))
        site.start()
        [done] = check_each_job_once(site, 1)
        assert done["attempts"] == 1
        return
    proc = site.start(crash_env(site, point))
    job_id = site.cli("submit", str(payload)).stdout.strip()
    died_at_point(proc, site)
    site.start()
    [job] = check_each_job_once(site, 1)
    assert job["id"] == job_id
    ran_before_crash = point.startswith("finish.")
    assert runs_per_job(site) == {job_id: 1}, "the algorithm ran once: a finished job is not run again"
    counted = {"claim": 1, "start_attempt": 2}.get(point, 1)
    assert job["attempts"] == counted, (point, ran_before_crash)


def _purge(site: Site, point: str, payload: Path) -> None:
    """A purge killed once the job is out of the outbox: the next purge records it (index, audit) and deletes it."""
    import json

    from pipeline import jobs
    from pipeline.index import Index

    proc = site.start()
    job_id = site.cli("submit", str(payload)).stdout.strip()
    site.done(1)
    assert site.stop(proc) == 0
    jobs.update_finished(site.inbox, site.outbox, job_id, lambda m: setattr(m, "finished", "2020-01-01T00:00:00+00:00"),
                         index=Index(site.root / "postbox.db.json"))
    killed = subprocess.run([*site.cli_argv(), "manage", "purge", "--older-than", "1"], env=crash_env(site, point),
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (site.outbox / job_id).exists() and (site.outbox / ".purging" / job_id).is_dir()
    done = site.cli("manage", "purge", "--older-than", "1")
    assert not (site.outbox / ".purging").exists(), done.stderr
    assert json.loads(site.cli("status", "--json").stdout) == []
    audit = [json.loads(line) for line in site.cli("audit", "--json").stdout.splitlines()]
    assert [(e["action"], e["job"]) for e in audit if e["action"] == "purge"] == [("purge", job_id)]


def _preview(site: Site, point: str, series: list[Path]) -> None:
    """Killed between the preview's rename and job.yaml naming it (issue 11): the job stays done, run once; the
    PNG is whole but not named, so nothing shows a preview that job.yaml does not vouch for."""
    site.config["algorithms"][0] = {"name": "noop", "function": "testalgos:lungs", "outputs": ["rtstruct"]}
    site.write_config()
    proc = site.start(crash_env(site, point))
    job_id = site.cli("submit", str(series[0].parent)).stdout.strip()
    died_at_point(proc, site)
    assert (site.outbox / job_id / "output" / "preview.png").is_file()
    assert not list((site.outbox / job_id / "output").glob(".*")), "no temporary file left"
    site.start()
    [job] = check_each_job_once(site, 1)
    assert job["id"] == job_id and job.get("preview") is None
    assert runs_per_job(site) == {job_id: 1}


def _folder(site: Site, point: str, payload: Path) -> None:
    proc = site.start(crash_env(site, point))
    (site.inbox / "dropped.txt").write_text("input")
    died_at_point(proc, site)
    assert not (site.inbox / "dropped.txt").exists(), "the drop moved into staging before the kill"
    site.start()
    [job] = check_each_job_once(site, 1)
    assert job["source"] == "folder"
    assert (site.outbox / job["id"] / "input" / "dropped.txt").read_text() == "input"
    assert runs_per_job(site) == {job["id"]: 1}


def _dicom(site: Site, point: str, series: list[Path], destination: Destination) -> None:
    crash = point if point != "node.stored" else f"{point}@5"  # four instances acknowledged, the fifth not
    proc = site.start(crash_env(site, crash))
    port = site.doors(proc)["dicom"]["port"]
    acknowledged: list[str] = []
    sender = threading.Thread(target=lambda: acknowledged.extend(send_series(port, series)))
    sender.start()
    died_at_point(proc, site)
    sender.join(timeout=60)
    expected = {"stage": 0, "node.staged": 0, "node.stored": 4}.get(point, SLICES)
    assert len(acknowledged) == expected, (point, len(acknowledged))
    if point == "stage":
        age_staging(site)
    written: dict[str, tuple[str, str]] = {}
    if point in ("outputs.written", "send.early_recorded"):  # the killed attempt's outputs' UIDs
        written = {p.name: file_uids(p) for p in site.inbox.glob("*/work/dicom-*/*.dcm")}
        assert sorted(written) == ["rtstruct.dcm", "seg.dcm"], written
    site.start()
    if expected == 0:
        # Nothing was acknowledged: the staged series has no instance and must leave nothing behind.
        wait_for(lambda: not any((site.inbox / ".staging").iterdir()), 10, what="the empty series to go")
        assert outbox_jobs(site.outbox) == [] and instances_in_jobs(site) == {}
        return
    [job] = check_each_job_once(site, 1)
    found = instances_in_jobs(site)
    assert all(found[uid] == 1 for uid in acknowledged), "each acknowledged instance is in one job, once"
    assert job["source"] == "dicom" and job["sender"]["calling_ae"] == "CT_SCANNER"
    if point in ("outputs.written", "send.early_recorded"):
        # Killed after its outputs were written, the job ran again and wrote the same instances (issue 10): a
        # file that left before the kill is the one the rerun sends, which the destination stores once.
        assert runs_per_job(site) == {job["id"]: 2} and job["attempts"] == 2
        rerun = {Path(o["path"]).name: file_uids(site.outbox / job["id"] / o["path"])
                 for o in job["outputs"] if o["type"] == "DICOM"}
        assert rerun == written
    else:
        assert runs_per_job(site) == {job["id"]: 1}
    if point.startswith("send.") or point == "outputs.written":
        if point == "send.early_recorded":  # recorded as sent while the first attempt ran: not sent again
            assert sorted(read_job(site.outbox / job["id"])["early_sent"]["TPS"].values()) == \
                ["dicom-in-1/rtstruct.dcm", "dicom-in-1/seg.dcm"]
        wait_for(lambda: read_job(site.outbox / job["id"])["sends"]["TPS"]["status"] == "sent", 30,
                 what="the send to resume and finish")
        sent = read_job(site.outbox / job["id"])["sends"]["TPS"]
        assert all(when is not None for when in sent["files"].values())
        # Stored but not yet written down when the process died: that one point sends again (DICOM's C-STORE
        # of one SOP Instance UID replaces it at the destination); every other point delivers exactly once.
        most = 2 if point in ("send.stored", "outputs.written") else 1
        assert destination.stored and all(1 <= n <= most for n in destination.stored.values()), \
            destination.stored
        assert len(destination.stored) == len(sent["files"])
