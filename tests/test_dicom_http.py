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


@pytest.fixture
def both(tmp_path: Path) -> Iterator[HttpSite]:
    (tmp_path / "site").mkdir()
    site = HttpSite(tmp_path / "site")
    site.config["algorithms"].append({**BODY_LUNGS, "outputs": ["rtstruct"]})
    site.write_config(default_algorithm="body-lungs", dicom={
        "enabled": True, "host": "127.0.0.1", "port": 0, "series_timeout": 1.0, "send_backoff_max": 1.0})
    site.start_http()
    site.alice = site.key("alice")
    site.bob = site.key("bob")
    yield site
    site.close()


def api(site: HttpSite, method: str, path: str, key: str | None = None, **kw: Any) -> Any:
    res = requests.request(method, site.url + path, headers={"API_KEY": key or site.alice}, timeout=30, **kw)
    assert res.status_code == 200, (res.status_code, res.text)
    return res.json() if res.headers.get("Content-Type") == "application/json" else res


def series(tmp_path: Path, name: str = "ct") -> tuple[Path, str]:
    files = phantom.write_dicom(tmp_path / name, phantom.axial_grid(slices=12, size=64))
    return tmp_path / name, str(pydicom.dcmread(files[0]).SeriesInstanceUID)


def storescu(site: HttpSite, folder: Path, port: int | None = None, called: str = "POSTBOX") -> None:
    proc = subprocess.run([dcmtk("storescu"), "-aec", called, "+sd", "127.0.0.1",
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


def test_send_a_series_the_dataset_waits_for(both: HttpSite, tmp_path: Path) -> None:
    folder, uid = series(tmp_path)
    ds = api(both, "POST", "/api/dataset")["id"]
    obj = api(both, "POST", "/api/dataobject", data={"dataset": ds, "type": "DICOM", "seriesUID": uid,
                                                      "dicom_retrieve": "SEND"})
    assert obj["is_fetched"] is False and "waiting for the series to be sent to POSTBOX" in obj["status"]
    assert api(both, "GET", f"/api/dataset/ready/{ds}") == {"ready": False}
    early = requests.post(both.url + "/api/trigger", headers={"API_KEY": both.alice}, timeout=30,
                          data={"dataset": ds, "algorithm": "body-lungs"})
    assert early.status_code == 400 and "not ready" in early.json()["error"]
    download = requests.get(both.url + f"/api/dataobject/download/{obj['id']}", headers={"API_KEY": both.alice},
                            timeout=30)
    assert download.status_code == 400 and "not been received" in download.json()["error"]
    storescu(both, folder)
    wait_ready(both, ds)
    assert api(both, "GET", f"/api/dataobject/{obj['id']}")["is_fetched"] is True
    result = run(both, ds)
    rt = rtstruct_of(both, result)
    assert rt.Modality == "RTSTRUCT" and rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0].SeriesInstanceUID == uid
    # The series went to the dataset, not into a job of its own.
    assert [read_job(p)["source"] for p in both.outbox.iterdir()] == ["http"]


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
    folder, uid = series(tmp_path)
    storescu(both, folder)  # no dataset waits for it: it becomes a job of its own
    [job_dir] = both.done(1, timeout=60)
    listed = wait_for(lambda: [d for d in api(both, "GET", "/api/datasets") if d["last_job"] == job_dir.name], 10)
    rt = rtstruct_of(both, listed[0])
    assert rt.Modality == "RTSTRUCT"
    # Every key sees the site's jobs, and none may add to or run them.
    assert rtstruct_of(both, api(both, "GET", f"/api/dataset/{listed[0]['id']}", both.bob), both.bob)
    res = requests.post(both.url + "/api/trigger", headers={"API_KEY": both.bob}, timeout=30,
                        data={"dataset": listed[0]["id"], "algorithm": "body-lungs"})
    assert res.status_code == 404


def test_only_the_latest_site_jobs_are_listed(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    site = HttpSite(tmp_path / "site")
    site.write_config(http={"site_jobs": 2})
    payload = tmp_path / "p.txt"
    payload.write_text("x")
    ids = [site.cli("submit", str(payload)).stdout.strip() for _ in range(3)]
    try:
        site.start_http()
        site.alice = site.key("alice")
        site.done(3)
        listed = wait_for(lambda: (lambda ds: ds if len(ds) == 2 and all(d["output_data_objects"] for d in ds)
                                   else None)(api(site, "GET", "/api/datasets")), 20)
        assert sorted(d["last_job"] for d in listed) == sorted(ids)[1:]
        res = api(site, "GET", f"/api/dataobject/download/{listed[0]['output_data_objects'][0]['id']}")
        assert res.content  # the site job's output downloads like any other
    finally:
        site.close()
