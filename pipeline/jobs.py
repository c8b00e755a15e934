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
    <id>/output/preview.png   the contour preview, added after the finish (``preview`` in job.yaml, issue 11)
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import yaml
from filelock import FileLock, Timeout

from .checks import dicom_series_uid, is_ignored
from .crashpoints import crash_point
from .dataobject import DataObject
from .errors import ClaimLost, DamagedManifest, InvalidInput

log = logging.getLogger(__name__)

JOB_FILE = "job.yaml"
INPUT = "input"
OUTPUT = "output"
WORK = "work"
LOG = "job.log"
STAGING = ".staging"
LOCKS = ".locks"
DROPPED = "dropped"  # inside a staging folder: a hand-dropped item being turned into a job
# A staging folder with inputs only, untouched this long, belongs to a door that died before acknowledging it.
ABANDONED_SECONDS = 3600.0
RECEIVING = "receiving.json"  # inside a staging folder: a door receiving into it (who sends, where it goes)
# The contour preview of a finished job (issue 11), relative to its folder: written after the finish, never an
# output (outputs are the algorithm's, recorded and sent at the finish); job.yaml's ``preview`` names it.
PREVIEW = f"{OUTPUT}/preview.png"

_JOB_ID = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{8}$")


class JobStatus(str, Enum):
    """Where a job is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class SendStatus(str, Enum):
    """Where a job's results are on their way to one destination."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


_KINDS = ("DICOM", "FILE")


def now_iso() -> str:
    """The current UTC time as an ISO 8601 string."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _check_relative(job_id: str, rel: str) -> None:
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts:
        raise ValueError(f"job {job_id}: path {rel!r} leaves the job folder")


def _mapping(what: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping, not {type(value).__name__}")
    return dict(value)


@dataclass
class InputRecord:
    """One input data object: a DICOM series folder or a file, at ``path`` relative to the job folder.

    ``gate`` is the completeness verdict taken when the series was received (the DICOM node checks each
    series as it completes), so the worker need not read every file again; None when not checked yet.
    """

    id: str
    type: str
    path: str
    meta_data: dict[str, Any] = field(default_factory=dict)
    gate: list[str] | None = None

    def __post_init__(self) -> None:
        if self.type not in _KINDS:
            raise ValueError(f"input {self.id}: type must be DICOM or FILE, not {self.type!r}")
        _check_relative(self.id, self.path)
        self.meta_data = _mapping(f"input {self.id}: meta_data", self.meta_data)
        if self.gate is not None:
            self.gate = [str(g) for g in self.gate]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputRecord:
        meta = _mapping("input meta_data", data.get("meta_data"))
        # 0.1.0 kept the node's verdict among the algorithm's meta_data.
        gate = data.get("gate", meta.pop("gate", None))
        return cls(id=str(data["id"]), type=data["type"], path=data["path"], meta_data=meta, gate=gate)


@dataclass
class OutputRecord:
    """One output of a finished job, at ``path`` relative to the job folder; ``parent`` is an input's id."""

    id: str
    type: str
    path: str
    parent: str | None = None
    meta_data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in _KINDS:
            raise ValueError(f"output {self.id}: type must be DICOM or FILE, not {self.type!r}")
        _check_relative(self.id, self.path)
        self.meta_data = _mapping(f"output {self.id}: meta_data", self.meta_data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputRecord:
        return cls(id=str(data["id"]), type=data["type"], path=data["path"], parent=data.get("parent"),
                   meta_data=_mapping("output meta_data", data.get("meta_data")))


@dataclass
class Delivery:
    """Where a job's DICOM results go, and under which structure names.

    ``destinations`` are names of ``dicom.destinations`` or inline peers ``{host, port, ae_title}`` (an HTTP
    dataset's ``to_dicom_location``); ``structures`` maps a mask's name to ``{name, color, type}`` (a route's).
    """

    destinations: list[Any] = field(default_factory=list)
    structures: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.destinations, (list, tuple)):
            raise TypeError("delivery.destinations must be a list")
        self.destinations = list(self.destinations)
        for dest in self.destinations:
            if isinstance(dest, Mapping):
                if set(dest) != {"host", "port", "ae_title"}:
                    raise ValueError(f"delivery destination {dict(dest)} needs exactly host, port and ae_title")
            elif not isinstance(dest, str):
                raise TypeError(f"delivery destination must be a name or a mapping, not {type(dest).__name__}")
        self.structures = _mapping("delivery.structures", self.structures)

    @staticmethod
    def name_of(dest: Any) -> str:
        """How a destination is named in ``sends``: its config name, or ``AE@host:port``."""
        return dest if isinstance(dest, str) else f"{dest['ae_title']}@{dest['host']}:{dest['port']}"

    def plan(self, outputs: list[OutputRecord]) -> dict[str, SendState]:
        """A pending send to every destination, of every DICOM output."""
        files = [o.path for o in outputs if o.type == "DICOM"]
        return {self.name_of(d): SendState(target=None if isinstance(d, str) else dict(d),
                                           files=dict.fromkeys(files)) for d in self.destinations}


@dataclass
class SendState:
    """One destination's delivery of a job's results, file by file.

    ``files`` maps each output's path to when the destination stored it (None: not yet), so that after a
    partial delivery only what is missing goes again (issue 8).
    """

    status: SendStatus = SendStatus.PENDING
    attempts: int = 0
    next_try: float = 0.0
    error: str | None = None
    sent: str | None = None
    target: dict[str, Any] | None = None
    files: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.status = SendStatus(self.status)
        if not isinstance(self.attempts, int) or self.attempts < 0:
            raise ValueError("send attempts must be a whole number >= 0")
        self.next_try = float(self.next_try)
        self.files = _mapping("send files", self.files)

    @property
    def missing(self) -> list[str]:
        """The files the destination has not stored yet."""
        return [path for path, when in self.files.items() if when is None]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SendState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class JobManifest:
    """The content of job.yaml; valid once constructed.

    Paths of inputs and outputs are relative to the job folder, so a job stays whole when it moves.
    ``refused`` is a reason found at the door that fails the job without running it (a hand drop with
    an unreadable job.yaml of its own); ``checks`` the check-back Dice per input and structure.
    ``early_sent`` names, per destination, the outputs stored there while the job ran (SOP Instance UID
    to file name), recorded before the finish so that a run again after a crash does not send them again.
    ``preview`` is the contour preview's path (:data:`PREVIEW`) once :func:`save_preview` has written it.
    """

    id: str
    algorithm: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    source: str = "folder"
    status: JobStatus = JobStatus.PENDING
    created: str = field(default_factory=now_iso)
    inputs: list[InputRecord] = field(default_factory=list)
    outputs: list[OutputRecord] = field(default_factory=list)
    attempts: int = 0
    started: str | None = None
    finished: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    sender: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    owner: str | None = None
    refused: str | None = None
    delivery: Delivery = field(default_factory=Delivery)
    sends: dict[str, SendState] = field(default_factory=dict)
    checks: dict[str, dict[str, float]] = field(default_factory=dict)
    early_sent: dict[str, dict[str, str]] = field(default_factory=dict)
    preview: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _JOB_ID.match(self.id):
            raise ValueError(f"job id {self.id!r} is not of the form YYYYMMDDTHHMMSS-xxxxxxxx")
        self.status = JobStatus(self.status)
        if not isinstance(self.settings, dict):
            raise TypeError(f"job {self.id}: settings must be a mapping, not {type(self.settings).__name__}")
        if not isinstance(self.attempts, int) or self.attempts < 0:
            raise ValueError(f"job {self.id}: attempts must be a whole number >= 0")
        self.inputs = [i if isinstance(i, InputRecord) else InputRecord.from_dict(i) for i in self.inputs]
        self.outputs = [o if isinstance(o, OutputRecord) else OutputRecord.from_dict(o) for o in self.outputs]
        if not isinstance(self.delivery, Delivery):
            self.delivery = Delivery(**_mapping(f"job {self.id}: delivery", self.delivery))
        self.sends = {str(k): v if isinstance(v, SendState) else SendState.from_dict(v)
                      for k, v in _mapping(f"job {self.id}: sends", self.sends).items()}
        dicom_outputs = [o.path for o in self.outputs if o.type == "DICOM"]
        for state in self.sends.values():
            if not state.files:  # written by 0.1.0, which kept no state per file
                delivered = state.sent if state.status == SendStatus.SENT else None
                state.files = dict.fromkeys(dicom_outputs, delivered)
        self.timings = {str(k): float(v) for k, v in _mapping(f"job {self.id}: timings", self.timings).items()}
        self.sender = _mapping(f"job {self.id}: sender", self.sender)
        self.checks = _mapping(f"job {self.id}: checks", self.checks)
        self.early_sent = {str(k): {str(u): str(n) for u, n in _mapping(f"job {self.id}: early_sent", v).items()}
                           for k, v in _mapping(f"job {self.id}: early_sent", self.early_sent).items()}
        if self.preview is not None:
            _check_relative(self.id, str(self.preview))

    @property
    def sending(self) -> bool:
        """Whether some destination still waits for files."""
        return any(s.status == SendStatus.PENDING for s in self.sends.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        for item in data["inputs"]:
            if item["gate"] is None:  # a file, or a series not yet checked: nothing to say
                del item["gate"]
        for state in data["sends"].values():
            state["status"] = SendStatus(state["status"]).value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobManifest:
        data = dict(data)
        legacy = data.pop("extra", None)
        if isinstance(legacy, Mapping):
            # job.yaml as 0.1.0 wrote it: one untyped dict read by the index, the sender and the worker.
            data.setdefault("delivery", {"destinations": legacy.get("destinations") or [],
                                         "structures": legacy.get("structures") or {}})
            data.setdefault("sends", legacy.get("sends") or {})
            data.setdefault("checks", legacy.get("check_dice") or {})
            data.setdefault("refused", legacy.get("refused"))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_yaml(cls, path: Path) -> JobManifest:
        """Read a job.yaml.

        Raises
        ------
        FileNotFoundError
            If there is none (the job moved, or is not a job).
        DamagedManifest
            If it is not valid YAML or not a Postbox manifest.
        """
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            data = yaml.load(text, Loader=_Loader)
            if not isinstance(data, Mapping):
                raise ValueError("it is not a mapping of job fields")
            return cls.from_dict(data)
        except (yaml.YAMLError, ValueError, TypeError, KeyError) as exc:
            raise DamagedManifest(path.parent.name, _one_line(exc)) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


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


def series_input(number: int, folder: str, series_uid: str, instances: int, *, gate: list[str] | None = None,
                 **meta: Any) -> InputRecord:
    """The input record of one DICOM series in ``input/<folder>``: every door describes a series this way."""
    return InputRecord(id=f"in-{number}", type="DICOM", path=f"{INPUT}/{folder}",
                       meta_data={"series_instance_uid": series_uid, **meta, "instances": instances}, gate=gate)


def place_inputs(sources: Iterable[Path], input_dir: Path, *, how: str = "copy", base: Path | None = None,
                 skip: Iterable[Path] = (), warnings: list[str] | None = None) -> list[InputRecord]:
    """Put input files into ``input_dir``, grouping DICOM files by series.

    Each DICOM series becomes one folder (``series-N``) and one DICOM data object; every other file
    is a FILE data object at its path relative to ``base``, except a file that is not DICOM beside a
    series' files (a ``notes.txt`` in a dropped series folder): it is kept in the input but given to
    no algorithm, and ``warnings`` (when given) says so.

    Parameters
    ----------
    how
        ``"copy"``, ``"link"`` (hard link, falling back to copy) or ``"move"``.
    skip
        Files not to take (a dropped folder's own job.yaml).
    """
    skipped = {p.resolve() for p in skip}
    series: dict[str, Path] = {}
    counts: dict[str, int] = {}
    order: list[tuple[str, str]] = []  # ("DICOM", series uid) or ("FILE", relative path), as first met
    file_folders: dict[str, Path] = {}  # a FILE's relative path -> the folder it came from
    series_folders: set[Path] = set()  # the folders that held DICOM files
    for src_root in sources:
        root_base = base or src_root.parent
        for src in _walk_inputs(src_root):
            if src.resolve() in skipped:
                continue
            uid = dicom_series_uid(src)
            if uid is not None:
                if uid not in series:
                    series[uid] = input_dir / f"series-{len(series) + 1}"
                    series[uid].mkdir(parents=True)
                    order.append(("DICOM", uid))
                dest = series[uid] / src.name
                if dest.exists():  # two files of one series with one name in different folders
                    dest = series[uid] / f"{src.stem}-{secrets.token_hex(3)}{src.suffix}"
                counts[uid] = counts.get(uid, 0) + 1
                series_folders.add(src.parent)
            else:
                rel = src.relative_to(root_base) if src.is_relative_to(root_base) else Path(src.name)
                dest = input_dir / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                order.append(("FILE", rel.as_posix()))
                file_folders[rel.as_posix()] = src.parent
            _transfer(src, dest, how)
    if not order:
        raise InvalidInput("no input files (hidden, temporary and partial files are ignored)")
    strays = [value for kind, value in order if kind == "FILE" and file_folders[value] in series_folders]
    for value in strays:
        order.remove(("FILE", value))
        if warnings is not None:
            warnings.append(f"{INPUT}/{value} is not DICOM and lies beside a DICOM series: kept in the input, "
                            "not given to the algorithm")
    return [series_input(n, series[value].name, value, counts[value]) if kind == "DICOM"
            else InputRecord(id=f"in-{n}", type="FILE", path=f"{INPUT}/{value}")
            for n, (kind, value) in enumerate(order, 1)]


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
    copy_file(src, dest)


def copy_file(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Copy content and times, not the mode: the copy gets the service's own (``permissions``, issue 9)."""
    shutil.copyfile(src, dest)
    st = os.stat(src)
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))


# --- the index, as the protocol sees it ---------------------------------------------------------


class JobIndex(Protocol):
    """Where the protocol records each job it commits, claims or finishes (``pipeline.index.Index``)."""

    def record_job(self, manifest: JobManifest, location: str) -> None: ...


def _record(index: JobIndex | None, manifest: JobManifest, location: str) -> None:
    if index is None:
        return
    try:
        index.record_job(manifest, location)
    except Exception as exc:  # the folders are the truth: the next repair brings the index back in line
        log.warning("job %s: the index could not record it (%s); the folders stay the truth", manifest.id,
                    type(exc).__name__)


# --- staging and commit ----------------------------------------------------------------------
#
# A staging folder inbox/.staging/<id>/ is always in one of these states, and recover() knows each:
#   input/ only            a door is writing it (a submit, a trigger): the door commits or discards it;
#                          one untouched for ABANDONED_SECONDS lost its door before it acknowledged anything
#   receiving.json         a door receives into it over time (a DICOM series): that door resumes it
#   dropped/               a hand-dropped item being turned into a job: recover() rebuilds the job
#   job.yaml               complete: recover() commits it (the new record is written before the old goes)


def stage(inbox: Path, job_id: str | None = None) -> Path:
    """Create a private staging folder ``inbox/.staging/<id>/input`` for a new job."""
    job_id = job_id or new_job_id()
    sdir = inbox / STAGING / job_id
    (sdir / INPUT).mkdir(parents=True)
    try:
        crash_point("stage")
    except BaseException:
        discard(sdir)  # a stage that fails leaves no folder behind
        raise
    return sdir


def commit(inbox: Path, staging_dir: Path, manifest: JobManifest, *, index: JobIndex | None = None) -> Path:
    """Make a staged job visible in the inbox with one atomic rename, and record it; returns the job folder.

    Its inputs and job.yaml are synced before the rename, so recover() can redo a commit that a crash
    interrupted at any point; a commit finished meanwhile by another process's recover() is not an error.
    """
    if staging_dir.name != manifest.id:
        raise ValueError(f"staging folder {staging_dir.name} does not match job {manifest.id}")
    manifest.status = JobStatus.PENDING
    manifest.timings["committed"] = time.time()
    job_dir = inbox / manifest.id
    try:
        fsync_tree(staging_dir / INPUT)
        write_manifest(staging_dir, manifest)
        crash_point("commit.manifest")
        (staging_dir / RECEIVING).unlink(missing_ok=True)
        os.rename(staging_dir, job_dir)
    except FileNotFoundError:
        if staging_dir.exists() or not (job_dir / JOB_FILE).is_file():
            raise
        return job_dir  # committed meanwhile by another process's recover() (two services on one inbox)
    fsync_dir(inbox)
    crash_point("commit.renamed")
    log.info("job %s: committed (%s, algorithm %s)", manifest.id, manifest.source, manifest.algorithm or "default")
    _record(index, manifest, "inbox")
    return job_dir


def discard(staging_dir: Path) -> None:
    """Remove a staged job that was refused: a refused input leaves nothing behind."""
    shutil.rmtree(staging_dir, ignore_errors=True)


def submit(inbox: Path, paths: Iterable[Path], *, algorithm: str | None = None,
           settings: Mapping[str, Any] | None = None, source: str = "cli", how: str = "copy",
           index: JobIndex | None = None, **fields: Any) -> JobManifest:
    """Stage ``paths`` as the inputs of one new job and commit it."""
    sdir = stage(inbox)
    try:
        manifest = JobManifest(id=sdir.name, algorithm=algorithm, settings=dict(settings or {}), source=source,
                               **fields)
        manifest.inputs = place_inputs([Path(p) for p in paths], sdir / INPUT, how=how, warnings=manifest.warnings)
        commit(inbox, sdir, manifest, index=index)
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
        data = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace")) or {}
    except yaml.YAMLError as exc:
        return path, {"refused": f"job.yaml is not valid YAML: {_one_line(exc)}"}
    if not isinstance(data, dict):
        return path, {"refused": "job.yaml must be a mapping with 'algorithm' and/or 'settings'"}
    unknown = set(data) - {"algorithm", "settings"}
    if unknown:
        return path, {"refused": f"job.yaml has unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                                 "(known: algorithm, settings)"}
    if not isinstance(data.get("settings", {}), dict):
        return path, {"refused": "job.yaml: settings must be a mapping"}
    if data.get("algorithm") is not None and not isinstance(data["algorithm"], str):
        return path, {"refused": "job.yaml: algorithm must be a name"}
    return path, {"algorithm": data.get("algorithm"), "settings": data.get("settings") or {}}


def adopt(inbox: Path, item: Path, *, index: JobIndex | None = None) -> JobManifest | None:
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
    crash_point("adopt.moved")
    return _build_adopted(inbox, sdir, index)


def _build_adopted(inbox: Path, sdir: Path, index: JobIndex | None) -> JobManifest:
    dropped = sdir / DROPPED
    items = list(dropped.iterdir())
    if (sdir / INPUT).exists():
        shutil.rmtree(sdir / INPUT)
    (sdir / INPUT).mkdir()
    request_file, request = _read_drop_request(items[0]) if len(items) == 1 else (None, {})
    manifest = JobManifest(id=sdir.name, source="folder", algorithm=request.get("algorithm"),
                           settings=request.get("settings", {}), refused=request.get("refused"))
    try:
        manifest.inputs = place_inputs(items, sdir / INPUT, how="link", base=dropped,
                                       skip=[request_file] if request_file else [], warnings=manifest.warnings)
    except InvalidInput as exc:
        # Keep the drop: it becomes a failed job whose folder holds what was dropped (nothing is lost).
        manifest.refused = exc.reason
        shutil.rmtree(sdir / INPUT)
        os.rename(dropped, sdir / INPUT)
        manifest.inputs = []
    write_manifest(sdir, manifest)
    shutil.rmtree(dropped, ignore_errors=True)
    commit(inbox, sdir, manifest, index=index)
    return manifest


def recover(inbox: Path, outbox: Path, *, index: JobIndex | None = None) -> tuple[list[str], int]:
    """Finish what a crash interrupted in the staging area.

    A staged job with its manifest written is complete and is committed; a hand-dropped item half way
    to a job is rebuilt from the item; a damaged manifest is set aside. Folders a door is still writing
    or receiving into are left to that door.

    Returns
    -------
    tuple
        The ids of the jobs committed, and how many staging folders could not be finished now (a full
        disk, say): the caller tries again later.
    """
    done: list[str] = []
    left = 0
    staging = inbox / STAGING
    if not staging.is_dir():
        return done, left
    for sdir in sorted(staging.iterdir()):
        if not is_job_id(sdir.name):
            continue
        try:
            if (sdir / JOB_FILE).is_file():
                try:
                    manifest = read_manifest(sdir)
                except DamagedManifest as exc:
                    set_aside(sdir, outbox, exc.problem, index=index)
                    continue
                shutil.rmtree(sdir / DROPPED, ignore_errors=True)
                commit(inbox, sdir, manifest, index=index)
                done.append(sdir.name)
            elif (sdir / DROPPED).is_dir():
                done.append(_build_adopted(inbox, sdir, index).id)
            elif not (sdir / RECEIVING).exists() and time.time() - _newest_mtime(sdir) > ABANDONED_SECONDS:
                # Input only, untouched for an hour: its door died before it committed the job.
                if any(p.is_file() for p in sdir.rglob("*")):
                    set_aside(sdir, outbox, "abandoned in the staging area before it became a job", index=index,
                              abandoned=True)
                else:
                    discard(sdir)  # nothing was received: nothing to keep
                    log.info("staging: removed %s, abandoned empty", sdir.name)
        except FileNotFoundError:
            if not (inbox / sdir.name).is_dir():  # else: committed by another process meanwhile
                left += 1
                log.error("staging: job %s could not be recovered now (a file vanished); trying again later",
                          sdir.name)
        except OSError as exc:
            left += 1
            log.error("staging: job %s could not be recovered now (%s); trying again later", sdir.name,
                      exc.strerror or type(exc).__name__)
    return done, left


def _newest_mtime(path: Path) -> float:
    # mtime alone (newest_change also takes ctime, which cannot be set back): a door writing into the
    # folder keeps its mtimes current, a copy in progress included.
    newest = path.stat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except FileNotFoundError:
                return time.time()
    return newest


def set_aside(job_dir: Path, outbox: Path, problem: str, *, index: JobIndex | None = None,
              abandoned: bool = False) -> Path:
    """Take a job that cannot run out of the way: failed, in the outbox, nothing in it deleted.

    A job whose job.yaml is damaged never runs (what it asked for cannot be read); its folder keeps its
    inputs and the damaged file as ``job.yaml.damaged`` for an operator to look at. An ``abandoned`` staging
    folder (inputs, no record, its door long gone) is kept the same way: what it holds may have been
    acknowledged by a release that lost it (0.1.0's DICOM commit), and nothing is deleted but by a
    retention rule. The caller holds the job's lock if it has one.
    """
    job_id = job_dir.name
    if abandoned:
        error = (f"{problem}; its inputs are kept in input/ for an operator (submit them again to run them)")
        said = f"set aside as failed in the outbox: {problem}"
    else:
        os.replace(job_dir / JOB_FILE, _unique(job_dir, f"{JOB_FILE}.damaged"))
        error = (f"job.yaml was damaged ({problem}); the job was set aside without running, the damaged file "
                 "kept as job.yaml.damaged")
        said = f"job.yaml is damaged ({problem}); set aside as failed in the outbox"
    manifest = JobManifest(id=job_id, source="unknown", status=JobStatus.FAILED, finished=now_iso(), error=error)
    write_manifest(job_dir, manifest)
    dest = outbox / job_id
    if job_dir != dest:
        os.rename(job_dir, dest)
        fsync_dir(outbox)
    log.error("job %s: %s", job_id, said)
    _record(index, manifest, "outbox")
    return dest


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
    index: JobIndex | None = None

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


def send_lock_path(inbox: Path, job_id: str, destination: str) -> Path:
    """The lock of one job's send to one destination (the sender's claim, ``send-<job>-<destination>``)."""
    safe = "".join(c if c.isalnum() else "_" for c in destination)
    return lock_path(inbox, f"send-{job_id}-{safe}")


def try_lock(path: Path) -> FileLock | None:
    """Take the OS lock at ``path`` without waiting; None if someone holds it (OSError if it cannot be made)."""
    lock = FileLock(path, timeout=0, thread_local=False, preserve_lock_file=True)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        return None
    return lock


def claim(inbox: Path, outbox: Path, job_id: str, *, index: JobIndex | None = None) -> Claim | None:
    """Lock job ``job_id``; None if another process holds it, it has left the inbox, or it was set aside.

    A job whose job.yaml is damaged is set aside (failed, in the outbox) under the lock, so it is dealt
    with once and never stops the jobs behind it. OSError if the lock cannot be taken at all.
    """
    lock = try_lock(lock_path(inbox, job_id))
    if lock is None:
        return None
    job_dir = inbox / job_id
    try:
        manifest = read_manifest(job_dir)
    except FileNotFoundError:
        lock.release()  # finished by another worker between our scan and our lock
        return None
    except DamagedManifest as exc:
        try:
            set_aside(job_dir, outbox, exc.problem, index=index)
        finally:
            lock.release()
        return None
    except BaseException:
        lock.release()
        raise
    crash_point("claim")
    return Claim(job_id, job_dir, manifest, lock, index)


def start_attempt(claim: Claim, *, counted: bool = True) -> None:
    """Count a new attempt and give it a clean working folder (a dead attempt's files are discarded).

    ``counted=False`` starts it without counting: the previous attempt was given back by this process
    (a full disk) but could not write that down.
    """
    m = claim.manifest
    previous = m.status
    if counted:
        m.attempts += 1
    for name in (WORK, OUTPUT):
        shutil.rmtree(claim.job_dir / name, ignore_errors=True)
    claim.work_dir.mkdir()
    if previous == JobStatus.RUNNING and counted:
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
    crash_point("start_attempt")
    _record(claim.index, m, "inbox")


def append_log(claim: Claim, line: str) -> None:
    """Add a line of Postbox's own to the job's log (what it did after the algorithm)."""
    with open(claim.log_path, "a", encoding="utf-8") as fh:
        fh.write(f"--- {line} ---\n")


def requeue(claim: Claim, reason: str, *, attempts: int | None = None) -> None:
    """Give a job back to the inbox untouched (service stopping, disk full); the attempt does not count.

    ``attempts`` sets the count outright: a job run on a Dask cluster counts its attempts' folders.
    """
    m = claim.manifest
    if attempts is not None:
        m.attempts = attempts
    elif m.status == JobStatus.RUNNING:
        m.attempts = max(0, m.attempts - 1)
    m.status = JobStatus.PENDING
    for name in (WORK, OUTPUT):  # also frees the space a full disk needs for this very write
        shutil.rmtree(claim.job_dir / name, ignore_errors=True)
    m.outputs = []
    with open(claim.log_path, "a", encoding="utf-8") as fh:
        fh.write(f"--- attempt interrupted: {reason} ---\n")
    _save(claim)
    crash_point("requeue")
    _record(claim.index, m, "inbox")


def save_running(claim: Claim) -> None:
    """Write a running job's manifest as it is now, durably (what it has sent before its finish)."""
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


def collect_outputs(claim: Claim, outputs: list[DataObject]) -> list[OutputRecord]:
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
            shutil.copytree(src, dest, symlinks=False, copy_function=copy_file)
        else:
            copy_file(src, dest)
        records.append(OutputRecord(id=obj.id or f"out-{i}", type=obj.type,
                                    path=dest.relative_to(claim.job_dir).as_posix(),
                                    parent=obj.parent.id if obj.parent is not None else None,
                                    meta_data=dict(obj.meta_data)))
    return records


def finished_lock(inbox: Path, job_id: str, timeout: float = 30) -> FileLock:
    """The lock of a finished job: held while its job.yaml in the outbox changes (send state)."""
    return FileLock(lock_path(inbox, job_id), timeout=timeout, thread_local=False, preserve_lock_file=True)


def update_finished(inbox: Path, outbox: Path, job_id: str, change: Callable[[JobManifest], None], *,
                    index: JobIndex | None = None) -> JobManifest:
    """Change the manifest of a job in the outbox (send state), under the job's lock, and record it."""
    with finished_lock(inbox, job_id):
        job_dir = outbox / job_id
        manifest = read_manifest(job_dir)
        change(manifest)
        write_manifest(job_dir, manifest)
    _record(index, manifest, "outbox")
    return manifest


PURGING = ".purging"  # in the outbox: finished jobs on their way out by a retention rule (issue 11)


@dataclass(frozen=True)
class Purged:
    """What :func:`purge` did with one finished job: removed it (``kept`` is None), or why it stayed."""

    job_id: str
    manifest: JobManifest | None = None
    kept: str | None = None


def purge(inbox: Path, outbox: Path, job_id: str, *, keep: Callable[[JobManifest], str | None],
          dry_run: bool = False) -> Purged:
    """Remove a finished job from the outbox with its lock files: design.md's one deletion, by a retention rule.

    The job's lock and the locks of its sends are taken first; a job whose lock another process holds stays,
    and so does one whose sends are pending (``JobManifest.sending``) or that ``keep``, asked with the
    manifest read again under the lock, gives a reason to keep (no longer old enough). A job removed leaves
    the outbox whole by one rename into ``outbox/.purging``; its lock files are deleted while held (filelock
    keeps them on purpose, but this job will never be locked again), so a process that opened one meanwhile
    finds no job once it has the lock. The caller records the removal (index, audit log) and then deletes the
    folder with :func:`delete_purged`; what a crash leaves there, :func:`purged_leftovers` names for the next
    purge to record and delete. ``dry_run`` changes nothing.
    """
    if not (outbox / job_id / JOB_FILE).is_file():  # looked at first: a lock taken would leave a new lock file
        return Purged(job_id, kept="it is not in the outbox")
    lock = try_lock(lock_path(inbox, job_id))
    if lock is None:
        return Purged(job_id, kept="its lock is held by another process")
    held = [lock]
    try:
        job_dir = outbox / job_id
        try:
            manifest = read_manifest(job_dir)
        except FileNotFoundError:
            return Purged(job_id, kept="it is not in the outbox")
        except DamagedManifest as exc:
            return Purged(job_id, kept=f"its job.yaml is damaged ({exc.problem})")
        reason = "its sends are pending" if manifest.sending else keep(manifest)
        if reason is not None:
            return Purged(job_id, manifest, kept=reason)
        send_locks = [send_lock_path(inbox, job_id, name) for name in manifest.sends]
        for path in send_locks:
            send = try_lock(path)
            if send is None:
                return Purged(job_id, manifest, kept="a send of it is under way")
            held.append(send)
        if dry_run:
            return Purged(job_id, manifest)
        trash = outbox / PURGING
        trash.mkdir(exist_ok=True)
        # No fsync: a removal that a power cut undoes leaves the job whole, for the next sweep to remove.
        os.rename(job_dir, trash / job_id)
        crash_point("purge.moved")
        for path in [lock_path(inbox, job_id), *send_locks]:
            path.unlink(missing_ok=True)
        log.debug("job %s: moved out of the outbox to be purged", job_id)
        return Purged(job_id, manifest)
    finally:
        for each in held:
            each.release()


def purged_leftovers(outbox: Path) -> list[str]:
    """The jobs in ``outbox/.purging``: out of the outbox, their removal not yet recorded (a purge crashed)."""
    try:
        return sorted(n for n in os.listdir(outbox / PURGING) if is_job_id(n))
    except FileNotFoundError:
        return []


def delete_purged(outbox: Path, job_ids: Iterable[str]) -> None:
    """Delete jobs that :func:`purge` moved out, once their removal is recorded; the folder too once empty."""
    trash = outbox / PURGING
    for job_id in job_ids:
        shutil.rmtree(trash / job_id, ignore_errors=True)
    try:
        os.rmdir(trash)
    except OSError:
        pass  # not empty: another purge is under way, and deletes its own


def save_preview(inbox: Path, outbox: Path, job_id: str, png: bytes, *,
                 index: JobIndex | None = None) -> JobManifest:
    """Put a finished job's contour preview at :data:`PREVIEW` and name it in its job.yaml (issue 11).

    Under the job's lock, as every change to a finished job: the PNG is written under a hidden temporary name
    and renamed, then job.yaml says where it is, so a reader sees either no preview or a whole one.

    Raises
    ------
    FileNotFoundError
        If the job is no longer in the outbox (removed by retention meanwhile).
    """
    def change(manifest: JobManifest) -> None:
        path = outbox / job_id / PREVIEW
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, png)
        crash_point("preview.written")
        manifest.preview = PREVIEW

    return update_finished(inbox, outbox, job_id, change, index=index)


def finish(claim: Claim, outbox: Path, outputs: list[OutputRecord] | None = None) -> Path:
    """Record success and move the job to the outbox with one atomic rename."""
    m = claim.manifest
    if outputs is not None:
        m.outputs = outputs
    return _close(claim, outbox, JobStatus.DONE, discard_work=True)


def fail(claim: Claim, outbox: Path, reason: str, detail: str | None = None) -> Path:
    """Record failure (reason in job.yaml, detail in job.log) and move the job to the outbox."""
    with open(claim.log_path, "a", encoding="utf-8") as fh:
        fh.write(f"--- failed: {reason} ---\n")
        if detail:
            fh.write(detail if detail.endswith("\n") else detail + "\n")
    return _close(claim, outbox, JobStatus.FAILED, discard_work=False, error=reason)


def _close(claim: Claim, outbox: Path, status: JobStatus, *, discard_work: bool, error: str | None = None) -> Path:
    m = claim.manifest
    before = m.status, m.error, m.finished
    m.status = status
    if error is not None:
        m.error = error
    m.finished = now_iso()
    m.timings["finished"] = time.time()
    try:
        if discard_work:
            shutil.rmtree(claim.work_dir, ignore_errors=True)
        if (claim.job_dir / OUTPUT).exists():
            fsync_tree(claim.job_dir / OUTPUT)
        if claim.log_path.exists():
            fsync_tree(claim.log_path)
        _save(claim)
    except BaseException:
        # Not written down, so the job is still the attempt it was: a full disk gives it back uncounted
        # (requeue goes by the status) instead of as done or failed, which counted the attempt (issue 8).
        m.status, m.error, m.finished = before
        raise
    crash_point("finish.manifest")
    dest = outbox / claim.job_id
    os.rename(claim.job_dir, dest)
    fsync_dir(outbox)
    fsync_dir(claim.job_dir.parent)
    claim.job_dir = dest
    crash_point("finish.moved")
    log.info("job %s: %s after %d attempt(s)", claim.job_id, m.status.value, m.attempts)
    _record(claim.index, m, "outbox")
    return dest
