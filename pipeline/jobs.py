"""The job-folder protocol of design.md, in one place.

stage -> commit (one atomic rename into the inbox) -> claim (file lock) -> start_attempt -> finish/fail
(one atomic rename into the outbox). This is the only module that renames job folders or writes job.yaml;
the doors (folder drop, CLI, HTTP, DICOM) and the worker call it.

Layout of a job folder::

    <id>/job.yaml      the manifest (JobManifest)
    <id>/input/        inputs: one folder per DICOM series, files as they came
    <id>/work/         the algorithm's working_dir while it runs (discarded on a new attempt)
    <id>/output/       outputs, complete and synced before the job moves to the outbox
    <id>/job.log       what the algorithm printed or logged, every attempt
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from .dataobject import DataObject
from .errors import ClaimLost, InvalidInput

log = logging.getLogger(__name__)

JOB_FILE = "job.yaml"
INPUT = "input"
OUTPUT = "output"
WORK = "work"
LOG = "job.log"
STAGING = ".staging"
LOCKS = ".locks"
DROPPED = "dropped"  # inside a staging folder: a hand-dropped item being turned into a job

_JOB_ID = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{8}$")
# Editors, browsers and copy tools write these while a file is not yet whole.
_PARTIAL_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".download", ".swp", "~")
_SERIES_UID_TAG = 0x0020000E


class JobStatus(str, Enum):
    """Where a job is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


def now_iso() -> str:
    """The current UTC time as an ISO 8601 string."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class JobManifest:
    """The content of job.yaml; valid once constructed.

    Paths of inputs and outputs are relative to the job folder, so a job stays whole when it moves.
    """

    id: str
    algorithm: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    source: str = "folder"
    status: JobStatus = JobStatus.PENDING
    created: str = field(default_factory=now_iso)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    started: str | None = None
    finished: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    sender: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    owner: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _JOB_ID.match(self.id):
            raise ValueError(f"job id {self.id!r} is not of the form YYYYMMDDTHHMMSS-xxxxxxxx")
        self.status = JobStatus(self.status)
        if not isinstance(self.settings, dict):
            raise TypeError(f"job {self.id}: settings must be a mapping, not {type(self.settings).__name__}")
        if not isinstance(self.attempts, int) or self.attempts < 0:
            raise ValueError(f"job {self.id}: attempts must be a whole number >= 0")
        for item in self.inputs + self.outputs:
            _check_relative(self.id, item.get("path", ""))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobManifest:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_yaml(cls, path: Path) -> JobManifest:
        """Read a job.yaml; ValueError if it is not a Postbox manifest."""
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
        if not isinstance(data, Mapping):
            raise ValueError(f"{path} is not a job manifest")
        return cls.from_dict(data)


_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _check_relative(job_id: str, rel: str) -> None:
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts:
        raise ValueError(f"job {job_id}: path {rel!r} leaves the job folder")


# --- small file-system helpers ---------------------------------------------------------------


def new_job_id() -> str:
    """A unique, time-sortable id that carries no patient data."""
    return f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"


def is_job_id(name: str) -> bool:
    return bool(_JOB_ID.match(name))


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder below ``path`` (outputs before they move to the outbox)."""
    if path.is_file():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` by temp file and rename: readers see old or new, never half.

    ``durable`` also fsyncs, so the new content survives a power cut, not only a crashed process.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_manifest(job_dir: Path, manifest: JobManifest, *, durable: bool = True) -> None:
    text = yaml.dump(manifest.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    atomic_write(job_dir / JOB_FILE, text.encode("utf-8"), durable=durable)


def read_manifest(job_dir: Path) -> JobManifest:
    return JobManifest.from_yaml(job_dir / JOB_FILE)


def is_ignored(name: str) -> bool:
    """Hidden, temporary and partial files are never taken as input (design.md)."""
    return name.startswith((".", "~", "#")) or name.lower().endswith(_PARTIAL_SUFFIXES) or name == "Thumbs.db"


def newest_change(path: Path) -> float:
    """The latest mtime or ctime in the tree at ``path``.

    ctime counts because copy tools (``cp -p``, ``shutil.copy2``) put old mtimes on new files.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        return time.time()
    newest = max(st.st_mtime, st.st_ctime)
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    st = os.lstat(os.path.join(root, name))
                except FileNotFoundError:
                    return time.time()  # still changing under us
                newest = max(newest, st.st_mtime, st.st_ctime)
    return newest


# --- inputs -------------------------------------------------------------------------------------


def dicom_series_uid(path: Path) -> str | None:
    """The SeriesInstanceUID of a DICOM file (by content, not by name), or None if not DICOM."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    import pydicom  # only needed for DICOM input; keeps the CLI quick to start

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a broken file is refused below, not warned about
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[_SERIES_UID_TAG])
    except Exception as exc:  # pydicom raises many types for a broken file
        raise InvalidInput(f"{path.name}: DICOM file does not parse ({exc})") from None
    uid = ds.get("SeriesInstanceUID")
    if not uid:
        raise InvalidInput(f"{path.name}: DICOM file has no SeriesInstanceUID")
    return str(uid)


def _walk_inputs(root: Path) -> Iterable[Path]:
    """Every file below ``root`` that counts as input (no hidden, temp or partial files, no links)."""
    if root.is_symlink():
        raise InvalidInput(f"{root.name}: symbolic links are not taken as input")
    if root.is_file():
        if not is_ignored(root.name):
            yield root
        return
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not is_ignored(d))
        for name in sorted(files):
            p = Path(dirpath) / name
            if is_ignored(name) or p.is_symlink():
                continue
            yield p


def place_inputs(sources: Iterable[Path], input_dir: Path, *, how: str = "copy", base: Path | None = None,
                 skip: Iterable[Path] = ()) -> list[dict[str, Any]]:
    """Put input files into ``input_dir``, grouping DICOM files by series.

    Each DICOM series becomes one folder (``series-N``) and one DICOM data object; every other file
    is a FILE data object at its path relative to ``base``.

    Parameters
    ----------
    how
        ``"copy"``, ``"link"`` (hard link, falling back to copy) or ``"move"``.
    skip
        Files not to take (a dropped folder's own job.yaml).
    """
    skipped = {p.resolve() for p in skip}
    series: dict[str, Path] = {}
    inputs: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for src_root in sources:
        root_base = base or (src_root.parent if src_root.is_dir() else src_root.parent)
        for src in _walk_inputs(src_root):
            if src.resolve() in skipped:
                continue
            uid = dicom_series_uid(src)
            if uid is not None:
                if uid not in series:
                    series[uid] = input_dir / f"series-{len(series) + 1}"
                    series[uid].mkdir(parents=True)
                    inputs.append({"id": f"in-{len(inputs) + 1}", "type": "DICOM",
                                   "path": f"{INPUT}/{series[uid].name}",
                                   "meta_data": {"series_instance_uid": uid}})
                dest = series[uid] / src.name
                if dest.exists():  # two files of one series with one name in different folders
                    dest = series[uid] / f"{src.stem}-{secrets.token_hex(3)}{src.suffix}"
                counts[uid] = counts.get(uid, 0) + 1
            else:
                rel = src.relative_to(root_base) if src.is_relative_to(root_base) else Path(src.name)
                dest = input_dir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                inputs.append({"id": f"in-{len(inputs) + 1}", "type": "FILE",
                               "path": f"{INPUT}/{rel.as_posix()}", "meta_data": {}})
            _transfer(src, dest, how)
    for item in inputs:
        uid = item["meta_data"].get("series_instance_uid")
        if uid:
            item["meta_data"]["instances"] = counts[uid]
    if not inputs:
        raise InvalidInput("no input files (hidden, temporary and partial files are ignored)")
    return inputs


def _transfer(src: Path, dest: Path, how: str) -> None:
    if how == "move":
        os.rename(src, dest)
        return
    if how == "link":
        try:
            os.link(src, dest)
            return
        except OSError:
            pass  # another filesystem or no hard links: copy instead
    shutil.copy2(src, dest)


# --- staging and commit ----------------------------------------------------------------------


def stage(inbox: Path, job_id: str | None = None) -> Path:
    """Create a private staging folder ``inbox/.staging/<id>/input`` for a new job."""
    job_id = job_id or new_job_id()
    sdir = inbox / STAGING / job_id
    (sdir / INPUT).mkdir(parents=True)
    return sdir


def commit(inbox: Path, staging_dir: Path, manifest: JobManifest) -> Path:
    """Make a staged job visible in the inbox with one atomic rename; returns the job folder."""
    if staging_dir.name != manifest.id:
        raise ValueError(f"staging folder {staging_dir.name} does not match job {manifest.id}")
    manifest.status = JobStatus.PENDING
    manifest.timings["committed"] = time.time()
    fsync_tree(staging_dir / INPUT)
    write_manifest(staging_dir, manifest)
    job_dir = inbox / manifest.id
    os.rename(staging_dir, job_dir)
    fsync_dir(inbox)
    log.info("job %s: committed (%s, algorithm %s)", manifest.id, manifest.source, manifest.algorithm or "default")
    return job_dir


def discard(staging_dir: Path) -> None:
    """Remove a staged job that was refused: a refused input leaves nothing behind."""
    shutil.rmtree(staging_dir, ignore_errors=True)


def submit(inbox: Path, paths: Iterable[Path], *, algorithm: str | None = None,
           settings: Mapping[str, Any] | None = None, source: str = "cli", how: str = "copy",
           **fields: Any) -> JobManifest:
    """Stage ``paths`` as the inputs of one new job and commit it."""
    sdir = stage(inbox)
    manifest = JobManifest(id=sdir.name, algorithm=algorithm, settings=dict(settings or {}), source=source,
                           **fields)
    try:
        manifest.inputs = place_inputs([Path(p) for p in paths], sdir / INPUT, how=how)
        commit(inbox, sdir, manifest)
    except BaseException:
        discard(sdir)
        raise
    return manifest


def _read_drop_request(item: Path) -> tuple[Path | None, dict[str, Any]]:
    """A dropped folder's own job.yaml may name the algorithm and settings."""
    path = item / JOB_FILE
    if not item.is_dir() or not path.is_file():
        return None, {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        return path, {"refused": f"job.yaml is not valid YAML: {exc}"}
    if not isinstance(data, dict):
        return path, {"refused": "job.yaml must be a mapping with 'algorithm' and/or 'settings'"}
    unknown = set(data) - {"algorithm", "settings"}
    if unknown:
        return path, {"refused": f"job.yaml has unknown key(s) {', '.join(sorted(unknown))} "
                                 "(known: algorithm, settings)"}
    if not isinstance(data.get("settings", {}), dict):
        return path, {"refused": "job.yaml: settings must be a mapping"}
    return path, {"algorithm": data.get("algorithm"), "settings": data.get("settings") or {}}


def adopt(inbox: Path, item: Path) -> JobManifest | None:
    """Turn a file or folder copied into the inbox by hand into one job.

    The item is first moved (one rename) into a staging folder, then linked into the job's input
    layout, so a crash at any step leaves either the item or the whole job, and ``recover``
    finishes the work.
    """
    job_id = new_job_id()
    sdir = inbox / STAGING / job_id
    (sdir / DROPPED).mkdir(parents=True)
    try:
        os.rename(item, sdir / DROPPED / item.name)
    except FileNotFoundError:
        shutil.rmtree(sdir, ignore_errors=True)
        return None
    fsync_dir(inbox)
    return _build_adopted(inbox, sdir)


def _build_adopted(inbox: Path, sdir: Path) -> JobManifest:
    dropped = sdir / DROPPED
    items = list(dropped.iterdir())
    if (sdir / INPUT).exists():
        shutil.rmtree(sdir / INPUT)
    (sdir / INPUT).mkdir()
    request_file, request = _read_drop_request(items[0]) if len(items) == 1 else (None, {})
    manifest = JobManifest(id=sdir.name, source="folder", algorithm=request.get("algorithm"),
                           settings=request.get("settings", {}))
    if "refused" in request:
        manifest.extra["refused"] = request["refused"]
    try:
        manifest.inputs = place_inputs(items, sdir / INPUT, how="link", base=dropped,
                                       skip=[request_file] if request_file else [])
    except InvalidInput as exc:
        # Keep the drop: it becomes a failed job whose folder holds what was dropped (nothing is lost).
        manifest.extra["refused"] = exc.reason
        shutil.rmtree(sdir / INPUT)
        os.rename(dropped, sdir / INPUT)
        manifest.inputs = []
    write_manifest(sdir, manifest)
    shutil.rmtree(dropped, ignore_errors=True)
    commit(inbox, sdir, manifest)
    return manifest


def recover(inbox: Path) -> list[str]:
    """Finish what a crash interrupted in the staging area; returns the ids of jobs committed.

    A staged job with its manifest written is complete and is committed; a hand-dropped item
    half way to a job is rebuilt from the item. Other staging folders belong to doors still
    receiving (an HTTP upload, a DICOM series) and are left alone.
    """
    done: list[str] = []
    staging = inbox / STAGING
    if not staging.is_dir():
        return done
    for sdir in sorted(staging.iterdir()):
        if not is_job_id(sdir.name):
            continue
        if (sdir / JOB_FILE).is_file():
            manifest = read_manifest(sdir)
            shutil.rmtree(sdir / DROPPED, ignore_errors=True)
            commit(inbox, sdir, manifest)
            done.append(sdir.name)
        elif (sdir / DROPPED).is_dir():
            done.append(_build_adopted(inbox, sdir).id)
    return done


# --- scanning ----------------------------------------------------------------------------------


def scan(inbox: Path) -> list[str]:
    """Ids of the committed jobs in the inbox, oldest first."""
    try:
        # Names alone: a job folder only ever appears whole (commit is one rename), and claim() reads its
        # job.yaml anyway; a stat per entry cost 50 ms a scan at 10,000 jobs.
        names = os.listdir(inbox)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if is_job_id(n))


def dropped_items(inbox: Path) -> list[Path]:
    """Files and folders put into the inbox by hand (not jobs, not hidden, not partial)."""
    try:
        names = os.listdir(inbox)
    except FileNotFoundError:
        return []
    return sorted(inbox / n for n in names if not is_ignored(n) and not is_job_id(n))


def locate(inbox: Path, outbox: Path, job_id: str) -> Path | None:
    """The folder of job ``job_id``, wherever it is now."""
    if not is_job_id(job_id):
        return None
    for box in (outbox, inbox):
        if (box / job_id / JOB_FILE).is_file():
            return box / job_id
    return None


# --- claiming and finishing ----------------------------------------------------------------------


@dataclass
class Claim:
    """A job held by this process through an OS-level lock in ``inbox/.locks``."""

    job_id: str
    job_dir: Path
    manifest: JobManifest
    lock: FileLock

    @property
    def work_dir(self) -> Path:
        return self.job_dir / WORK

    @property
    def log_path(self) -> Path:
        return self.job_dir / LOG

    def release(self) -> None:
        # The lock file stays: deleting it would let a waiter lock a file that no longer exists.
        self.lock.release()


def lock_path(inbox: Path, name: str) -> Path:
    # Outside the job folder, which moves: filelock would re-create a moved folder's parent.
    return inbox / LOCKS / f"{name}.lock"


def try_lock(path: Path) -> FileLock | None:
    """Take the OS lock at ``path`` without waiting; None if someone holds it."""
    lock = FileLock(path, timeout=0, thread_local=False, preserve_lock_file=True)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        return None
    return lock


def claim(inbox: Path, job_id: str) -> Claim | None:
    """Lock job ``job_id``; None if another worker holds it or it has left the inbox."""
    lock = try_lock(lock_path(inbox, job_id))
    if lock is None:
        return None
    job_dir = inbox / job_id
    try:
        manifest = read_manifest(job_dir)
    except FileNotFoundError:
        lock.release()  # finished by another worker between our scan and our lock
        return None
    except (ValueError, TypeError, yaml.YAMLError) as exc:
        log.error("job %s: unreadable job.yaml (%s); left in the inbox", job_id, exc)
        lock.release()
        return None
    return Claim(job_id, job_dir, manifest, lock)


def start_attempt(claim: Claim) -> None:
    """Count a new attempt and give it a clean working folder (a dead attempt's files are discarded)."""
    m = claim.manifest
    previous = m.status
    m.attempts += 1
    for name in (WORK, OUTPUT):
        shutil.rmtree(claim.job_dir / name, ignore_errors=True)
    claim.work_dir.mkdir()
    if previous == JobStatus.RUNNING:
        m.warnings.append(f"attempt {m.attempts - 1} did not finish (its worker stopped); started again")
    m.status = JobStatus.RUNNING
    m.started = now_iso()
    m.timings["claimed"] = time.time()
    m.error = None
    with open(claim.log_path, "a", encoding="utf-8") as fh:
        fh.write(f"--- attempt {m.attempts} at {m.started} (worker pid {os.getpid()}) ---\n")
    # Not fsynced: a killed process leaves this in the page cache for the next worker to count; only a
    # power cut could lose it, and then the job simply runs again without the attempt counted.
    _save(claim, durable=False)


def append_log(claim: Claim, line: str) -> None:
    """Add a line of Postbox's own to the job's log (what it did after the algorithm)."""
    with open(claim.log_path, "a", encoding="utf-8") as fh:
        fh.write(f"--- {line} ---\n")


def requeue(claim: Claim, reason: str) -> None:
    """Give a job back to the inbox untouched (service shutting down); the attempt does not count."""
    m = claim.manifest
    m.status = JobStatus.PENDING
    m.attempts = max(0, m.attempts - 1)
    shutil.rmtree(claim.work_dir, ignore_errors=True)
    with open(claim.log_path, "a", encoding="utf-8") as fh:
        fh.write(f"--- attempt interrupted: {reason} ---\n")
    _save(claim)


def _save(claim: Claim, *, durable: bool = True) -> None:
    if not claim.job_dir.is_dir():
        raise ClaimLost(claim.job_id)
    write_manifest(claim.job_dir, claim.manifest, durable=durable)


def _unique(dest_dir: Path, name: str) -> Path:
    dest = dest_dir / name
    n = 1
    while dest.exists():
        stem, dot, suffix = name.partition(".")
        dest = dest_dir / f"{stem}-{n}{dot}{suffix}"
        n += 1
    return dest


def collect_outputs(claim: Claim, outputs: list[DataObject]) -> list[dict[str, Any]]:
    """Move an algorithm's outputs into ``output/`` and describe them for the manifest."""
    out_dir = claim.job_dir / OUTPUT
    out_dir.mkdir(exist_ok=True)
    records = []
    for i, obj in enumerate(outputs, 1):
        src = Path(obj.path)
        if not src.is_absolute():
            src = claim.work_dir / src
        if not src.exists():
            raise InvalidInput(f"output {i} ({obj.path}) does not exist")
        dest = _unique(out_dir, src.name)
        if src.resolve().is_relative_to(claim.work_dir.resolve()):
            os.rename(src, dest)
        elif src.is_dir():
            shutil.copytree(src, dest, symlinks=False)
        else:
            shutil.copy2(src, dest)
        records.append({"id": obj.id or f"out-{i}", "type": obj.type,
                        "path": dest.relative_to(claim.job_dir).as_posix(),
                        "parent": obj.parent.id if obj.parent is not None else None,
                        "meta_data": dict(obj.meta_data)})
    return records


def update_finished(inbox: Path, outbox: Path, job_id: str, change: Callable[[JobManifest], None]) -> JobManifest:
    """Change the manifest of a job in the outbox (send state), under the job's lock."""
    lock = FileLock(lock_path(inbox, job_id), timeout=30, thread_local=False, preserve_lock_file=True)
    with lock:
        job_dir = outbox / job_id
        manifest = read_manifest(job_dir)
        change(manifest)
        write_manifest(job_dir, manifest)
    return manifest


def finish(claim: Claim, outbox: Path, outputs: list[dict[str, Any]] | None = None) -> Path:
    """Record success and move the job to the outbox with one atomic rename."""
    m = claim.manifest
    if outputs is not None:
        m.outputs = outputs
    m.status = JobStatus.DONE
    return _close(claim, outbox, discard_work=True)


def fail(claim: Claim, outbox: Path, reason: str, detail: str | None = None) -> Path:
    """Record failure (reason in job.yaml, detail in job.log) and move the job to the outbox."""
    m = claim.manifest
    m.status = JobStatus.FAILED
    m.error = reason
    with open(claim.log_path, "a", encoding="utf-8") as fh:
        fh.write(f"--- failed: {reason} ---\n")
        if detail:
            fh.write(detail if detail.endswith("\n") else detail + "\n")
    return _close(claim, outbox, discard_work=False)


def _close(claim: Claim, outbox: Path, *, discard_work: bool) -> Path:
    m = claim.manifest
    m.finished = now_iso()
    m.timings["finished"] = time.time()
    if discard_work:
        shutil.rmtree(claim.work_dir, ignore_errors=True)
    if (claim.job_dir / OUTPUT).exists():
        fsync_tree(claim.job_dir / OUTPUT)
    if claim.log_path.exists():
        fsync_tree(claim.log_path)
    _save(claim)
    dest = outbox / claim.job_id
    os.rename(claim.job_dir, dest)
    fsync_dir(outbox)
    fsync_dir(claim.job_dir.parent)
    claim.job_dir = dest
    log.info("job %s: %s after %d attempt(s)", claim.job_id, m.status.value, m.attempts)
    return dest
