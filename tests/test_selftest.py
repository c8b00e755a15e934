"""``postbox selftest`` (issue 11, section 6) against a really started service with every door on.

The bundled body-lungs passes at every door; the same masks shifted ~5 mm (tests/algos/testalgos.py
``shifted``) pass the check-back but fail the self-test, which compares with the phantom's own truth. The
self-test's DICOM series is never sent on unless ``--destination`` asks for a configured one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _http import BODY_LUNGS, HttpSite, http_site
from _peers import Destination
from conftest import outbox_jobs, read_job

from pipeline.config import Config, Route
from pipeline.node import SELFTEST_AE, selftest_description, selftest_destinations
from pipeline.tls import make_certificates

SMALL = ("--slices", "40", "--size", "128", "--timeout", "60")


@pytest.fixture
def destination() -> Iterator[Destination]:
    peer = Destination()
    yield peer
    peer.close()


def start(root: Path, destination: Destination, algorithm: str = "body-lungs", **dicom: Any) -> HttpSite:
    """A site with the folder, HTTP and DICOM doors on, whose every DICOM series is routed to TPS."""
    site = http_site(root, worker={"rescan_seconds": 0.2, "settle_seconds": 0.2, "processes": 2},
                     default_algorithm=algorithm)
    for alg in site.config["algorithms"]:
        if alg["name"] == "body-lungs":
            alg["outputs"] = ["rtstruct", "seg"]
    site.config["algorithms"].append({**BODY_LUNGS, "name": "shifted", "function": "testalgos:shifted",
                                      "default_settings": {"mm": 5.0}, "outputs": ["rtstruct", "seg"]})
    site.write_config(dicom={"enabled": True, "host": "127.0.0.1", "port": 0, "complete_on_release": True,
                             "series_timeout": 30, "send_backoff_max": 0.5,
                             "destinations": {"TPS": destination.config()},
                             "routes": [{"algorithm": algorithm, "destinations": ["TPS"]}], **dicom})
    site.start_http()
    return site


def rows(stdout: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in stdout.splitlines()[1:] if line and not line.startswith(" ")}


def test_body_lungs_passes_at_every_door_and_the_selftest_series_goes_nowhere(
        tmp_path: Path, destination: Destination) -> None:
    site = start(tmp_path, destination)
    try:
        proc = site.cli("selftest", *SMALL, check=False, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr + site.service_log()
        table = rows(proc.stdout)
        assert sorted(table) == ["dicom", "folder", "http"], proc.stdout
        for row in table.values():
            body, left, right = map(float, row[2:5])
            assert body >= 0.95 and left >= 0.9 and right >= 0.9, row
            assert row[5:] == ["yes", "-", "ok"], row
        # The route sends every DICOM series to TPS, but not the self-test's: its job has no send at all.
        dicom_job = read_job(site.outbox / table["dicom"][1])
        assert dicom_job["sender"]["calling_ae"] == SELFTEST_AE
        assert dicom_job.get("sends", {}) == {} and not destination.stored
        # The temporary HTTP key is gone.
        assert "selftest" not in site.cli("manage", "key", "--list").stdout
    finally:
        site.close()


def test_masks_shifted_5_mm_pass_the_check_back_but_fail_the_selftest(
        tmp_path: Path, destination: Destination) -> None:
    site = start(tmp_path, destination, algorithm="shifted")
    try:
        proc = site.cli("selftest", *SMALL, check=False, timeout=300)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        table = rows(proc.stdout)
        assert sorted(table) == ["dicom", "folder", "http"], proc.stdout
        assert all(row[-1] == "FAILED" for row in table.values()), proc.stdout
        assert "against the phantom below 0.9" in proc.stdout
        for job_dir in outbox_jobs(site.outbox):
            job = read_job(job_dir)  # each job itself was fine: its RTSTRUCT matches its (shifted) masks
            assert job["status"] == "done" and job["algorithm"] == "shifted", job
    finally:
        site.close()


def test_destination_receives_the_results_when_asked(tmp_path: Path, destination: Destination) -> None:
    site = start(tmp_path, destination)
    try:
        proc = site.cli("selftest", *SMALL, "--destination", "TPS", check=False, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr + site.service_log()
        table = rows(proc.stdout)
        assert table["dicom"][6] == "sent" and table["folder"][6] == "-", proc.stdout
        assert len(destination.stored) == 2, "the RTSTRUCT and the SEG"
    finally:
        site.close()


def test_selftest_over_tls(tmp_path: Path, destination: Destination) -> None:
    certs = tmp_path / "certs"
    make_certificates(certs, ["localhost", "127.0.0.1"])
    (tmp_path / "site").mkdir()
    site = start(tmp_path / "site", destination, tls={
        "cert": str(certs / "server.pem"), "key": str(certs / "server-key.pem"), "ca": str(certs / "ca.pem"),
        "require_client_cert": True})
    try:
        proc = site.cli("selftest", *SMALL, "--tls", check=False, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr + site.service_log()
        assert sorted(rows(proc.stdout)) == ["dicom", "folder", "http"]
    finally:
        site.close()


def test_bad_usage_exits_2(tmp_path: Path, destination: Destination) -> None:
    site = start(tmp_path, destination)
    try:
        for args, words in ((("--destination", "NOPE"), "not a name of dicom.destinations"),
                            (("--tls",), "--tls needs dicom.tls"),
                            (("--tls-cert", "a.pem"), "go together")):
            proc = site.cli("selftest", *args, check=False)
            assert proc.returncode == 2 and words in proc.stderr, (args, proc.stderr)
    finally:
        site.close()
    proc = site.cli("selftest", check=False)
    assert proc.returncode == 2 and "no running service" in proc.stderr, proc.stderr
    assert not outbox_jobs(site.outbox), "a refused self-test submits nothing"


@pytest.mark.parametrize(("calling", "description", "expected"), [
    ("SCANNER", selftest_description(None), ["TPS"]),  # not a self-test: the route's own destinations
    ("SCANNER", selftest_description("OTHER"), ["TPS"]),
    (SELFTEST_AE, selftest_description(None), []),  # a self-test goes nowhere by default
    (SELFTEST_AE, "", []),
    (SELFTEST_AE, selftest_description("OTHER"), ["OTHER"]),  # ... unless it asks for a configured name
    (SELFTEST_AE, selftest_description("NOPE"), []),  # never a name the config does not have
    (SELFTEST_AE, selftest_description("TPS"), ["TPS"]),
])
def test_selftest_destinations(tmp_path: Path, calling: str, description: str, expected: list[str]) -> None:
    peer = {"host": "127.0.0.1", "port": 104, "ae_title": "X"}
    cfg = Config.from_dict({"dicom": {"destinations": {"TPS": peer, "OTHER": peer}}}, base_dir=tmp_path,
                           check_folders=False)
    route = Route(algorithm="body-lungs", destinations=("TPS",))
    assert selftest_destinations(cfg, calling, route, {"SeriesDescription": description}) == expected
