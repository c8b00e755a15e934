"""``postbox selftest``: acceptance on site, a phantom sent through every door that is on (issue 11, section 6).

The running service's ready file (``inbox/.services/*.json``) names its doors and ports. A fresh phantom
series goes in through each: the folder (``jobs.submit``, as ``postbox submit`` does), HTTP (with a key made
for the run and removed after it) and DICOM C-STORE to the node itself, optionally over TLS, with the calling
AE title :data:`SELFTEST_AE`, which the node never sends on unless the series asks for a configured
destination (:func:`pipeline.node.selftest_destinations`). Each job's RTSTRUCT is rasterised on the series and
compared with the phantom's own truth, not with the algorithm's masks: a model whose masks are shifted a few
millimetres passes the check-back (RTSTRUCT against mask) but fails here.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from pipeline import jobs, phantom
from pipeline.config import Config
from pipeline.errors import InvalidInput
from pipeline.index import Index
from pipeline.node import SELFTEST_AE, selftest_description
from pipeline.service import ReadyFile
from pipeline.tls import TlsFiles
from pipeline.writers.check import dice, rasterise_rtstruct
from pipeline.writers.series import Series, align_mask, read_series

MIN_DICE = {"body": 0.95, "lung_left": 0.9, "lung_right": 0.9}
DCIODVFY = Path("/usr/bin/dciodvfy")


@dataclass
class DoorResult:
    """What one door made of the phantom: its job, Dice per structure, output problems, and delivery."""

    door: str
    job: str = "-"
    dice: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    sent: str = "-"
    valid: str = "-"  # every RTSTRUCT and SEG read back and passed dciodvfy: yes/no; "-" none was checked

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Options:
    """How to run the self-test: which algorithm, phantom size, TLS, destination, and how long to wait."""

    algorithm: str | None = None
    slices: int = 40
    size: int = 128
    tls: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    destination: str | None = None
    timeout: float = 300.0


def running_doors(cfg: Config) -> dict[str, Any]:
    """The doors of a service running on this inbox, from its ready file (a live process's, newest first).

    Raises
    ------
    InvalidInput
        If no service on this host is running on the inbox.
    """
    folder = cfg.inbox / ReadyFile.FOLDER
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    for path in files:
        try:
            data = json.loads(path.read_text())
            pid = int(data["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if path == ReadyFile.path_for(cfg.inbox, pid) and _alive(pid):
            return dict(data.get("doors") or {})
    raise InvalidInput(f"no running service on {cfg.inbox} (no live ready file in {folder}); start it with "
                       "'postbox manage run'")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)  # polling another process's folders: there is nothing to wait on


def _finished(cfg: Config, job_id: str) -> jobs.JobManifest | None:
    job_dir = jobs.locate(cfg.inbox, cfg.outbox, job_id)
    if job_dir is None or job_dir.parent != cfg.outbox:
        return None
    manifest = jobs.read_manifest(job_dir)
    return manifest if manifest.status in (jobs.JobStatus.DONE, jobs.JobStatus.FAILED) else None


def run(cfg: Config, options: Options, *, work_dir: Path | None = None) -> list[DoorResult]:
    """Send a phantom through every door the running service has on; one result per door.

    Raises
    ------
    InvalidInput
        No running service, ``--tls`` without ``dicom.tls``, or an unknown ``--destination``.
    """
    doors = running_doors(cfg)
    if options.tls and cfg.dicom.tls is None:
        raise InvalidInput("--tls needs dicom.tls in the config (the node serves plain DICOM)")
    if options.destination is not None:
        if options.destination not in cfg.dicom.destinations:
            raise InvalidInput(f"--destination {options.destination}: not a name of dicom.destinations "
                               f"(known: {', '.join(cfg.dicom.destinations) or 'none'})")
        if "dicom" not in doors:
            raise InvalidInput("--destination needs the DICOM door on: only its series are sent on")
    algorithm = options.algorithm or cfg.default_algorithm
    grid = phantom.axial_grid(slices=options.slices, size=options.size)
    _, truth = phantom.sample(grid, noise=0)
    truth_images = {name: phantom.to_sitk(grid, truth[name]) for name in MIN_DICE}
    own = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="postbox-selftest-")) if work_dir is None else work_dir
    results = []
    try:
        for door, send in (("folder", _folder), ("http", _http), ("dicom", _dicom)):
            if door != "folder" and door not in doors:
                continue
            series_dir = root / door / "series"
            phantom.write_dicom(series_dir, grid, patient_id="POSTBOX-SELFTEST",
                                series_description=selftest_description(options.destination))
            result = DoorResult(door)
            try:
                files, manifest = send(cfg, doors.get(door, {}), series_dir, root / door / "out", algorithm,
                                       options, result)
                _judge(result, files, read_series(series_dir), truth_images, manifest)
                if door == "dicom" and options.destination and manifest is not None:
                    _check_sent(cfg, result, manifest.id, options)
            except Exception as exc:  # every way a door can fail is one line of its row, never a traceback
                result.problems.append(f"{type(exc).__name__}: {exc}")
            results.append(result)
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
    return results


# -- the doors --

Sent = tuple[list[Path], jobs.JobManifest | None]  # the output files to judge, and the job when read from its folder


def _job_outputs(cfg: Config, result: DoorResult, manifest: jobs.JobManifest) -> list[Path]:
    result.job = manifest.id
    if manifest.status is not jobs.JobStatus.DONE:
        raise RuntimeError(f"job {manifest.id} {manifest.status.value}: {manifest.error}")
    return [cfg.outbox / manifest.id / o.path for o in manifest.outputs if o.type == "DICOM"]


def _folder(cfg: Config, info: dict[str, Any], series_dir: Path, out: Path, algorithm: str, options: Options,
            result: DoorResult) -> Sent:
    # As `postbox submit` does: one staged and committed job, through the job protocol's own code.
    manifest = jobs.submit(cfg.inbox, [series_dir], algorithm=algorithm, source="cli", index=Index(cfg.database))
    result.job = manifest.id
    done = _wait(lambda: _finished(cfg, manifest.id), options.timeout, f"folder job {manifest.id}")
    return _job_outputs(cfg, result, done), done


def _http(cfg: Config, info: dict[str, Any], series_dir: Path, out: Path, algorithm: str, options: Options,
          result: DoorResult) -> Sent:
    from .client import Client

    index = Index(cfg.database)
    name = f"selftest-{secrets.token_hex(4)}"
    key = index.add_key(name)
    try:
        verify = None
        if info.get("scheme") == "https":
            served = cfg.tls_files()["http.tls"]
            verify = str(served.ca or served.cert)
        host = _local(cfg.http.host)
        with Client(host, int(info["port"]), key, algorithm, verify=verify, progress=False) as client:
            dataset = client.add_dataset()
            client.add_dicom_folder(dataset, series_dir)
            for _ in client.run_algorithm(dataset):
                pass
            files = client.download_output_objects(dataset, output_path=out)
        found = index.jobs(lambda r: str(r.get("dataset")) == str(dataset["id"] if isinstance(dataset, dict)
                                                                    else dataset))
        result.job = found[-1]["id"] if found else "-"
    finally:
        index.remove_key(name)
    return [f for f in files if f.suffix == ".dcm"], None


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _dicom_tls(cfg: Config, options: Options, host: str) -> tuple[Any, str] | None:
    if not options.tls:
        return None
    server = cfg.tls_files()["dicom.tls"]  # its files as paths, resolved against the config's folder
    cert, key = options.tls_cert, options.tls_key
    if cert is None and server.ca is not None and (server.ca.parent / "client.pem").is_file():
        # The layout `postbox manage certs` writes: a client certificate beside the CA.
        cert, key = server.ca.parent / "client.pem", server.ca.parent / "client-key.pem"
    files = TlsFiles(cert=cert, key=key, ca=server.ca or server.cert)
    return files.client_context(), host


def _dicom(cfg: Config, info: dict[str, Any], series_dir: Path, out: Path, algorithm: str, options: Options,
           result: DoorResult) -> Sent:
    from pynetdicom import AE

    files = sorted(series_dir.glob("*.dcm"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    series_uid = str(first.SeriesInstanceUID)
    host = _local(cfg.dicom.host)
    ae = AE(ae_title=SELFTEST_AE)
    ae.add_requested_context(str(first.SOPClassUID))
    ae.acse_timeout = ae.network_timeout = 30
    tls = _dicom_tls(cfg, options, "localhost" if host == "127.0.0.1" else host)
    started = jobs.new_job_id()[:15]  # the second the series goes in: its job's id sorts after it
    assoc = ae.associate(host, int(info["port"]), ae_title=str(info.get("ae_title") or cfg.dicom.ae_title),
                         tls_args=tls)
    if not assoc.is_established:
        raise RuntimeError(f"no association with the node at {host}:{info['port']}")
    try:
        for path in files:
            status = assoc.send_c_store(pydicom.dcmread(path))
            if getattr(status, "Status", None) != 0:
                raise RuntimeError(f"C-STORE of {path.name} answered {status}")
    finally:
        assoc.release()

    def ours() -> jobs.JobManifest | None:
        for record in reversed(Index(cfg.database).jobs(lambda r: r["source"] == "dicom" and r["id"] >= started)):
            manifest = _finished(cfg, record["id"])
            if manifest is not None and manifest.inputs and \
                    manifest.inputs[0].meta_data.get("series_instance_uid") == series_uid:
                return manifest
        return None

    done = _wait(ours, options.timeout, f"the job of DICOM series {series_uid}")
    return _job_outputs(cfg, result, done), done


def _check_sent(cfg: Config, result: DoorResult, job_id: str, options: Options) -> None:
    name = options.destination

    def settled() -> jobs.SendState | None:
        manifest = jobs.read_manifest(cfg.outbox / job_id)
        state = manifest.sends.get(str(name))
        return state if state is not None and state.status is not jobs.SendStatus.PENDING else None

    try:
        state = _wait(settled, options.timeout, f"job {job_id}'s send to {name}")
    except TimeoutError as exc:
        result.sent = "pending"
        result.problems.append(str(exc))
        return
    result.sent = state.status.value
    if state.status is not jobs.SendStatus.SENT:
        result.problems.append(f"send to {name} {state.status.value}: {state.error}")


# -- the checks --


def _judge(result: DoorResult, files: list[Path], series: Series, truth: dict[str, Any],
           manifest: jobs.JobManifest | None) -> None:
    """Dice of the RTSTRUCT against the phantom's truth, and every RTSTRUCT and SEG valid."""
    renamed = {str(v.get("name", k)): k for k, v in manifest.delivery.structures.items()
               if isinstance(v, dict)} if manifest is not None else {}
    rtstructs = 0
    invalid = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            invalid.append(f"{path.name}: pydicom cannot read it ({exc})")
            continue
        modality = str(ds.get("Modality", ""))
        if modality not in ("RTSTRUCT", "SEG"):
            continue
        if modality == "SEG":
            try:
                import highdicom as hd

                hd.seg.Segmentation.from_dataset(ds)
            except Exception as exc:
                invalid.append(f"{path.name}: highdicom cannot read the SEG back ({exc})")
        invalid.extend(f"{path.name}: dciodvfy: {line}" for line in _dciodvfy(path))
        result.valid = "no" if invalid else "yes"
        if modality == "RTSTRUCT":
            rtstructs += 1
            contours = {renamed.get(name, name): mask for name, mask in rasterise_rtstruct(ds, series).items()}
            for name, minimum in MIN_DICE.items():
                expected = align_mask(series, name, truth[name])
                got = contours.get(name, np.zeros(series.shape, dtype=bool))
                figure = dice(got, expected)
                result.dice[name] = figure
                if figure < minimum:
                    result.problems.append(f"{name}: Dice {figure:.3f} against the phantom below {minimum:g}")
    result.problems.extend(invalid)
    if rtstructs == 0:
        result.problems.append("no RTSTRUCT among the outputs")


def _dciodvfy(path: Path) -> list[str]:
    if not DCIODVFY.exists():
        return []
    proc = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=120)
    return [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def table(results: list[DoorResult]) -> str:
    """The report: door, job, Dice per structure, validity, sent, and each problem under its row."""
    names = list(MIN_DICE)
    lines = [f"{'DOOR':<7} {'JOB':<25} " + " ".join(f"{n:>10}" for n in names) + f" {'VALID':<6} {'SENT':<8} RESULT"]
    for r in results:
        figures = " ".join(f"{r.dice[n]:>10.3f}" if n in r.dice else f"{'-':>10}" for n in names)
        lines.append(f"{r.door:<7} {r.job:<25} {figures} {r.valid:<6} {r.sent:<8} {'ok' if r.ok else 'FAILED'}")
        lines.extend(f"    {p}" for p in r.problems)
    return "\n".join(lines)
