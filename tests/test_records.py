"""Who may see what over HTTP (issue 9): site keys, owners by key id, records of release 0.1, quotas, and the
operator's list of DICOM location hosts; each on a real service."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from _http import HttpSite, http_site
from conftest import read_job, wait_for

from facade._paths import hide_paths
from pipeline.config import Config
from pipeline.index import Index, hash_key


def call(site: HttpSite, method: str, path: str, key: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, site.url + path, headers={"API_KEY": key}, timeout=30, **kwargs)


def ok(site: HttpSite, method: str, path: str, key: str, **kwargs: Any) -> Any:
    res = call(site, method, path, key, **kwargs)
    assert res.status_code == 200, res.text
    return res.json() if res.headers["Content-Type"] == "application/json" else res


def refused(res: requests.Response, status: int, text: str) -> None:
    assert res.status_code == status, f"{res.status_code} {res.text}"
    assert res.headers["Content-Type"] == "application/json"
    assert text in res.json()["error"], res.json()


def site_key(site: HttpSite, name: str) -> str:
    return site.cli("manage", "key", "--add", name, "--site").stdout.strip()


def upload(site: HttpSite, key: str, dataset: int, data: bytes, name: str = "in.txt") -> requests.Response:
    return call(site, "POST", "/api/dataobject", key, data={"dataset": dataset, "type": "FILE", "file_name": name},
                files={"file_data": (name, data)})


def run(site: HttpSite, key: str, dataset: int) -> dict[str, Any]:
    poll = ok(site, "POST", "/api/trigger", key, data={"dataset": dataset, "algorithm": "noop"})["poll"]
    return wait_for(lambda: (lambda s: s if s["state"] in ("SUCCESS", "FAILURE") else None)(
        ok(site, "GET", poll, key)), 30, what="the run")  # type: ignore[no-any-return]


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[HttpSite]:
    site = http_site(tmp_path, http={"site_jobs": 2, "allowed_locations": ["127.0.0.1"]})
    yield site
    site.close()


def test_only_a_site_key_sees_the_keyless_doors_jobs_and_every_keys_datasets(srv: HttpSite, tmp_path: Path) -> None:
    payload = tmp_path / "p.txt"
    payload.write_text("x")
    early = [srv.cli("submit", str(payload)).stdout.strip() for _ in range(3)]  # CLI jobs: no key
    srv.start_http()
    alice, bob, ops = srv.key("alice"), srv.key("bob"), site_key(srv, "ops")
    listing = srv.cli("manage", "key", "--list").stdout.splitlines()
    assert [line.split("\t")[3] for line in listing] == ["plain", "plain", "site"]  # no key is a site key unasked
    srv.done(3)
    mine = ok(srv, "POST", "/api/dataset", alice)["id"]
    obj = upload(srv, alice, mine, b"alice's").json()["id"]
    job = run(srv, alice, mine)["job"]
    theirs = ok(srv, "POST", "/api/dataset", bob)["id"]

    # The operator: every key's datasets, then the latest http.site_jobs (2) jobs of the keyless doors.
    listed = wait_for(lambda: (lambda ds: ds if len(s := [d for d in ds if d["last_job"] in early]) == 2
                               and all(d["output_data_objects"] for d in s) else None)(
        ok(srv, "GET", "/api/datasets", ops)), 20)
    assert {mine, theirs} <= {d["id"] for d in listed}
    site_sets = [d for d in listed if d["last_job"] in early]
    assert sorted(d["last_job"] for d in site_sets) == sorted(early)[1:]
    out = site_sets[0]["output_data_objects"][0]["id"]
    assert ok(srv, "GET", f"/api/dataobject/download/{out}", ops).content
    assert ok(srv, "GET", f"/api/dataobject/download/{obj}", ops).content == b"alice's"
    assert ok(srv, "GET", f"/api/status/{job}", ops)["state"] == "SUCCESS"
    assert obj in {o["id"] for o in ok(srv, "GET", "/api/dataobjects", ops)}
    # ... but it changes only what it made: another key's dataset and the site's are read-only to it.
    refused(call(srv, "POST", "/api/trigger", ops, data={"dataset": mine, "algorithm": "noop"}), 404, "not found")
    refused(upload(srv, ops, mine, b"ops'"), 404, f"dataset {mine} not found")
    refused(call(srv, "DELETE", f"/api/dataobject/{obj}", ops), 404, "not found")
    refused(call(srv, "POST", "/api/trigger", ops, data={"dataset": site_sets[0]["id"], "algorithm": "noop"}), 404,
            "not found")

    # Two jobs more: the first site datasets drop out of the listing, and still read by id for the operator.
    later = [srv.cli("submit", str(payload)).stdout.strip() for _ in range(2)]
    srv.done(6)
    relisted = wait_for(lambda: (lambda ds: ds if {d["last_job"] for d in ds} >= set(later) else None)(
        ok(srv, "GET", "/api/datasets", ops)), 20)
    assert not {d["last_job"] for d in relisted} & set(early)
    assert ok(srv, "GET", f"/api/dataset/{site_sets[0]['id']}", ops)["last_job"] in early

    # A plain key sees only what it made: no site dataset, listed or by id, old or new; no other key's.
    every_site = [d for d in listed + relisted if d["last_job"] in early + later]
    assert [d["id"] for d in ok(srv, "GET", "/api/datasets", alice)] == [mine]
    for key in (alice, bob):
        for d in every_site:
            refused(call(srv, "GET", f"/api/dataset/{d['id']}", key), 404, "not found")
            for o in d["output_data_objects"]:
                refused(call(srv, "GET", f"/api/dataobject/download/{o['id']}", key), 404, "not found")
                refused(call(srv, "GET", f"/api/dataobject/{o['id']}", key), 404, "not found")
        seen = {o["id"] for o in ok(srv, "GET", "/api/dataobjects", key)}
        assert not seen & {o["id"] for d in every_site for o in d["output_data_objects"]}
    refused(call(srv, "GET", f"/api/status/{job}", bob), 404, "not found")
    refused(call(srv, "GET", f"/api/status/{early[0]}", alice), 404, "not found")


def test_a_removed_keys_name_given_again_inherits_nothing(srv: HttpSite) -> None:
    srv.start_http()
    old = srv.key("alice")
    ds = ok(srv, "POST", "/api/dataset", old)["id"]
    obj = upload(srv, old, ds, b"old alice's").json()["id"]
    job = run(srv, old, ds)["job"]
    loc = ok(srv, "POST", "/api/dicomlocation", old, data={"name": "pacs", "host": "127.0.0.1", "port": 104})["id"]
    srv.cli("manage", "key", "--remove", "alice")
    new = srv.key("alice")
    assert ok(srv, "GET", "/api/datasets", new) == [] and ok(srv, "GET", "/api/dataobjects", new) == []
    assert ok(srv, "GET", "/api/dicomlocation", new) == []
    for path in (f"/api/dataset/{ds}", f"/api/dataobject/{obj}", f"/api/dataobject/download/{obj}",
                 f"/api/status/{job}"):
        refused(call(srv, "GET", path, new), 404, "not found")
    refused(call(srv, "POST", "/api/dataset", new, data={"from_dicom_location": loc}), 404, "not found")
    owner = read_job(srv.outbox / job)["owner"]  # the old key's id, never its name
    [key] = Index(srv.root / "postbox.db.json").list_keys()
    assert key.name == "alice" and owner.startswith("key-") and key.tag != owner  # ids are never given again


def test_records_of_the_previous_release_stay_their_keys_only(srv: HttpSite) -> None:
    """Release 0.1 named owners by key name: each record goes to its key's id once, never to a later namesake."""
    index = Index(srv.root / "postbox.db.json")

    def old_key(name: str, created: str) -> str:  # exactly what 0.1's add_key wrote: no id, no site flag
        key = f"pbx_{name}-key-of-release-0.1-xxxxxxxx"
        index.insert("keys", {"name": name, "hash": hash_key(key), "prefix": key[:8], "created": created})
        return key

    def old_dataset(owner: str, made: str) -> int:
        ds = index.insert("datasets", {"owner": owner, "timestamp": made, "timeout_hours": 24.0,
                                       "expires": 4102444800.0, "from_dicom_location": None,
                                       "to_dicom_location": None, "last_job": None}, id_field="id")
        folder = srv.inbox / ".datasets" / str(ds) / "f0"
        folder.mkdir(parents=True)
        (folder / "in.txt").write_text(f"{owner}'s")
        index.insert("dataobjects", {"dataset": ds, "owner": owner, "is_input": True, "type": "FILE",
                                     "meta_data": {}, "parent": None, "timestamp": made, "is_sent": False,
                                     "status": None, "series_instance_uid": None, "dicom_retrieve": None,
                                     "folder": "f0", "file_name": "in.txt", "is_fetched": True, "size": 8},
                     id_field="id")
        return ds

    alice = old_key("alice", "2025-01-01T00:00:00.000+00:00")
    mine = old_dataset("alice", "2025-02-01T00:00:00.000+00:00")
    loc = index.insert("locations", {"owner": "alice", "name": "pacs", "host": "127.0.0.1", "port": 104,
                                     "ae_title": "PACS"}, id_field="id")
    carols = old_dataset("carol", "2025-02-01T00:00:00.000+00:00")  # carol's key was removed under 0.1
    daves = old_dataset("dave", "2025-02-01T00:00:00.000+00:00")
    dave = old_key("dave", "2025-03-01T00:00:00.000+00:00")  # a later "dave", made again under 0.1
    srv.start_http()
    carol = srv.key("carol")  # and a "carol" made after the upgrade

    assert [d["id"] for d in ok(srv, "GET", "/api/datasets", alice)] == [mine]
    assert ok(srv, "GET", "/api/dicomlocation", alice) == [{"id": loc, "name": "pacs", "host": "127.0.0.1",
                                                            "port": 104, "ae_title": "PACS"}]
    [obj] = ok(srv, "GET", f"/api/dataset/{mine}", alice)["input_data_objects"]
    assert ok(srv, "GET", f"/api/dataobject/download/{obj['id']}", alice).content == b"alice's"
    assert run(srv, alice, mine)["state"] == "SUCCESS"  # and it is hers to run: her data objects came along
    for key, theirs in ((carol, carols), (dave, daves)):
        assert ok(srv, "GET", "/api/datasets", key) == []
        refused(call(srv, "GET", f"/api/dataset/{theirs}", key), 404, "not found")
    assert {r["owner"] for r in index.find("datasets")} == {1, "carol", "dave"}  # stored as the key's id now
    stored = (srv.root / "postbox.db.json.tables" / "datasets.json").read_text()
    assert '"owner":"alice"' not in stored


def test_quotas_per_key_answer_429_and_keep_nothing(tmp_path: Path) -> None:
    site = http_site(tmp_path, http={"max_datasets_per_key": 2, "max_stored_mb_per_key": 0.001,
                                     "allowed_locations": ["127.0.0.1"]})
    try:
        site.start_http()
        alice, bob, ops = site.key("alice"), site.key("bob"), site_key(site, "ops")
        first, second = (ok(site, "POST", "/api/dataset", alice)["id"] for _ in range(2))
        refused(call(site, "POST", "/api/dataset", alice), 429, "as many as http.max_datasets_per_key allows")
        assert ok(site, "POST", "/api/dataset", bob)["id"]  # a quota is per key
        ok(site, "POST", "/api/dataset", ops)
        ok(site, "POST", "/api/dataset", ops)
        refused(call(site, "POST", "/api/dataset", ops), 429, "max_datasets_per_key")  # site keys too

        kept = upload(site, alice, first, b"a" * 600).json()["id"]
        refused(upload(site, alice, second, b"b" * 600), 429, "would pass http.max_stored_mb_per_key (0.001 MB)")
        assert list((site.inbox / ".datasets" / str(second)).iterdir()) == []  # refused: no file, no record
        assert ok(site, "GET", f"/api/dataset/{second}", alice)["input_data_objects"] == []
        assert upload(site, bob, ok(site, "GET", "/api/datasets", bob)[0]["id"], b"c" * 600).status_code == 200
        upload(site, alice, first, b"d" * 400)  # up to the quota exactly
        # At the quota: refused before its body is read.
        refused(upload(site, alice, second, b"e"), 429, "stores 0.001 MB, as much as http.max_stored_mb_per_key")
        loc = ok(site, "POST", "/api/dicomlocation", alice, data={"name": "p", "host": "127.0.0.1", "port": 104})
        refused(call(site, "POST", "/api/dataset", alice, data={"from_dicom_location": loc["id"]}), 429,
                "max_datasets_per_key")
        ok(site, "DELETE", f"/api/dataobject/{kept}", alice)  # room again
        assert upload(site, alice, second, b"f" * 600).status_code == 200
    finally:
        site.close()


def test_a_location_is_used_only_while_its_host_is_allowed(tmp_path: Path) -> None:
    # No http.allowed_locations: only the hosts of dicom.destinations may be named.
    site = http_site(tmp_path, dicom={"enabled": False, "destinations": {
        "tps": {"host": "127.0.0.1", "port": 104, "ae_title": "TPS"}}})
    try:
        site.start_http()
        alice = site.key("alice")
        refused(call(site, "POST", "/api/dicomlocation", alice, data={"name": "x", "host": "10.9.9.9", "port": 104}),
                400, "is not allowed")
        loc = ok(site, "POST", "/api/dicomlocation", alice, data={"name": "tps", "host": "127.0.0.1", "port": 104,
                                                                  "ae_title": "TPS"})["id"]
        ds = ok(site, "POST", "/api/dataset", alice, data={"to_dicom_location": loc, "from_dicom_location": loc})["id"]
        upload(site, alice, ds, b"x")
        site.stop(site.procs[-1])
        # The operator takes 127.0.0.1 off: the location made with it is not used any more.
        site.write_config(http={"allowed_locations": ["10.0.0.0/8"]})
        site.start_http()
        refused(call(site, "POST", "/api/trigger", alice, data={"dataset": ds, "algorithm": "noop"}), 400,
                "DICOM location host '127.0.0.1' is not allowed")
        refused(call(site, "POST", "/api/dataobject", alice, data={"dataset": ds, "type": "DICOM",
                                                                  "seriesUID": "1.2.3", "dicom_retrieve": "GET"}),
                400, "is not allowed")
        refused(call(site, "POST", "/api/dataset", alice, data={"from_dicom_location": loc}), 400, "is not allowed")
        assert not any((site.inbox / p).is_dir() for p in site.inbox.iterdir() if not p.name.startswith("."))
    finally:
        site.close()


def test_server_paths_are_hidden_from_messages(tmp_path: Path) -> None:
    cfg = Config.from_dict({"database": "db/postbox.db.json"}, base_dir=tmp_path)
    message = (f"[Errno 2] No such file or directory: '{tmp_path}/inbox/20260101T000000-0123abcd/input/ct.nii.gz'"
               f" -> '{tmp_path}/outbox/x'; index {tmp_path}/db/postbox.db.json; config {tmp_path}/config.yaml")
    hidden = hide_paths(message, cfg)
    assert str(tmp_path) not in hidden
    assert hidden == ("[Errno 2] No such file or directory: 'inbox/20260101T000000-0123abcd/input/ct.nii.gz' -> "
                      "'outbox/x'; index postbox.db.json; config config.yaml")
    assert json.loads(json.dumps(hidden)) == hidden
