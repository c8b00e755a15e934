"""The web dashboard (issue 11, section 1): sign-in, sessions, CSRF, who sees which job, and the pages in a
real browser (headless Chromium driven by Selenium, with Debian's chromedriver: never a driver download).

One service serves the module: a DICOM phantom dropped into its inbox (a keyless job only a site key sees,
run by body-lungs with RTSTRUCT and SEG, so it gets a preview) and a job alice starts over HTTP.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from _http import BODY_LUNGS, HttpSite, http_site
from conftest import read_job, wait_for

from facade.app import make_app
from facade.dashboard import COOKIE, LOGIN_COOKIE, Sessions
from pipeline import phantom
from pipeline.audit import AuditLog
from pipeline.config import Config
from pipeline.index import Index
from pipeline.tls import make_certificates

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class DashboardSite(HttpSite):
    """The module's service, with a site key and the two jobs the tests look at."""

    operator = ""  # a site key
    dicom_job = ""  # the dropped phantom's job (keyless: only a site key sees it)
    alice_job = ""  # alice's job, started over the API


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardSite]:
    root = tmp_path_factory.mktemp("dashboard")
    site = DashboardSite(root)
    try:
        site.config["algorithms"].append({**BODY_LUNGS, "outputs": ["rtstruct", "seg"]})
        site.write_config(default_algorithm="body-lungs")
        site.alice, site.bob = site.key("alice"), site.key("bob")
        site.operator = site.cli("manage", "key", "--add", "operator", "--site").stdout.strip()
        site.start_http()
        # A keyless door's job: a DICOM phantom dropped into the inbox, with a preview once finished.
        phantom.write_dicom(root / "ct", phantom.axial_grid(slices=24, size=96))
        shutil.copytree(root / "ct", site.inbox / "ct")
        [job_dir] = site.done(1, timeout=90)
        wait_for(lambda: (job_dir / "job.yaml").is_file() and read_job(job_dir).get("preview"), 60,
                 what="the phantom job's preview")
        assert read_job(job_dir)["status"] == "done", site.service_log()
        site.dicom_job = job_dir.name
        # Alice's own job, started over the API.
        headers = {"API_KEY": site.alice}
        dataset = requests.post(site.url + "/api/dataset", headers=headers, timeout=30).json()["id"]
        requests.post(site.url + "/api/dataobject", headers=headers, timeout=30,
                      data={"dataset": dataset, "type": "FILE", "file_name": "note.txt"},
                      files={"file_data": ("note.txt", b"<script>alert(1)</script>")}).raise_for_status()
        poll = requests.post(site.url + "/api/trigger", headers=headers, timeout=30,
                             data={"dataset": dataset, "algorithm": "noop"}).json()["poll"]
        site.alice_job = poll.rsplit("/", 1)[1]
        wait_for(lambda: (site.outbox / site.alice_job / "job.yaml").is_file(), 60,
                 what="alice's job")
        yield site
    finally:
        site.close()


def sign_in(url: str, key: str) -> tuple[requests.Session, requests.Response]:
    """Sign in as a browser would: fetch the form (its CSRF token and pre-session cookie), post it."""
    web = requests.Session()
    form = web.get(url + "/", timeout=30)
    assert form.status_code == 200 and 'action="/dashboard/login"' in form.text
    [token] = _CSRF.findall(form.text)
    answer = web.post(url + "/dashboard/login", data={"key": key, "csrf": token}, allow_redirects=False, timeout=30)
    return web, answer


# --- over HTTP, no browser ---------------------------------------------------------------------------------


def test_a_session_cookie_is_httponly_strict_and_expiring(srv: DashboardSite) -> None:
    web, answer = sign_in(srv.url, srv.alice)
    assert answer.status_code == 303 and answer.headers["Location"].endswith("/")
    [cookie] = [c for c in answer.headers["Set-Cookie"].split(", ") if c.startswith(COOKIE + "=")] or \
        [answer.headers["Set-Cookie"]]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "Max-Age=28800" in cookie and "Secure" not in cookie  # plain HTTP here; see the TLS test below
    page = web.get(srv.url + "/", timeout=30)
    assert page.status_code == 200 and "alice" in page.text and srv.alice_job in page.text
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert srv.dicom_job not in page.text  # a keyless door's job: site keys only


def test_a_wrong_key_or_a_missing_csrf_token_signs_nobody_in(srv: DashboardSite) -> None:
    web, answer = sign_in(srv.url, "pbx_not-a-key")
    assert answer.status_code == 401 and "not valid" in answer.text and COOKIE not in web.cookies
    # No token, or a token for another pre-session cookie (a cross-site form): refused even with a good key.
    web = requests.Session()
    web.get(srv.url + "/", timeout=30)
    refused = web.post(srv.url + "/dashboard/login", data={"key": srv.alice}, allow_redirects=False, timeout=30)
    assert refused.status_code == 403 and COOKIE not in web.cookies
    other = requests.Session()
    [token] = _CSRF.findall(other.get(srv.url + "/", timeout=30).text)
    refused = web.post(srv.url + "/dashboard/login", data={"key": srv.alice, "csrf": token}, allow_redirects=False,
                       timeout=30)
    assert refused.status_code == 403 and COOKIE not in web.cookies


def test_signing_out_needs_the_sessions_csrf_token(srv: DashboardSite) -> None:
    web, _ = sign_in(srv.url, srv.bob)
    refused = web.post(srv.url + "/dashboard/logout", data={"csrf": "guess"}, allow_redirects=False, timeout=30)
    assert refused.status_code == 403
    page = web.get(srv.url + "/", timeout=30)
    assert 'id="logout"' in page.text  # still signed in
    [token] = _CSRF.findall(page.text)
    out = web.post(srv.url + "/dashboard/logout", data={"csrf": token}, allow_redirects=False, timeout=30)
    assert out.status_code == 303
    assert 'action="/dashboard/login"' in web.get(srv.url + "/", timeout=30).text


def test_a_plain_key_cannot_open_another_keys_job(srv: DashboardSite) -> None:
    bob, _ = sign_in(srv.url, srv.bob)
    alice, _ = sign_in(srv.url, srv.alice)
    job = srv.alice_job
    assert alice.get(f"{srv.url}/dashboard/job/{job}", timeout=30).status_code == 200
    for path in (f"/dashboard/job/{job}", f"/dashboard/job/{job}/output/0", f"/dashboard/job/{job}/preview.png",
                 f"/dashboard/job/{srv.dicom_job}", f"/dashboard/job/{srv.dicom_job}/preview.png"):
        assert bob.get(srv.url + path, timeout=30).status_code == 404, path
    assert alice.get(f"{srv.url}/dashboard/job/{srv.dicom_job}", timeout=30).status_code == 404
    assert job not in bob.get(srv.url + "/", timeout=30).text
    # Without a session: the sign-in form, never the job.
    anonymous = requests.get(f"{srv.url}/dashboard/job/{job}", timeout=30)
    assert anonymous.status_code == 401 and job not in anonymous.text


def test_a_job_page_escapes_what_it_shows_and_names_no_server_path(srv: DashboardSite) -> None:
    alice, _ = sign_in(srv.url, srv.alice)
    job = srv.alice_job
    page = alice.get(f"{srv.url}/dashboard/job/{job}", timeout=30).text
    assert "noop ran" in page  # job.log
    assert str(srv.root) not in page and str(srv.root.resolve()) not in page
    assert "<script>alert" not in page
    download = alice.get(f"{srv.url}/dashboard/job/{job}/output/0", timeout=30)
    assert download.status_code == 200 and json.loads(download.content)["settings"] is not None
    audit = srv.cli("audit", "--job", job, "--json").stdout
    actions = [(e["action"], e["who"]) for e in map(json.loads, audit.splitlines())]
    assert ("dashboard-view", "alice") in actions and ("download", "alice") in actions


def test_the_algorithms_and_the_node_pages(srv: DashboardSite) -> None:
    web, _ = sign_in(srv.url, srv.operator)
    algorithms = web.get(srv.url + "/dashboard/algorithms", timeout=30).text
    assert "body-lungs" in algorithms and "noop" in algorithms and "&quot;label&quot;" in algorithms
    # A DICOM exchange in the audit log shows among the recent associations, escaped, to a site key only.
    AuditLog.beside(srv.root / "postbox.db.json").record("c-store-received", who="<b>CT1</b>",
                                                         address="10.0.0.9", job=srv.dicom_job, count=24)
    node = web.get(srv.url + "/dashboard/node", timeout=30).text
    assert "AE title" in node and "POSTBOX" in node and "Nothing waiting." in node
    assert "&lt;b&gt;CT1&lt;/b&gt;" in node and "<b>CT1" not in node and "10.0.0.9" in node
    alice, _ = sign_in(srv.url, srv.alice)
    assert "CT1" not in alice.get(srv.url + "/dashboard/node", timeout=30).text


# --- sessions in the app itself: expiry and the Secure flag under TLS ------------------------------------------


def _wsgi(app: Any, method: str, path: str, *, cookies: dict[str, str] | None = None,
          form: dict[str, str] | None = None, scheme: str = "http") -> tuple[int, list[tuple[str, str]], str]:
    body = "&".join(f"{k}={requests.utils.quote(v)}" for k, v in (form or {}).items()).encode()
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "", "wsgi.input": io.BytesIO(body),
               "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/x-www-form-urlencoded",
               "HTTP_COOKIE": "; ".join(f"{k}={v}" for k, v in (cookies or {}).items()),
               "wsgi.url_scheme": scheme, "SERVER_NAME": "localhost", "SERVER_PORT": "8000",
               "REMOTE_ADDR": "127.0.0.1"}
    answer: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        answer.update(status=int(status.split()[0]), headers=headers)

    text = b"".join(app(environ, start_response)).decode()
    return answer["status"], answer["headers"], text


def _set_cookies(headers: list[tuple[str, str]]) -> dict[str, str]:
    found = {}
    for name, value in headers:
        if name == "Set-Cookie":
            found[value.split("=", 1)[0]] = value
    return found


def test_a_session_expires_and_is_secure_under_tls(tmp_path: Path) -> None:
    config = Config.from_dict({"inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox"),
                               "database": str(tmp_path / "db.json")}, base_dir=tmp_path)
    config.check_folders()
    index = Index(config.database)
    key = index.add_key("carol")
    app = make_app(config, index)
    status, headers, text = _wsgi(app, "GET", "/", scheme="https")
    pre = _set_cookies(headers)[LOGIN_COOKIE]
    assert "Secure" in pre and "HttpOnly" in pre
    [token] = _CSRF.findall(text)
    status, headers, _ = _wsgi(app, "POST", "/dashboard/login", scheme="https", form={"key": key, "csrf": token},
                               cookies={LOGIN_COOKIE: pre.split(";")[0].split("=", 1)[1]})
    cookie = _set_cookies(headers)[COOKIE]
    assert status == 303 and "Secure" in cookie and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    session = {COOKIE: cookie.split(";")[0].split("=", 1)[1]}
    status, _, text = _wsgi(app, "GET", "/", cookies=session, scheme="https")
    assert status == 200 and 'id="logout"' in text
    sessions: Sessions = app.config["postbox.sessions"]
    real = sessions.clock
    sessions.clock = lambda: real() + sessions.lifetime + 1  # eight hours on
    status, _, text = _wsgi(app, "GET", "/", cookies=session, scheme="https")
    assert status == 200 and 'action="/dashboard/login"' in text and 'id="logout"' not in text
    assert len(sessions) == 0
    # A removed key's session ends at once, whatever its cookie's age.
    sessions.clock = real
    _, headers, text = _wsgi(app, "GET", "/")
    [token] = _CSRF.findall(text)
    pre_value = _set_cookies(headers)[LOGIN_COOKIE].split(";")[0].split("=", 1)[1]
    _, headers, _ = _wsgi(app, "POST", "/dashboard/login", form={"key": key, "csrf": token},
                          cookies={LOGIN_COOKIE: pre_value})
    session = {COOKIE: _set_cookies(headers)[COOKIE].split(";")[0].split("=", 1)[1]}
    assert 'id="logout"' in _wsgi(app, "GET", "/", cookies=session)[2]
    index.remove_key("carol")
    assert _wsgi(app, "GET", "/dashboard/node", cookies=session)[0] == 401


def test_over_https_the_cookies_are_secure(tmp_path: Path) -> None:
    """A real service with ``http.tls``: cheroot says the scheme is https, so both cookies carry Secure."""
    (tmp_path / "certs").mkdir()
    (tmp_path / "site").mkdir()
    make_certificates(tmp_path / "certs", ["127.0.0.1"])
    site = http_site(tmp_path / "site", http={"tls": {"cert": str(tmp_path / "certs" / "server.pem"),
                                                      "key": str(tmp_path / "certs" / "server-key.pem")}})
    try:
        key = site.key("dora")
        url = site.start_http().replace("http://", "https://")
        web, ca = requests.Session(), str(tmp_path / "certs" / "ca.pem")  # per request: REQUESTS_CA_BUNDLE wins
        form = web.get(url + "/", verify=ca, timeout=30)
        assert "Secure" in form.headers["Set-Cookie"]
        [token] = _CSRF.findall(form.text)
        answer = web.post(url + "/dashboard/login", data={"key": key, "csrf": token}, allow_redirects=False,
                          verify=ca, timeout=30)
        assert answer.status_code == 303
        cookie = answer.headers["Set-Cookie"]
        assert f"{COOKIE}=" in cookie and "Secure" in cookie and "HttpOnly" in cookie
        assert 'id="logout"' in web.get(url + "/", verify=ca, timeout=30).text
    finally:
        site.close()


# --- in a real browser ------------------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    # Never skipped: .ci/install installs both, and a skipped browser test would prove nothing.
    assert CHROMIUM.is_file() and CHROMEDRIVER.is_file(), \
        "needs /usr/bin/chromium and /usr/bin/chromedriver (bash .ci/install installs them)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1800", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    # Debian's driver, by path: Selenium's driver manager would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_in_a_browser_an_operator_signs_in_opens_a_job_sees_its_preview_and_downloads(
        srv: DashboardSite, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    # A wrong key: the form again, with the reason, and no session.
    browser.get(srv.url + "/")
    browser.find_element(By.ID, "key").send_keys("pbx_wrong-key")
    browser.find_element(By.ID, "sign-in").click()
    # The click only starts the form's submission: wait for the answer's page, as for every page below.
    [error] = wait_for(lambda: browser.find_elements(By.ID, "login-error"), 10, what="the sign-in refused")
    assert "not valid" in error.text
    assert browser.get_cookie(COOKIE) is None

    # The operator's site key: the list shows the phantom job, done.
    browser.find_element(By.ID, "key").send_keys(srv.operator)
    browser.find_element(By.ID, "sign-in").click()
    wait_for(lambda: browser.find_elements(By.ID, "jobs"), 10, what="the job list")
    job = srv.dicom_job
    [row] = [r for r in browser.find_elements(By.CSS_SELECTOR, "#jobs tbody tr") if job in r.text]
    assert "done" in row.text and "body-lungs" in row.text
    cookie = browser.get_cookie(COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # Its page: the preview loaded (decoded by the browser), the outputs, the check-back Dice.
    row.find_element(By.CLASS_NAME, "job-link").click()
    preview = wait_for(lambda: browser.find_elements(By.ID, "preview"), 10, what="the preview")[0]
    width = wait_for(lambda: browser.execute_script(
        "const i = arguments[0]; return i.complete && i.naturalWidth;", preview), 10, what="the preview to load")
    assert width > 0
    assert "rtstruct" in browser.find_element(By.ID, "outputs").text
    assert "body" in browser.find_element(By.ID, "checks").text
    shot = tmp_path / "dashboard-job.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
    print(f"dashboard screenshot: {shot}")

    # Download an output with the browser's session: the file as it is in the outbox.
    links = {a.text: a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#outputs a.download")}
    [name] = [n for n in links if n.endswith(".dcm") and "rtstruct" in n]
    res = requests.get(links[name], cookies={COOKIE: cookie["value"]}, timeout=30)
    assert res.status_code == 200 and name in res.headers["Content-Disposition"]
    [output] = [o["path"] for o in read_job(srv.outbox / job)["outputs"] if o["path"].endswith("/" + name)]
    assert res.content == (srv.outbox / job / output).read_bytes()
    audit = [json.loads(line) for line in srv.cli("audit", "--job", job, "--json").stdout.splitlines()]
    assert {"dashboard-view", "download"} <= {e["action"] for e in audit if e["who"] == "operator"}

    # Signing out ends the session.
    browser.find_element(By.ID, "logout").click()
    wait_for(lambda: browser.find_elements(By.ID, "sign-in"), 10, what="the sign-in form")
    assert requests.get(links[name], cookies={COOKIE: cookie["value"]}, timeout=30).status_code == 401
