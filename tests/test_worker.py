"""The worker as a real process: crashes, failures, parallel workers, warm children, shutdown."""

from __future__ import annotations

import collections
import json
import os
import signal
from pathlib import Path

import pytest
from conftest import Site, outbox_jobs, read_job, wait_for


def submit(site: Site, payload: Path, *args: str) -> str:
    return site.cli("submit", str(payload), *args).stdout.strip()


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    p = tmp_path / "payload.txt"
    p.write_text("input")
    return p


def test_kill9_during_run_then_restart_completes_once_with_two_attempts(site: Site, payload: Path) -> None:
    site.write_config(default_algorithm="slow")
    proc = site.start()
    job_id = submit(site, payload, "--settings", '{"seconds": 60}')
    wait_for(lambda: (site.inbox / job_id / "work" / "partial-output.txt").exists(), what="the slow job to run")
    first_pid = site.runs()[0]["pid"]
    proc.kill()  # SIGKILL: no clean-up runs
    proc.wait()
    # The algorithm's child dies with its worker (no orphan writing into the job).
    wait_for(lambda: not _alive(first_pid), 5, what="the orphaned child to die")
    assert read_job(site.inbox / job_id)["status"] == "running"

    site.write_config(algorithms=[{"name": "slow", "function": "testalgos:slow",
                                   "default_settings": {"seconds": 0.2}}])
    # A shorter job this time: same algorithm and job, the settings in job.yaml still say 60 s,
    # so we change them on disk the way an operator would not; instead restart with the job as-is.
    manifest = read_job(site.inbox / job_id)
    assert manifest["settings"] == {"seconds": 60}
    (site.inbox / job_id / "job.yaml").write_text((site.inbox / job_id / "job.yaml").read_text()
                                                  .replace("seconds: 60", "seconds: 0.2"))
    site.start()
    [job_dir] = site.done(1)
    job = read_job(job_dir)
    assert job["status"] == "done"
    assert job["attempts"] == 2
    assert any("did not finish" in w for w in job["warnings"])
    assert sorted(p.name for p in job_dir.iterdir()) == ["input", "job.log", "job.yaml", "output"]
    assert [p.name for p in (job_dir / "output").iterdir()] == ["partial-output.txt"]
    ends = (site.evidence / "ends.log").read_text().splitlines()
    assert len(ends) == 1, "the job must have completed exactly once"
    assert not (site.inbox / job_id).exists()
    assert list((site.inbox / ".staging").iterdir()) == [] if (site.inbox / ".staging").exists() else True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_max_attempts_gives_up_with_reason(site: Site, payload: Path) -> None:
    site.write_config(default_algorithm="slow", worker={"max_attempts": 1})
    proc = site.start()
    job_id = submit(site, payload, "--settings", '{"seconds": 60}')
    wait_for(lambda: (site.inbox / job_id / "work" / "partial-output.txt").exists())
    proc.kill()
    proc.wait()
    site.start()
    [job_dir] = site.done(1)
    job = read_job(job_dir)
    assert job["status"] == "failed"
    assert "gave up after 1 attempt" in job["error"]


@pytest.mark.parametrize(("algorithm", "reason"), [
    ("raises", "ValueError: the model found no CT in the input"),
    ("suicide", "algorithm process died (killed by signal SIGKILL)"),
    ("bad-output", "does not exist"),
    ("junk", "must return a list of DataObject"),
])
def test_failures_end_failed_with_reason_and_worker_lives_on(site: Site, payload: Path, algorithm: str,
                                                             reason: str) -> None:
    proc = site.start()
    bad = submit(site, payload, "--algorithm", algorithm)
    good = submit(site, payload, "--algorithm", "noop")
    site.done(2)
    failed = read_job(site.outbox / bad)
    assert failed["status"] == "failed"
    assert reason in failed["error"]
    assert f"--- failed: {failed['error']}" in (site.outbox / bad / "job.log").read_text()
    assert read_job(site.outbox / good)["status"] == "done"
    assert proc.poll() is None


def test_timeout_fails_the_job_and_kills_the_child(site: Site, payload: Path) -> None:
    site.write_config(worker={"job_timeout": 1})
    proc = site.start()
    bad = submit(site, payload, "--algorithm", "slow", "--settings", '{"seconds": 60}')
    good = submit(site, payload, "--algorithm", "noop")
    site.done(2)
    failed = read_job(site.outbox / bad)
    assert failed["status"] == "failed"
    assert "timed out after 1 s" in failed["error"]
    slow_pid = [r for r in site.runs() if r["alg"] == "slow"][0]["pid"]
    assert not _alive(slow_pid)
    assert read_job(site.outbox / good)["status"] == "done"
    assert not (site.evidence / "ends.log").exists()
    assert proc.poll() is None


def test_traceback_and_prints_go_to_job_log(site: Site, payload: Path) -> None:
    site.start()
    bad = submit(site, payload, "--algorithm", "raises")
    site.done(1)
    text = (site.outbox / bad / "job.log").read_text()
    assert "about to fail" in text
    assert "Traceback" in text and "raise ValueError" in text
    assert "about to fail" not in site.service_log()


def test_two_services_on_one_inbox_run_30_jobs_each_exactly_once_and_both_take_jobs(site: Site,
                                                                                    payload: Path) -> None:
    # Slow enough jobs that the first service cannot take all 30 before the second starts.
    site.write_config(default_algorithm="slow", worker={"processes": 2, "keep_warm": True})
    ids = [submit(site, payload, "--settings", '{"seconds": 0.1}') for _ in range(30)]  # no service runs
    first, second = site.launch(), site.launch()  # started together: both race for the jobs
    jobs_done = site.done(30, timeout=60)
    assert sorted(p.name for p in jobs_done) == sorted(ids)
    counts = collections.Counter(r["job"] for r in site.runs())
    assert counts == {i: 1 for i in ids}
    assert all(read_job(p)["status"] == "done" and read_job(p)["attempts"] == 1 for p in jobs_done)
    # Each algorithm child's parent is the service that ran the job: both services took jobs.
    by_service = collections.Counter(r["service"] for r in site.runs())
    assert set(by_service) == {first.pid, second.pid}, by_service


def test_warm_child_loads_once_and_a_crash_only_costs_its_job(site: Site, payload: Path) -> None:
    site.start()
    first = [submit(site, payload) for _ in range(3)]
    site.done(3)
    imports = (site.evidence / "imports.log").read_text().split()
    pids = {r["pid"] for r in site.runs()}
    assert len(pids) == 1 and imports.count(str(pids.pop())) == 1, "module imported once for three jobs"

    crash = submit(site, payload, "--algorithm", "suicide")
    site.done(4)
    after = submit(site, payload)
    site.done(5)
    assert read_job(site.outbox / crash)["status"] == "failed"
    job = read_job(site.outbox / after)
    assert job["status"] == "done"
    result = json.loads((site.outbox / after / "output" / "result.txt").read_text())
    assert result["inputs"] == [str(site.inbox / after / "input" / "payload.txt")]
    assert all(read_job(site.outbox / i)["status"] == "done" for i in first)


def test_cold_children_when_keep_warm_is_off(site: Site, payload: Path) -> None:
    site.write_config(worker={"keep_warm": False})
    site.start()
    for _ in range(3):
        submit(site, payload)
    site.done(3)
    assert len({r["pid"] for r in site.runs()}) == 3


def test_max_jobs_per_child_recycles(site: Site, payload: Path) -> None:
    site.write_config(worker={"max_jobs_per_child": 2})
    site.start()
    for _ in range(4):
        submit(site, payload)
    site.done(4)
    assert len({r["pid"] for r in site.runs()}) == 2


def test_a_warm_child_is_recycled_after_it_raised_and_when_its_source_changed(site: Site, payload: Path) -> None:
    site.config["algorithms"].append({"name": "versioned", "function": "testalgos:versioned",
                                      "default_settings": {"fail": False}})
    site.write_config(default_algorithm="versioned")
    site.start()

    def run(*args: str) -> tuple[dict, str]:
        job_id = submit(site, payload, *args)
        [job_dir] = wait_for(lambda: [p for p in outbox_jobs(site.outbox) if p.name == job_id], 30,
                             what=f"job {job_id}")
        pid = [r["pid"] for r in site.runs() if r["job"] == job_id][0]
        return read_job(job_dir), str(pid)

    one, pid1 = run()
    two, pid2 = run()
    assert one["status"] == two["status"] == "done" and pid1 == pid2  # warm: one process for both
    failed, pid3 = run("--settings", '{"fail": true}')
    assert failed["status"] == "failed" and "asked to fail" in failed["error"] and pid3 == pid1
    after, pid4 = run()
    assert after["status"] == "done" and pid4 != pid3, "a child whose function raised took another job"
    same, pid5 = run()
    assert pid5 == pid4  # warm again

    source = site.root / "testalgos.py"
    source.write_text(source.read_text().replace("VERSION = 1 ", "VERSION = 22 "))  # a new size as well
    edited, pid6 = run()
    assert edited["status"] == "done" and pid6 != pid5, "the old code ran after testalgos.py was edited"
    job_dir = site.outbox / edited["id"]
    assert (job_dir / "output" / "version.txt").read_text() == "22"
    imports = (site.evidence / "imports.log").read_text().split()
    assert [imports.count(p) for p in (pid1, pid4, pid6)] == [1, 1, 1]


def test_max_parallel_caps_an_algorithm(site: Site, payload: Path) -> None:
    site.config["algorithms"][1]["max_parallel"] = 1
    site.write_config(worker={"processes": 3})
    for _ in range(3):
        submit(site, payload, "--algorithm", "slow", "--settings", '{"seconds": 0.4}')
    site.start()
    site.done(3, timeout=60)
    runs = sorted(site.runs(), key=lambda r: r["start"])
    ends = sorted(float(line.split()[1]) for line in (site.evidence / "ends.log").read_text().splitlines())
    for later, earlier_end in zip(runs[1:], ends[:-1], strict=False):
        assert later["start"] >= earlier_end - 0.01, "two jobs of a max_parallel: 1 algorithm overlapped"


def test_sigterm_gives_a_running_job_back_untouched(site: Site, payload: Path) -> None:
    site.write_config(default_algorithm="slow")
    proc = site.start()
    doors = site.doors(proc)  # the ready file names the doors that listen: DICOM is off in this site
    assert set(doors) == {"http"} and doors["http"]["port"] > 0
    job_id = submit(site, payload, "--settings", '{"seconds": 60}')
    wait_for(lambda: (site.inbox / job_id / "work").exists() and site.runs())
    assert site.stop(proc, signal.SIGTERM) == 0
    assert not site.ready_file(proc).exists(), "a clean stop removes the ready file"
    job = read_job(site.inbox / job_id)
    assert job["status"] == "pending" and job["attempts"] == 0
    assert not (site.inbox / job_id / "work").exists()
    assert outbox_jobs(site.outbox) == []
    assert "service: stopped" in site.service_log()
