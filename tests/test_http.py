"""The HTTP API on a real service (cheroot, worker, algorithms): every route's codes and fields, keys, refusals.

One service serves the whole module; each test makes its own datasets, so tests do not see each other's.
"""

from __future__ import annotations

import io
import json
import re
import socket
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from _http import HttpSite, http_site
from conftest import read_job, wait_for

from facade import openapi
from pipeline import phantom
from pipeline.index import Index

LIMIT_MB = 4
DATASET_FIELDS = {"id", "input_data_objects", "output_data_objects", "from_dicom_location", "to_dicom_location",
                  "timestamp", "timeout"}
OBJECT_FIELDS = {"id", "dataset_id", "is_input", "type", "series_instance_uid", "meta_data", "status", "is_fetched",
                 "is_sent", "parent_id", "children", "timestamp"}


# An algorithm whose error names a file of its job by its absolute path, as a real one's would.
PATH_ALGOS = """
from pathlib import Path

def opens_missing(data_objects, working_dir, settings):
    open(Path(data_objects[0].path).parent / "absent.nii.gz")
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpSite]:
    root = tmp_path_factory.mktemp("http")
    (root / "pathalgos.py").write_text(PATH_ALGOS)
    site = http_site(root, worker={"processes": 2},
                     http={"max_upload_mb": LIMIT_MB, "max_unpacked_mb": 16, "max_zip_entries": 60,
                           "sweep_seconds": 0.2, "allowed_locations": ["127.0.0.1", "10.0.0.0/24"]})
    site.config["algorithms"].append({"name": "opens-missing", "function": "pathalgos:opens_missing"})
    site.write_config()
    site.alice, site.bob = site.key("alice"), site.key("bob")
    site.start_http()
    yield site
    site.close()


class Api:
    """Raw requests with one key (no client library: these tests check the wire)."""

    def __init__(self, srv: HttpSite, key: str | None) -> None:
        self.srv = srv
        self.headers = {"API_KEY": key} if key is not None else {}

    def __call__(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, self.srv.url + path, headers={**self.headers, **kwargs.pop("headers", {})},
                                timeout=30, **kwargs)

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        res = self(method, path, **kwargs)
        assert res.status_code == 200, res.text
        assert res.headers["Content-Type"] == "application/json"
        return res.json()

    def dataset(self, **fields: Any) -> dict[str, Any]:
        return self.ok("POST", "/api/dataset", data=fields)  # type: ignore[no-any-return]

    def upload(self, dataset_id: int, name: str, data: bytes, **fields: Any) -> requests.Response:
        form = {"dataset": dataset_id, "type": "FILE", "file_name": name, **fields}
        return self("POST", "/api/dataobject", data=form, files={"file_data": (name, data)})

    def run(self, dataset: int, algorithm: str = "noop", **fields: Any) -> dict[str, Any]:
        poll = self.ok("POST", "/api/trigger", data={"dataset": dataset, "algorithm": algorithm, **fields})["poll"]
        assert re.fullmatch(r"/api/status/\d{8}T\d{6}-[0-9a-f]{8}", poll)
        return wait_for(lambda: (lambda s: s if s["state"] in ("SUCCESS", "FAILURE") else None)(self.ok("GET", poll)),
                        30, what=f"{poll} to finish")  # type: ignore[no-any-return]


def error(res: requests.Response, status: int, text: str = "") -> str:
    assert res.status_code == status, f"{res.status_code} {res.text}"
    assert res.headers["Content-Type"] == "application/json"
    message = res.json()["error"]
    assert text in message, message
    return str(message)


def nothing_left(srv: HttpSite, dataset: int) -> None:
    """No file kept for a refused upload and no request folder left behind (mailbox's rule)."""
    root = srv.inbox / ".datasets"
    wait_for(lambda: not any((root / ".uploads").iterdir()), 10, what="the upload folder to be removed")
    assert list((root / str(dataset)).iterdir()) == []
    assert Api(srv, srv.alice).ok("GET", f"/api/dataset/{dataset}")["input_data_objects"] == []


# --- keys -------------------------------------------------------------------------------------------


def test_every_route_but_health_needs_a_valid_key(srv: HttpSite) -> None:
    assert requests.get(srv.url + "/api/health", timeout=10).json()["status"] == "ok"
    for route in openapi.ROUTES:
        path = re.sub(r"\{[a-z_]+\}", "1", route["path"])
        for key in (None, "pbx_not-a-key", ""):
            res = Api(srv, key)(route["method"], path)
            if not route.get("auth", True):
                assert res.status_code == 200
                continue
            error(res, 401, "API_KEY")
    assert srv.alice not in srv.service_log()


def test_the_api_key_header_with_an_underscore_reaches_the_app(srv: HttpSite) -> None:
    # Exactly what PlatiPy's clients send; Werkzeug 2.3+ and gunicorn 22+ would drop this header.
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /api/algorithm HTTP/1.1\r\nHost: x\r\nAPI_KEY: {srv.alice}\r\n"
                     "Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
    assert b'"name": "noop"' in answer


def test_a_key_sees_only_what_it_owns(srv: HttpSite) -> None:
    alice, bob = Api(srv, srv.alice), Api(srv, srv.bob)
    ds = alice.dataset()["id"]
    obj = alice.upload(ds, "a.txt", b"alice's").json()["id"]
    status = alice.run(ds)
    job = status["job"]
    loc = alice.ok("POST", "/api/dicomlocation", data={"name": "pacs", "host": "127.0.0.1", "port": 104})["id"]
    for method, path in [("GET", f"/api/dataset/{ds}"), ("GET", f"/api/dataset/ready/{ds}"),
                         ("GET", f"/api/dataobject/{obj}"), ("GET", f"/api/dataobject/download/{obj}"),
                         ("DELETE", f"/api/dataobject/{obj}"), ("GET", f"/api/status/{job}")]:
        error(bob(method, path), 404, "not found")
    # A digit that is not an ASCII one ("²".isdigit() is True, int("²") raises) names nothing either.
    for path in ("/api/dataset/%C2%B2", "/api/dataobject/%D9%A3"):
        error(alice("GET", path), 404, "not found")
    error(bob("POST", "/api/trigger", data={"dataset": ds, "algorithm": "noop"}), 404, f"dataset {ds} not found")
    error(bob.upload(ds, "b.txt", b"bob's"), 404, f"dataset {ds} not found")
    error(bob("POST", "/api/dataset", data={"to_dicom_location": loc}), 404, f"DICOM location {loc} not found")
    assert ds not in [d["id"] for d in bob.ok("GET", "/api/datasets")]
    assert obj not in [o["id"] for o in bob.ok("GET", "/api/dataobjects")]
    assert loc not in [x["id"] for x in bob.ok("GET", "/api/dicomlocation")]
    assert alice.ok("GET", f"/api/dataobject/{obj}")["id"] == obj  # still there after bob's DELETE
    text = json.dumps([alice.ok("GET", "/api/datasets"), alice.ok("GET", "/api/dataobjects")])
    assert srv.alice not in text and "hash" not in text and str(srv.root) not in text


# --- routes and their fields ---------------------------------------------------------------------------


def test_algorithms_health_and_openapi(srv: HttpSite) -> None:
    alice = Api(srv, srv.alice)
    algorithms = alice.ok("GET", "/api/algorithm")
    assert {"name": "noop", "default_settings": {"label": "x", "n": 1}} in algorithms
    assert all(set(a) == {"name", "default_settings"} for a in algorithms)
    assert requests.get(srv.url + "/api/health", timeout=10).json()["max_upload_mb"] == LIMIT_MB
    doc = alice.ok("GET", "/api/openapi.json")
    assert doc["openapi"].startswith("3.") and doc["components"]["securitySchemes"]["api_key"]["name"] == "API_KEY"
    for route in openapi.ROUTES:
        op = doc["paths"][route["path"]][route["method"].lower()]
        assert set(map(str, route["responses"])) <= set(op["responses"])
        assert ("401" in op["responses"]) == route.get("auth", True)


def test_openapi_lists_exactly_the_app_routes(tmp_path: Path) -> None:
    from facade.app import make_app
    from pipeline.config import Config
    from pipeline.index import Index

    cfg = Config.from_dict({}, base_dir=tmp_path)
    app = make_app(cfg, Index(cfg.database))
    served = {(r.method, re.sub(r"<([a-z_]+)>", r"{\1}", r.rule)) for r in app.routes
              if not r.config.get("dashboard")}  # the web pages (facade/dashboard.py) are not the API
    assert served == {(r["method"], r["path"]) for r in openapi.ROUTES}


def test_dataset_routes(srv: HttpSite) -> None:
    alice = Api(srv, srv.alice)
    loc = alice.ok("POST", "/api/dicomlocation", data={"name": "tps", "host": "10.0.0.1", "port": "11112",
                                                       "ae_title": "TPS"})
    assert loc == {"id": loc["id"], "name": "tps", "host": "10.0.0.1", "port": 11112, "ae_title": "TPS"}
    assert loc in alice.ok("GET", "/api/dicomlocation")
    ds = alice.dataset(to_dicom_location=loc["id"])
    assert DATASET_FIELDS <= set(ds) and ds["to_dicom_location"] == loc and ds["from_dicom_location"] is None
    assert ds["input_data_objects"] == ds["output_data_objects"] == []
    # Parameters may come as query arguments too; timeout is in hours.
    short = alice.ok("POST", "/api/dataset?timeout=2")
    assert short["timeout"] < ds["timeout"]
    assert alice.ok("GET", f"/api/dataset/{ds['id']}") == ds
    assert {d["id"] for d in alice.ok("GET", "/api/datasets")} >= {ds["id"], short["id"]}
    assert alice.ok("GET", f"/api/dataset/ready/{ds['id']}") == {"ready": False}  # empty
    for bad, text in [({"timeout": "soon"}, "timeout must be a number"), ({"timeout": "-1"}, "more than 0"),
                      ({"from_dicom_location": "x"}, "must be a whole number")]:
        error(alice("POST", "/api/dataset", data=bad), 400, text)
    error(alice("POST", "/api/dataset", data={"from_dicom_location": 999}), 404, "DICOM location 999 not found")
    for bad, text in [({"name": "x", "host": "h", "port": "0"}, "TCP port"), ({"host": "h", "port": "1"}, "name"),
                      ({"name": "x", "host": "h", "port": "1", "ae_title": "A" * 17}, "ae_title")]:
        error(alice("POST", "/api/dicomlocation", data=bad), 400, text)
    # Issue 9: only hosts on http.allowed_locations (here 127.0.0.1 and 10.0.0.0/24), never wherever a key says.
    for host in ("10.0.1.1", "169.254.169.254", "localhost", "2130706433", "[::1]", "metadata.internal"):
        error(alice("POST", "/api/dicomlocation", data={"name": "x", "host": host, "port": 104}), 400,
              "is not allowed: only the hosts on http.allowed_locations")
    assert {x["host"] for x in alice.ok("GET", "/api/dicomlocation")} <= {"127.0.0.1", "10.0.0.1"}
    for path in ("/api/dataset/999999", "/api/dataset/abc", "/api/dataset/ready/999999"):
        error(alice("GET", path), 404, "not found")


def test_data_object_routes(srv: HttpSite) -> None:
    alice = Api(srv, srv.alice)
    ds = alice.dataset()["id"]
    first = alice.upload(ds, "ct scan.nii.gz", b"one", meta_data=json.dumps({"site": "A"})).json()
    assert OBJECT_FIELDS <= set(first)
    assert first["type"] == "FILE" and first["is_input"] and first["is_fetched"] and first["dataset_id"] == ds
    assert first["meta_data"] == {"site": "A"} and first["parent_id"] is None and first["children"] == []
    second = alice.upload(ds, "notes.txt", b"two", parent=first["id"]).json()
    assert second["parent_id"] == first["id"]
    assert alice.ok("GET", f"/api/dataobject/{second['id']}") == second
    assert {first["id"], second["id"]} <= {o["id"] for o in alice.ok("GET", "/api/dataobjects")}
    assert alice.ok("GET", f"/api/dataset/ready/{ds}") == {"ready": True}

    res = alice("GET", f"/api/dataobject/download/{second['id']}")
    assert res.status_code == 200 and res.content == b"two"
    assert res.headers["Content-Disposition"] == "attachment; filename=notes.txt"  # unquoted: clients split on it
    res = alice("GET", f"/api/dataobject/download/{first['id']}")
    disposition = res.headers["Content-Disposition"]
    assert res.content == b"one" and disposition.startswith("attachment; filename*=UTF-8''ct%20scan.nii.gz; ")
    assert disposition.split("filename=")[1] == "ct_scan.nii.gz"  # what PlatiPy's client makes of it

    assert alice.ok("DELETE", f"/api/dataobject/{second['id']}") == {"id": second["id"], "deleted": True}
    error(alice("GET", f"/api/dataobject/{second['id']}"), 404, "not found")
    error(alice("DELETE", f"/api/dataobject/{second['id']}"), 404, "not found")
    assert [o["id"] for o in alice.ok("GET", f"/api/dataset/{ds}")["input_data_objects"]] == [first["id"]]
    again = alice.upload(ds, "x.txt", b"x").json()
    assert again["id"] > second["id"]  # a deleted object's id is never given out again

    for fields, status, text in [
        ({"meta_data": "{not json"}, 400, "meta_data is not JSON"),
        ({"meta_data": "[1]"}, 400, "JSON object"),
        ({"type": "IMAGE"}, 400, "type must be FILE or DICOM"),
        ({"parent": 999999}, 404, "parent data object 999999"),
        ({"dataset": 999999}, 404, "dataset 999999 not found"),
        ({"dataset": ""}, 400, "'dataset'"),
    ]:
        error(alice.upload(ds, "y.txt", b"y", **fields), status, text)
    error(alice("POST", "/api/dataobject", data={"dataset": ds, "type": "FILE", "file_name": "z"}), 400,
          "file_data is missing")
    error(alice("GET", "/api/dataobject/999999"), 404, "not found")
    error(alice("GET", "/api/dataobject/download/999999"), 404, "not found")
    error(alice("GET", "/api/nothing/here"), 404, "")
    error(alice("PUT", "/api/dataset"), 405, "")


def test_dicom_retrieve_refusals(srv: HttpSite) -> None:
    # The waiting itself (SEND, MOVE, GET with a DICOM node) is tested in test_dicom_http.py.
    alice = Api(srv, srv.alice)
    ds = alice.dataset()["id"]
    uid = "1.2.826.0.1.3680043.8.498.1"
    for fields, text in [({"dicom_retrieve": "SEND", "seriesUID": uid}, "needs this service's DICOM node"),
                         ({"dicom_retrieve": "FETCH", "seriesUID": uid}, "dicom_retrieve (SEND, MOVE or GET)"),
                         ({"dicom_retrieve": "SEND", "seriesUID": "not a uid"}, "seriesUID must be a DICOM UID"),
                         ({"dicom_retrieve": "MOVE", "seriesUID": uid}, "from_dicom_location")]:
        error(alice("POST", "/api/dataobject", data={"dataset": ds, "type": "DICOM", **fields}), 400, text)
    assert alice.ok("GET", f"/api/dataset/{ds}")["input_data_objects"] == []


# --- runs -------------------------------------------------------------------------------------------


def test_trigger_refusals(srv: HttpSite) -> None:
    alice = Api(srv, srv.alice)
    ds = alice.dataset()["id"]
    error(alice("POST", "/api/trigger", data={"dataset": ds, "algorithm": "noop"}), 400, "has no data objects")
    alice.upload(ds, "in.txt", b"x")
    for fields, status, text in [
        ({"algorithm": "nope"}, 404, "unknown algorithm 'nope'"),
        ({"algorithm": "noop", "dataset": 999999}, 404, "dataset 999999 not found"),
        ({"algorithm": "noop", "config": "{not json"}, 400, "config is not JSON"),
        ({"algorithm": "noop", "config": "[1, 2]"}, 400, "config must be a JSON object"),
        ({"algorithm": "noop", "config": '{"label": "y", "colour": 1}'}, 400, "'colour' is not a setting"),
        ({"algorithm": "noop", "config": '{"n": "one"}'}, 400, "must be int"),
        ({"algorithm": ""}, 400, "'algorithm' is missing"),
    ]:
        error(alice("POST", "/api/trigger", data={"dataset": ds, **fields}), status, text)
    assert [p for p in srv.inbox.iterdir() if not p.name.startswith(".")] == []
    assert not any(read_job(p)["dataset"] == str(ds) for p in srv.outbox.iterdir() if (p / "job.yaml").exists())


def test_a_run_its_outputs_and_a_second_run(srv: HttpSite) -> None:
    alice = Api(srv, srv.alice)
    ds = alice.dataset()["id"]
    source = alice.upload(ds, "in.txt", b"payload").json()
    first = alice.run(ds, config=json.dumps({"label": "first", "n": 1}))
    assert first == {"state": "SUCCESS", "current": 1, "total": 1, "status": "Done", "job": first["job"]}
    job = read_job(srv.outbox / first["job"])
    [key] = [k for k in Index(srv.root / "postbox.db.json").list_keys() if k.name == "alice"]
    # Owned by the key's id, never its name (issue 9); the name only says who sent it.
    assert job["source"] == "http" and job["dataset"] == str(ds) and job["owner"] == f"key-{key.id}"
    assert job["sender"]["key"] == "alice"
    assert job["settings"] == {"label": "first", "n": 1}
    data = alice.ok("GET", f"/api/dataset/{ds}")
    [out] = data["output_data_objects"]
    assert OBJECT_FIELDS <= set(out)
    assert out["is_input"] is False and out["parent_id"] == source["id"] and out["path"] == "result.txt"
    assert data["input_data_objects"][0]["children"] == [out]
    res = alice("GET", f"/api/dataobject/download/{out['id']}")
    assert res.headers["Content-Disposition"] == "attachment; filename=result.txt"
    assert json.loads(res.content)["settings"] == {"label": "first", "n": 1}
    assert alice.ok("GET", f"/api/dataset/{ds}") == data  # outputs keep their ids

    second = alice.run(ds, config=json.dumps({"label": "second", "n": 2}))
    assert second["job"] != first["job"]
    [latest] = alice.ok("GET", f"/api/dataset/{ds}")["output_data_objects"]
    assert latest["id"] != out["id"] and latest["job"] == second["job"]
    assert json.loads(alice("GET", f"/api/dataobject/download/{latest['id']}").content)["settings"]["n"] == 2
    assert json.loads(alice("GET", f"/api/dataobject/download/{out['id']}").content)["settings"]["n"] == 1


def test_a_failed_run_reports_failure_with_its_error(srv: HttpSite) -> None:
    alice = Api(srv, srv.alice)
    ds = alice.dataset()["id"]
    alice.upload(ds, "in.txt", b"x")
    status = alice.run(ds, "raises")
    assert status["state"] == "FAILURE" and status["current"] == status["total"] == 1
    assert "the model found no CT in the input" in status["status"]
    assert alice.ok("GET", f"/api/dataset/{ds}")["output_data_objects"] == []
    error(alice("GET", "/api/status/20990101T000000-00000000"), 404, "not found")
    error(alice("GET", "/api/status/not-a-job"), 404, "not found")


@pytest.mark.parametrize(("algorithm", "said"), [
    ("opens-missing", "No such file or directory: 'input/"),  # the algorithm's own error, naming its input
    ("bad-output", "output 1 (work/missing.nii.gz) does not exist"),  # Postbox's, naming the algorithm's output
])
def test_a_failed_runs_answers_hold_no_server_path(srv: HttpSite, algorithm: str, said: str) -> None:
    alice = Api(srv, srv.alice)
    ds = alice.dataset()["id"]
    alice.upload(ds, "in.txt", b"x")
    status = alice.run(ds, algorithm)
    assert status["state"] == "FAILURE" and said in status["status"], status
    # The job's own record, which the worker wrote, is relative too: it is what any door shows.
    assert said in read_job(srv.outbox / status["job"])["error"]
    answers = [alice("GET", f"/api/status/{status['job']}"), alice("GET", f"/api/dataset/{ds}"),
               alice("GET", "/api/datasets"), alice("GET", "/api/dataobjects"),
               alice("POST", "/api/trigger", data={"dataset": ds, "algorithm": "noop", "config": "{x"})]
    for res in answers:
        assert str(srv.root) not in res.text and str(srv.root.resolve()) not in res.text, res.text


def test_pending_then_running_states(srv: HttpSite) -> None:
    alice = Api(srv, srv.alice)
    ds = alice.dataset()["id"]
    alice.upload(ds, "in.txt", b"x")
    poll = alice.ok("POST", "/api/trigger", data={"dataset": ds, "algorithm": "slow",
                                                  "config": '{"seconds": 0.6}'})["poll"]
    seen = set()  # ?wait=0: each answer at once, so that the states on the way are seen (issue 10)
    wait_for(lambda: seen.add(alice.ok("GET", f"{poll}?wait=0")["state"]) or "SUCCESS" in seen, 30)
    assert "RUNNING" in seen and seen <= {"PENDING", "RUNNING", "SUCCESS"}
    running = {"state": "RUNNING", "current": 0, "total": 1, "status": "Running Algorithm: slow"}
    assert set(running) <= set(alice.ok("GET", poll))


# --- unsafe input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kept"), [
    ("../../etc/passwd", "passwd"),
    ("/etc/passwd", "passwd"),
    ("..\\..\\Windows\\win.ini", "win.ini"),
    ("C:\\scans\\ct.nii.gz", "ct.nii.gz"),
    (".hidden", "hidden"),
    ("bad\x00name\x1f.txt", "badname.txt"),
])
def test_file_names_are_reduced_to_a_safe_base_name(srv: HttpSite, name: str, kept: str) -> None:
    alice = Api(srv, srv.alice)
    ds = alice.dataset()["id"]
    obj = alice.upload(ds, name, b"data").json()
    assert obj["path"] == kept
    [folder] = (srv.inbox / ".datasets" / str(ds)).iterdir()
    assert [p.name for p in folder.iterdir()] == [kept]
    assert not (srv.root / "etc").exists() and not (srv.inbox / ".datasets" / "passwd").exists()
    assert alice("GET", f"/api/dataobject/download/{obj['id']}").headers["Content-Disposition"].endswith(kept)


@pytest.mark.parametrize("name", ["..", "../", "/", "x.part", "x.tmp", "~"])
def test_unusable_file_names_are_refused(srv: HttpSite, name: str) -> None:
    alice = Api(srv, srv.alice)
    ds = alice.dataset()["id"]
    error(alice.upload(ds, name, b"data"), 400, "name")
    nothing_left(srv, ds)


def _zip(entries: dict[str, bytes], *, links: tuple[str, ...] = (), deflate: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            if name in links:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
            zf.writestr(info, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("series")
    phantom.write_dicom(out / "a", phantom.axial_grid(slices=4, size=32))
    phantom.write_dicom(out / "b", phantom.axial_grid(slices=2, size=32))
    return {f"{s}/{p.name}": p.read_bytes() for s in "ab" for p in sorted((out / s).iterdir())}


def test_a_zipped_series_becomes_a_dicom_object(srv: HttpSite, series: dict[str, bytes]) -> None:
    alice = Api(srv, srv.alice)
    ds = alice.dataset()["id"]
    a = {f"scan/{k}": v for k, v in series.items() if k.startswith("a/")}
    a["__MACOSX/._x"] = b"resource fork"
    obj = alice.upload(ds, "ct.zip", _zip(a, deflate=True)).json()
    assert obj["type"] == "DICOM" and obj["series_instance_uid"] and obj["meta_data"] == {"instances": 4}
    [folder] = (srv.inbox / ".datasets" / str(ds)).iterdir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(k.rsplit("/", 1)[1] for k in a if "MACOSX" not in k)
    res = alice("GET", f"/api/dataobject/download/{obj['id']}")
    assert res.headers["Content-Disposition"] == "attachment; filename=ct.zip"
    assert len(zipfile.ZipFile(io.BytesIO(res.content)).namelist()) == 4
    plain = alice.upload(ds, "notes.zip", _zip({"a.txt": b"a"})).json()
    assert plain["type"] == "FILE" and alice(
        "GET", f"/api/dataobject/download/{plain['id']}").content == _zip({"a.txt": b"a"})


@pytest.mark.parametrize(("entries", "links", "status", "text"), [
    ({"../evil.dcm": b"x"}, (), 400, "outside the archive"),
    ({"a/../../evil.dcm": b"x"}, (), 400, "outside the archive"),
    ({"/etc/evil.dcm": b"x"}, (), 400, "outside the archive"),
    ({"C:/evil.dcm": b"x"}, (), 400, "outside the archive"),
    ({"link.dcm": b"/etc/passwd"}, ("link.dcm",), 400, "symbolic link"),
    ({f"f{i}.dcm": b"x" for i in range(61)}, (), 413, "the limit is 60"),
    ({"bomb.bin": b"\0" * (17 * 10**6)}, (), 413, "the limit is 16 MB"),
])
def test_unsafe_zips_are_refused_and_leave_nothing(srv: HttpSite, entries: dict[str, bytes], links: tuple[str, ...],
                                                   status: int, text: str) -> None:
    alice = Api(srv, srv.alice)
    ds = alice.dataset()["id"]
    body = _zip(entries, links=links, deflate=True)
    assert len(body) < LIMIT_MB * 10**6  # a bomb is small until unpacked
    error(alice.upload(ds, "series.zip", body), status, text)
    nothing_left(srv, ds)
    assert not (srv.root / "evil.dcm").exists() and not (srv.inbox / ".datasets" / "evil.dcm").exists()


def test_zips_that_are_not_one_series_are_refused(srv: HttpSite, series: dict[str, bytes]) -> None:
    alice = Api(srv, srv.alice)
    ds = alice.dataset()["id"]
    error(alice.upload(ds, "two.zip", _zip(series)), 400, "2 DICOM series")
    mixed = {**{k: v for k, v in series.items() if k.startswith("a/")}, "readme.txt": b"hi"}
    error(alice.upload(ds, "mixed.zip", _zip(mixed)), 400, "mixes a DICOM series with other files")
    broken = {"x.dcm": b"\0" * 128 + b"DICM" + b"\x02\x00"}
    error(alice.upload(ds, "broken.zip", _zip(broken)), 400, "x.dcm: DICOM file")
    error(alice.upload(ds, "not.zip", b"PK but not really"), 400, "not a readable zip")
    error(alice.upload(ds, "x.txt", b"text", type="DICOM"), 400, "must be a DICOM file or a zip")
    nothing_left(srv, ds)


def test_an_upload_over_the_limit_is_refused_with_413(srv: HttpSite) -> None:
    alice = Api(srv, srv.alice)
    ds = alice.dataset()["id"]
    # Refused from its Content-Length, before a byte is read; then one just over, refused while streaming.
    error(alice.upload(ds, "big.bin", b"\1" * (LIMIT_MB + 2) * 10**6), 413, f"the upload limit is {LIMIT_MB} MB")
    error(alice.upload(ds, "big.bin", b"\1" * (LIMIT_MB * 10**6 + 1)), 413, f"over the upload limit of {LIMIT_MB} MB")

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused while streaming, at the limit
        yield b'--b\r\nContent-Disposition: form-data; name="dataset"\r\n\r\n' + str(ds).encode() + b"\r\n"
        yield b'--b\r\nContent-Disposition: form-data; name="file_data"; filename="big.bin"\r\n\r\n'
        for _ in range(LIMIT_MB + 1):
            yield b"\1" * 10**6
        yield b"\r\n--b--\r\n"

    res = alice("POST", "/api/dataobject", data=chunked(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    error(res, 413, f"over the upload limit of {LIMIT_MB} MB")
    error(alice("POST", "/api/dataset", data={"timeout": "1" * (2 << 20)}), 413, "limited to")
    nothing_left(srv, ds)
    assert alice.ok("GET", "/api/algorithm")  # the server still answers


def test_a_connection_dropped_mid_upload_leaves_no_object_and_no_job(srv: HttpSite) -> None:
    alice = Api(srv, srv.alice)
    ds = alice.dataset()["id"]
    uploads = srv.inbox / ".datasets" / ".uploads"
    head = (b'--b\r\nContent-Disposition: form-data; name="dataset"\r\n\r\n' + str(ds).encode() + b"\r\n"
            b'--b\r\nContent-Disposition: form-data; name="file_data"; filename="ct.nii.gz"\r\n\r\n')
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /api/dataobject HTTP/1.1\r\nHost: x\r\nAPI_KEY: {srv.alice}\r\n"
                     "Content-Type: multipart/form-data; boundary=b\r\n"
                     f"Content-Length: {len(head) + 3 * 10**6}\r\n\r\n".encode() + head + b"\2" * 2 * 10**6)
        # The server is writing the file (1 MiB at a time): wait until its private upload file has some.
        wait_for(lambda: any(p.stat().st_size > 0 for p in uploads.rglob("upload.bin")), 10,
                 what="the upload to reach the disk")
    nothing_left(srv, ds)
    error(alice("POST", "/api/trigger", data={"dataset": ds, "algorithm": "noop"}), 400, "has no data objects")
    assert not any(read_job(p).get("dataset") == str(ds) for p in srv.outbox.iterdir() if (p / "job.yaml").exists())
    assert "upload abandoned, nothing kept" in srv.service_log()


def test_a_dataset_expires_after_its_timeout(srv: HttpSite) -> None:
    alice = Api(srv, srv.alice)
    keep = alice.dataset()["id"]
    ds = alice.ok("POST", "/api/dataset", data={"timeout": 0.0003})["id"]  # about a second
    obj = alice.upload(ds, "in.txt", b"x").json()["id"]
    folder = srv.inbox / ".datasets" / str(ds)
    assert folder.is_dir()
    wait_for(lambda: alice("GET", f"/api/dataset/{ds}").status_code == 404, 15, what="the dataset to expire")
    wait_for(lambda: not folder.exists(), 5)
    error(alice("GET", f"/api/dataobject/{obj}"), 404, "not found")
    assert alice("GET", f"/api/dataset/{keep}").status_code == 200


def test_a_taken_port_closes_only_the_http_door(srv: HttpSite, tmp_path: Path) -> None:
    # A second service on the same inbox and port (as with one config.yaml on one machine): its worker runs.
    port = int(srv.url.rsplit(":", 1)[1])
    (tmp_path / "other").mkdir()
    other = http_site(tmp_path / "other", http={"port": port})
    other.start()
    try:
        assert re.search(rf"ERROR .*http: cannot listen on 127\.0\.0\.1:{port} .*the HTTP door stays closed",
                         other.service_log())
        (other.inbox / "in.txt").write_text("x")
        assert read_job(other.done(1)[0])["status"] == "done"
    finally:
        other.close()
    assert requests.get(srv.url + "/api/health", timeout=10).status_code == 200
