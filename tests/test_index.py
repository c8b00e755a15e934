"""The TinyDB index: safe for several processes, never stale, repaired from the folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import Site, read_job, wait_for

from pipeline import jobs
from pipeline.index import Index, job_record

WRITER = """
import sys
from pipeline.index import Index
index = Index(sys.argv[1])
for i in range(40):
    job_id = f"20260101T000000-{int(sys.argv[2]):02x}{i:06x}"
    index.upsert_job({"id": job_id, "status": "pending", "location": "inbox", "algorithm": "a",
                      "source": "cli", "created": "", "started": None, "finished": None, "attempts": 0,
                      "error": None, "dataset": None, "owner": None})
    index.insert("datasets", {"writer": int(sys.argv[2]), "n": i})
"""


def test_four_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    db = tmp_path / "db.json"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(w)]) for w in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    index = Index(db)
    assert len(index.jobs()) == 160
    assert len(index.find("datasets")) == 160
    assert len(index.find("datasets", writer=2)) == 40


def test_reads_are_never_stale_across_instances(tmp_path: Path) -> None:
    a, b = Index(tmp_path / "db.json"), Index(tmp_path / "db.json")
    rec = {"id": "20260101T000000-0000abcd", "status": "pending", "location": "inbox"}
    a.upsert_job(rec)
    assert b.get_job(rec["id"])["status"] == "pending"
    b.update_job(rec["id"], status="done")
    assert a.get_job(rec["id"])["status"] == "done"


def test_repair_makes_the_index_agree_with_the_folders(site: Site, tmp_path: Path) -> None:
    payload = tmp_path / "p.txt"
    payload.write_text("x")
    index = Index(tmp_path / "db.json")
    pending = jobs.submit(site.inbox, [payload], algorithm="noop")
    moved = jobs.submit(site.inbox, [payload], algorithm="noop")
    index.record_job(moved, "inbox")  # the index says inbox...
    (site.inbox / moved.id).rename(site.outbox / moved.id)  # ...but the folder is in the outbox
    index.upsert_job({**job_record(pending, "inbox"), "id": "20200101T000000-deadbeef"})  # no folder
    assert index.repair(site.inbox, site.outbox) == 3
    assert index.get_job(pending.id)["location"] == "inbox"
    assert index.get_job(moved.id)["location"] == "outbox"
    assert index.get_job("20200101T000000-deadbeef") is None
    assert index.repair(site.inbox, site.outbox) == 0


def test_damaged_index_file_is_rebuilt_not_fatal(site: Site, tmp_path: Path) -> None:
    payload = tmp_path / "p.txt"
    payload.write_text("x")
    index = Index(tmp_path / "db.json")
    job = jobs.submit(site.inbox, [payload], algorithm="noop")
    index.record_job(job, "inbox")
    for shard in index.jobs_dir.glob("*.json"):
        shard.write_text('{"jobs": {"1": {"id": ')  # cut short, as by a full disk
    index.repair(site.inbox, site.outbox)
    assert index.get_job(job.id)["status"] == "pending"


def test_worker_keeps_the_index_current(site: Site, tmp_path: Path) -> None:
    payload = tmp_path / "p.txt"
    payload.write_text("x")
    site.start()
    job_id = site.cli("submit", str(payload)).stdout.strip()
    [job_dir] = site.done(1)
    index = Index(site.root / "postbox.db.json")
    # The worker records the job just after the move: poll, the index may be a moment behind the folders.
    rec = wait_for(lambda: (lambda r: r if r and r["location"] == "outbox" else None)(index.get_job(job_id)))
    assert rec["status"] == "done" and rec["location"] == "outbox"
    assert rec["finished"] == read_job(job_dir)["finished"]
