"""The audit trail: one JSON line per access to patient data, read with ``postbox audit`` (issue 9)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from _peers import Destination, storescu
from conftest import Site, read_job, wait_for

from pipeline import phantom
from pipeline.audit import AuditLog, parse_since


def test_entries_are_appended_as_json_lines_and_filtered(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.log")
    audit.record("download", who="alice", address="10.0.0.7", job="20261130T000000-00000001", dataset=3)
    audit.record("c-store-sent", who="TPS", address="10.0.0.5:104", job="20261130T000000-00000002", count=2)
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert [json.loads(line)["action"] for line in lines] == ["download", "c-store-sent"]
    assert (tmp_path / "audit.log").stat().st_mode & 0o777 == 0o600
    assert [e["who"] for e in audit.entries(job="20261130T000000-00000002")] == ["TPS"]
    assert len(list(audit.entries(since="1h"))) == 2
    assert list(audit.entries(since=(dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).isoformat())) == []


@pytest.mark.parametrize(("action", "who", "message"), [
    ("read", "alice", "audit action must be one of"),
    ("download", "", "needs who accessed"),
])
def test_an_entry_is_valid_once_built(tmp_path: Path, action: str, who: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AuditLog(tmp_path / "audit.log").record(action, who=who)


def test_since_takes_a_date_or_a_duration() -> None:
    assert parse_since("2026-11-30").year == 2026
    assert dt.datetime.now(dt.timezone.utc) - parse_since("24h") > dt.timedelta(hours=23)
    with pytest.raises(ValueError, match="ISO date or time .* or a duration"):
        parse_since("yesterday")


def test_a_dicom_job_sent_on_is_audited_and_postbox_audit_reads_it(site: Site, tmp_path: Path) -> None:
    dest = Destination()
    try:
        site.config["algorithms"][0] = {"name": "noop", "function": "testalgos:echo_series"}
        site.write_config(dicom={
            "enabled": True, "host": "127.0.0.1", "port": 0, "series_timeout": 1.0, "complete_on_release": True,
            "destinations": {"TPS": dest.config()}, "routes": [{"algorithm": "noop", "destinations": ["TPS"]}]})
        phantom.write_dicom(tmp_path / "ct", phantom.axial_grid(slices=6, size=32), patient_name="Doe^Jane",
                            patient_id="MRN-12345")
        proc = site.start()
        storescu(site.doors(proc)["dicom"]["port"], tmp_path / "ct")
        [job_dir] = site.done(1)
        wait_for(lambda: read_job(job_dir)["sends"]["TPS"]["status"] == "sent", 30)
        job_id = job_dir.name
        out = site.cli("audit", "--json", "--job", job_id).stdout
        entries = [json.loads(line) for line in out.splitlines()]
        sent = [e for e in entries if e["action"] == "c-store-sent"]
        assert sent and sent[0]["who"] == "TPS" and sent[0]["count"] == 2 and sent[0]["job"] == job_id
        assert sent[0]["address"] == f"127.0.0.1:{dest.port}"
        assert sent[0]["series_uid"] == read_job(job_dir)["inputs"][0]["meta_data"]["series_instance_uid"]
        table = site.cli("audit", "--since", "1h").stdout
        assert job_id in table and "c-store-sent" in table
        text = (site.root / "audit.log").read_text()
        assert "Doe" not in text and "MRN-12345" not in text, "no patient name or ID in the audit trail"
        refused = site.cli("audit", "--since", "yesterday", check=False)
        assert refused.returncode == 2 and "duration" in refused.stderr
    finally:
        dest.close()


def test_each_series_the_node_receives_is_audited_once_with_its_sender(site: Site, tmp_path: Path) -> None:
    # Two series of 6 instances in one association: two jobs, one line each, not one per instance.
    site.write_config(http={"enabled": False}, dicom={"enabled": True, "host": "127.0.0.1", "port": 0,
                                                      "series_timeout": 30, "complete_on_release": True})
    for name in ("a", "b"):
        phantom.write_dicom(tmp_path / "cts" / name, phantom.axial_grid(slices=6, size=32), patient_name="Doe^Jane",
                            patient_id="MRN-12345")
    proc = site.start()
    storescu(site.doors(proc)["dicom"]["port"], tmp_path / "cts")
    job_dirs = site.done(2)
    entries = [json.loads(line) for line in site.cli("audit", "--json").stdout.splitlines()]
    received = sorted(({k: v for k, v in e.items() if k != "time"} for e in entries
                       if e["action"] == "c-store-received"), key=lambda e: e["job"])
    assert received == [{"action": "c-store-received", "who": "STORESCU", "address": "127.0.0.1", "job": d.name,
                         "series_uid": read_job(d)["inputs"][0]["meta_data"]["series_instance_uid"], "count": 6}
                        for d in sorted(job_dirs, key=lambda d: d.name)]
    text = (site.root / "audit.log").read_text()
    assert "Doe" not in text and "MRN-12345" not in text, "no patient name or ID in the audit trail"


def test_an_upload_and_a_download_over_http_are_audited_with_the_keys_name(tmp_path: Path) -> None:
    import requests
    from _http import http_site

    (tmp_path / "http").mkdir()
    site = http_site(tmp_path / "http")
    try:
        url = site.start_http()
        key = site.key("alice")
        headers = {"API_KEY": key}
        ds = requests.post(f"{url}/api/dataset", headers=headers, timeout=10).json()
        obj = requests.post(f"{url}/api/dataobject", headers=headers, data={"dataset": ds["id"]},
                            files={"file_data": ("ct.nii.gz", b"not really a CT")}, timeout=10).json()
        got = requests.get(f"{url}/api/dataobject/download/{obj['id']}", headers=headers, timeout=10)
        assert got.content == b"not really a CT"
        entries = [json.loads(line) for line in site.cli("audit", "--json").stdout.splitlines()]
        assert [(e["action"], e["who"], e["dataset"], e["address"]) for e in entries] == [
            ("upload", "alice", ds["id"], "127.0.0.1"), ("download", "alice", ds["id"], "127.0.0.1")]
        assert key not in (site.root / "audit.log").read_text(), "never the key itself"
    finally:
        site.close()
