"""TLS (issue 9): test certificates, results sent over TLS to dcmtk's storescp, and warnings for open doors."""

from __future__ import annotations

import io
import socket
import ssl
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
import requests
from _peers import DCMTK_ENV, storescu
from conftest import Site, read_job, wait_for

from pipeline import phantom
from pipeline.config import Config
from pipeline.service import exposure_warnings
from pipeline.tls import CERT_FILES


def test_manage_certs_writes_a_ca_a_server_and_a_client_certificate(site: Site, tmp_path: Path) -> None:
    out = site.cli("manage", "certs", str(tmp_path / "pki"), "--host", "postbox.example", "--host", "10.1.2.3")
    assert sorted(Path(line).name for line in out.stdout.split()) == sorted(CERT_FILES)
    for name in CERT_FILES:
        mode = (tmp_path / "pki" / name).stat().st_mode & 0o777
        assert mode == 0o600 if name.endswith("-key.pem") else mode & 0o077 != 0o077, (name, oct(mode))
    ctx = ssl.create_default_context(cafile=str(tmp_path / "pki" / "ca.pem"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(tmp_path / "pki" / "server.pem"), str(tmp_path / "pki" / "server-key.pem"))
    # The server certificate holds for the names asked for, under the CA written beside it.
    a, b = socket.socketpair()
    with a, b:
        import threading

        t = threading.Thread(target=lambda: server.wrap_socket(b, server_side=True).close())
        t.start()
        with ctx.wrap_socket(a, server_hostname="postbox.example") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        t.join(10)


def storescp_tls(port: int, out: Path, certs: Path) -> subprocess.Popen[bytes]:
    """dcmtk's storescp over TLS, requiring a client certificate from ``certs``' CA."""
    out.mkdir()
    return subprocess.Popen(["/usr/bin/storescp", "+tls", str(certs / "server-key.pem"), str(certs / "server.pem"),
                             "+cf", str(certs / "ca.pem"), "-rc", "-od", str(out), "-aet", "TPS", str(port)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("trusted", [True, False])
def test_results_go_over_tls_to_dcmtk_storescp(site: Site, tmp_path: Path, certs: Path, other_certs: Path,
                                               trusted: bool) -> None:
    port = free_port()
    scp = storescp_tls(port, tmp_path / "received", certs)
    try:
        mine = certs if trusted else other_certs  # a client certificate from another CA is refused
        site.config["algorithms"][0] = {"name": "noop", "function": "testalgos:echo_series"}
        site.write_config(dicom={
            "enabled": True, "host": "127.0.0.1", "port": 0, "series_timeout": 1.0, "complete_on_release": True,
            "send_backoff_max": 0.2, "send_retry_seconds": 2 if not trusted else 60,
            "destinations": {"TPS": {"host": "localhost", "port": port, "ae_title": "TPS",
                                     "tls": {"ca": str(certs / "ca.pem"), "cert": str(mine / "client.pem"),
                                             "key": str(mine / "client-key.pem")}}},
            "routes": [{"algorithm": "noop", "destinations": ["TPS"]}]})
        phantom.write_dicom(tmp_path / "ct", phantom.axial_grid(slices=6, size=32))
        proc = site.start()
        storescu(site.doors(proc)["dicom"]["port"], tmp_path / "ct")
        [job_dir] = site.done(1)
        state = wait_for(lambda: (s := read_job(job_dir)["sends"]["TPS"])["status"] != "pending" and s, 30,
                         what="the send to end")
        if trusted:
            assert state["status"] == "sent"
            assert len(list((tmp_path / "received").iterdir())) == 2
        else:
            assert state["status"] == "failed" and list((tmp_path / "received").iterdir()) == []
    finally:
        scp.kill()
        scp.wait()


def test_a_door_open_to_the_network_without_tls_or_allow_list_is_warned_about(tmp_path: Path, certs: Path) -> None:
    open_ = Config.from_dict({"http": {"host": "0.0.0.0"}, "dicom": {"host": "0.0.0.0"}}, base_dir=tmp_path,
                             check_folders=False)
    warnings = exposure_warnings(open_)
    assert len(warnings) == 3
    assert any("HTTP door listens on 0.0.0.0 without TLS" in w for w in warnings)
    assert any("DICOM door listens on 0.0.0.0 without TLS" in w for w in warnings)
    assert any("for anyone" in w for w in warnings)
    closed = Config.from_dict({"http": {"host": "0.0.0.0", "tls": {"cert": str(certs / "server.pem"),
                                                                   "key": str(certs / "server-key.pem")}},
                               "dicom": {"host": "10.0.0.2", "allowed_ae_titles": ["TPS"],
                                         "tls": {"cert": str(certs / "server.pem"),
                                                 "key": str(certs / "server-key.pem")}}},
                              base_dir=tmp_path, check_folders=False)
    assert exposure_warnings(closed) == []
    loopback = Config.from_dict({}, base_dir=tmp_path, check_folders=False)
    assert [w for w in exposure_warnings(loopback) if "HTTP" in w] == []  # 127.0.0.1 by default


def test_a_tls_file_that_cannot_be_read_stops_the_start_naming_the_key(site: Site) -> None:
    site.write_config(http={"tls": {"cert": "missing.pem", "key": "missing-key.pem"}})
    proc = site.cli("manage", "run", check=False, timeout=30)
    assert proc.returncode == 2 and "http.tls.cert" in proc.stderr and str(site.root) not in proc.stderr


@pytest.mark.parametrize("listed_with_tls", [True, False])
def test_a_location_made_over_http_gets_tls_only_from_the_operators_entry(site: Site, tmp_path: Path, certs: Path,
                                                                          listed_with_tls: bool) -> None:
    # The key names a host and a port, never a file: TLS and the client certificate come from config.yaml.
    port = free_port()
    scp = storescp_tls(port, tmp_path / "received", certs)
    try:
        entry: Any = {"host": "127.0.0.1", "tls": {"ca": str(certs / "ca.pem"), "cert": str(certs / "client.pem"),
                                                   "key": str(certs / "client-key.pem")}}
        site.config["algorithms"][0] = {"name": "noop", "function": "testalgos:echo_series"}
        site.write_config(http={"allowed_locations": [entry if listed_with_tls else "127.0.0.1"]},
                          dicom={"enabled": True, "port": 0, "send_backoff_max": 0.2, "send_retry_seconds": 1})
        key = site.cli("manage", "key", "--add", "alice").stdout.strip()
        proc = site.start()
        url = f"http://127.0.0.1:{site.doors(proc)['http']['port']}"

        def api(method: str, path: str, **kw: Any) -> Any:
            res = requests.request(method, url + path, headers={"API_KEY": key}, timeout=30, **kw)
            assert res.status_code < 300, res.text
            return res.json()

        loc = api("POST", "/api/dicomlocation", data={"name": "tps", "host": "127.0.0.1", "port": port,
                                                      "ae_title": "TPS"})
        ds = api("POST", "/api/dataset", data={"to_dicom_location": loc["id"]})["id"]
        phantom.write_dicom(tmp_path / "ct", phantom.axial_grid(slices=6, size=32))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for f in sorted((tmp_path / "ct").iterdir()):
                zf.write(f, f.name)
        api("POST", "/api/dataobject", data={"dataset": ds, "type": "FILE", "file_name": "ct.zip"},
            files={"file_data": ("ct.zip", buf.getvalue())})
        api("POST", "/api/trigger", data={"dataset": ds, "algorithm": "noop"})
        [job_dir] = site.done(1)
        [name] = read_job(job_dir)["sends"]
        state = wait_for(lambda: (s := read_job(job_dir)["sends"][name])["status"] != "pending" and s
                         or (not listed_with_tls and s.get("attempts", 0) >= 2 and s), 30, what="the send to end")
        if listed_with_tls:
            assert state["status"] == "sent", state
            assert len(list((tmp_path / "received").iterdir())) == 2
        else:  # plain DICOM to a TLS-only peer: nothing arrives
            assert state["status"] != "sent" and list((tmp_path / "received").iterdir()) == []
    finally:
        scp.kill()
        scp.wait()
