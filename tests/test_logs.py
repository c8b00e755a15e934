"""The service log cannot be forged: control characters in logged values are escaped (issue 9)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import requests
from _http import HttpSite, http_site
from conftest import Site, wait_for

from pipeline.logs import EscapingFormatter, JsonFormatter, escape


def test_escape_writes_every_control_character_as_an_escape() -> None:
    assert escape("a\nb\rc\td\x1be\x7ff\x85g\u2028h") == "a\\nb\\rc\\td\\x1be\\x7ff\\x85g\\u2028h"
    assert escape("plain 1.2.840.10008 ÄÖ") == "plain 1.2.840.10008 ÄÖ"


def test_a_logged_value_stays_on_its_line_and_a_traceback_keeps_its_lines() -> None:
    formatter = EscapingFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "uid %s", ("1.2\nINFO forged",), None)
    assert formatter.format(record) == "INFO uid 1.2\\nINFO forged"
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("a\nb",), sys.exc_info())
    lines = formatter.format(record).splitlines()
    assert lines[0] == "ERROR failed a\\nb" and lines[1].startswith("Traceback") and len(lines) > 2


def test_a_newline_in_a_url_does_not_forge_a_line_of_the_service_log(tmp_path) -> None:
    site: HttpSite = http_site(tmp_path)
    try:
        url = site.start_http()
        forged = "2026-12-01 00:00:00,000 INFO    pipeline.worker: job forged"
        res = requests.get(f"{url}/api/dataset/1%0A{forged.replace(' ', '%20')}", timeout=10)
        assert res.status_code == 401
        wait_for(lambda: "refused" in site.service_log(), 10, what="the refusal in the log")
        lines = site.service_log().splitlines()
        assert not any(line.startswith(forged) for line in lines)
        assert any("/api/dataset/1\\n2026-12-01" in line for line in lines)
    finally:
        site.close()


# --- issue 11: --log-json and log_format: json, one JSON object per line for a log collector -------------------


def test_a_json_line_holds_the_fields_and_stays_one_line_whatever_the_values() -> None:
    formatter = JsonFormatter()
    forged = "1.2\nINFO forged\u2028x\x85"
    record = logging.LogRecord("pipeline.node", logging.WARNING, __file__, 1, "uid %s", (forged,), None)
    line = formatter.format(record)
    assert len(line.splitlines()) == 1 and "\n" not in line and "\u2028" not in line
    entry = json.loads(line)
    assert {k: entry[k] for k in ("level", "logger", "message")} == {
        "level": "WARNING", "logger": "pipeline.node", "message": "uid 1.2\nINFO forged\u2028x\x85"}
    assert entry["time"].endswith("+00:00") and "exception" not in entry
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("a",), sys.exc_info())
    line = formatter.format(record)
    assert len(line.splitlines()) == 1
    entry = json.loads(line)
    assert entry["message"] == "failed a" and entry["exception"].startswith("Traceback")
    assert entry["exception"].rstrip().endswith("ValueError: boom")


def json_lines(text: str) -> list[dict]:
    """Every line of a service log as JSON (json.loads raises on a line that is not one object)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_and_stop(site: Site, proc: subprocess.Popen) -> list[dict]:
    wait_for(lambda: site.ready_file(proc).is_file() or proc.poll() is not None, 30, what="the service ready")
    assert site.stop(proc) == 0, site.service_log()
    return json_lines(site.service_log())


def test_log_format_json_in_the_config_makes_every_service_line_json(site: Site) -> None:
    site.write_config(log_format="json")
    entries = run_and_stop(site, site.launch())
    assert entries and all(set(e) >= {"time", "level", "logger", "message"} for e in entries)
    assert any(e["logger"] == "pipeline.service" and e["message"].startswith("service: ready") for e in entries)


def test_log_json_flag_makes_every_service_line_json(site: Site) -> None:
    with open(site.root / "service-0.log", "wb") as out:
        proc = subprocess.Popen([*site.cli_argv(), "--log-json", "manage", "run"], stdout=out,
                                stderr=subprocess.STDOUT, env=site.env)
    site.procs.append(proc)
    entries = run_and_stop(site, proc)
    assert any(e["logger"] == "pipeline.service" and e["message"] == "service: stopped" for e in entries)


def test_log_format_takes_text_or_json_only(site: Site) -> None:
    site.write_config(log_format="xml")
    proc = site.cli("status", check=False)
    assert proc.returncode == 2 and "log_format" in proc.stderr
