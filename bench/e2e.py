"""Benchmark from end to end (not a test): a CT by C-STORE in, RTSTRUCT and SEG out at a destination (issue 10).

Run it as ``python bench/e2e.py`` from the repository (``--help`` for the sizes and repeats). It prints one
Markdown table, a row per series size and algorithm, with the targets of issue 10 marked PASS or MISS:

- A phantom CT (``phantom.axial_grid(slices=S, size=N)``, Explicit VR Little Endian) is written once per
  size into a temp folder, with its exact truth masks (``phantom.write_masks_nifti``).
- One real service, ``python -m facade.cli --config CFG manage run`` in its own folder: the DICOM node with
  ``complete_on_release: true``, two routes by called AE title (``LUNGS``: the bundled ``body-lungs``;
  ``NOOP``: ``fixed_masks``, a no-op that hard-links the phantom's truth masks of the input's size into its
  working folder, so everything after the algorithm is the same work in a fraction of a second), both with
  ``outputs: [rtstruct, seg]`` and sent to ``OUT``, a dcmtk ``storescp -od OUT`` (``dicom.destinations``).
- Each run: ``os.sync()`` (untimed, so that an earlier run's writeback does not slow this one), then dcmtk's
  ``storescu +sd`` sends the series over one association (``TCP_NODELAY=1``: Debian's dcmtk leaves Nagle on
  otherwise). The clock starts at the ``storescu`` process's exit, just after the association release, and
  stops when both the RTSTRUCT and the SEG files are in storescp's folder (polled every 2 ms). The job's
  ``job.yaml`` (outbox) gives the rest: ``committed``, ``algorithm_started``, ``algorithm_ended``,
  ``finished`` (epochs), the split ``dicom_read_seconds``, ``rtstruct_seconds``, ``check_seconds``,
  ``seg_seconds`` and ``results_seconds.OUT`` (the algorithm's end to the destination's last file stored).
- The SEG is written in a thread while the RTSTRUCT is written and checked, and the RTSTRUCT leaves as soon
  as it is checked (``dicom.send_early``): "writing" is the read plus the longer of RTSTRUCT + check and
  SEG; "send" is what ``results_seconds.OUT`` adds to that (the SEG's C-STORE, and the RTSTRUCT's when it
  ends after the SEG is written); "other" is what the job's bookkeeping takes after the algorithm's end
  beyond the writing (outputs back from the child, early-send wait, fsync, the move to the outbox): it is
  no longer on the way to the destination.
- One warm-up run per size and algorithm first (a cold algorithm child, the service's lazy imports), then
  ``--repeat`` rounds, the algorithms interleaved in each; every figure is the median of the rounds.

Targets (issue 10): on 200 x 512 x 512, both results at the destination within 1.0 s of the algorithm's end
(median of 5, warm); commit to job start under 0.1 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from pipeline import phantom  # noqa: E402
from pipeline.bodylungs import DEFAULT_SETTINGS  # noqa: E402

STORESCU, STORESCP = "/usr/bin/storescu", "/usr/bin/storescp"
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")  # Debian's dcmtk 3.6.7 leaves Nagle on otherwise
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

TARGET_AFTER_ALGORITHM = 1.0  # seconds from the algorithm's end to both files at the destination
TARGET_SIZE = (200, 512)  # ... on this series (slices, rows and columns)
TARGET_JOB_START = 0.1  # seconds from the commit to the algorithm's start
ALGORITHMS = {"body-lungs": "LUNGS", "noop": "NOOP"}  # algorithm -> the called AE title of its route
DESTINATION = "OUT"

# The no-op algorithm, next to the service's config.yaml: the truth masks of the input's grid, hard-linked.
FIXED_MASKS = r'''
import os
import shutil
from pathlib import Path

import pydicom

from pipeline import DataObject

MASKS = Path(__file__).resolve().parent / "masks"


def fixed_masks(data_objects, working_dir, settings):
    series = Path(data_objects[0].path)
    files = sorted(p for p in series.iterdir() if p.is_file())
    rows = pydicom.dcmread(files[0], stop_before_pixels=True).Rows
    outputs = []
    for mask in sorted((MASKS / f"{len(files)}x{rows}").iterdir()):
        dest = Path(working_dir) / mask.name
        try:
            os.link(mask, dest)
        except OSError:
            shutil.copyfile(mask, dest)
        outputs.append(DataObject(type="FILE", path=str(dest), parent=data_objects[0],
                                  meta_data={"name": mask.name.split(".")[0]}))
    return outputs
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def files_in(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if not name.startswith(".")]


class Bench:
    """The service and the storescp destination, in one temp folder; ``run`` times one series end to end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "postbox"
        self.out = base / "storescp"
        self.outbox = self.root / "outbox"
        self.log = self.root / "service.log"
        self.port = free_port()
        self.scp_port = free_port()
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self) -> None:
        self.out.mkdir(parents=True)
        scp = subprocess.Popen([STORESCP, "-od", str(self.out), str(self.scp_port)], env=DCMTK_ENV,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(scp)
        (self.root / "benchalgos.py").write_text(FIXED_MASKS)
        config = self.root / "config.yaml"
        config.write_text(yaml.safe_dump({
            "inbox": "inbox", "outbox": "outbox", "database": "index.json", "log_level": "INFO",
            "default_algorithm": "noop",
            "algorithms": [
                {"name": "body-lungs", "function": "pipeline.bodylungs:segment", "outputs": ["rtstruct", "seg"],
                 "default_settings": dict(DEFAULT_SETTINGS)},
                {"name": "noop", "function": "benchalgos:fixed_masks", "outputs": ["rtstruct", "seg"]},
            ],
            "worker": {"settle_seconds": 0, "rescan_seconds": 1, "job_timeout": 600},
            "http": {"enabled": False},
            "dicom": {
                "enabled": True, "host": "127.0.0.1", "port": self.port, "series_timeout": 30,
                "complete_on_release": True,
                "destinations": {DESTINATION: {"host": "127.0.0.1", "port": self.scp_port, "ae_title": "STORESCP"}},
                "routes": [{"called_ae": ae, "algorithm": alg, "destinations": [DESTINATION]}
                           for alg, ae in ALGORITHMS.items()],
            },
        }))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        with open(self.log, "wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "facade.cli", "--config", str(config), "manage", "run"],
                                    cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.STDOUT)
        self.procs.append(proc)
        ok = wait_until(lambda: b"worker: watching" in self.log.read_bytes() or proc.poll() is not None, 60)
        if not ok or proc.poll() is not None:
            raise RuntimeError(f"the service did not start:\n{self.log.read_text()}")
        if not wait_until(lambda: b"dicom: node " in self.log.read_bytes(), 30):
            raise RuntimeError(f"the DICOM node did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)

    def problems(self) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        bad = [ln for ln in text.splitlines() if " ERROR " in ln or "Traceback" in ln or " WARNING " in ln]
        return [f"service log: {bad[0].strip()} (+{len(bad) - 1} more)"] if bad else []

    def run(self, series: Path, algorithm: str) -> dict[str, float]:
        """storescu ``series`` to the route of ``algorithm``; the figures of that one job, in seconds."""
        for name in files_in(self.out):  # storescp is idle between runs: empty its folder
            (self.out / name).unlink()
        before = set(os.listdir(self.outbox)) if self.outbox.is_dir() else set()
        os.sync()
        proc = subprocess.run([STORESCU, "-aec", ALGORITHMS[algorithm], "+sd", "127.0.0.1", str(self.port),
                               str(series)], env=DCMTK_ENV, capture_output=True, text=True, timeout=300)
        released = time.time()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu exited {proc.returncode}: {proc.stderr[-2000:]}")
        if not wait_until(lambda: len(files_in(self.out)) >= 2, 600, interval=0.002):
            raise RuntimeError(f"the results did not reach storescp within 600 s:\n{self.log.read_text()[-3000:]}")
        landed = time.time()
        key = f"results_seconds.{DESTINATION}"

        def job() -> dict[str, Any] | None:
            for job_id in set(os.listdir(self.outbox)) - before:
                try:
                    data: dict[str, Any] = yaml.load((self.outbox / job_id / "job.yaml").read_text(), Loader=_Loader)
                except (FileNotFoundError, yaml.YAMLError):
                    return None
                if data["status"] != "done":
                    raise RuntimeError(f"job {job_id} is {data['status']}: {data.get('error')}")
                return data if key in data["timings"] else None  # sent, and the send's time written down
            return None

        done = wait_until(job, 60)
        if not done:
            raise RuntimeError(f"no job in the outbox recorded its send:\n{self.log.read_text()[-3000:]}")
        names = sorted(files_in(self.out))
        if len(names) != 2:
            raise RuntimeError(f"storescp holds {names}, not one RTSTRUCT and one SEG")
        t = done["timings"]
        split = {"read": t["dicom_read_seconds"], "rtstruct": t["rtstruct_seconds"], "check": t["check_seconds"],
                 "seg": t["seg_seconds"]}
        return {
            "results": landed - released,
            "algorithm": t["algorithm_ended"] - t["algorithm_started"],
            "after": landed - t["algorithm_ended"],
            "gate": t["committed"] - released,
            "start": t["algorithm_started"] - t["committed"],
            **split,
            "writing": (writing := split["read"] + max(split["rtstruct"] + split["check"], split["seg"])),
            "other": t["finished"] - t["algorithm_ended"] - writing,
            "send": t[key] - writing,
        }


# Columns: figure key, heading.
COLUMNS = (
    ("results", "release to results"),
    ("algorithm", "algorithm"),
    ("after", "algorithm end to results"),
    ("gate", "release to commit"),
    ("start", "commit to job start"),
    ("read", "read series + masks"),
    ("rtstruct", "RTSTRUCT"),
    ("check", "check-back"),
    ("seg", "SEG"),
    ("writing", "writing"),
    ("other", "other"),
    ("send", "send"),
)


def cell(key: str, runs: list[float], size: tuple[int, int]) -> str:
    m = statistics.median(runs)
    text = f"{m:.3f} s"
    if key == "after" and size == TARGET_SIZE:
        text += f" **{'PASS' if m <= TARGET_AFTER_ALGORITHM else 'MISS'}** (<= {TARGET_AFTER_ALGORITHM} s)"
    elif key == "start":
        text += f" {'PASS' if m < TARGET_JOB_START else 'MISS'} (< {TARGET_JOB_START} s)"
    return text


def parse_size(text: str) -> tuple[int, int]:
    """``200x512x512`` (slices x rows x columns; rows and columns equal) or ``200x512``."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 3 and parts[1] == parts[2]:
        return parts[0], parts[1]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"{text!r}: give SLICESxSIZExSIZE, e.g. 200x512x512")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sizes", default="40x128x128,200x512x512",
                   help="series, comma-separated, slices x rows x columns (default 40x128x128,200x512x512)")
    p.add_argument("--repeat", type=int, default=5, help="measured rounds; figures are medians (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs first, per size and algorithm (default 1)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help=f"comma-separated, of {', '.join(ALGORITHMS)} (default both)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    args = p.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    algorithms = [a for a in args.algorithms.split(",") if a]
    if unknown := [a for a in algorithms if a not in ALGORITHMS]:
        p.error(f"unknown algorithm(s) {unknown}; choose from {', '.join(ALGORITHMS)}")
    for tool in (STORESCU, STORESCP):
        if not os.access(tool, os.X_OK):
            print(f"bench: {tool} is missing (apt-get install -y dcmtk)", file=sys.stderr)
            return 2
    base = Path(tempfile.mkdtemp(prefix="postbox-bench-e2e-"))
    t_all = time.perf_counter()
    bench = Bench(base)
    figures: dict[tuple[tuple[int, int], str], list[dict[str, float]]] = {}
    notes: list[str] = []
    try:
        series: dict[tuple[int, int], Path] = {}
        for slices, size in sizes:
            t = time.perf_counter()
            grid = phantom.axial_grid(slices=slices, size=size)
            files = phantom.write_dicom(base / "ct" / f"{slices}x{size}", grid)
            phantom.write_masks_nifti(bench.root / "masks" / f"{slices}x{size}", grid)
            series[slices, size] = base / "ct" / f"{slices}x{size}"
            mb = sum(f.stat().st_size for f in files) / 1e6
            notes.append(f"phantom {slices}x{size}x{size}: {len(files)} instances, {mb:.0f} MB, written with its "
                         f"truth masks in {time.perf_counter() - t:.1f} s")
        bench.start()
        for key, folder in series.items():
            for alg in algorithms:
                for _ in range(args.warmup):
                    warm = bench.run(folder, alg)
                    notes.append(f"warm-up {key[0]}x{key[1]}x{key[1]} {alg}: release to results "
                                 f"{warm['results']:.3f} s, commit to job start {warm['start']:.3f} s")
            for _ in range(args.repeat):
                for alg in algorithms:
                    figures.setdefault((key, alg), []).append(bench.run(folder, alg))
    finally:
        bench.stop()
        notes.extend(bench.problems())
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)

    print(f"# Postbox end to end: storescu -> node -> algorithm -> RTSTRUCT + SEG -> storescp "
          f"({os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {time.perf_counter() - t_all:.0f} s)\n")
    print(f"Medians of {args.repeat} warm run(s) each; the split (read .. send) is from job.yaml's timings. Target: "
          f"algorithm end to results <= {TARGET_AFTER_ALGORITHM} s on {TARGET_SIZE[0]}x{TARGET_SIZE[1]}x"
          f"{TARGET_SIZE[1]}, commit to job start < {TARGET_JOB_START} s. The clock starts at storescu's exit, "
          "a few ms after the association release at which the node commits the series: release to commit "
          "is then negative.\n")
    head = ["series", "algorithm run", *(title for _, title in COLUMNS)]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for (shape, alg), runs in figures.items():
        cells = [cell(key, [r[key] for r in runs], shape) for key, _ in COLUMNS]
        print(f"| {shape[0]} x {shape[1]} x {shape[1]} | {alg} | " + " | ".join(cells) + " |")
    print("\nEvery run (algorithm end to results; release to results):")
    for (shape, alg), runs in figures.items():
        print(f"- {shape[0]}x{shape[1]}x{shape[1]} {alg}: " + " / ".join(f"{r['after']:.3f}" for r in runs)
              + " s; " + " / ".join(f"{r['results']:.3f}" for r in runs) + " s")
    if notes:
        print("\nNotes:")
        for note in notes:
            print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
