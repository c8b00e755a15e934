"""Benchmark of the HTTP door (not a test): upload and download speed, server memory, a small round trip.

Run it as ``python bench/http.py`` from the repository (``--help`` for the sizes). It prints one Markdown
table with each figure, its target and PASS/MISS, and a reference measured in the same run:

- Upload and download of one file (200 MB by default) through the API with :class:`facade.client.Client`,
  against a plain copy of the same file with fsync on the same disk (an upload is on disk, fsynced, before
  it is acknowledged, so that is the fair floor). Median of ``--repeat`` runs each.
- The service's peak RSS during the uploads: ``/proc/<pid>/status`` VmRSS sampled every 5 ms, minus its
  RSS just before (the upload is streamed to disk, so this should stay flat whatever the file size).
- The round trip of a 40x128x128 phantom with a no-op algorithm: a dataset, the upload, the trigger, the
  status until done, the dataset read, the output downloaded; median of ``--round-trips`` after two warm-up
  runs. With :class:`facade.client.Client` as it is (its status request waits on the server for the run,
  issue 10), and as a reference with ``wait=False``: ``?wait=0`` and a poll every 20 ms, as it did before.
- The same round trip driven by PlatiPy 0.7.2's own client, unmodified (it polls once after the trigger, then
  sleeps a second between polls), run by ``--platipy-python`` (``.ci/.venv-platipy``) in a subprocess that
  times ``--platipy-trips`` round trips after two warm-up runs; median and mean. Its target is 0.3x PlatiPy's
  own backend's mean (about 1.0 s, issue 10), read as a median of at most 180 ms. PlatiPy's backend (redis,
  celery, Flask) is too heavy to run here: its figure from issue 10 is shown as a dated reference row.

- With ``--tls`` on (the default), the same uploads to a second service serving HTTPS (``http.tls``, with
  certificates from ``pipeline.tls.make_certificates``), against the plain uploads of the same run.

The service is a real process, ``postbox --config CFG manage run`` in a temp folder (HTTP on a free port of
127.0.0.1, DICOM off), stopped with SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# This file is called http.py: take its folder off sys.path so ``import http`` is the standard library's.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from facade.client import Client  # noqa: E402
from pipeline import phantom  # noqa: E402
from pipeline.index import Index  # noqa: E402

POSTBOX = str(Path(sys.executable).parent / "postbox") if (Path(sys.executable).parent / "postbox").exists() \
    else (shutil.which("postbox") or "postbox")
NOOP = (
    "from pathlib import Path\n\nfrom pipeline import DataObject\n\n\n"
    "def noop(data_objects, working_dir, settings):\n"
    "    out = Path(working_dir) / 'done.txt'\n    out.write_text('done')\n"
    "    return [DataObject(type='FILE', path=str(out), parent=data_objects[0])]\n"
)
MB = 1e6
PLATIPY_PYTHON = ROOT / ".ci" / ".venv-platipy" / "bin" / "python"
# PlatiPy 0.7.2's client, unmodified, timing whole no-op round trips (tests/test_client.py's flow); the first
# two warm the service and the algorithm's child up. Prints the times in seconds as one JSON list.
PLATIPY_TRIPS = """
import json, sys, time
from platipy.client import PlatiPyClient

host, port, api_key, ct_path, out, n, algorithm = sys.argv[1:]
client = PlatiPyClient(host, int(port), api_key, algorithm)
times = []
for i in range(int(n) + 2):
    start = time.perf_counter()
    dataset = client.add_dataset()
    client.add_data_object(dataset, file_path=ct_path)
    states = list(client.run_algorithm(dataset))
    client.download_output_objects(dataset, output_path=f"{out}/{i}")
    times.append(time.perf_counter() - start)
print(json.dumps(times[2:]))
"""
# PlatiPy's own backend, from issue 10 (not run here): the same service.py, its client, the small phantom.
PLATIPY_BACKEND = "621 ms median (102-1,205), mean ~1.0 s (998 and 1,098 ms in two runs); 10 runs, 2026-11"
PLATIPY_BACKEND_THRESHOLD = "1,119 ms median; Postbox then: 1,089 ms; 10 runs, 2026-11"


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]


class PeakRss:
    """Samples a process's RSS in a thread while the ``with`` block runs."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid, self.interval = pid, interval
        self.before = self.peak = rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.pid))


def copy_fsync(src: Path, dest: Path) -> None:
    """The reference: a plain copy in 1 MiB pieces, fsynced, as an acknowledged upload must be."""
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        while piece := fin.read(1 << 20):
            fout.write(piece)
        fout.flush()
        os.fsync(fout.fileno())


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Service:
    """A Postbox in a temp folder serving HTTP, with one key."""

    def __init__(self, root: Path, postbox: str, certs: Path | None = None) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.certs = certs
        tls = {"tls": {"cert": str(certs / "server.pem"), "key": str(certs / "server-key.pem")}} if certs else {}
        (root / "benchalgos.py").write_text(NOOP)
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump({
            "database": "index.json", "dicom": {"enabled": False},
            "http": {"host": "127.0.0.1", "port": 0, "max_upload_mb": 4096, **tls},
            "worker": {"processes": 1, "settle_seconds": 0, "rescan_seconds": 1, "keep_warm": True},
            "default_algorithm": "noop",
            "algorithms": [{"name": "noop", "function": "benchalgos:noop"},
                           # The bundled threshold segmentation: issue 10's second PlatiPy figure.
                           {"name": "body-lungs", "function": "pipeline.bodylungs:segment"}],
        }))
        self.key = Index(root / "index.json").add_key("bench")
        self.log = root / "service.log"
        with open(self.log, "wb") as fh:
            # PYTHONPATH: the service runs this checkout's code, whatever the editable install points at.
            self.proc = subprocess.Popen([postbox, "--config", str(config), "manage", "run"], cwd=root,
                                         stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 30
        while not (m := re.search(r"http: listening on https?://127\.0\.0\.1:(\d+)", self.log.read_text())) \
                or "worker: watching" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start:\n{self.log.read_text()}")
            time.sleep(0.02)
        self.port = int(m.group(1))

    def client(self) -> Client:
        return Client("127.0.0.1", self.port, self.key, "noop", progress=False, timeout=600,
                      verify=str(self.certs / "ca.pem") if self.certs else None)

    def stop(self) -> list[str]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        bad = [ln for ln in self.log.read_text(errors="replace").splitlines() if " ERROR " in ln or "Traceback" in ln]
        return bad


def platipy_trips(args: argparse.Namespace, svc: Service, ct: Path, out: Path, problems: list[str],
                  algorithm: str = "noop") -> list[float]:
    """PlatiPy's own client's round trips of ``algorithm`` against ``svc``, in seconds; [] if skipped or not
    installed."""
    if args.platipy_trips <= 0:
        return []
    if not args.platipy_python.exists():
        problems.append(f"no PlatiPy client at {args.platipy_python} (python3 -m venv .ci/.venv-platipy && "
                        ".ci/.venv-platipy/bin/pip install platipy==0.7.2; --platipy-trips 0 skips it)")
        return []
    script = out.parent / "platipy_trips.py"
    script.write_text(PLATIPY_TRIPS)
    proc = subprocess.run([str(args.platipy_python), str(script), "127.0.0.1", str(svc.port), svc.key, str(ct),
                           str(out), str(args.platipy_trips), algorithm], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        problems.append(f"PlatiPy's client failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return []
    times: list[float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=200, help="the file uploaded and downloaded (default 200)")
    p.add_argument("--repeat", type=int, default=3, help="uploads, downloads and copies timed (default 3)")
    p.add_argument("--round-trips", type=int, default=20, help="phantom round trips timed (default 20)")
    p.add_argument("--platipy-trips", type=int, default=10,
                   help="round trips timed with PlatiPy's own client (default 10; 0 skips them)")
    p.add_argument("--platipy-python", type=Path, default=PLATIPY_PYTHON,
                   help=f"a Python with platipy==0.7.2 installed (default {PLATIPY_PYTHON})")
    p.add_argument("--dir", type=Path, default=None, help="where to work (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    p.add_argument("--no-tls", action="store_true", help="skip the HTTPS uploads")
    p.add_argument("--postbox", default=POSTBOX, help=f"the service's executable (default {POSTBOX})")
    args = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="postbox-bench-http-", dir=args.dir))
    rows: list[list[str]] = []
    problems: list[str] = []
    try:
        big = base / "big.bin"
        with open(big, "wb") as fh:  # incompressible, written in pieces so the bench itself stays small
            for _ in range(args.size_mb):
                fh.write(os.urandom(int(MB)))
            fh.flush()
            os.fsync(fh.fileno())  # its write-back must not slow the first copy down
        size = big.stat().st_size

        def copies() -> list[float]:
            times = [timed(lambda i=i: copy_fsync(big, base / f"copy-{i}.bin")) for i in range(args.repeat)]
            for i in range(args.repeat):
                (base / f"copy-{i}.bin").unlink()
            return times

        copy_times = copies()

        svc = Service(base / "site", args.postbox)
        try:
            with svc.client() as client:
                # The round trips first: after 600 MB of downloads the disk is still writing them back,
                # and every fsync of a job would wait behind that.
                ct = phantom.write_nifti(base / "ct.nii.gz", slices=40, size=128)

                def round_trips(what: str, **options: Any) -> list[float]:
                    trips = []
                    for i in range(args.round_trips + 2):
                        out = base / f"trip-{what}-{i}"
                        start = time.perf_counter()
                        ds = client.add_dataset()
                        client.add_data_object(ds, file_path=ct)
                        states = list(client.run_algorithm(ds, **options))
                        files = client.download_output_objects(ds, out)
                        elapsed = time.perf_counter() - start
                        if states[-1]["state"] != "SUCCESS" or [f.name for f in files] != ["done.txt"]:
                            problems.append(f"round trip {what} {i}: {states[-1]} {files}")
                        if i >= 2:  # the first two warm the algorithm's child up
                            trips.append(elapsed)
                    return trips

                trips = round_trips("wait")  # the client as it is: its status request waits for the run
                polled = round_trips("poll", wait=False, poll=0.02, max_poll=0.02)  # as before issue 10
                platipy = platipy_trips(args, svc, ct, base / "platipy", problems)
                platipy_seg = platipy_trips(args, svc, ct, base / "platipy-seg", problems, algorithm="body-lungs")

                dataset = client.add_dataset()
                uploads, objects = [], []
                with PeakRss(svc.proc.pid) as mem:
                    for _ in range(args.repeat):
                        start = time.perf_counter()
                        objects.append(client.add_data_object(dataset, file_path=big))
                        uploads.append(time.perf_counter() - start)
                downloads = []
                for i, obj in enumerate(objects):
                    out = base / f"down-{i}"
                    out.mkdir()
                    downloads.append(timed(lambda obj=obj, out=out: client.download_object(obj, out)))
                    got = out / big.name
                    if got.stat().st_size != size:
                        problems.append(f"download {i} has {got.stat().st_size} bytes, not {size}")
                    got.unlink()
                up_s, down_s = statistics.median(uploads), statistics.median(downloads)
                copy_times += copies()  # before and after, so a busy spell on a shared disk hits both sides
                copy_s = statistics.median(copy_times)

        finally:
            problems += svc.stop()

        tls_up_s = None
        if not args.no_tls:
            from pipeline.tls import make_certificates

            make_certificates(base / "certs", ["127.0.0.1"])
            svc = Service(base / "site-tls", args.postbox, certs=base / "certs")
            try:
                with svc.client() as client:
                    dataset = client.add_dataset()
                    tls_uploads = [timed(lambda: client.add_data_object(dataset, file_path=big))
                                   for _ in range(args.repeat)]
                tls_up_s = statistics.median(tls_uploads)
            finally:
                problems += svc.stop()

        def mbps(seconds: float) -> float:
            return size / MB / seconds

        growth = (mem.peak - mem.before) / MB
        trip, polled_trip = statistics.median(trips), statistics.median(polled)
        rows = [
            ["copy with fsync (reference)", f"{mbps(copy_s):.0f} MB/s", "-", "info", "-"],
            [f"upload {size / MB:.0f} MB (on disk, fsynced, when answered)", f"{mbps(up_s):.0f} MB/s",
             ">= 0.5x the copy", "PASS" if up_s <= 2 * copy_s else "MISS", f"{copy_s / up_s:.2f}x"],
            [f"download {size / MB:.0f} MB", f"{mbps(down_s):.0f} MB/s", ">= 0.5x the copy",
             "PASS" if down_s <= 2 * copy_s else "MISS", f"{copy_s / down_s:.2f}x"],
            ["server peak RSS growth during uploads",
             f"{growth:.1f} MB (from {mem.before / MB:.0f} to {mem.peak / MB:.0f} MB)", "< 100 MB",
             "PASS" if growth < 100 else "MISS", "-"],
            [f"round trip, 40x128x128 phantom, no-op, our client (median of {len(trips)})",
             f"{trip * 1000:.1f} ms", "median <= 40 ms", "PASS" if trip <= 0.04 else "MISS",
             f"min {min(trips) * 1000:.1f} / max {max(trips) * 1000:.1f} ms"],
            [f"the same, our client with ?wait=0 and a 20 ms poll (median of {len(polled)}, reference)",
             f"{polled_trip * 1000:.1f} ms", "info", "-",
             f"min {min(polled) * 1000:.1f} / max {max(polled) * 1000:.1f} ms; the wait: {polled_trip / trip:.2f}x "
             "faster"],
            ["the same on PlatiPy's own backend, PlatiPy's client (issue 10, not run here)", PLATIPY_BACKEND,
             "reference", "-", "-"],
        ]
        if platipy:
            median, mean = statistics.median(platipy), statistics.mean(platipy)
            rows.append([f"the same, PlatiPy 0.7.2's own client against Postbox (median and mean of {len(platipy)})",
                         f"{median * 1000:.0f} ms median, {mean * 1000:.0f} ms mean",
                         "median <= 180 ms (0.3x PlatiPy's mean of ~1.0 s, measured in issue 10)",
                         "PASS" if median <= 0.18 else "MISS",
                         f"min {min(platipy) * 1000:.0f} / max {max(platipy) * 1000:.0f} ms; "
                         f"mean {mean / 1.0:.2f}x PlatiPy's (~1.0 s)"])
        if platipy_seg:
            rows.append([f"threshold segmentation (body-lungs), PlatiPy 0.7.2's own client against Postbox (median "
                         f"of {len(platipy_seg)})", f"{statistics.median(platipy_seg) * 1000:.0f} ms median",
                         "info", "-", f"PlatiPy's backend (issue 10, not run here): {PLATIPY_BACKEND_THRESHOLD}"])
        if tls_up_s is not None:
            rows.insert(2, [f"HTTPS upload {size / MB:.0f} MB (http.tls)", f"{mbps(tls_up_s):.0f} MB/s",
                            "info", "-", f"{up_s / tls_up_s:.2f}x the plain upload, {copy_s / tls_up_s:.2f}x the copy"])
    finally:
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    print("| figure | value | target | result | ratio or spread |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for problem in problems:
        print(f"\nproblem: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
