"""Benchmark of the job pipeline (not a test): pickup latency, throughput, warm children, the index.

Run it as ``python bench/pipeline.py`` from the repository (``--help`` for the sizes). It prints one
Markdown table with each figure, its target and PASS/MISS, plus a reference measured in the same run so
that the figures can also be read as ratios on a shared, noisy machine:

- worker figures are divided by the time of a bare ``subprocess.run([sys.executable, "-c", "pass"])``
  (the floor of starting a process cold);
- index figures are divided by plain ``json`` work on files of the same size (``json.load`` +
  ``json.dump`` of the shard that an update rewrites; ``json.load`` of all the records for a listing);
  ``postbox status`` is divided by a process that only starts Python and ``json.load``\\ s all the records.

How it measures:

- Every service is a real process, ``postbox --config CFG manage run``, in its own temp folder with a
  no-op and a slow-to-import algorithm next to its config.yaml, the HTTP and DICOM doors off, stopped
  with SIGTERM.
- Pickup latency is ``algorithm_started - committed`` from each finished job's job.yaml (``committed`` is
  taken just before the rename into inbox/, ``algorithm_started`` inside the algorithm's child process).
  The jobs are submitted one at a time at a steady pace, slower than the measured throughput, so the
  figure is latency and not queueing; warm-up jobs run first so the children are warm. With one process,
  jobs that come alone are measured too: 1 s apart, and (from a quiet inbox) each as soon as the previous
  one is in the outbox, which a steady stream hides (see the comment in ``noop_run``).
- Throughput: N jobs are fully staged first, then committed (``jobs.commit``) back to back while the
  service is already running and warm; jobs/s = N / (last ``finished`` - first ``committed``).
- Warm against cold: five jobs of ``slowload`` (its import sleeps 2 s), each submitted once the previous
  one is in the outbox, with ``keep_warm`` true and false; the figure is the latency of jobs 2 to 5.
- Index: records made by ``pipeline.index.job_record`` are bulk-loaded shard by shard (the per-record
  ``upsert_job`` loop, as ``Index.repair`` does it, takes over a minute at 10,000), then ``update_job`` and
  ``upsert_job`` (median of 50), ``Index.jobs()`` and the ``postbox status`` CLI (median of 5),
  ``jobs.scan`` and ``Index.repair`` are timed.
- Dashboard (issue 11): at the largest index size, with the job folders written, the time to the first byte of
  the job list page (``GET /`` with a site key's session), cheroot serving the app in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# This file is called pipeline.py: take its folder off sys.path so ``import pipeline`` is the package.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from pipeline import jobs  # noqa: E402
from pipeline.index import SHARDS, Index, _doc_id, job_record  # noqa: E402

# The service as installed, without a version manager's shim in front of it (pyenv's adds ~50 ms).
POSTBOX = str(Path(sys.executable).parent / "postbox") if (Path(sys.executable).parent / "postbox").exists() \
    else (shutil.which("postbox") or "postbox")

ALGORITHMS = {
    "benchalgos.py": "def noop(data_objects, working_dir, settings):\n    return []\n",
    "slowload.py": (
        "import time\n\ntime.sleep(2)  # a stand-in for loading a model at import\n\n\n"
        "def run(data_objects, working_dir, settings):\n    return []\n"
    ),
}
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


# --- small helpers --------------------------------------------------------------------------------


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def p95(xs: Iterable[float]) -> float:
    xs = sorted(xs)
    if len(xs) < 2:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[94]


def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


class Row:
    """One line of the results table."""

    def __init__(self, figure: str, value: str, target: str = "-", ok: bool | None = None,
                 reference: str = "-", ratio: str = "-") -> None:
        result = {None: "info", True: "PASS", False: "MISS"}[ok]
        self.cells = [figure, value, target, result, reference, ratio]


# --- a Postbox in a temp folder, run as a real process --------------------------------------------


class Site:
    """config.yaml, the two algorithms, inbox/ and outbox/ in one folder."""

    postbox = POSTBOX  # the service's executable (--postbox)

    def __init__(self, root: Path, **worker: Any) -> None:
        self.root = root
        root.mkdir(parents=True)
        for name, text in ALGORITHMS.items():
            (root / name).write_text(text)
        self.inbox, self.outbox = root / "inbox", root / "outbox"
        self.payload = root / "payload.txt"
        self.payload.write_text("input\n")
        self.config = root / "config.yaml"
        self.config.write_text(yaml.safe_dump({
            "inbox": "inbox", "outbox": "outbox", "database": "index.json", "log_level": "INFO",
            "worker": {"processes": 1, "settle_seconds": 0, "rescan_seconds": 1, "keep_warm": True,
                       "job_timeout": 60, **worker},
            # The pipeline alone: no door listens (two services on one inbox would also fight for the ports).
            "http": {"enabled": False}, "dicom": {"enabled": False},
            "default_algorithm": "noop",
            "algorithms": [{"name": "noop", "function": "benchalgos:noop"},
                           {"name": "slowload", "function": "slowload:run"}],
        }))
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self) -> None:
        """Start one more ``postbox manage run`` on this site and wait until its worker watches the inbox."""
        log = self.root / f"service-{len(self.procs)}.log"
        with open(log, "wb") as fh:
            argv = [self.postbox, "--config", str(self.config), "manage", "run"]
            proc = subprocess.Popen(argv, cwd=self.root, stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.STDOUT)
        self.procs.append((proc, log))
        ok = wait_until(lambda: b"worker: watching" in log.read_bytes() or proc.poll() is not None, 30)
        if not ok or proc.poll() is not None:
            raise RuntimeError(f"the service did not start:\n{log.read_text()}")

    def stop(self) -> list[str]:
        """SIGTERM every service; returns the problems their logs show."""
        problems = []
        for proc, _log in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc, log in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                problems.append(f"{self.root.name}/{log.name}: did not stop within 30 s of SIGTERM (killed)")
            text = log.read_text(errors="replace")
            bad = [ln for ln in text.splitlines() if " ERROR " in ln or "Traceback" in ln]
            spurious = [ln for ln in bad if "queue_events() called when the thread is inactive" in ln]
            if spurious:
                problems.append("on SIGTERM watchdog logged ERROR 'InotifyEmitter.queue_events() called when "
                                "the thread is inactive'")
            bad = [ln for ln in bad if ln not in spurious]
            if bad:
                problems.append(f"{self.root.name}/{log.name}: {bad[0].strip()} (+{len(bad) - 1} more)")
            if proc.returncode not in (0, -signal.SIGTERM):
                problems.append(f"{self.root.name}/{log.name}: exit code {proc.returncode}")
        self.procs.clear()
        return problems

    def submit(self, algorithm: str = "noop") -> str:
        return jobs.submit(self.inbox, [self.payload], algorithm=algorithm, source="bench").id

    def stage(self, algorithm: str = "noop") -> tuple[Path, jobs.JobManifest]:
        """Everything ``jobs.submit`` does but the commit."""
        sdir = jobs.stage(self.inbox)
        manifest = jobs.JobManifest(id=sdir.name, algorithm=algorithm, source="bench")
        manifest.inputs = jobs.place_inputs([self.payload], sdir / jobs.INPUT)
        return sdir, manifest

    def wait_done(self, ids: list[str], timeout: float) -> list[dict[str, Any]]:
        """Wait for ``ids`` to reach the outbox; their manifests (fewer if the timeout passed)."""
        want = set(ids)
        wait_until(lambda: want <= set(os.listdir(self.outbox)), timeout, 0.05)
        found = [self.outbox / i / jobs.JOB_FILE for i in ids]
        return [yaml.load(p.read_text(), Loader=_Loader) for p in found if p.exists()]


def latencies(manifests: list[dict[str, Any]], start: str = "committed", end: str = "algorithm_started") \
        -> list[float]:
    return [m["timings"][end] - m["timings"][start] for m in manifests
            if m["status"] == "done" and start in m["timings"] and end in m["timings"]]


# --- the measurements -------------------------------------------------------------------------------


def process_floor(repeat: int = 15) -> float:
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return median(timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), repeat))


def noop_run(base: Path, name: str, services: int, processes: int, n_jobs: int, n_paced: int,
             notes: list[str], n_serial: int = 0, n_sparse: int = 0) -> dict[str, Any]:
    """Throughput (N committed back to back) then paced pickup latency, on one warm site."""
    site = Site(base / name, processes=processes)
    for _ in range(services):
        site.start()
    try:
        warm = [site.submit() for _ in range(2 * processes * services)]
        site.wait_done(warm, 60)

        staged = [site.stage() for _ in range(n_jobs)]
        t0 = time.perf_counter()
        for sdir, manifest in staged:
            jobs.commit(site.inbox, sdir, manifest)
        commit_s = time.perf_counter() - t0
        done = site.wait_done([m.id for _, m in staged], 30 + n_jobs * 0.5)
        ok = [m for m in done if m["status"] == "done"]
        span = max(m["timings"]["finished"] for m in ok) - min(m["timings"]["committed"] for m in ok)
        rate = len(ok) / span
        if len(ok) < n_jobs:
            notes.append(f"{name}: only {len(ok)} of {n_jobs} throughput jobs finished as done")

        # Pace well below the measured capacity (and no faster than one each 20 ms): latency, not queueing.
        pace = max(0.020, 2.0 / rate)
        ids, submit_times = [], []
        t_next = time.perf_counter()
        for _ in range(n_paced):
            t_next += pace
            time.sleep(max(0.0, t_next - time.perf_counter()))
            t = time.perf_counter()
            ids.append(site.submit())
            submit_times.append(time.perf_counter() - t)
        paced = site.wait_done(ids, 60)
        if len(paced) < n_paced:
            notes.append(f"{name}: only {len(paced)} of {n_paced} paced jobs finished")

        # Jobs that come alone, each 1 s after the previous one, then (from a quiet inbox) each as soon as
        # the previous one is in the outbox: a job that leaves the inbox holds watchdog's later events for
        # 0.5 s, which a steady stream of jobs hides (stale events keep waking the worker).
        sparse = []
        for _ in range(n_sparse):
            time.sleep(1.0)
            sparse += site.wait_done([site.submit()], 10)
        time.sleep(1.0)
        serial = [m for _ in range(n_serial) for m in site.wait_done([site.submit()], 10)]
    finally:
        notes.extend(site.stop())
    return {
        "rate": rate, "commit_s": commit_s, "n": len(ok), "pace": pace, "submit": median(submit_times),
        "lat": latencies(paced), "serial": latencies(serial), "sparse": latencies(sparse),
        "parts": {k: latencies(paced, a, b) for k, (a, b) in {
            "committed->claimed": ("committed", "claimed"),
            "claimed->algorithm_started": ("claimed", "algorithm_started"),
            "algorithm_ended->finished": ("algorithm_ended", "finished"),
        }.items()},
        "backlog_parts": {k: median(latencies(ok, a, b)) for k, (a, b) in {
            "claimed->algorithm_started": ("claimed", "algorithm_started"),
            "algorithm_ended->finished": ("algorithm_ended", "finished"),
        }.items()},
    }


def slowload_run(base: Path, keep_warm: bool, notes: list[str], n: int = 5) -> list[dict[str, Any]]:
    """``n`` slowload jobs, each submitted once the previous one has finished."""
    name = f"slowload-{'warm' if keep_warm else 'cold'}"
    site = Site(base / name, keep_warm=keep_warm)
    site.start()
    manifests = []
    try:
        for _ in range(n):
            manifests += site.wait_done([site.submit("slowload")], 30)
    finally:
        notes.extend(site.stop())
    if len(manifests) < n or any(m["status"] != "done" for m in manifests):
        notes.append(f"{name}: {sum(m['status'] == 'done' for m in manifests)} of {n} jobs done")
    return manifests


def fake_manifest(i: int, algorithm: str = "noop") -> jobs.JobManifest:
    """A finished job as the worker leaves it, with an id unique in the run."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(1_700_000_000 + i))
    return jobs.JobManifest(
        id=f"{stamp}-{random.getrandbits(32):08x}", algorithm=algorithm, source="bench",
        status=jobs.JobStatus.DONE, attempts=1, started=jobs.now_iso(), finished=jobs.now_iso(),
        inputs=[{"id": "in-1", "type": "FILE", "path": "input/payload.txt", "meta_data": {}}],
        timings={"committed": 1.0, "claimed": 1.1, "finished": 1.2})


def write_job_folders(outbox: Path, manifests: list[jobs.JobManifest]) -> None:
    """Finished job folders (job.yaml only) as the worker leaves them in the outbox."""
    for m in manifests:
        (outbox / m.id).mkdir(parents=True)
        (outbox / m.id / jobs.JOB_FILE).write_text(yaml.dump(m.to_dict(), Dumper=_Dumper, sort_keys=False))


def bulk_fill(index: Index, records: list[dict[str, Any]]) -> None:
    """Load records shard by shard, one write per shard (what N ``upsert_job`` calls would leave)."""
    from tinydb.table import Document

    by_shard: dict[Path, list[dict[str, Any]]] = {}
    for rec in records:
        by_shard.setdefault(index._shard(rec["id"]), []).append(rec)
    for shard, recs in by_shard.items():
        with index._open(shard) as db:
            db.table("jobs").insert_multiple(Document(r, doc_id=_doc_id(r["id"])) for r in recs)


def index_run(base: Path, n: int, with_repair: bool, rows: list[Row], notes: list[str]) -> None:
    root = base / f"index-{n}"
    root.mkdir()
    manifests = [fake_manifest(i) for i in range(n)]
    records = [job_record(m, "outbox") for m in manifests]
    index = Index(root / "index.json")
    t = time.perf_counter()
    bulk_fill(index, records)
    fill_s = time.perf_counter() - t
    got = index.jobs()
    if len(got) != n or got[0] != min(records, key=lambda r: r["id"]):
        notes.append(f"index {n}: bulk fill gave {len(got)} records, expected {n}")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"inbox": "inbox", "outbox": "outbox", "database": "index.json",
                                      "algorithms": [{"name": "noop", "function": "benchalgos:noop"}]}))
    (root / "benchalgos.py").write_text(ALGORITHMS["benchalgos.py"])

    # update_job / upsert_job on random existing jobs, against json.load + json.dump of the shard file.
    sample = random.sample(records, 50)
    it = iter(sample)
    upd = median(timed(lambda: index.update_job(next(it)["id"], status="done", attempts=2), 50))
    it = iter(sample)
    ups = median(timed(lambda: index.upsert_job({**next(it), "attempts": 3}), 50))
    shard = index._shard(sample[0]["id"])
    tmp = root / "ref.json"

    def json_rewrite() -> None:
        with open(shard, encoding="utf-8") as fh:
            data = json.load(fh)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, separators=(",", ":"))
        os.replace(tmp, root / "ref-out.json")

    ref_upd = median(timed(json_rewrite, 50))
    kb = shard.stat().st_size / 1024
    target = n >= 10_000
    rows.append(Row(f"index `update_job`, {n:,} jobs (median of 50)", ms(upd),
                    "< 20 ms" if target else "-", (upd < 0.020) if target else None,
                    f"json load+dump of its {kb:.0f} KB shard {ms(ref_upd)}", f"{upd / ref_upd:.1f}x"))
    rows.append(Row(f"index `upsert_job` (the worker's write), {n:,} jobs", ms(ups), "-", None,
                    f"same {ms(ref_upd)}", f"{ups / ref_upd:.1f}x"))

    # Listing: Index.jobs() in-process and the `postbox status` CLI, against plain json of all the records.
    everything = root / "all.json"
    table = {"jobs": {str(_doc_id(r["id"])): r for r in records}}
    everything.write_text(json.dumps(table, separators=(",", ":")))
    mb = everything.stat().st_size / 2**20
    lst = median(timed(index.jobs, 5))
    ref_lst = median(timed(lambda: json.loads(everything.read_text(encoding="utf-8")), 5))
    rows.append(Row(f"`Index.jobs()`, {n:,} jobs (median of 5)", ms(lst), "-", None,
                    f"json.load of {mb:.1f} MB {ms(ref_lst)}", f"{lst / ref_lst:.1f}x"))
    cli = [Site.postbox, "--config", str(config), "status"]
    out = subprocess.run(cli, cwd=root, capture_output=True, check=True)
    lines = out.stdout.count(b"\n")
    if lines != n + 1:
        notes.append(f"postbox status at {n}: printed {lines} lines for {n} jobs")
    st = median(timed(lambda: subprocess.run(cli, cwd=root, stdout=subprocess.DEVNULL, check=True), 5))
    floor = [sys.executable, "-c", f"import json; json.load(open({str(everything)!r}))"]
    ref_st = median(timed(lambda: subprocess.run(floor, check=True), 5))
    rows.append(Row(f"`postbox status` CLI, {n:,} jobs (median of 5)", ms(st), "-", None,
                    f"`python -c json.load` of {mb:.1f} MB {ms(ref_st)}", f"{st / ref_st:.1f}x"))
    notes.append(f"index {n}: bulk fill {fill_s:.2f} s ({SHARDS} shards, one write each)")

    if with_repair:
        # Job folders in the outbox matching the index: what a worker start has to check.
        outbox = root / "outbox"
        t = time.perf_counter()
        write_job_folders(outbox, manifests)
        make_s = time.perf_counter() - t
        (root / "inbox").mkdir(exist_ok=True)
        scan = median(timed(lambda: jobs.scan(outbox), 3))
        listing = median(timed(lambda: os.listdir(outbox), 3))
        rows.append(Row(f"`jobs.scan` of a folder of {n:,} jobs (the worker's scan before each claim)",
                        ms(scan), "-", None, f"`os.listdir` {ms(listing)}", f"{scan / listing:.1f}x"))
        rep = median(timed(lambda: index.repair(root / "inbox", outbox), 3))
        rows.append(Row(f"`Index.repair` (worker start), {n:,} jobs in outbox, index in step", ms(rep),
                        "-", None, f"json.load of {mb:.1f} MB {ms(ref_lst)}", f"{rep / ref_lst:.1f}x"))
        notes.append(f"index {n}: wrote {n:,} outbox job folders in {make_s:.1f} s for the repair figure")
        dashboard_run(root, n, rows, ref=f"`Index.jobs()` {ms(lst)}")


def dashboard_run(root: Path, n: int, rows: list[Row], *, ref: str) -> None:
    """The dashboard's job list (``GET /``, issue 11) over ``n`` indexed jobs with their folders: the time to the
    first byte of the answer, with a site key's session, served by cheroot in this process (median of 5)."""
    import socket

    from facade.dashboard import COOKIE, LOGIN_COOKIE, PAGE_SIZE
    from facade.server import HttpServer
    from pipeline.config import Config

    config = Config.from_dict({"inbox": "inbox", "outbox": "outbox", "database": "index.json",
                               "http": {"port": 0, "host": "127.0.0.1"}, "dicom": {"enabled": False}},
                              base_dir=root)
    index = Index(root / "index.json")
    key = index.add_key("bench-dashboard", site=True)
    server = HttpServer(config, index)
    server.start()

    def request(raw: bytes, first_byte_only: bool = False) -> tuple[float, bytes]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            t = time.perf_counter()
            sock.sendall(raw)
            data = sock.recv(1)
            ttfb = time.perf_counter() - t
            while piece := sock.recv(65536):
                data += piece
        return ttfb, data

    try:
        _, form = request(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        pre = form.split(f"{LOGIN_COOKIE}=".encode(), 1)[1].split(b";", 1)[0].decode()
        csrf = form.split(b'name="csrf" value="', 1)[1].split(b'"', 1)[0].decode()
        body = f"key={key}&csrf={csrf}".encode()
        _, signed = request(b"POST /dashboard/login HTTP/1.0\r\nHost: bench\r\nContent-Type: "
                            b"application/x-www-form-urlencoded\r\n" + f"Cookie: {LOGIN_COOKIE}={pre}\r\n"
                            f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        session = signed.split(f"{COOKIE}=".encode(), 1)[1].split(b";", 1)[0].decode()
        page = f"GET / HTTP/1.0\r\nHost: bench\r\nCookie: {COOKIE}={session}\r\n\r\n".encode()
        _, answer = request(page)  # warm-up, and a check that it is the list
        shown = answer.count(b'class="job-link"')
        if shown != min(n, PAGE_SIZE):
            raise RuntimeError(f"the dashboard listed {shown} jobs on its first page, not {min(n, PAGE_SIZE)}")
        ttfb = median(request(page)[0] for _ in range(5))
    finally:
        server.stop()
    target = n >= 10_000
    rows.append(Row(f"dashboard job list `GET /`, {n:,} jobs, time to first byte (median of 5)", ms(ttfb),
                    "< 200 ms" if target else "-", (ttfb < 0.200) if target else None, ref, "-"))


def repair_lost_index(base: Path, n: int, rows: list[Row]) -> None:
    """Rebuild an index that was lost (deleted) from ``n`` outbox folders: one upsert per job."""
    root = base / f"repair-{n}"
    outbox = root / "outbox"
    write_job_folders(outbox, [fake_manifest(i) for i in range(n)])
    (root / "inbox").mkdir()
    index = Index(root / "index.json")
    t = time.perf_counter()
    changed = index.repair(root / "inbox", outbox)
    rep = time.perf_counter() - t
    rows.append(Row(f"`Index.repair` of a lost index, {n:,} jobs ({changed} upserts)", ms(rep), "-", None,
                    "-", f"{ms(rep / max(1, changed))} a job"))


def write_minimal_folders(outbox: Path, manifests: list[jobs.JobManifest], locks: Path | None = None) -> None:
    """Outbox job folders holding a job.yaml only, one YAML text for all (the ids swapped in): fast at 100,000.

    With ``locks``, each job's lock file there too, as the claim leaves it.
    """
    outbox.mkdir(parents=True, exist_ok=True)
    first = manifests[0]
    text = yaml.dump(first.to_dict(), Dumper=_Dumper, sort_keys=False)
    if locks is not None:
        locks.mkdir(parents=True, exist_ok=True)
    for m in manifests:
        os.mkdir(outbox / m.id)
        with open(outbox / m.id / jobs.JOB_FILE, "w", encoding="utf-8") as fh:
            fh.write(text.replace(first.id, m.id))
        if locks is not None:
            open(locks / f"{m.id}.lock", "wb").close()


def retention_run(base: Path, n: int, k: int, rows: list[Row], notes: list[str]) -> None:
    """Issue 11 at ``n`` jobs: ``postbox status``, an index update, a sweep with nothing due, and a purge of the
    ``k`` oldest (folders are slow to make: the sweep still goes through all ``n`` index entries)."""
    from pipeline.audit import AuditLog
    from pipeline.config import Config
    from pipeline.retention import Retention

    root = base / f"retention-{n}"
    root.mkdir()
    (root / "benchalgos.py").write_text(ALGORITHMS["benchalgos.py"])
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"inbox": "inbox", "outbox": "outbox", "database": "index.json",
                                      "default_algorithm": "noop",
                                      "algorithms": [{"name": "noop", "function": "benchalgos:noop"}]}))
    manifests = [fake_manifest(i) for i in range(n)]
    k = min(k, n)
    old = f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(time.time() - 30 * 86400))}.000+00:00"
    for m in manifests[:k]:
        m.finished = old  # 30 days ago; the others finished now
    records = [job_record(m, "outbox") for m in manifests]
    index = Index(root / "index.json")
    t = time.perf_counter()
    bulk_fill(index, records)
    fill_s = time.perf_counter() - t

    cli = [Site.postbox, "--config", str(config), "status"]
    lines = subprocess.run(cli, cwd=root, capture_output=True, check=True).stdout.count(b"\n")
    if lines != n + 1:
        notes.append(f"postbox status at {n}: printed {lines} lines for {n} jobs")
    st = median(timed(lambda: subprocess.run(cli, cwd=root, stdout=subprocess.DEVNULL, check=True), 3))
    everything = root / "all.json"
    everything.write_text(json.dumps({"jobs": {str(_doc_id(r["id"])): r for r in records}}, separators=(",", ":")))
    mb = everything.stat().st_size / 2**20
    floor = [sys.executable, "-c", f"import json; json.load(open({str(everything)!r}))"]
    ref_st = median(timed(lambda: subprocess.run(floor, check=True), 3))
    rows.append(Row(f"`postbox status` CLI, {n:,} jobs (median of 3)", ms(st), "-", None,
                    f"`python -c json.load` of {mb:.1f} MB {ms(ref_st)}", f"{st / ref_st:.1f}x"))

    sample = iter(random.sample(records, 20))
    upd = median(timed(lambda: index.update_job(next(sample)["id"], status="done", attempts=2), 20))
    shard = index._shard(records[0]["id"])

    def json_rewrite() -> None:
        with open(shard, encoding="utf-8") as fh:
            data = json.load(fh)
        with open(root / "ref.json", "w", encoding="utf-8") as fh:
            json.dump(data, fh, separators=(",", ":"))

    ref_upd = median(timed(json_rewrite, 20))
    rows.append(Row(f"index `update_job`, {n:,} jobs (median of 20)", ms(upd), "-", None,
                    f"json load+dump of its {shard.stat().st_size / 1024:.0f} KB shard {ms(ref_upd)}",
                    f"{upd / ref_upd:.1f}x"))

    t = time.perf_counter()
    write_minimal_folders(root / "outbox", manifests[:k], locks=root / "inbox" / jobs.LOCKS)
    make_s = time.perf_counter() - t
    cfg = Config.from_file(config)
    retention = Retention(cfg, index, who="bench")
    idle = median(timed(lambda: retention.purge({"done": 3650, "failed": 3650}), 3))
    rows.append(Row(f"retention sweep, {n:,} jobs, none due (the cost every `sweep_minutes`)", ms(idle), "-",
                    None, f"`Index.jobs()` alone {ms(median(timed(index.jobs, 3)))}", "-"))

    t = time.perf_counter()
    report = retention.purge({"done": 7, "failed": 7})
    purge_s = time.perf_counter() - t
    # The floor: the same number of such folders and lock files made again and deleted by rm -r.
    write_minimal_folders(root / "ref-outbox", manifests[:k], locks=root / "ref-locks")
    t = time.perf_counter()
    subprocess.run(["rm", "-r", str(root / "ref-outbox"), str(root / "ref-locks")], check=True)
    ref_rm = time.perf_counter() - t
    left = [name for name in os.listdir(root / "outbox") if jobs.is_job_id(name)]
    locks_left = os.listdir(root / "inbox" / jobs.LOCKS)
    audited = sum(1 for e in AuditLog.beside(cfg.database).entries() if e["action"] == "purge")
    entries = len(index.jobs())
    if len(report.removed) != k or left or locks_left or entries != n - k or audited != k or report.kept:
        notes.append(f"retention {n}: removed {len(report.removed)} of {k}, kept {len(report.kept)}, left {len(left)} "
                     f"folders, {len(locks_left)} locks, {entries} index entries; {audited} audit lines")
    rows.append(Row(f"retention purge of the {k:,} oldest of {n:,} jobs (folder, lock file, index entry, audit "
                    "line each)", f"{purge_s:.1f} s", "-", None,
                    f"`rm -r` of as many folders and lock files {ref_rm:.1f} s",
                    f"{purge_s / ref_rm:.1f}x ({ms(purge_s / k)} a job)"))
    notes.append(f"retention {n}: bulk fill of the index {fill_s:.1f} s; {k:,} minimal job folders and lock files "
                 f"written in {make_s:.1f} s")


def noop_rows(label: str, r: dict[str, Any], alone: bool, floor: float) -> list[Row]:
    ref = f"bare process start {ms(floor)}"
    lat = r["lat"]
    p50 = median(lat)
    rows = [Row(f"pickup latency p50, {label} ({len(lat)} jobs, one each {r['pace'] * 1000:.0f} ms)",
                ms(p50), "< 50 ms", p50 < 0.050, ref, f"{p50 / floor:.1f}x"),
            Row(f"pickup latency p95, {label}", ms(p95(lat)), "-", None, ref, f"{p95(lat) / floor:.1f}x")]
    for key, how in (("sparse", "one each 1 s"), ("serial", "each submitted once the previous is done")):
        v = r[key]
        if v:
            rows.append(Row(f"pickup latency p50 / p95, {label}, {len(v)} jobs {how}",
                            f"{ms(median(v))} / {ms(p95(v))}", "< 50 ms (p50)", median(v) < 0.050, ref,
                            f"{median(v) / floor:.1f}x"))
    rows.append(Row(f"no-op jobs/s, {label} ({r['n']} jobs committed at once into a running service)",
                    f"{r['rate']:.1f} /s", ">= 20 /s" if alone else "-", r["rate"] >= 20 if alone else None,
                    ref, f"{1 / r['rate'] / floor:.1f}x a job"))
    return rows


# --- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=300, help="no-op jobs for the throughput figure (default 300)")
    p.add_argument("--paced", type=int, default=100, help="paced no-op jobs for latency (default 100)")
    p.add_argument("--serial", type=int, default=20, help="no-op jobs one after another (default 20)")
    p.add_argument("--sparse", type=int, default=8, help="no-op jobs submitted 1 s apart (default 8)")
    p.add_argument("--index-sizes", default="1000,10000", help="index sizes (default 1000,10000)")
    p.add_argument("--no-two-services", action="store_true", help="skip the two-services-on-one-inbox run")
    p.add_argument("--retention-jobs", type=int, default=100_000,
                   help="jobs for the retention figures: status, update, purge (default 100000; 0 skips them)")
    p.add_argument("--purge-jobs", type=int, default=10_000,
                   help="of those, the old ones with job folders, which the purge removes (default 10000)")
    p.add_argument("--only-retention", action="store_true", help="measure the retention figures alone")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    p.add_argument("--postbox", default=POSTBOX, help=f"the service's executable (default {POSTBOX})")
    args = p.parse_args(argv)
    Site.postbox = args.postbox
    sizes = [int(s) for s in args.index_sizes.split(",") if s]
    base = Path(tempfile.mkdtemp(prefix="postbox-bench-"))
    rows: list[Row] = []
    notes: list[str] = []
    t_all = time.perf_counter()
    try:
        floor = process_floor()
        ref = f"bare process start {ms(floor)}"

        runs = [] if args.only_retention else [("1 process", 1, 1), ("2 processes (`worker.processes: 2`)", 1, 2)]
        if not args.no_two_services and not args.only_retention:
            runs.append(("2 services x 1 process, one inbox", 2, 1))
        results = {}
        for label, services, processes in runs:
            alone = services * processes == 1
            results[label] = noop_run(base, f"noop-{services}x{processes}", services, processes, args.jobs,
                                      args.paced, notes, n_serial=args.serial if alone else 0,
                                      n_sparse=args.sparse if alone else 0)
            rows += noop_rows(label, results[label], alone, floor)

        for keep_warm in () if args.only_retention else (True, False):
            done = slowload_run(base, keep_warm, notes)
            lat = latencies(done)[1:]
            load = [m["timings"].get("load_seconds", float("nan")) for m in done[1:]]
            word = "warm (`keep_warm: true`)" if keep_warm else "cold (`keep_warm: false`)"
            value = (f"max {max(lat):.2f} s (median {median(lat):.2f} s; import {max(load):.2f} s)"
                     if lat else "n/a")
            rows.append(Row(f"slowload jobs 2-5 latency, {word}", value,
                            "< 1 s, no 2 s load" if keep_warm else "-",
                            (bool(lat) and max(lat) < 1.0 and max(load) < 0.1) if keep_warm else None,
                            ref, f"{max(lat) / floor:.1f}x" if lat else "-"))
            if done:
                notes.append(f"slowload {word}: first job latency {latencies(done)[0]:.2f} s")

        for n in [] if args.only_retention else sizes:
            index_run(base, n, with_repair=(n == max(sizes)), rows=rows, notes=notes)
        if not args.only_retention:
            repair_lost_index(base, min(sizes), rows)
        if args.retention_jobs:
            retention_run(base, args.retention_jobs, args.purge_jobs, rows, notes)
    finally:
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)

    print(f"# Postbox pipeline benchmark ({os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"{time.perf_counter() - t_all:.0f} s)\n")
    head = ["figure", "measured", "target", "result", "reference (same run)", "ratio"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(row.cells) + " |")
    if results:
        print("\nWhere a paced job's pickup time goes (p50 / p95), and per job in the back-to-back run (p50):\n")
        print("| run | " + " | ".join(next(iter(results.values()))["parts"]) + " | submit (bench side) |")
        print("|---|---|---|---|---|")
    for label, r in results.items():
        parts = " | ".join(f"{ms(median(v))} / {ms(p95(v))}" for v in r["parts"].values())
        print(f"| {label}, paced | {parts} | {ms(r['submit'])} |")
        bp = r["backlog_parts"]
        print(f"| {label}, back to back | - | {ms(bp['claimed->algorithm_started'])} | "
              f"{ms(bp['algorithm_ended->finished'])} | commit of {r['n']}: {r['commit_s']:.2f} s |")
    if notes:
        counts = {n: notes.count(n) for n in notes}
        print("\nNotes:")
        for note, k in counts.items():
            print(f"- {note}" + (f" ({k} times)" if k > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
