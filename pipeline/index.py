"""The TinyDB index over the job folders (jobs, datasets, API keys), safe for several processes.

Every access takes a file lock and reads the file afresh, so no process acts on a stale copy. The
folders are the truth: ``repair`` rebuilds the job entries from them at start.

The jobs table is split over a few TinyDB files by a hash of the job id. TinyDB rewrites a whole file
on every update; one file of 10,000 jobs takes ~60 ms an update, a shard of a few hundred ~2 ms.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import secrets
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from tinydb import Query, TinyDB
from tinydb.middlewares import CachingMiddleware
from tinydb.storages import Storage
from tinydb.table import Document

from . import jobs as _jobs
from .errors import DamagedManifest, IndexDamaged

log = logging.getLogger(__name__)

SHARDS = 32
_SEQUENCE = "_sequence"  # in each table's file: the last id given out there


# The files that the job folders cannot rebuild, by the table each holds: what it holds, and what to do
# once it is lost (issue 8). Job shards are not here: ``Index.repair`` fills them again from the folders.
_PRECIOUS: dict[str, tuple[str, str]] = {
    "keys": ("the API keys", "make new ones with postbox manage key --add NAME"),
    "datasets": ("the HTTP API's datasets", "clients create their datasets again; their jobs stay in the folders"),
    "dataobjects": ("the HTTP API's data objects",
                    "clients upload their inputs again; jobs and their outputs stay in the folders"),
    "locations": ("the HTTP API's DICOM locations", "clients add their DICOM locations again"),
}


def _precious(table: str) -> tuple[str, str]:
    return _PRECIOUS.get(table, (f"the table {table}", "add its records again"))


class AtomicJSONStorage(Storage):
    """TinyDB storage that replaces its file by rename, so a crash never leaves half a file.

    Parameters
    ----------
    path
        The file.
    name
        The file's name in messages: relative to the database's folder, never a server path.
    holds
        What the file holds that the job folders cannot rebuild (``"the API keys"``). Such a file, found
        damaged, raises :class:`IndexDamaged` and is left as it is; TinyDB would otherwise take it for empty
        and write over it. Without ``holds`` (a job shard) a damaged file is started afresh, and
        ``Index.repair`` fills it again from the folders.
    """

    def __init__(self, path: str, *, name: str | None = None, holds: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.name
        self.holds = holds

    def read(self) -> dict[str, dict[str, Any]] | None:
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return None  # a new index
        try:
            return _tables(raw)
        except ValueError as exc:
            if self.holds is not None:
                raise IndexDamaged(self.name, self.holds, str(exc)) from None
            # A job shard: the folders are the truth, and a damaged shard must not stop the service.
            log.warning("index file %s is damaged (%s); starting it afresh", self.name, exc)
            return None

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        # dumps, not dump: json.dump encodes in pure Python, several times slower on a big index.
        # atomic_write fsyncs the file, renames it over the old one and fsyncs the folder: the new content
        # survives a power cut, where a rename alone could leave an empty file behind (issue 8).
        # A job shard is rebuilt from the folders, so it skips the two fsyncs (they cost a job ~1 ms each).
        _jobs.atomic_write(self.path, json.dumps(data, separators=(",", ":")).encode("utf-8"),
                           durable=self.holds is not None)

    def close(self) -> None:
        pass


def _tables(raw: bytes) -> dict[str, dict[str, Any]]:
    """The tables in a file's bytes; ValueError saying what is wrong when they are not TinyDB's JSON."""
    if not raw.strip():
        raise ValueError("the file is empty")
    try:
        data = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(table, dict) for table in data.values()):
        raise ValueError("not a JSON object of tables")
    return data


@dataclass(frozen=True)
class SetAside:
    """A damaged index file that ``Index.repair_files`` moved aside and started afresh."""

    file: str  # its name, relative to the database's folder
    aside: str  # the damaged file's new name, beside it
    problem: str  # what was wrong with it
    lost: str  # what it held ("the API keys")
    remedy: str  # what to do about the loss


def hash_key(key: str) -> str:
    # Keys are long random tokens, so a fast hash is enough (no brute force of a small space).
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def job_record(manifest: _jobs.JobManifest, location: str) -> dict[str, Any]:
    """What the index keeps of a job: enough to list and find it without reading its folder."""
    return {
        "id": manifest.id,
        "status": manifest.status.value,
        "location": location,
        "algorithm": manifest.algorithm,
        "source": manifest.source,
        "created": manifest.created,
        "started": manifest.started,
        "finished": manifest.finished,
        "attempts": manifest.attempts,
        "error": manifest.error,
        "dataset": manifest.dataset,
        "owner": manifest.owner,
        "sending": manifest.sending,
        # Each destination's send state, for the metrics' pending and failed sends without reading job.yaml.
        "sends": {name: state.status.value for name, state in manifest.sends.items()},
    }


class Index:
    """The index at ``path`` (API keys), ``<path>.jobs/`` (job shards) and ``<path>.tables/`` (the rest)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.jobs_dir = self.path.with_name(self.path.name + ".jobs")
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.tables_dir = self.path.with_name(self.path.name + ".tables")
        self.tables_dir.mkdir(parents=True, exist_ok=True)

    # -- plumbing --

    @contextmanager
    def _open(self, path: Path, *, cached: bool = False) -> Iterator[TinyDB]:
        # TinyDB reads the whole file for every table operation and writes it for every change; ``cached``
        # makes the operations of one locked session share one read and one write (at close).
        storage = CachingMiddleware(AtomicJSONStorage) if cached else AtomicJSONStorage
        with self._lock(path):
            # TinyDB hands its keyword arguments on to the storage: the file's name and what it holds.
            db = TinyDB(str(path), storage=storage, **self._describe(path))
            try:
                yield db
            finally:
                db.close()

    @staticmethod
    def _lock(path: Path) -> FileLock:
        # Held for a millisecond or two at a time, so poll often: filelock's default of 50 ms between tries
        # turned every meeting of the HTTP door and the worker on one shard into a 50 ms stall.
        return FileLock(str(path) + ".lock", thread_local=False, preserve_lock_file=True, poll_interval=0.001)

    def _describe(self, path: Path) -> dict[str, Any]:
        """The file's name relative to the database's folder, and what it holds if the folders cannot rebuild it."""
        if path == self.path:
            return {"name": path.name, "holds": _precious("keys")[0]}
        name = f"{path.parent.name}/{path.name}"
        if path.parent == self.jobs_dir:
            return {"name": name, "holds": None}
        return {"name": name, "holds": _precious(path.stem)[0]}

    def _precious_files(self) -> list[Path]:
        """The files that exist and that the folders cannot rebuild: the main file (keys) and the tables."""
        return [p for p in (self.path, *sorted(self.tables_dir.glob("*.json"))) if p.is_file()]

    # -- damaged files (issue 8) --

    def check(self) -> None:
        """Make sure every file that the job folders cannot rebuild reads back (a file not made yet is fine).

        Job shards are not read: ``repair`` rebuilds a damaged one from the folders.

        Raises
        ------
        IndexDamaged
            For the first damaged file (not JSON, empty, not an object of tables), which is left as it is.
        """
        for path in self._precious_files():
            AtomicJSONStorage(str(path), **self._describe(path)).read()

    def repair_files(self) -> list[SetAside]:
        """Move each damaged file that the folders cannot rebuild aside, and start it afresh.

        The damaged file keeps its bytes under a dated name beside it (``postbox.db.json.damaged-<UTC time>``),
        so nothing is overwritten; what it held is lost unless restored from there or a backup. Job shards
        are left to ``repair``.

        Returns
        -------
        list of SetAside
            One per file moved aside, saying what was lost and what to do, for the caller to tell (the CLI
            prints one line each); empty when nothing was damaged.
        """
        stamp = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%S}"
        done = []
        for path in self._precious_files():
            described = self._describe(path)
            storage = AtomicJSONStorage(str(path), **described)
            with self._lock(path):  # no writer between the look and the move
                try:
                    storage.read()
                    continue
                except IndexDamaged as exc:
                    problem = exc.problem
                aside = path.with_name(f"{path.name}.damaged-{stamp}")
                n = 1
                while aside.exists():  # a second repair within the second
                    n += 1
                    aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
                os.rename(path, aside)
                table = "keys" if path == self.path else path.stem  # see _file
                # Ids are never reused (see ``insert``), and the damaged file held the last one given out: a
                # data object or upload folder of a lost dataset must not meet a new dataset of the same id.
                # Start past every id given out before: the time in milliseconds, which ids given out one
                # by one since the index began (or since a repair) cannot have caught up with.
                storage.write({_SEQUENCE: {"1": {"table": table, "last": time.time_ns() // 1_000_000}}})
            lost, remedy = _precious(table)
            done.append(SetAside(file=described["name"], aside=str(Path(described["name"]).with_name(aside.name)),
                                 problem=problem, lost=lost, remedy=remedy))
        return done

    def _file(self, table: str) -> Path:
        # API keys in the main file; each other table in a file of its own, so checking a key on every
        # HTTP request never parses the datasets, and writers of different tables never wait on each other.
        if table == "keys":
            return self.path
        if not table.isidentifier():
            raise ValueError(f"not a table name: {table!r}")
        return self.tables_dir / f"{table}.json"

    def _shard(self, job_id: str) -> Path:
        return self.jobs_dir / f"{zlib.crc32(job_id.encode()) % SHARDS:02d}.json"

    def _shards(self) -> list[Path]:
        return [self.jobs_dir / f"{n:02d}.json" for n in range(SHARDS)]

    # -- jobs --

    def upsert_job(self, record: dict[str, Any]) -> None:
        with self._open(self._shard(record["id"])) as db:
            db.table("jobs").upsert(Document(record, doc_id=_doc_id(record["id"])))

    def upsert_jobs(self, records: list[dict[str, Any]]) -> None:
        """Write many job entries with one rewrite per shard (rebuilding an index of 10,000 jobs)."""
        by_shard: dict[Path, list[dict[str, Any]]] = {}
        for record in records:
            by_shard.setdefault(self._shard(record["id"]), []).append(record)
        for shard, group in by_shard.items():
            with self._open(shard) as db:
                table = db.table("jobs")
                known = {doc.doc_id for doc in table.all()}
                fresh = [Document(r, doc_id=_doc_id(r["id"])) for r in group if _doc_id(r["id"]) not in known]
                for r in group:
                    if _doc_id(r["id"]) in known:
                        table.upsert(Document(r, doc_id=_doc_id(r["id"])))
                if fresh:
                    table.insert_multiple(fresh)

    def update_job(self, job_id: str, **fields: Any) -> None:
        with self._open(self._shard(job_id)) as db:
            table = db.table("jobs")
            if table.contains(doc_id=_doc_id(job_id)):
                table.update(fields, doc_ids=[_doc_id(job_id)])

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        with self._open(self._shard(job_id)) as db:
            doc = db.table("jobs").get(doc_id=_doc_id(job_id))
        return dict(doc) if doc is not None else None

    def remove_job(self, job_id: str) -> None:
        with self._open(self._shard(job_id)) as db:
            db.table("jobs").remove(doc_ids=[_doc_id(job_id)])

    def remove_jobs(self, job_ids: Iterable[str]) -> int:
        """Remove many job entries with one rewrite per shard (retention, issue 11); returns entries removed."""
        by_shard: dict[Path, list[int]] = {}
        for job_id in job_ids:
            by_shard.setdefault(self._shard(job_id), []).append(_doc_id(job_id))
        removed = 0
        for shard, doc_ids in by_shard.items():
            with self._open(shard) as db:
                table = db.table("jobs")
                present = [d for d in doc_ids if table.contains(doc_id=d)]
                if present:
                    table.remove(doc_ids=present)
                removed += len(present)
        return removed

    def jobs(self, where: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        """Every indexed job (optionally filtered), oldest first."""
        result: list[dict[str, Any]] = []
        for shard in self._shards():
            if not shard.exists():
                continue
            with self._open(shard) as db:
                result.extend(dict(d) for d in db.table("jobs").all() if where is None or where(d))
        return sorted(result, key=lambda r: r["id"])

    def record_job(self, manifest: _jobs.JobManifest, location: str) -> None:
        self.upsert_job(job_record(manifest, location))

    def repair(self, inbox: Path, outbox: Path) -> int:
        """Make the job entries agree with the folders (the folders win); returns entries changed."""
        on_disk: dict[str, tuple[str, Path]] = {}
        for location, box in (("outbox", outbox), ("inbox", inbox)):
            for job_id in _jobs.scan(box):
                on_disk[job_id] = (location, box / job_id)
        indexed = {r["id"]: r for r in self.jobs()}
        gone = set(indexed) - set(on_disk)
        for job_id in gone:
            self.remove_job(job_id)
        changed = len(gone)
        updates = []
        for job_id, (location, job_dir) in on_disk.items():
            rec = indexed.get(job_id)
            # Finished jobs never change again; only re-read what may differ from its folder.
            if rec is not None and rec["location"] == location == "outbox":
                continue
            try:
                manifest = _jobs.read_manifest(job_dir)
            except FileNotFoundError:
                continue  # it moved meanwhile; whoever moved it records it where it went
            except DamagedManifest as exc:
                # One damaged job.yaml must never stop the start (issue 8). In the inbox, the worker sets the
                # job aside when it claims it, under its lock; a finished one is set aside here.
                if location == "outbox":
                    with _jobs.finished_lock(inbox, job_id):
                        _jobs.set_aside(job_dir, outbox, exc.problem, index=self)
                else:
                    # Not said here: the claim sets it aside and says so, once (issue 8: one line per job).
                    log.debug("%s", exc)
                continue
            except OSError as exc:
                log.warning("job %s: unreadable job.yaml while repairing the index (%s)", job_id,
                            exc.strerror or type(exc).__name__)
                continue
            new = job_record(manifest, location)
            if new != rec:
                updates.append(new)
        self.upsert_jobs(updates)
        changed += len(updates)
        if changed:
            log.info("index: repaired %d job entr%s from the folders", changed, "y" if changed == 1 else "ies")
        return changed

    # -- other tables (datasets, data objects, DICOM locations, keys): one file each --

    def insert(self, table: str, record: dict[str, Any], *, id_field: str | None = None,
               unless: dict[str, Any] | None = None) -> int:
        """Add ``record`` to ``table`` and return its id.

        Ids are never reused: TinyDB would give a removed record's id to the next one, so a client
        holding an old id (an expired dataset, a deleted data object) would reach a new record.

        Parameters
        ----------
        id_field
            Also store the id in the record under this name, so that ``find``/``update``/``remove``
            can match on it.
        unless
            If a record matching these fields exists, return its id and insert nothing; the look-up
            and the insert share one lock, so two processes racing to add the same record add it once.
        """
        return self.insert_many(table, [record], id_field=id_field, unless=[unless] if unless else None)[0]

    def insert_many(self, table: str, records: list[dict[str, Any]], *, id_field: str | None = None,
                    unless: list[dict[str, Any]] | None = None) -> list[int]:
        """``insert`` for several records at once, with one read and one write of the file."""
        with self._open(self._file(table), cached=True) as db:
            tab = db.table(table)
            sequence = db.table(_SEQUENCE)
            is_this = Query()["table"] == table
            last = sequence.get(is_this)
            next_id = max([last["last"] if last else 0, *(d.doc_id for d in tab.all())]) + 1
            ids = []
            for i, record in enumerate(records):
                found = tab.search(Query().fragment(unless[i])) if unless and unless[i] else []
                if found:
                    ids.append(found[0].doc_id)
                    continue
                doc = {**record, id_field: next_id} if id_field else dict(record)
                tab.insert(Document(doc, doc_id=next_id))
                ids.append(next_id)
                next_id += 1
            if next_id - 1 != (last["last"] if last else 0):
                sequence.upsert({"table": table, "last": next_id - 1}, is_this)
            return ids

    def find(self, table: str, **match: Any) -> list[dict[str, Any]]:
        with self._open(self._file(table)) as db:
            q = Query().fragment(match) if match else None
            docs = db.table(table).search(q) if q is not None else db.table(table).all()
        return [{**d, "doc_id": d.doc_id} for d in docs]

    def update(self, table: str, fields: dict[str, Any], **match: Any) -> int:
        with self._open(self._file(table)) as db:
            return len(db.table(table).update(fields, Query().fragment(match)))

    def remove(self, table: str, **match: Any) -> int:
        with self._open(self._file(table)) as db:
            return len(db.table(table).remove(Query().fragment(match)))

    def remove_where(self, table: str, where: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Remove every record of ``table`` for which ``where`` is true, in one rewrite; the records removed."""
        with self._open(self._file(table), cached=True) as db:
            tab = db.table(table)
            found = [d for d in tab.all() if where(d)]
            if found:
                tab.remove(doc_ids=[d.doc_id for d in found])
        return [{**d, "doc_id": d.doc_id} for d in found]

    # -- API keys: stored hashed --

    def add_key(self, name: str, *, site: bool = False) -> str:
        """Create key ``name`` and return it; only its hash is stored, so it is shown once.

        Parameters
        ----------
        name
            What the key is called (``postbox manage key --list``, the audit trail). It never owns anything:
            the key's id does, so a name given again after ``remove_key`` starts with nothing (issue 9).
        site
            An operator's key: it may list and download the jobs of every door and every key's datasets.

        Raises
        ------
        ValueError
            For an empty, reserved or taken name.
        """
        if not name or not name.strip():
            raise ValueError("a key needs a name")
        if name.strip() == "*":
            # "*" owns the HTTP datasets of the keyless doors (facade.records.SITE), which no key may own.
            raise ValueError("'*' is reserved; choose another key name")
        if _KEY_TAG.match(name.strip()):
            # A job.yaml names its owner 'key-<id>'; a key called so would read as another key's jobs.
            raise ValueError(f"'{name}' is reserved (job.yaml names owners key-<id>); choose another key name")
        if self.find("keys", name=name):
            raise ValueError(f"a key named '{name}' exists already")
        key = "pbx_" + secrets.token_urlsafe(24)
        # ``id_field`` stores the id in the record: ids come from the table's sequence, never reused (insert).
        self.insert("keys", {"name": name, "hash": hash_key(key), "prefix": key[:8], "created": _jobs.now_iso(),
                             "site": site}, id_field="id")
        return key

    def list_keys(self) -> list[ApiKey]:
        """Every key (never its hash), oldest first."""
        return sorted((ApiKey.from_record(r) for r in self.find("keys")), key=lambda k: k.id)

    def remove_key(self, name: str) -> bool:
        return self.remove("keys", name=name) > 0

    def key_owner(self, key: str) -> ApiKey | None:
        """The key whose hash this is (its id owns what it makes), or None if it is not valid."""
        found = self.find("keys", hash=hash_key(key))
        return ApiKey.from_record(found[0]) if found else None


_KEY_TAG = re.compile(r"^key-[0-9]+$")


@dataclass(frozen=True)
class ApiKey:
    """An API key as the doors see it: who it is, never the key or its hash.

    ``id`` is given once and never again (the keys table's sequence), so it, not the name, owns records.
    ``legacy`` marks a key made before keys had ids (release 0.1): its records named it by name, and
    only such a key may take them over (see ``facade.records.Records.adopt_legacy_owners``).
    """

    id: int
    name: str
    created: str
    prefix: str = ""
    site: bool = False
    legacy: bool = False

    @property
    def tag(self) -> str:
        """How job.yaml names the key as a job's owner: ``key-<id>``."""
        return f"key-{self.id}"

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ApiKey:
        # A key of release 0.1 has no "id": TinyDB's document id is the one the sequence gave it.
        return cls(id=int(record.get("id", record["doc_id"])), name=str(record["name"]),
                   created=str(record.get("created", "")), prefix=str(record.get("prefix", "")),
                   site=bool(record.get("site", False)), legacy="id" not in record)


def _doc_id(job_id: str) -> int:
    # TinyDB wants integer document ids; the job id's hash gives a stable one per job.
    return int.from_bytes(hashlib.blake2b(job_id.encode(), digest_size=7).digest(), "big")
