"""The service log cannot be forged: control characters in logged values are escaped (issue 9)."""

from __future__ import annotations

import logging
import sys

import requests
from _http import HttpSite, http_site
from conftest import wait_for

from pipeline.logs import EscapingFormatter, escape


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
