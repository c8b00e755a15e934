"""Retention (issue 11): old finished jobs leave the outbox with their locks, index entries and HTTP records.

Jobs are made and finished through the job protocol on real folders; their age is their recorded finish, set
back through ``jobs.update_finished`` (the protocol's one way to change a finished job.yaml, which also tells
the index). The sweep runs in a really started service; ``postbox manage purge`` as a real process.
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.request
from pathlib import Path

import pytest
from conftest import Site, wait_for

from pipeline import jobs
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.index import Index


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    p = tmp_path / "payload.txt"
    p.write_text("input")
    return p


def index_of(site: Site) -> Index:
    return Index(site.root / "postbox.db.json")


def finished_job(site: Site, payload: Path, *, failed: bool = False) -> str:
    """A job run to its end through the protocol: submitted, claimed, finished (or failed) into the outbox."""
    index = index_of(site)
    manifest = jobs.submit(site.inbox, [payload], algorithm="noop", source="cli", index=index)
    claim = jobs.claim(site.inbox, site.outbox, manifest.id, index=index)
    assert claim is not None
    jobs.start_attempt(claim)
    if failed:
        jobs.fail(claim, site.outbox, "it failed")
    else:
        jobs.finish(claim, site.outbox, [])
    claim.release()
    return manifest.id


def age(site: Site, job_id: str, days: float, *, send: jobs.SendStatus | None = None) -> None:
    """Set the job's recorded finish ``days`` back (and give it a send to TPS in state ``send``)."""
    when = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days)).isoformat(timespec="milliseconds")

    def change(m: jobs.JobManifest) -> None:
        m.finished = when
        if send is not None:
            m.sends["TPS"] = jobs.SendState(status=send)

    jobs.update_finished(site.inbox, site.outbox, job_id, change, index=index_of(site))


def listed(site: Site) -> set[str]:
    return {r["id"] for r in json.loads(site.cli("status", "--json").stdout)}


def purges(site: Site) -> dict[str, str]:
    """Job id -> who, of the audit log's purge lines."""
    lines = [json.loads(line) for line in site.cli("audit", "--json").stdout.splitlines()]
    return {e["job"]: e["who"] for e in lines if e["action"] == "purge"}


def test_the_service_sweeps_old_jobs_away_with_their_locks_index_entries_records_and_audit_lines(
        site: Site, payload: Path) -> None:
    site.write_config(retention={"done_days": 1, "failed_days": 2, "sweep_minutes": 0.01},
                      worker={"rescan_seconds": 0.2, "stop_timeout": 3})
    old_done, old_failed, recent, sending, failed_young = (
        finished_job(site, payload), finished_job(site, payload, failed=True), finished_job(site, payload),
        finished_job(site, payload), finished_job(site, payload, failed=True))
    proc = site.start()
    # A site key lists the keyless doors' jobs, each as a dataset of its own (facade.records.adopt_site_jobs).
    key = site.cli("manage", "key", "--add", "ops", "--site").stdout.strip()
    url = f"http://127.0.0.1:{site.doors(proc)['http']['port']}/api/datasets"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"API_KEY": key}), timeout=10) as answer:
        assert answer.status == 200
    index = index_of(site)
    site_jobs = {d["last_job"] for d in index.find("datasets", owner="*")}
    assert {old_done, old_failed, recent, sending} <= site_jobs

    age(site, old_done, 3, send=jobs.SendStatus.SENT)  # delivered: its send's lock file goes too
    jobs.try_lock(jobs.send_lock_path(site.inbox, old_done, "TPS")).release()  # type: ignore[union-attr]
    age(site, old_failed, 3)
    age(site, recent, 0.5)  # younger than done_days
    age(site, sending, 3, send=jobs.SendStatus.PENDING)  # old, but its results have not reached TPS
    age(site, failed_young, 1.5)  # old for a done job, young for a failed one
    wait_for(lambda: not (site.outbox / old_done).exists() and not (site.outbox / old_failed).exists(), 30,
             what="the sweep to remove the old jobs")

    kept = {recent, sending, failed_young}
    assert {p.name for p in site.outbox.iterdir() if jobs.is_job_id(p.name)} == kept
    locks = {p.name for p in (site.inbox / ".locks").iterdir()}
    for gone in (old_done, old_failed):
        assert not any(gone in name for name in locks), locks
        assert index.get_job(gone) is None
    assert f"{recent}.lock" in locks
    assert listed(site) == kept
    assert {d["last_job"] for d in index.find("datasets", owner="*")} == site_jobs - {old_done, old_failed}
    assert purges(site) == {old_done: "retention", old_failed: "retention"}
    assert not (site.outbox / jobs.PURGING).exists() or not any((site.outbox / jobs.PURGING).iterdir())
    assert site.stop(proc) == 0


def test_manage_purge_dry_run_a_held_lock_and_the_state(site: Site, payload: Path) -> None:
    old_done, old_failed, young = (finished_job(site, payload), finished_job(site, payload, failed=True),
                                   finished_job(site, payload))
    age(site, old_done, 10)
    age(site, old_failed, 10)
    age(site, young, 1)
    everything = {old_done, old_failed, young}

    dry = site.cli("manage", "purge", "--older-than", "7", "--dry-run")
    assert f"would remove {old_done}\tdone" in dry.stdout and f"would remove {old_failed}\tfailed" in dry.stdout
    assert young not in dry.stdout
    assert {p.name for p in site.outbox.iterdir()} == everything and listed(site) == everything
    assert purges(site) == {}

    # Another process holds the job's lock (a sender updating its job.yaml, say): the job stays, untouched.
    lock = jobs.try_lock(jobs.lock_path(site.inbox, old_done))
    assert lock is not None
    try:
        held = site.cli("manage", "purge", "--older-than", "7", "--state", "done")
    finally:
        lock.release()
    assert f"kept {old_done}: its lock is held by another process" in held.stdout
    assert (site.outbox / old_done / "job.yaml").is_file() and listed(site) == everything

    only_failed = site.cli("manage", "purge", "--older-than", "7", "--state", "failed")
    assert only_failed.stdout.splitlines()[0].startswith(f"removed {old_failed}\tfailed")
    assert (site.outbox / old_done).is_dir() and not (site.outbox / old_failed).exists()

    site.cli("manage", "purge", "--older-than", "7")
    assert {p.name for p in site.outbox.iterdir()} == {young}
    assert listed(site) == {young}
    assert not (site.inbox / ".locks" / f"{old_done}.lock").exists()
    assert (site.inbox / ".locks" / f"{young}.lock").exists()
    assert purges(site) == {old_done: "manage purge", old_failed: "manage purge"}
    assert "no such" not in site.cli("status").stdout

    refused = site.cli("manage", "purge", "--older-than", "-1", check=False)
    assert refused.returncode == 2 and "--older-than" in refused.stderr


def test_retention_config_keeps_everything_by_default_and_is_checked(tmp_path: Path) -> None:
    assert Config.from_dict({}, base_dir=tmp_path).retention.rules == {}
    cfg = Config.from_dict({"retention": {"done_days": 30, "sweep_minutes": 5}}, base_dir=tmp_path)
    assert cfg.retention.rules == {"done": 30.0}
    with pytest.raises(ConfigError, match=r"retention\.failed_days"):
        Config.from_dict({"retention": {"failed_days": -1}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"retention\.sweep_minutes"):
        Config.from_dict({"retention": {"sweep_minutes": 0}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"retention\.keep_days"):
        Config.from_dict({"retention": {"keep_days": 3}}, base_dir=tmp_path)


def test_forget_jobs_drops_site_datasets_and_outputs_but_not_a_keys_dataset(tmp_path: Path) -> None:
    from facade.records import SITE, forget_jobs

    index = Index(tmp_path / "postbox.db.json")
    gone, stays = "20200101T000000-0000000a", "20200101T000000-0000000b"
    site_ds = index.insert("datasets", {"owner": SITE, "last_job": gone}, id_field="id")
    other_site = index.insert("datasets", {"owner": SITE, "last_job": stays}, id_field="id")
    keyed = index.insert("datasets", {"owner": 7, "last_job": gone}, id_field="id")
    index.insert_many("dataobjects", [
        {"dataset": site_ds, "is_input": False, "job": gone, "output": "output/a.dcm"},
        {"dataset": keyed, "is_input": True, "job": None},
        {"dataset": keyed, "is_input": False, "job": gone, "output": "output/b.dcm"},
        {"dataset": other_site, "is_input": False, "job": stays, "output": "output/c.dcm"},
    ], id_field="id")
    assert forget_jobs(index, [gone]) == 3
    assert {d["id"] for d in index.find("datasets")} == {other_site, keyed}
    assert sorted((o["dataset"], o["job"]) for o in index.find("dataobjects")) == [(other_site, stays), (keyed, None)]
    assert forget_jobs(index, []) == 0
