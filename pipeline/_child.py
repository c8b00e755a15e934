"""The algorithm's own process: ``python -m pipeline._child``, serving jobs sent over a pipe.

Started as its own program (not multiprocessing), so it inherits no threads or locks and also works
inside a distributed engine's worker. One JSON request a line on stdin, one JSON reply a line on the
original stdout; while a job runs, fds 1 and 2 point at the job's log, so whatever the algorithm
prints or logs (even from C code) lands there. The module is imported on the first job, so a model
loaded at import is loaded once for the life of this process.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

from .dataobject import DataObject

_PR_SET_PDEATHSIG = 1
_cache: dict[tuple[str, str, str], tuple[Any, str | None, list[int] | None]] = {}


def _die_with_parent(parent: int) -> None:
    """End this process when the worker dies (kill -9 included), so no orphan writes into a job."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the watcher thread below still does it

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(70)
            time.sleep(0.2)

    if os.getppid() != parent:
        os._exit(70)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _load(module: str, attr: str, search_path: str) -> tuple[Any, str | None, list[int] | None]:
    """The callable, its module's file and that file's [mtime_ns, size] when it was imported.

    The worker compares the stamp with the file before each job and starts a fresh process when the
    file was edited, so an edited service.py takes effect without a restart.
    """
    key = (module, attr, search_path)
    if key not in _cache:
        if search_path and search_path not in sys.path:
            sys.path.insert(0, search_path)
        spec = importlib.util.find_spec(module)
        source = spec.origin if spec is not None and spec.has_location else None
        try:
            stamp = _stamp(source) if source else None  # before the import: an edit while importing shows
        except OSError:
            source = stamp = None
        fn = getattr(importlib.import_module(module), attr, None)
        if not callable(fn):
            raise LookupError(f"module '{module}' has no callable '{attr}'")
        _cache[key] = (fn, source, stamp)
    return _cache[key]


def _stamp(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_mtime_ns, st.st_size]


def _run(request: dict[str, Any]) -> dict[str, Any]:
    inputs = [DataObject(type=d["type"], path=d["path"], meta_data=d.get("meta_data") or {}, id=d["id"])
              for d in request.get("data_objects", ())]
    t_load = time.time()
    fn, source, stamp = _load(request["module"], request["attr"], request["search_path"])
    started = time.time()
    if request.get("load_only"):
        # A GPU node warms its children at start (issue 12): the model loads before the first job comes.
        return {"ok": True, "outputs": [], "load_seconds": started - t_load, "started": started, "ended": started,
                "source": source, "source_stamp": stamp}
    os.chdir(request["working_dir"])
    result = fn(inputs, request["working_dir"], request["settings"])
    ended = time.time()
    if result is None:
        result = []
    if not isinstance(result, (list, tuple)) or not all(isinstance(o, DataObject) for o in result):
        raise TypeError(f"the algorithm must return a list of DataObject, not {type(result).__name__}")
    outputs = [{"type": o.type, "path": o.path, "meta_data": o.meta_data, "id": o.id,
                "parent": o.parent.id if o.parent is not None else None} for o in result]
    return {"ok": True, "outputs": outputs, "load_seconds": started - t_load, "started": started, "ended": ended,
            "source": source, "source_stamp": stamp}


def main() -> int:
    parent = int(os.environ.get("POSTBOX_PARENT_PID", os.getppid()))
    _die_with_parent(parent)
    reply = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    home = os.getcwd()
    for line in sys.stdin:
        request = json.loads(line)
        logfd = os.open(request["log_path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        os.close(logfd)
        try:
            answer = _run(request)
        except BaseException as exc:  # the algorithm's failure is the job's, never this process's
            if isinstance(exc, SystemExit):
                message = f"the algorithm called sys.exit({exc.code})"
            else:
                message = f"{type(exc).__name__}: {exc}"
            try:
                traceback.print_exc()
            except OSError:
                pass  # job.log is on the full disk too: the answer still says why (issue 8)
            # errno tells the worker a full disk (it waits for space) from the algorithm's own failure.
            answer = {"ok": False, "error": message, "errno": exc.errno if isinstance(exc, OSError) else None}
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except OSError:
                    pass  # a full disk must not end this process: that would read as the algorithm dying
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.chdir(home)
        reply.write(json.dumps(answer, default=str) + "\n")
        reply.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
