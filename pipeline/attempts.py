"""A job's remote attempts (issue 12): one folder each under ``attempts/`` in the job folder.

On a Dask cluster an attempt runs on another machine, sharing the job folder through a filesystem mounted at
the same path everywhere. Dask may rerun a task whose worker died, and a Postbox service that restarts
submits again, so the folders, not any counter in memory, say how many attempts a job has had:

- an attempt makes ``attempts/NN-<node>-<pid>/`` (NN counts up) with its own ``work/`` and ``job.log``, and
  refuses to start when ``max_attempts`` attempts that count are there already;
- an attempt stopped on purpose (the service stopping, the node shutting down) or by a full disk leaves an
  ``interrupted`` file in its folder, and does not count, as an interrupted local attempt does not;
- a finished attempt describes its outputs (paths, sizes, sha256), and the service checks that description
  against the files before it promotes that one attempt's ``work/`` to the job's; a dead attempt's partial
  files stay in its own folder and never reach ``output/``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import PostboxError

ATTEMPTS = "attempts"
INTERRUPTED = "interrupted"
WORK = "work"
LOG = "job.log"
_NAME = re.compile(r"^(\d{2,})-")


class AttemptsUsed(PostboxError):
    """The job has had its ``max_attempts`` attempts: this one does not start."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} attempt(s) already made")
        self.count = count


class StaleAttempt(PostboxError):
    """The job has left the inbox (finished or given up) or changed hands: a late attempt starts nothing."""


class AttemptMismatch(PostboxError):
    """An attempt's files do not match what it reported: it is not promoted."""


def folders(job_dir: Path) -> list[Path]:
    """Every attempt folder of a job, oldest first."""
    try:
        found = [p for p in (job_dir / ATTEMPTS).iterdir() if p.is_dir() and _NAME.match(p.name)]
    except FileNotFoundError:
        return []
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]


def counted(job_dir: Path) -> int:
    """The attempts that count against ``max_attempts``: all but those stopped on purpose."""
    return sum(1 for p in folders(job_dir) if not (p / INTERRUPTED).exists())


def begin(job_dir: Path, node: str, max_attempts: int) -> Path:
    """Make the next attempt's folder (with an empty ``work/``) and return it.

    The caller holds the job's attempt lock, so two attempts never number themselves alike. Raises
    StaleAttempt if the job is no longer in the inbox, AttemptsUsed if it has had its attempts.
    """
    if not (job_dir / "job.yaml").is_file():
        raise StaleAttempt(f"job {job_dir.name} is no longer in the inbox")
    used = counted(job_dir)
    if used >= max_attempts:
        raise AttemptsUsed(used)
    # Not parents=True: a job folder moved away meanwhile must not be made again by a late attempt.
    (job_dir / ATTEMPTS).mkdir(exist_ok=True)
    number = len(folders(job_dir)) + 1
    safe = "".join(c if c.isalnum() or c in "._" else "_" for c in node)[:40] or "node"
    attempt = job_dir / ATTEMPTS / f"{number:02d}-{safe}-{os.getpid()}"
    attempt.mkdir()
    (attempt / WORK).mkdir()
    return attempt


def used_up(count: int) -> str:
    """Why a job failed when its attempts are used up on the cluster (each attempt's node died under it)."""
    return (f"failed after {count} attempt(s): each ended with its GPU node's worker process dying (see attempts/ "
            "in the job folder)")


def interrupt(attempt: Path) -> None:
    """Mark an attempt as stopped on purpose, so it does not count."""
    try:
        (attempt / INTERRUPTED).touch()
    except OSError:
        pass  # the job has moved on (finished, set aside): nothing left to count


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _files(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            found.append(path)
    return found


def describe(attempt: Path, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of a finished attempt: its outputs, with paths relative to its ``work/``, and every file
    they hold with its size and sha256. An output outside ``work/`` is refused: the service could not see it."""
    work = (attempt / WORK).resolve()
    described, paths = [], []
    for i, out in enumerate(outputs, 1):
        path = Path(out["path"])
        path = (work / path) if not path.is_absolute() else path
        resolved = path.resolve()
        if not resolved.is_relative_to(work):
            raise AttemptMismatch(f"output {i} ({path.name}) is outside the job's working folder; on a GPU node "
                                  "an algorithm writes its outputs in its working_dir")
        if not resolved.exists():
            raise AttemptMismatch(f"output {i} ({path.name}) does not exist")
        described.append({**out, "path": resolved.relative_to(work).as_posix()})
        paths.append(resolved)
    files = [{"path": f.relative_to(work).as_posix(), "size": f.stat().st_size, "sha256": _sha256(f)}
             for f in _files(paths)]
    return {"attempt": attempt.name, "outputs": described, "files": files}


def verify(attempt: Path, manifest: dict[str, Any]) -> None:
    """Check every file the manifest names against the disk (size, then sha256); AttemptMismatch if not."""
    work = attempt / WORK
    for entry in manifest["files"]:
        path = work / entry["path"]
        if not path.resolve().is_relative_to(work.resolve()):
            raise AttemptMismatch(f"attempt {attempt.name} names a file outside its folder")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise AttemptMismatch(f"attempt {attempt.name}: {entry['path']} is missing") from None
        if size != entry["size"] or _sha256(path) != entry["sha256"]:
            raise AttemptMismatch(f"attempt {attempt.name}: {entry['path']} differs from what the attempt reported")


def promote(job_dir: Path, attempt: Path, log_path: Path) -> Path:
    """Make a verified attempt's ``work/`` the job's (one rename) and add its log to the job's; returns the
    job's work folder."""
    work = job_dir / WORK
    shutil.rmtree(work, ignore_errors=True)
    os.rename(attempt / WORK, work)
    append_log(attempt, log_path)
    return work


def append_log(attempt: Path, log_path: Path) -> None:
    """Copy an attempt's own log into the job's log (what the algorithm printed on its node)."""
    try:
        text = (attempt / LOG).read_bytes()
    except FileNotFoundError:
        return
    with open(log_path, "ab") as fh:
        fh.write(f"--- attempt {attempt.name}: the algorithm's output on its node ---\n".encode())
        fh.write(text if text.endswith(b"\n") or not text else text + b"\n")
