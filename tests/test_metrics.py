"""``GET /metrics`` on a real service (issue 11): who may read it, and that its figures move with real work."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from _http import HttpSite, http_site
from _peers import DCMTK_ENV, storescu
from conftest import wait_for
from prometheus_client.parser import text_string_to_metric_families

from pipeline import phantom
from pipeline.config import Config
from pipeline.errors import ConfigError


def _dead_port() -> int:
    """A port nothing listens on: the destination a send to which keeps failing."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpSite]:
    site = http_site(tmp_path_factory.mktemp("metrics"), metrics={"allowed_hosts": ["10.99.0.0/16"]}, dicom={
        "enabled": True, "host": "127.0.0.1", "port": 0, "series_timeout": 1.0, "complete_on_release": True,
        "send_retry_seconds": 1.0, "send_early": False,
        "destinations": {"DOWN": {"host": "127.0.0.1", "port": _dead_port(), "ae_title": "DOWN"}},
        "routes": [{"algorithm": "echo", "destinations": ["DOWN"]}]})
    site.config["algorithms"].append({"name": "echo", "function": "testalgos:echo_series"})
    site.write_config()
    site.alice = site.key("alice")
    site.bob = site.cli("manage", "key", "--add", "ops", "--site").stdout.strip()  # the operator
    site.start_http()
    yield site
    site.close()


def scrape(site: HttpSite, key: str | None) -> requests.Response:
    return requests.get(site.url + "/metrics", headers={"API_KEY": key} if key else {}, timeout=30)


def figures(site: HttpSite) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape with the operator's key, by name and labels."""
    res = scrape(site, site.bob)
    assert res.status_code == 200, res.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(res.text) for s in family.samples}


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_metrics_need_a_site_key_or_an_allowed_address(srv: HttpSite) -> None:
    assert scrape(srv, None).status_code == 401
    assert scrape(srv, "not-a-key").status_code == 401
    plain = scrape(srv, srv.alice)
    assert plain.status_code == 403 and "site key" in plain.json()["error"]
    res = scrape(srv, srv.bob)
    assert res.status_code == 200 and res.headers["Content-Type"].startswith("text/plain; version=")
    # A forwarded address is anyone's to write: only the connection's own counts for metrics.allowed_hosts.
    forged = requests.get(srv.url + "/metrics", headers={"X-Forwarded-For": "10.99.1.1"}, timeout=30)
    assert forged.status_code == 401


def test_the_figures_move_with_a_dicom_job_and_its_send(srv: HttpSite, tmp_path: Path) -> None:
    before = figures(srv)
    assert value(before, "postbox_inbox_free_bytes") > 0 and value(before, "postbox_inbox_size_bytes") > 0
    assert ("postbox_sends", frozenset({("destination", "DOWN"), ("state", "failed")})) in before  # at 0
    phantom.write_dicom(tmp_path / "ct", phantom.axial_grid(slices=6, size=32))
    storescu(srv.port, tmp_path / "ct")
    after = wait_for(lambda: (lambda f: f if value(f, "postbox_jobs", state="done", source="dicom")
                              > value(before, "postbox_jobs", state="done", source="dicom") else None)(figures(srv)),
                     30, what="a done DICOM job in the metrics")
    assert value(after, "postbox_job_run_seconds_count", algorithm="echo") \
        == value(before, "postbox_job_run_seconds_count", algorithm="echo") + 1
    assert value(after, "postbox_job_run_seconds_sum", algorithm="echo") > 0
    assert value(after, "postbox_dicom_associations_total", outcome="accepted") \
        >= value(before, "postbox_dicom_associations_total", outcome="accepted") + 1
    assert value(after, "postbox_dicom_instances_received_total") \
        == value(before, "postbox_dicom_instances_received_total") + 6
    assert value(after, "postbox_inbox_jobs") == 0
    # Its results cannot reach DOWN: the send is retried for send_retry_seconds, then given up.
    wait_for(lambda: value(figures(srv), "postbox_sends", destination="DOWN", state="failed")
             == value(before, "postbox_sends", destination="DOWN", state="failed") + 1, 30,
             what="the failed send in the metrics")


def test_http_requests_are_counted_by_route_rule_not_path(srv: HttpSite) -> None:
    headers = {"API_KEY": srv.alice}
    made = requests.post(srv.url + "/api/dataset", headers=headers, timeout=30).json()
    for dataset_id in (made["id"], made["id"], 987654):
        requests.get(f"{srv.url}/api/dataset/{dataset_id}", headers=headers, timeout=30)
    requests.get(srv.url + "/no/such/route/123", timeout=30)
    found = figures(srv)
    rule = "/api/dataset/<dataset_id>"
    assert value(found, "postbox_http_requests_total", method="GET", route=rule, status="200") >= 2
    assert value(found, "postbox_http_requests_total", method="GET", route=rule, status="404") >= 1
    assert value(found, "postbox_http_requests_total", method="GET", route="(unmatched)", status="404") >= 1
    assert value(found, "postbox_http_requests_total", method="GET", route="/metrics", status="200") >= 1
    routes = {dict(labels).get("route", "") for name, labels in found if name == "postbox_http_requests_total"}
    assert not any(str(made["id"]) in r or "987654" in r or "123" in r for r in routes), routes


def test_an_allowed_address_reads_the_metrics_without_a_key(tmp_path: Path) -> None:
    site = http_site(tmp_path, metrics={"allowed_hosts": ["127.0.0.0/8"]},
                     dicom={"enabled": True, "host": "127.0.0.1", "port": 0, "allowed_ae_titles": ["PACS"]})
    try:
        site.start_http()
        # A calling AE not on dicom.allowed_ae_titles: the association is rejected, and counted so.
        subprocess.run(["/usr/bin/echoscu", "-aet", "INTRUDER", "-aec", "POSTBOX", "127.0.0.1", str(site.port)],
                       capture_output=True, env=DCMTK_ENV, timeout=60)
        res = scrape(site, None)
        assert res.status_code == 200
        rejected = [s.value for family in text_string_to_metric_families(res.text) for s in family.samples
                    if s.name == "postbox_dicom_associations_total" and s.labels == {"outcome": "rejected"}]
        assert rejected == [1.0]
        names = {family.name for family in text_string_to_metric_families(res.text)}
        assert {"postbox_jobs", "postbox_inbox_jobs", "postbox_inbox_free_bytes", "postbox_sends",
                "postbox_job_run_seconds", "postbox_http_requests", "postbox_dicom_associations",
                "postbox_dicom_instances_received"} <= names, names
        # The allowed address spares the key, nothing else: any other route still wants one.
        assert requests.get(site.url + "/api/datasets", timeout=30).status_code == 401
    finally:
        site.close()


@pytest.mark.parametrize("entry", ["example.org", "10.0.0.300", "10.0.0.0/33"])
def test_metrics_allowed_hosts_takes_addresses_and_cidr_blocks_only(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.allowed_hosts\[1\].*address or a CIDR block"):
        Config.from_dict({"metrics": {"allowed_hosts": ["::1", entry]}}, base_dir=tmp_path, check_folders=False)
