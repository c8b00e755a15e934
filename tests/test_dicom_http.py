"""The DICOM node and the HTTP door together: SEND/MOVE/GET inputs, results to a dataset's location,
and DICOM-fed jobs visible over HTTP. Peers we did not write: dcmtk's storescu, storescp and dcmqrscp."""

from __future__ import annotations

import io
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from _http import BODY_LUNGS, HttpSite
from conftest import read_job, wait_for
from test_node import DCMTK_ENV, dcmtk, free_port, start_storescp

from pipeline import phantom
from pipeline.index import Index


def start_both(root: Path, **dicom: Any) -> HttpSite:
    """A service with the DICOM node and the HTTP door; keys alice and bob (plain), and ``ops`` (a site key)."""
    root.mkdir()
    site = HttpSite(root)
    site.config["algorithms"].append({**BODY_LUNGS, "outputs": ["rtstruct"]})
    site.write_config(default_algorithm="body-lungs", http={"allowed_locations": ["127.0.0.1"]}, dicom={
        "enabled": True, "host": "127.0.0.1", "port": 0, "series_timeout": 1.0, "send_backoff_max": 1.0, **dicom})
    site.start_http()
    site.alice = site.key("alice")
    site.bob = site.key("bob")
    site.ops = site.cli("manage", "key", "--add", "ops", "--site").stdout.strip()  # type: ignore[attr-defined]
    return site


@pytest.fixture
def both(tmp_path: Path) -> Iterator[HttpSite]:
    site = start_both(tmp_path / "site")
    yield site
    site.close()


def api(site: HttpSite, method: str, path: str, key: str | None = None, **kw: Any) -> Any:
    res = requests.request(method, site.url + path, headers={"API_KEY": key or site.alice}, timeout=30, **kw)
    assert res.status_code == 200, (res.status_code, res.text)
    return res.json() if res.headers.get("Content-Type") == "application/json" else res


def series(tmp_path: Path, name: str = "ct") -> tuple[Path, str]:
    files = phantom.write_dicom(tmp_path / name, phantom.axial_grid(slices=12, size=64))
    return tmp_path / name, str(pydicom.dcmread(files[0]).SeriesInstanceUID)


def storescu(site: HttpSite, folder: Path, port: int | None = None, called: str = "POSTBOX",
             calling: str = "STORESCU") -> None:
    proc = subprocess.run([dcmtk("storescu"), "-aec", called, "-aet", calling, "+sd", "127.0.0.1",
                           str(port or site.port), str(folder)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=60)
    assert proc.returncode == 0, proc.stderr


def run(site: HttpSite, dataset: int, key: str | None = None) -> dict[str, Any]:
    poll = api(site, "POST", "/api/trigger", key, data={"dataset": dataset, "algorithm": "body-lungs"})["poll"]
    status = wait_for(lambda: (lambda s: s if s["state"] in ("SUCCESS", "FAILURE") else None)(
        api(site, "GET", poll, key)), 90, what="the run")
    assert status["state"] == "SUCCESS", status
    return api(site, "GET", f"/api/dataset/{dataset}", key)


def rtstruct_of(site: HttpSite, dataset: dict[str, Any], key: str | None = None) -> pydicom.Dataset:
    [rt] = [o for o in dataset["output_data_objects"] if o["type"] == "DICOM"]
    res = api(site, "GET", f"/api/dataobject/download/{rt['id']}", key)
    return pydicom.dcmread(io.BytesIO(res.content))


def wait_ready(site: HttpSite, dataset: int) -> None:
    wait_for(lambda: api(site, "GET", f"/api/dataset/ready/{dataset}")["ready"], 60, what="the dataset to be ready")


def wait_send(site: HttpSite, uid: str, ae_title: str | None = "MODALITY") -> tuple[int, dict[str, Any]]:
    """A dataset of alice's waiting (SEND) for series ``uid`` from a location with AE title ``ae_title``."""
    loc = api(site, "POST", "/api/dicomlocation", data={"name": "ct", "host": "127.0.0.1", "port": 104,
                                                        **({"ae_title": ae_title} if ae_title else {})})
    ds = api(site, "POST", "/api/dataset", data={"from_dicom_location": loc["id"]})["id"]
    obj = api(site, "POST", "/api/dataobject", data={"dataset": ds, "type": "DICOM", "seriesUID": uid,
                                                      "dicom_retrieve": "SEND"})
    return ds, obj


def test_send_a_series_the_dataset_waits_for(both: HttpSite, tmp_path: Path) -> None:
    folder, uid = series(tmp_path)
    # Issue 9: a SEND wait names who sends it (a location's AE title), else any sender's series would do.
    plain = api(both, "POST", "/api/dataset")["id"]
    for location in (None, "no AE title"):
        if location is not None:
            loc = api(both, "POST", "/api/dicomlocation", data={"name": "x", "host": "127.0.0.1", "port": 104})
            plain = api(both, "POST", "/api/dataset", data={"from_dicom_location": loc["id"]})["id"]
        res = requests.post(both.url + "/api/dataobject", headers={"API_KEY": both.alice}, timeout=30,
                            data={"dataset": plain, "type": "DICOM", "seriesUID": uid, "dicom_retrieve": "SEND"})
        assert res.status_code == 400 and "from_dicom_location with an ae_title" in res.json()["error"], res.text
    ds, obj = wait_send(both, uid)
    assert obj["is_fetched"] is False and "waiting for the series to be sent to POSTBOX" in obj["status"]
    assert api(both, "GET", f"/api/dataset/ready/{ds}") == {"ready": False}
    early = requests.post(both.url + "/api/trigger", headers={"API_KEY": both.alice}, timeout=30,
                          data={"dataset": ds, "algorithm": "body-lungs"})
    assert early.status_code == 400 and "not ready" in early.json()["error"]
    download = requests.get(both.url + f"/api/dataobject/download/{obj['id']}", headers={"API_KEY": both.alice},
                            timeout=30)
    assert download.status_code == 400 and "not been received" in download.json()["error"]
    # Sent by another AE title: not the dataset's; it becomes a job of its own (the sender's, not alice's).
    storescu(both, folder, calling="INTRUDER")
    [other] = both.done(1, timeout=60)
    assert read_job(other)["source"] == "dicom" and read_job(other)["sender"]["calling_ae"] == "INTRUDER"
    assert api(both, "GET", f"/api/dataset/ready/{ds}") == {"ready": False}
    storescu(both, folder, calling="MODALITY")
    wait_ready(both, ds)
    fed = api(both, "GET", f"/api/dataobject/{obj['id']}")
    assert fed["is_fetched"] is True and "from MODALITY" in fed["status"]
    result = run(both, ds)
    rt = rtstruct_of(both, result)
    assert rt.Modality == "RTSTRUCT" and rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0].SeriesInstanceUID == uid
    # The right sender's series went to the dataset, not into a job of its own.
    assert sorted(read_job(p)["source"] for p in both.outbox.iterdir()) == ["dicom", "http"]


def test_a_series_an_explicit_route_takes_is_never_diverted(tmp_path: Path) -> None:
    # The modality's own route: its series run as its job, even when a key waits for that UID from its title.
    site = start_both(tmp_path / "site", routes=[{"algorithm": "body-lungs", "calling_ae": "CT-*"}])
    try:
        folder, uid = series(tmp_path)
        ds, obj = wait_send(site, uid, ae_title="CT-1")
        storescu(site, folder, calling="CT-1")
        [job_dir] = site.done(1, timeout=60)
        job = read_job(job_dir)
        assert job["source"] == "dicom" and job["status"] == "done" and job["inputs"][0]["meta_data"][
            "series_instance_uid"] == uid
        assert api(site, "GET", f"/api/dataobject/{obj['id']}")["is_fetched"] is False
        # In the same service, a series no rule matches goes to the dataset waiting for it from its sender:
        # the rule, not the AE title, kept the first one from being taken.
        other, other_uid = series(tmp_path, "other")
        ds2, _ = wait_send(site, other_uid, ae_title="WARD")
        storescu(site, other, calling="WARD")
        wait_ready(site, ds2)
        assert len(site.done(1)) == 1
    finally:
        site.close()


def dcmqrscp(tmp_path: Path, node_port: int) -> tuple[subprocess.Popen[bytes], int, str]:
    folder, uid = series(tmp_path, "pacs-src")
    db = tmp_path / "pacs-db"
    db.mkdir()
    files = []
    for f in folder.iterdir():
        (db / f.name).write_bytes(f.read_bytes())
        files.append(str(db / f.name))
    subprocess.run([dcmtk("dcmqridx"), str(db), *files], check=True, env=DCMTK_ENV)
    port = free_port()
    cfg = tmp_path / "dcmqrscp.cfg"
    cfg.write_text(f"""NetworkTCPPort = {port}
MaxPDUSize = 16384
MaxAssociations = 16
HostTable BEGIN
postbox = (POSTBOX, 127.0.0.1, {node_port})
HostTable END
VendorTable BEGIN
VendorTable END
AETable BEGIN
PACS {db} RW (200, 1024mb) ANY
AETable END
""")
    proc = subprocess.Popen([dcmtk("dcmqrscp"), "-c", str(cfg)], env=DCMTK_ENV)
    wait_for(lambda: subprocess.run([dcmtk("echoscu"), "-aec", "PACS", "127.0.0.1", str(port)], capture_output=True,
                                    env=DCMTK_ENV).returncode == 0, 20, 0.1, what="dcmqrscp")
    return proc, port, uid


@pytest.mark.parametrize("how", ["MOVE", "GET"])
def test_move_and_get_from_dcmqrscp_driven_over_http(both: HttpSite, tmp_path: Path, how: str) -> None:
    pacs, port, uid = dcmqrscp(tmp_path, both.port)
    try:
        loc = api(both, "POST", "/api/dicomlocation", data={"name": "pacs", "host": "127.0.0.1", "port": port,
                                                            "ae_title": "PACS"})
        ds = api(both, "POST", "/api/dataset", data={"from_dicom_location": loc["id"]})["id"]
        api(both, "POST", "/api/dataobject", data={"dataset": ds, "type": "DICOM", "seriesUID": uid,
                                                   "dicom_retrieve": how})
        wait_ready(both, ds)
        [obj] = api(both, "GET", f"/api/dataset/{ds}")["input_data_objects"]
        assert obj["meta_data"]["instances"] == 12 and how.replace("MOVE", "") in obj["status"] + "GET"
        rt = rtstruct_of(both, run(both, ds))
        assert rt.Modality == "RTSTRUCT"
    finally:
        pacs.kill()
        pacs.wait()


def test_a_retrieval_a_stop_interrupted_is_made_at_the_next_start(tmp_path: Path) -> None:
    # What a service stopped in the middle of a C-GET leaves in the index: the data object still ``fetching``.
    (tmp_path / "site").mkdir()
    site = HttpSite(tmp_path / "site")
    site.write_config(http={"allowed_locations": ["127.0.0.1"]})
    alice = site.key("alice")
    pacs, port, uid = dcmqrscp(tmp_path, 0)
    try:
        index = Index(site.root / "postbox.db.json")
        [key] = index.list_keys()
        loc = index.insert("locations", {"owner": key.id, "name": "pacs", "host": "127.0.0.1", "port": port,
                                         "ae_title": "PACS"}, id_field="id")
        ds = index.insert("datasets", {"owner": key.id, "timestamp": "2026-01-01T00:00:00.000+00:00",
                                       "timeout_hours": 24.0, "expires": 4102444800.0, "from_dicom_location": loc,
                                       "to_dicom_location": None, "last_job": None}, id_field="id")
        (site.inbox / ".datasets" / str(ds)).mkdir(parents=True)
        obj = index.insert("dataobjects", {"dataset": ds, "owner": key.id, "is_input": True, "type": "DICOM",
                                           "meta_data": {}, "parent": None,
                                           "timestamp": "2026-01-01T00:00:00.000+00:00",
                                           "is_sent": False, "status": "fetching the series (C-GET)",
                                           "series_instance_uid": uid, "dicom_retrieve": "GET", "folder": None,
                                           "file_name": None, "is_fetched": False, "fetching": True}, id_field="id")
        site.start_http()
        wait_for(lambda: api(site, "GET", f"/api/dataset/ready/{ds}", alice)["ready"], 60, what="the retrieval")
        got = api(site, "GET", f"/api/dataobject/{obj}", alice)
        assert got["meta_data"]["instances"] == 12 and "by C-GET from PACS" in got["status"]
        assert index.find("dataobjects", id=obj)[0]["fetching"] is False
    finally:
        pacs.kill()
        pacs.wait()
        site.close()


def test_move_from_an_unreachable_pacs_says_why(both: HttpSite) -> None:
    loc = api(both, "POST", "/api/dicomlocation", data={"name": "gone", "host": "127.0.0.1", "port": free_port(),
                                                        "ae_title": "GONE"})
    ds = api(both, "POST", "/api/dataset", data={"from_dicom_location": loc["id"]})["id"]
    obj = api(both, "POST", "/api/dataobject", data={"dataset": ds, "type": "DICOM", "seriesUID": "1.2.3.4",
                                                     "dicom_retrieve": "GET"})
    status = wait_for(lambda: (lambda s: s if s and s.startswith("failed") else None)(
        api(both, "GET", f"/api/dataobject/{obj['id']}")["status"]), 30)
    assert "no association with GONE" in status
    assert api(both, "GET", f"/api/dataset/ready/{ds}") == {"ready": False}


def test_results_go_to_the_datasets_location_and_is_sent_shows_it(both: HttpSite, tmp_path: Path) -> None:
    dest = free_port()
    scp = start_storescp(dest, tmp_path / "received")
    try:
        folder, _ = series(tmp_path)
        loc = api(both, "POST", "/api/dicomlocation", data={"name": "tps", "host": "127.0.0.1", "port": dest,
                                                            "ae_title": "TPS"})
        ds = api(both, "POST", "/api/dataset", data={"to_dicom_location": loc["id"]})["id"]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for f in folder.iterdir():
                zf.write(f, f.name)
        api(both, "POST", "/api/dataobject", data={"dataset": ds, "type": "FILE", "file_name": "ct.zip"},
            files={"file_data": ("ct.zip", buf.getvalue())})
        run(both, ds)
        wait_for(lambda: [o for o in api(both, "GET", f"/api/dataset/{ds}")["output_data_objects"]
                          if o["type"] == "DICOM" and o["is_sent"]], 30, what="is_sent")
        assert [pydicom.dcmread(p).Modality for p in (tmp_path / "received").iterdir()] == ["RTSTRUCT"]
    finally:
        scp.kill()
        scp.wait()


def test_a_dicom_fed_job_is_listed_and_downloadable_over_http(both: HttpSite, tmp_path: Path) -> None:
    ops = both.ops  # type: ignore[attr-defined]
    folder, uid = series(tmp_path)
    storescu(both, folder)  # no dataset waits for it: it becomes a job of its own
    [job_dir] = both.done(1, timeout=60)
    # A site key (an operator's) lists and downloads the jobs of every door ...
    listed = wait_for(lambda: [d for d in api(both, "GET", "/api/datasets", ops) if d["last_job"] == job_dir.name],
                      10)
    rt = rtstruct_of(both, listed[0], ops)
    assert rt.Modality == "RTSTRUCT"
    # ... but neither adds to nor runs them.
    res = requests.post(both.url + "/api/trigger", headers={"API_KEY": ops}, timeout=30,
                        data={"dataset": listed[0]["id"], "algorithm": "body-lungs"})
    assert res.status_code == 404
    # A plain key sees none of it: the patient's CT and RTSTRUCT are not its (issue 9).
    [rt_object] = [o for o in listed[0]["output_data_objects"] if o["type"] == "DICOM"]
    for key in (both.alice, both.bob):
        assert job_dir.name not in [d["last_job"] for d in api(both, "GET", "/api/datasets", key)]
        for path in (f"/api/dataset/{listed[0]['id']}", f"/api/dataobject/download/{rt_object['id']}",
                     f"/api/dataobject/{rt_object['id']}", f"/api/status/{job_dir.name}"):
            res = requests.get(both.url + path, headers={"API_KEY": key}, timeout=30)
            assert res.status_code == 404 and "not found" in res.json()["error"], (path, res.text)


def test_only_the_latest_site_jobs_are_listed(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    site = HttpSite(tmp_path / "site")
    site.write_config(http={"site_jobs": 2})
    payload = tmp_path / "p.txt"
    payload.write_text("x")
    ids = [site.cli("submit", str(payload)).stdout.strip() for _ in range(3)]
    try:
        site.start_http()
        ops = site.cli("manage", "key", "--add", "ops", "--site").stdout.strip()
        site.done(3)
        listed = wait_for(lambda: (lambda ds: ds if len(ds) == 2 and all(d["output_data_objects"] for d in ds)
                                   else None)(api(site, "GET", "/api/datasets", ops)), 20)
        assert sorted(d["last_job"] for d in listed) == sorted(ids)[1:]
        res = api(site, "GET", f"/api/dataobject/download/{listed[0]['output_data_objects'][0]['id']}", ops)
        assert res.content  # the site job's output downloads like any other
    finally:
        site.close()
