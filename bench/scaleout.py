"""Benchmark of scale-out (not a test): the same backlog on local children and on a Dask cluster (issue 12).

Run it as ``python bench/scaleout.py`` from the repository (``--help`` for the sizes). It prints one Markdown
table with each figure, its target and PASS/MISS, and a second one that splits the time between two jobs on
one worker into its parts, to tell where a miss comes from.

How it measures:

- The algorithm is ``sleepy`` (``bench/_scaleout_algos.py``, copied next to each config.yaml): it sleeps
  ``--seconds`` and costs no CPU, a GPU model's stand-in. It appends a JSON line as it starts and as it ends
  to the file named by ``POSTBOX_BENCH_EVIDENCE`` (its pid, the Dask node from its attempt folder, the time).
- Every process is real, in a temp folder, started in its own session and killed by process group at the
  end whatever happens: ``python -m facade.cli --config CFG manage run`` (HTTP and DICOM doors off, stopped
  with SIGTERM); for Dask also ``dask scheduler`` on a free loopback port
  (``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=3``) and two ``python -m facade.cli gpu-worker --resources
  GPU=1 --nthreads 1`` (w1, w2), each waited for until its log says ``algorithm sleepy: warm on wN``.
- Local: ``engine.kind: local`` with ``worker.processes: 2``. Dask: ``engine.kind: dask``, ``resources:
  {GPU: 1}``, ``slots: auto`` (``worker.processes`` plays no part there). Both keep their children warm.
- Each run: the service is ready (its ``inbox/.services/<host>-<pid>.json``), four warm-up jobs run, then
  ``--jobs`` jobs are fully staged and committed (``jobs.commit``) back to back.
- Makespan: first ``committed`` to last ``finished`` (job.yaml). Claim to start: ``algorithm_started -
  claimed`` (``claimed`` is written as the worker starts the attempt, ``algorithm_started`` in the child).
- GPU idle between jobs: per worker (Dask: the node of the attempt folder; local: the child's pid), the time
  from one job's algorithm end to the next job's algorithm start on it (evidence lines), counted only while
  another job of the batch had been committed and not yet started, i.e. while the worker had work waiting.
- Kill to rerun: on the idle cluster after the batch, one ``sleepy`` job of 3 s; once its evidence says it
  started, ``kill -9`` of the process group of the gpu-worker that runs it; the figure is the time from the
  kill to the rerun's algorithm start on the other worker (evidence). The job must then end done with
  ``attempts: 2`` (the killed attempt counts: it was not stopped on purpose).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# bench/ holds a pipeline.py: take this folder off sys.path so ``import pipeline`` is the package.
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from pipeline import jobs  # noqa: E402
from pipeline.service import ReadyFile  # noqa: E402

ALGOS = HERE / "_scaleout_algos.py"
EVIDENCE_ENV = "POSTBOX_BENCH_EVIDENCE"
# ``dask`` next to this Python, without a version manager's shim in front of it.
DASK = str(Path(sys.executable).parent / "dask") if (Path(sys.executable).parent / "dask").exists() \
    else (shutil.which("dask") or "dask")
WORKERS = ("w1", "w2")
WARMUP = 4
KILL_SECONDS = 3.0
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --- small helpers --------------------------------------------------------------------------------


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def p95(xs: Iterable[float]) -> float:
    xs = sorted(xs)
    if len(xs) < 2:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[94]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def p50_p95(xs: list[float]) -> str:
    return f"{ms(median(xs))} / {ms(p95(xs))}" if xs else "n/a"


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def children_of(pids: set[int]) -> set[int]:
    """Every live descendant of ``pids`` (from /proc), so that a child in its own session is found too."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(stat[1])
    found, frontier = set(), set(pids)
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


class Row:
    """One line of the results table."""

    def __init__(self, figure: str, value: str, target: str = "-", ok: bool | None = None,
                 reference: str = "-", ratio: str = "-") -> None:
        result = {None: "info", True: "PASS", False: "MISS"}[ok]
        self.cells = [figure, value, target, result, reference, ratio]


# --- the processes ------------------------------------------------------------------------------------


class Procs:
    """Every process this bench starts, each in its own session; ``kill_all`` ends them and what they started."""

    def __init__(self) -> None:
        self.started: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.extra: set[int] = set()  # processes of ours that left their parent's tree (a killed node's child)

    def start(self, name: str, argv: list[str], log: Path, *, cwd: Path,
              env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.started[name] = (proc, log)
        return proc

    def proc(self, name: str) -> subprocess.Popen[bytes]:
        return self.started[name][0]

    def log(self, name: str) -> str:
        return self.started[name][1].read_text(errors="replace")

    def check_running(self, name: str) -> None:
        proc, log = self.started[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")

    def kill_group(self, name: str) -> None:
        """``kill -9`` of the process group of ``name`` (what a lost node looks like)."""
        proc = self.proc(name)
        self.extra |= children_of({proc.pid})  # its children in their own sessions outlive the group
        os.killpg(proc.pid, signal.SIGKILL)

    def kill_all(self) -> None:
        live = {p.pid for p, _ in self.started.values() if p.poll() is None}
        for pid in sorted(children_of(live) | self.extra):
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for proc, _log in self.started.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()


def bench_env(evidence: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **{EVIDENCE_ENV: str(evidence)})


class Site:
    """config.yaml, the sleeping algorithm, inbox/, outbox/ and the evidence file in one folder."""

    def __init__(self, root: Path, seconds: float, engine: dict[str, Any] | None) -> None:
        self.root = root
        root.mkdir(parents=True)
        shutil.copy(ALGOS, root / ALGOS.name)
        self.inbox, self.outbox = root / "inbox", root / "outbox"
        self.payload = root / "payload.txt"
        self.payload.write_text("input\n")
        self.evidence = root / "evidence.jsonl"
        self.evidence.touch()
        self.config = root / "config.yaml"
        data: dict[str, Any] = {
            "inbox": "inbox", "outbox": "outbox", "database": "index.json", "log_level": "INFO",
            "worker": {"processes": 2, "settle_seconds": 0, "rescan_seconds": 1, "job_timeout": 60,
                       "max_attempts": 3, "keep_warm": True},
            "http": {"enabled": False}, "dicom": {"enabled": False},
            "default_algorithm": "sleepy",
            "algorithms": [{"name": "sleepy", "function": f"{ALGOS.stem}:sleepy",
                            "default_settings": {"seconds": seconds}}],
        }
        if engine is not None:
            data["engine"] = engine
        self.config.write_text(yaml.safe_dump(data))
        self.env = bench_env(self.evidence)

    def start_service(self, procs: Procs) -> None:
        proc = procs.start(f"service-{self.root.name}",
                           [sys.executable, "-m", "facade.cli", "--config", str(self.config), "manage", "run"],
                           self.root / "service.log", cwd=self.root, env=self.env)
        ready = ReadyFile.path_for(self.inbox, proc.pid)
        wait_until(lambda: ready.exists() or proc.poll() is not None, 60)
        procs.check_running(f"service-{self.root.name}")
        if not ready.exists():
            raise RuntimeError(f"the service did not get ready in 60 s:\n{procs.log(f'service-{self.root.name}')}")

    def stop_service(self, procs: Procs, notes: list[str]) -> None:
        name = f"service-{self.root.name}"
        proc = procs.proc(name)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            notes.append(f"{name}: did not stop within 30 s of SIGTERM")
        text = procs.log(name)
        bad = [ln for ln in text.splitlines() if (" ERROR " in ln or "Traceback" in ln)
               and "queue_events() called when the thread is inactive" not in ln]
        if bad:
            notes.append(f"{name}: {bad[0].strip()[:300]} (+{len(bad) - 1} more ERROR/Traceback lines)")
        if proc.returncode not in (0, -signal.SIGTERM, None):
            notes.append(f"{name}: exit code {proc.returncode}")

    def submit(self, **settings: Any) -> str:
        return jobs.submit(self.inbox, [self.payload], algorithm="sleepy", settings=settings, source="bench").id

    def stage(self) -> tuple[Path, jobs.JobManifest]:
        """Everything ``jobs.submit`` does but the commit."""
        sdir = jobs.stage(self.inbox)
        manifest = jobs.JobManifest(id=sdir.name, algorithm="sleepy", source="bench")
        manifest.inputs = jobs.place_inputs([self.payload], sdir / jobs.INPUT)
        return sdir, manifest

    def wait_done(self, ids: list[str], timeout: float) -> list[dict[str, Any]]:
        """Wait for ``ids`` to reach the outbox; their manifests (fewer if the timeout passed)."""
        want = set(ids)
        wait_until(lambda: want <= {n for n in os.listdir(self.outbox) if (self.outbox / n / jobs.JOB_FILE).exists()},
                   timeout, 0.05)
        found = [self.outbox / i / jobs.JOB_FILE for i in ids]
        return [yaml.load(p.read_text(), Loader=_Loader) for p in found if p.exists()]

    def events(self) -> list[dict[str, Any]]:
        lines = self.evidence.read_text().splitlines()
        return [json.loads(ln) for ln in lines if ln.strip()]

    def batch(self, n: int, notes: list[str], timeout: float) -> list[dict[str, Any]]:
        """Warm-up jobs, then ``n`` jobs staged and committed back to back; their finished manifests."""
        warm = [self.submit() for _ in range(WARMUP)]
        if len(self.wait_done(warm, 90)) < WARMUP:
            raise RuntimeError(f"{self.root.name}: the warm-up jobs did not finish in 90 s")
        staged = [self.stage() for _ in range(n)]
        for sdir, manifest in staged:
            jobs.commit(self.inbox, sdir, manifest)
        done = self.wait_done([m.id for _, m in staged], timeout)
        ok = [m for m in done if m["status"] == "done"]
        if len(ok) < n:
            notes.append(f"{self.root.name}: only {len(ok)} of {n} jobs finished as done in {timeout:.0f} s")
        return ok


# --- the figures ------------------------------------------------------------------------------------


def makespan(ms_: list[dict[str, Any]]) -> float:
    return max(m["timings"]["finished"] for m in ms_) - min(m["timings"]["committed"] for m in ms_)


def between(ms_: list[dict[str, Any]], a: str, b: str) -> list[float]:
    return [m["timings"][b] - m["timings"][a] for m in ms_ if a in m["timings"] and b in m["timings"]]


def idle_gaps(manifests: list[dict[str, Any]], events: list[dict[str, Any]]) -> dict[str, Any]:
    """The gaps on each worker between one job's end and the next one's start, while jobs were waiting.

    Each gap is split by job.yaml: the end of the first job's algorithm to its ``finished``, that to the next
    job's ``claimed``, that to the next job's ``algorithm_started``.
    """
    by_id = {m["id"]: m for m in manifests}
    runs: dict[str, dict[str, Any]] = {}
    for e in events:
        if e["job"] in by_id:
            run = runs.setdefault(e["job"], {"job": e["job"]})
            run[e["event"]] = e["t"]
            run["worker"] = e["node"] or f"pid {e['pid']}"
    runs_list = [r for r in runs.values() if "start" in r and "end" in r]
    per_worker: dict[str, list[dict[str, Any]]] = {}
    for r in runs_list:
        per_worker.setdefault(r["worker"], []).append(r)
    gaps: list[float] = []
    parts: dict[str, list[float]] = {"algorithm end -> its finished": [], "finished -> next claimed": [],
                                     "next claimed -> its algorithm start": []}
    for seq in per_worker.values():
        seq.sort(key=lambda r: r["start"])
        for a, b in zip(seq, seq[1:], strict=False):
            waiting = any(by_id[r["job"]]["timings"]["committed"] <= a["end"] < r["start"] for r in runs_list)
            if not waiting:
                continue
            gaps.append(b["start"] - a["end"])
            ta, tb = by_id[a["job"]]["timings"], by_id[b["job"]]["timings"]
            parts["algorithm end -> its finished"].append(ta["finished"] - a["end"])
            parts["finished -> next claimed"].append(tb["claimed"] - ta["finished"])
            parts["next claimed -> its algorithm start"].append(b["start"] - tb["claimed"])
    return {"gaps": gaps, "parts": parts, "workers": {w: len(s) for w, s in per_worker.items()}}


# --- the runs -------------------------------------------------------------------------------------------


def local_run(base: Path, n: int, seconds: float, procs: Procs, notes: list[str]) -> dict[str, Any]:
    site = Site(base / "local", seconds, None)
    site.start_service(procs)
    try:
        ok = site.batch(n, notes, 60 + 2 * n * seconds)
    finally:
        site.stop_service(procs, notes)
    return {"ok": ok, "idle": idle_gaps(ok, site.events())}


def dask_run(base: Path, n: int, seconds: float, procs: Procs, notes: list[str]) -> dict[str, Any]:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    site = Site(base / "dask", seconds, {"kind": "dask", "dask": {"scheduler": address, "resources": {"GPU": 1},
                                                                  "slots": "auto"}})
    env = dict(site.env, DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="3")
    procs.start("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                site.root / "scheduler.log", cwd=site.root, env=env)
    wait_until(lambda: listening(port) or procs.proc("scheduler").poll() is not None, 60, 0.05)
    procs.check_running("scheduler")
    t = time.perf_counter()
    for w in WORKERS:
        procs.start(w, [sys.executable, "-m", "facade.cli", "gpu-worker", "--scheduler", address, "--config",
                        str(site.config), "--name", w, "--resources", "GPU=1", "--nthreads", "1"],
                    site.root / f"{w}.log", cwd=ROOT, env=site.env)
    for w in WORKERS:
        wait_until(lambda w=w: f"algorithm sleepy: warm on {w}" in procs.log(w) or procs.proc(w).poll() is not None,
                   60, 0.05)
        procs.check_running(w)
        if f"algorithm sleepy: warm on {w}" not in procs.log(w):
            raise RuntimeError(f"{w} did not warm sleepy in 60 s:\n{procs.log(w)[-3000:]}")
    notes.append(f"dask: both gpu-workers warm {time.perf_counter() - t:.1f} s after their start")
    site.start_service(procs)
    try:
        ok = site.batch(n, notes, 60 + 2 * n * seconds)
        result: dict[str, Any] = {"ok": ok, "idle": idle_gaps(ok, site.events())}
        result["kill"] = kill_test(site, procs, notes)
    finally:
        site.stop_service(procs, notes)
    # The scheduler goes: the surviving worker should exit 0 by itself.
    procs.proc("scheduler").send_signal(signal.SIGTERM)
    for w in WORKERS:
        proc = procs.proc(w)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            notes.append(f"dask: {w} still ran 20 s after its scheduler stopped")
            continue
        if proc.returncode != 0 and w != result.get("kill", {}).get("node"):
            notes.append(f"dask: {w} exited with {proc.returncode} once its scheduler stopped (not 0)")
    return result


def kill_test(site: Site, procs: Procs, notes: list[str]) -> dict[str, Any]:
    """One 3 s job; ``kill -9`` of its worker's process group once it runs; the time to its rerun's start."""
    job = site.submit(seconds=KILL_SECONDS)

    def started(exclude: str | None = None) -> dict[str, Any] | None:
        return next((e for e in site.events() if e["job"] == job and e["event"] == "start"
                     and e["node"] != exclude), None)

    first = wait_until(started, 30)
    if first is None:
        notes.append("kill test: the job did not start in 30 s")
        return {}
    node = first["node"]
    if node not in WORKERS:
        notes.append(f"kill test: the job ran on {node!r}, not a known worker")
        return {}
    t_kill = time.time()
    procs.kill_group(node)
    procs.extra.add(first["pid"])
    rerun = wait_until(lambda: started(exclude=node), 30)
    child_gone = wait_until(lambda: not alive(first["pid"]), 5, 0.05)
    if not child_gone:
        notes.append(f"kill test: the killed node's child (pid {first['pid']}) still ran 5 s after the kill")
    done = site.wait_done([job], 30)
    m = done[0] if done else None
    folders = sorted(p.name for p in (site.outbox / job / "attempts").iterdir()) \
        if (site.outbox / job / "attempts").is_dir() else []
    return {"node": node, "t_kill": t_kill, "rerun": rerun["t"] - t_kill if rerun else None,
            "rerun_node": rerun["node"] if rerun else None, "status": m["status"] if m else "not finished",
            "attempts": m.get("attempts") if m else None, "folders": folders,
            "timings": m["timings"] if m else {}, "since_first_start": t_kill - first["t"]}


# --- the table --------------------------------------------------------------------------------------


def rows_of(n: int, seconds: float, local: dict[str, Any], dsk: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    ideal = n * seconds / 2
    ml, md = makespan(local["ok"]), makespan(dsk["ok"])
    rows.append(Row(f"makespan, local (`worker.processes: 2`), {len(local['ok'])} jobs x {seconds:g} s",
                    f"{ml:.2f} s", "-", None, f"ideal {ideal:.2f} s", f"{ml / ideal:.3f}x ideal"))
    rows.append(Row(f"makespan, dask (2 gpu-workers, GPU=1 each), {len(dsk['ok'])} jobs x {seconds:g} s",
                    f"{md:.2f} s", "<= 1.10x local", md / ml <= 1.10, f"local {ml:.2f} s; ideal {ideal:.2f} s",
                    f"{md / ml:.3f}x local"))
    cl, cd = between(local["ok"], "claimed", "algorithm_started"), between(dsk["ok"], "claimed", "algorithm_started")
    rows.append(Row("claim to start p50 / p95, local", p50_p95(cl), "-", None))
    rows.append(Row("claim to start p50 / p95, dask", p50_p95(cd), "< 50 ms (p50)", bool(cd) and median(cd) < 0.050,
                    f"local p50 {ms(median(cl))}" if cl else "-",
                    f"{median(cd) / median(cl):.1f}x local" if cl and cd and median(cl) > 0 else "-"))
    gl, gd = local["idle"]["gaps"], dsk["idle"]["gaps"]
    rows.append(Row(f"GPU idle between jobs p50 / p95, local ({len(gl)} gaps on {len(local['idle']['workers'])} "
                    "children)", p50_p95(gl), "-", None))
    rows.append(Row(f"GPU idle between jobs p50 / p95, dask ({len(gd)} gaps on {len(dsk['idle']['workers'])} "
                    "workers)", p50_p95(gd), "< 50 ms (p50)", bool(gd) and median(gd) < 0.050,
                    f"local p50 {ms(median(gl))}" if gl else "-",
                    f"{median(gd) / median(gl):.1f}x local" if gl and gd and median(gl) > 0 else "-"))
    k = dsk.get("kill") or {}
    if k.get("rerun") is not None:
        rows.append(Row(f"kill -9 of {k['node']}'s process group -> rerun's algorithm start on {k['rerun_node']}",
                        f"{k['rerun']:.2f} s", "< 2 s", k["rerun"] < 2.0))
    else:
        rows.append(Row("kill -9 of the running worker -> rerun's algorithm start", "no rerun seen", "< 2 s", False))
    if k:
        rows.append(Row("the killed job's end", f"{k['status']}, attempts: {k['attempts']}", "done, attempts: 2",
                        k["status"] == "done" and k["attempts"] == 2, f"attempt folders: {', '.join(k['folders'])}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=40, help="jobs of the backlog (default 40)")
    p.add_argument("--seconds", type=float, default=0.5, help="seconds each job's algorithm sleeps (default 0.5)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    args = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="postbox-scaleout-"))
    procs = Procs()
    notes: list[str] = []
    t_all = time.perf_counter()
    try:
        local = local_run(base, args.jobs, args.seconds, procs, notes)
        dsk = dask_run(base, args.jobs, args.seconds, procs, notes)
    finally:
        procs.kill_all()
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)

    print(f"# Postbox scale-out benchmark ({os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"{time.perf_counter() - t_all:.0f} s)\n")
    head = ["figure", "measured", "target", "result", "reference (same run)", "ratio"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows_of(args.jobs, args.seconds, local, dsk):
        print("| " + " | ".join(row.cells) + " |")

    print("\nWhere a worker's time between two jobs goes (p50 / p95, job.yaml and evidence times):\n")
    names = list(local["idle"]["parts"])
    print("| run | " + " | ".join(names) + " | committed -> claimed (queue) | algorithm end -> finished (all jobs) |")
    print("|" + "---|" * (len(names) + 3))
    for label, r in (("local", local), ("dask", dsk)):
        parts = " | ".join(p50_p95(r["idle"]["parts"][k]) for k in names)
        print(f"| {label} | {parts} | {p50_p95(between(r['ok'], 'committed', 'claimed'))} | "
              f"{p50_p95(between(r['ok'], 'algorithm_ended', 'finished'))} |")
    for label, r in (("local", local), ("dask", dsk)):
        notes.append(f"{label}: jobs per worker {r['idle']['workers']}")
    k = dsk.get("kill") or {}
    if k:
        t = k["timings"]
        notes.append(f"kill test: killed {k.get('since_first_start', 0):.2f} s after the first attempt started; "
                     + ", ".join(f"{key} {t[key] - k['t_kill']:+.2f} s" for key in
                                 ("claimed", "algorithm_started", "algorithm_ended", "finished") if key in t)
                     + " (job.yaml, from the kill)")
    if notes:
        print("\nNotes:")
        for note in notes:
            print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
