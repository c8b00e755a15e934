"""The warm test algorithm of ``bench/scaleout.py``: it sleeps, and says when, where and in which process.

``sleepy`` sleeps ``settings["seconds"]`` (default 0.5). When the environment names a file in
``POSTBOX_BENCH_EVIDENCE``, it appends two JSON lines to it, one as it starts and one as it ends:
``{"event", "t", "pid", "ppid", "job", "node", "working_dir"}`` (``t`` a Unix time; ``node`` the Dask worker's
name taken from the attempt folder ``attempts/NN-<node>-<pid>/``, or None when the job ran in a local child).
Each line is one small ``O_APPEND`` write, so the lines of processes running at once do not mix.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

ENV = "POSTBOX_BENCH_EVIDENCE"
_JOB_ID = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{8}$")
_ATTEMPT = re.compile(r"^\d{2,}-(.+)-\d+$")


def where(working_dir: str) -> tuple[str | None, str | None]:
    """The job id and the Dask node (None when local) that a working folder belongs to."""
    parts = Path(working_dir).parts
    job = next((p for p in parts if _JOB_ID.match(p)), None)
    node = None
    if "attempts" in parts:
        i = parts.index("attempts")
        m = _ATTEMPT.match(parts[i + 1]) if i + 1 < len(parts) else None
        node = m.group(1) if m else None
    return job, node


def _say(event: str, working_dir: str) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    job, node = where(working_dir)
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), "ppid": os.getppid(), "job": job,
                       "node": node, "working_dir": str(working_dir)}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def sleepy(data_objects: list[Any], working_dir: str, settings: dict[str, Any]) -> list[Any]:
    """Sleep ``settings["seconds"]``: a GPU algorithm's stand-in that costs no CPU."""
    _say("start", working_dir)
    time.sleep(float(settings.get("seconds", 0.5)))
    _say("end", working_dir)
    return []
