"""A status request that waits for its job (issue 10), on a real service: it ends as soon as the job does,
``?wait=0`` answers at once, at most ``http.max_waiters`` wait, and waiting never starves other requests.

One service serves the whole module, with a short ``http.status_wait_ms`` (2 s); a job of the ``slow`` test
algorithm that runs for a minute gives the tests that need one a job that stays RUNNING.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from _http import HttpSite, http_site
from conftest import read_job, wait_for

from facade import runs
from facade.client import Client
from facade.records import Records
from facade.runs import RECHECK_SECONDS, Runs
from pipeline import jobs
from pipeline.config import Config
from pipeline.index import ApiKey, Index

WAIT_S = 2.0  # http.status_wait_ms of the module's service
MAX_WAITERS = 8  # http.max_waiters, the default

# An algorithm that fails after a while: the worker tells the HTTP door only of jobs done, so a waiting status
# request sees a failure by reading the job again (every RECHECK_SECONDS).
LATE_ALGOS = """
import time

def late_failure(data_objects, working_dir, settings):
    time.sleep(settings["seconds"])  # not a wait: the model's own work before it fails
    raise ValueError("the model gave up")
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpSite]:
    root = tmp_path_factory.mktemp("runs")
    (root / "latealgos.py").write_text(LATE_ALGOS)
    # 20 clients and the health checks come from one address: more connections than the default cap.
    site = http_site(root, worker={"processes": 3},
                     http={"status_wait_ms": int(WAIT_S * 1000), "max_connections_per_address": 32})
    site.config["algorithms"].append({"name": "late-failure", "function": "latealgos:late_failure",
                                      "default_settings": {"seconds": 0.5}})
    site.write_config()
    site.alice = site.key("alice")
    site.start_http()
    yield site
    site.stop(site.procs[0])  # SIGTERM: the running minute-long job is given back and its child stopped
    site.close()


def call(srv: HttpSite, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, srv.url + path, headers={"API_KEY": srv.alice}, timeout=30, **kwargs)


def ok(srv: HttpSite, method: str, path: str, **kwargs: Any) -> Any:
    res = call(srv, method, path, **kwargs)
    assert res.status_code == 200, res.text
    return res.json()


def trigger(srv: HttpSite, algorithm: str, **settings: Any) -> str:
    """A new dataset with one input, run with ``algorithm``: the status URL."""
    ds = ok(srv, "POST", "/api/dataset")["id"]
    res = call(srv, "POST", "/api/dataobject", data={"dataset": ds, "type": "FILE", "file_name": "in.txt"},
               files={"file_data": ("in.txt", b"x")})
    assert res.status_code == 200, res.text
    config = {"config": json.dumps(settings)} if settings else {}
    return str(ok(srv, "POST", "/api/trigger", data={"dataset": ds, "algorithm": algorithm, **config})["poll"])


def timed_status(srv: HttpSite, poll: str) -> tuple[float, dict[str, Any]]:
    start = time.monotonic()
    state = ok(srv, "GET", poll)
    return time.monotonic() - start, state


@pytest.fixture(scope="module")
def running(srv: HttpSite) -> str:
    """The status URL of a job that stays RUNNING for the module's tests."""
    poll = trigger(srv, "slow", seconds=60)
    wait_for(lambda: ok(srv, "GET", f"{poll}?wait=0")["state"] == "RUNNING", 30, what="the slow job to run")
    return poll


def test_a_status_request_waits_and_ends_as_soon_as_the_job_does(srv: HttpSite) -> None:
    poll = trigger(srv, "slow", seconds=0.8)
    asked = time.time()
    elapsed, state = timed_status(srv, poll)
    answered = time.time()
    assert state == {"state": "SUCCESS", "current": 1, "total": 1, "status": "Done", "job": poll.rsplit("/", 1)[1]}
    finished = read_job(srv.outbox / state["job"])["timings"]["finished"]
    assert asked < finished  # one request, held while the job ran...
    assert answered - finished < 0.3, f"answered {answered - finished:.3f} s after the job's end"  # ...and no longer
    assert elapsed < WAIT_S


def test_a_failure_ends_the_wait_when_read_again(srv: HttpSite) -> None:
    poll = trigger(srv, "late-failure", seconds=0.5)
    asked = time.time()
    _, state = timed_status(srv, poll)
    answered = time.time()
    assert state["state"] == "FAILURE" and "the model gave up" in state["status"]
    finished = read_job(srv.outbox / state["job"])["timings"]["finished"]
    assert asked < finished and answered - finished < RECHECK_SECONDS + 0.3


def test_wait_0_answers_at_once(srv: HttpSite, running: str) -> None:
    start = time.monotonic()
    state = ok(srv, "GET", f"{running}?wait=0")
    assert time.monotonic() - start < WAIT_S / 4
    assert state == {"state": "RUNNING", "current": 0, "total": 1, "status": "Running Algorithm: slow",
                     "job": running.rsplit("/", 1)[1]}
    start = time.monotonic()
    assert ok(srv, "GET", f"{running}?wait=300")["state"] == "RUNNING"  # a shorter wait of its own
    assert 0.3 <= time.monotonic() - start < WAIT_S / 2
    res = call(srv, "GET", f"{running}?wait=soon")
    assert res.status_code == 400 and "'wait' must be a whole number of milliseconds" in res.json()["error"]


def test_over_max_waiters_a_status_request_answers_at_once(srv: HttpSite, running: str) -> None:
    with ThreadPoolExecutor(MAX_WAITERS + 4) as pool:  # a wait past the maximum is the maximum
        results = list(pool.map(lambda _: timed_status(srv, f"{running}?wait=600000"), range(MAX_WAITERS + 4)))
    assert {s["state"] for _, s in results} == {"RUNNING"}
    times = sorted(t for t, _ in results)
    assert all(t < WAIT_S / 2 for t in times[:4]), times  # over max_waiters: at once
    assert all(WAIT_S * 0.9 <= t < WAIT_S * 2 for t in times[4:]), times  # held for the wait, and no longer


def test_twenty_waiting_clients_do_not_stop_a_health_check(srv: HttpSite, running: str) -> None:
    checks = []
    with ThreadPoolExecutor(20) as pool:
        waiting = [pool.submit(timed_status, srv, running) for _ in range(20)]
        while not all(f.done() for f in waiting):
            start = time.monotonic()
            res = requests.get(srv.url + "/api/health", timeout=1.0)
            checks.append(time.monotonic() - start)
            assert res.status_code == 200 and res.json()["status"] == "ok"
        times = sorted(f.result()[0] for f in waiting)
    assert len(checks) >= 3 and max(checks) < 1.0, checks
    assert sum(t >= WAIT_S * 0.9 for t in times) == MAX_WAITERS, times


def test_our_client_uses_the_wait_and_falls_back_to_polling(srv: HttpSite) -> None:
    port = int(srv.url.rsplit(":", 1)[1])
    with Client("127.0.0.1", port, srv.alice, "slow", progress=False) as client:
        for wait, expected in ((True, [["SUCCESS"]]), (False, [["PENDING", "RUNNING", "SUCCESS"],
                                                                 ["RUNNING", "SUCCESS"]])):
            dataset = client.add_dataset()
            path = Path(srv.root / "in.txt")
            path.write_text("x")
            client.add_data_object(dataset, file_path=path)
            states = [s["state"] for s in client.run_algorithm(dataset, config={"seconds": 0.5}, wait=wait)]
            # Held: one answer, the last. At once (?wait=0): the client polls and sees the run on its way.
            assert states in expected, (wait, states)


def test_the_workers_hook_wakes_a_waiting_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In one process, as the service wires it: with the re-reading put off past the wait, only the hook that
    # the worker calls once the job is in the outbox can end the wait in time.
    monkeypatch.setattr(runs, "RECHECK_SECONDS", 60.0)
    cfg = Config.from_dict({}, base_dir=tmp_path)
    index = Index(cfg.database)
    store = Runs(cfg, index, Records(cfg, index))
    key = ApiKey(id=1, name="alice", created="2000-01-01T00:00:00+00:00")
    (tmp_path / "in.txt").write_text("x")
    manifest = jobs.submit(cfg.inbox, [tmp_path / "in.txt"], algorithm="noop", source="http", owner=key.tag)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(store.status, key, manifest.id, wait=30.0)
        wait_for(lambda: store.waiting == 1, 10, what="the status request to wait")
        claim = jobs.claim(cfg.inbox, cfg.outbox, manifest.id)
        assert claim is not None
        jobs.start_attempt(claim)
        jobs.finish(claim, cfg.outbox)
        assert store.waiting == 1  # the job is in the outbox, and the request still waits: nothing told it
        store.job_finished(claim.manifest)
        assert answer.result(timeout=5)["state"] == "SUCCESS"
        assert store.waiting == 0
        # A stopping door (HttpServer.stop) ends the waits, and answers at once from then on.
        pending = jobs.submit(cfg.inbox, [tmp_path / "in.txt"], algorithm="noop", source="http", owner=key.tag)
        answer = pool.submit(store.status, key, pending.id, wait=30.0)
        wait_for(lambda: store.waiting == 1, 10, what="the status request to wait")
        store.close()
        assert answer.result(timeout=5)["state"] == "PENDING"
    assert store.status(key, pending.id, wait=30.0)["state"] == "PENDING" and store.waiting == 0
