"""The TinyDB index over the job folders (jobs, datasets, API keys), safe for several processes.

Every access takes a file lock and reads the file afresh, so no process acts on a stale copy. The
folders are the truth: ``repair`` rebuilds the job entries from them at start.

The jobs table is split over a few TinyDB files by a hash of the job id. TinyDB rewrites a whole file
on every update; one file of 10,000 jobs takes ~60 ms an update, a shard of a few hundred ~2 ms.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock
from tinydb import Query, TinyDB
from tinydb.middlewares import CachingMiddleware
from tinydb.storages import Storage
from tinydb.table import Document

from . import jobs as _jobs

log = logging.getLogger(__name__)

SHARDS = 32
_SEQUENCE = "_sequence"  # in each table's file: the last id given out there


class AtomicJSONStorage(Storage):
    """TinyDB storage that replaces its file by rename, so a crash never leaves half a file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, dict[str, Any]] | None:
        try:
            with open(self.path, encoding="utf-8") as fh:
                text = fh.read()
        except FileNotFoundError:
            return None
        if not text:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            # The index is rebuilt from the folders; a damaged file must not stop the service.
            log.warning("index file %s is damaged; starting it afresh", self.path)
            return None

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            # dumps, not dump: json.dump encodes in pure Python, several times slower on a big index.
            fh.write(json.dumps(data, separators=(",", ":")))
        os.replace(tmp, self.path)

    def close(self) -> None:
        pass


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
        "sending": any(v.get("status") == "pending" for v in manifest.extra.get("sends", {}).values()),
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
        # Held for a millisecond or two at a time, so poll often: filelock's default of 50 ms between tries
        # turned every meeting of the HTTP door and the worker on one shard into a 50 ms stall.
        with FileLock(str(path) + ".lock", thread_local=False, preserve_lock_file=True, poll_interval=0.001):
            db = TinyDB(str(path), storage=CachingMiddleware(AtomicJSONStorage) if cached else AtomicJSONStorage)
            try:
                yield db
            finally:
                db.close()

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
            except (OSError, ValueError, TypeError) as exc:
                log.warning("job %s: unreadable job.yaml while repairing the index: %s", job_id, exc)
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

    # -- API keys: stored hashed --

    def add_key(self, name: str) -> str:
        """Create key ``name`` and return it; only its hash is stored, so it is shown once."""
        if not name or not name.strip():
            raise ValueError("a key needs a name")
        if name.strip() == "*":
            # "*" owns the HTTP datasets of the keyless doors (facade.datasets.SITE), which no key may own.
            raise ValueError("'*' is reserved; choose another key name")
        if self.find("keys", name=name):
            raise ValueError(f"a key named '{name}' exists already")
        key = "pbx_" + secrets.token_urlsafe(24)
        self.insert("keys", {"name": name, "hash": hash_key(key), "prefix": key[:8],
                             "created": _jobs.now_iso()})
        return key

    def list_keys(self) -> list[dict[str, Any]]:
        return [{k: r[k] for k in ("name", "prefix", "created")} for r in self.find("keys")]

    def remove_key(self, name: str) -> bool:
        return self.remove("keys", name=name) > 0

    def key_owner(self, key: str) -> str | None:
        """The name of the key, or None if it is not valid."""
        found = self.find("keys", hash=hash_key(key))
        return found[0]["name"] if found else None


def _doc_id(job_id: str) -> int:
    # TinyDB wants integer document ids; the job id's hash gives a stable one per job.
    return int.from_bytes(hashlib.blake2b(job_id.encode(), digest_size=7).digest(), "big")
