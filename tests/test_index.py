"""The TinyDB index: safe for several processes, never stale, repaired from the folders."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Site, read_job, wait_for

from pipeline import jobs
from pipeline.errors import IndexDamaged
from pipeline.index import AtomicJSONStorage, Index, job_record

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


def test_storage_write_is_atomic_and_leaves_no_temp_file(tmp_path: Path) -> None:
    storage = AtomicJSONStorage(str(tmp_path / "db.json"))
    storage.write({"keys": {"1": {"name": "a"}}})
    storage.write({"keys": {"1": {"name": "a"}, "2": {"name": "b"}}})
    assert [p.name for p in tmp_path.iterdir()] == ["db.json"]
    assert storage.read() == {"keys": {"1": {"name": "a"}, "2": {"name": "b"}}}


DAMAGES = {
    "half": lambda raw: raw[: len(raw) // 2],  # cut short, as by a full disk or a crash without fsync
    "empty": lambda raw: b"",
    "not an object": lambda raw: b"[1, 2]",
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_keys_file_is_refused_and_left_as_it_is(tmp_path: Path, damage: str) -> None:
    index = Index(tmp_path / "postbox.db.json")
    index.add_key("planning")
    damaged = DAMAGES[damage](index.path.read_bytes())
    index.path.write_bytes(damaged)
    with pytest.raises(IndexDamaged, match=r"index file postbox\.db\.json is damaged .*the API keys"):
        index.check()
    with pytest.raises(IndexDamaged, match=r"postbox manage initdb --repair"):
        index.add_key("other")  # a write would read the file as empty and write over it
    with pytest.raises(IndexDamaged, match=r"postbox\.db\.json"):
        index.key_owner("pbx_whatever")
    assert index.path.read_bytes() == damaged


def test_a_damaged_table_file_is_refused_and_the_others_still_work(tmp_path: Path) -> None:
    index = Index(tmp_path / "postbox.db.json")
    index.insert("datasets", {"owner": "a"}, id_field="id")
    index.insert("locations", {"owner": "a"}, id_field="id")
    tables = index.tables_dir / "datasets.json"
    damaged = tables.read_bytes()[:-3]
    tables.write_bytes(damaged)
    with pytest.raises(IndexDamaged, match=r"postbox\.db\.json\.tables/datasets\.json is damaged .*datasets"):
        index.check()
    with pytest.raises(IndexDamaged, match=r"postbox\.db\.json\.tables/datasets\.json"):
        index.insert("datasets", {"owner": "b"}, id_field="id")
    assert tables.read_bytes() == damaged
    assert len(index.find("locations")) == 1
    assert str(tmp_path) not in str(IndexDamaged("f", "h", "p"))


def test_index_damaged_survives_pickling() -> None:
    exc = pickle.loads(pickle.dumps(IndexDamaged("postbox.db.json", "the API keys", "the file is empty")))
    assert (exc.file, exc.holds, exc.problem) == ("postbox.db.json", "the API keys", "the file is empty")
    assert "postbox.db.json is damaged (the file is empty)" in str(exc)


def test_repair_files_moves_damaged_files_aside_and_never_reuses_an_id(tmp_path: Path) -> None:
    index = Index(tmp_path / "postbox.db.json")
    index.add_key("planning")
    ids = [index.insert("datasets", {"n": n}, id_field="id") for n in range(3)]
    assert index.repair_files() == []  # nothing damaged, nothing moved
    keys_raw = index.path.read_bytes()[:10]
    index.path.write_bytes(keys_raw)
    datasets = index.tables_dir / "datasets.json"
    datasets.write_bytes(b"")
    lost = index.repair_files()
    assert [(s.file, s.lost) for s in lost] == [("postbox.db.json", "the API keys"),
                                                ("postbox.db.json.tables/datasets.json", "the HTTP API's datasets")]
    assert "postbox manage key --add NAME" in lost[0].remedy
    [keys_aside] = tmp_path.glob("postbox.db.json.damaged-*")
    assert keys_aside.name == lost[0].aside and keys_aside.read_bytes() == keys_raw
    [datasets_aside] = index.tables_dir.glob("datasets.json.damaged-*")
    assert lost[1].aside == f"postbox.db.json.tables/{datasets_aside.name}" and datasets_aside.read_bytes() == b""
    index.check()
    assert index.list_keys() == [] and index.find("datasets") == []
    # A data object or upload folder of a lost dataset must never meet a new dataset of the same id.
    assert index.insert("datasets", {"n": 3}, id_field="id") > max(ids)
    assert index.repair_files() == []
