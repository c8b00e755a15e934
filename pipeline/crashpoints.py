"""Named crash points: every step that changes durable state can be made to kill its process, in tests.

SQLite and FoundationDB test durability this way: the points stay in the code, each is killed in turn by a
test (tests/test_crashpoints.py), and a new step that writes state gets a point and so cannot slip in
untested (a test checks that every point in the code is listed here, and every point here has a test).

``POSTBOX_CRASH_AT=NAME`` (or ``NAME@N`` for its N-th pass) makes :func:`crash_point` send SIGKILL to its own
process when it reaches that point: no clean-up, no ``finally``, exactly what a power cut of the process
looks like. The variable is read once, at import; only the tests set it.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "POSTBOX_CRASH_AT"

#: Every crash point, and what is on disk when the process dies there.
POINTS: dict[str, str] = {
    "stage": "a job's staging folder exists, nothing is in it yet",
    "commit.manifest": "a staged job's inputs and job.yaml are synced; the folder is not yet in the inbox",
    "commit.renamed": "the job is in the inbox; the index does not know it yet",
    "adopt.moved": "a hand-dropped item is in a staging folder; no job.yaml yet",
    "claim": "the job's lock is held and its job.yaml read; nothing written yet",
    "start_attempt": "the attempt is counted in job.yaml; the algorithm has not started",
    "outputs.written": "a job's RTSTRUCT and SEG are written in its work/ folder, and may have been sent to "
                       "its destinations; job.yaml says running and names no early send",
    "send.early_recorded": "what a running job's destinations stored is in job.yaml (early_sent); it is "
                           "still running",
    "finish.manifest": "the job's outcome is in job.yaml; the folder is still in the inbox",
    "finish.moved": "the job is in the outbox; the index does not know yet",
    "requeue": "a running job given back: job.yaml says pending again, the lock is still held",
    "node.staged": "a new series has its staging folder and receiving.json; no instance yet",
    "node.stored": "an instance is on disk; its C-STORE Success has not been answered",
    "node.complete": "a series is due and checked by the gate; its job.yaml is not yet written",
    "send.claimed": "a send's lock is held; the association is not yet opened",
    "send.stored": "files are stored at the destination; the send state in job.yaml does not say so yet",
    "send.recorded": "the send state is in job.yaml; the index does not know yet",
    "purge.moved": "a job being purged is in outbox/.purging; its lock files and index entry are still there",
    "remote.before_child": "on a GPU node: the attempt's folder exists under attempts/, its child is not yet given "
                           "the job (the node's worker dies: Dask reruns the attempt elsewhere)",
    "remote.outputs_written": "on a GPU node: the algorithm's outputs are in its attempt's work/; no manifest yet",
    "remote.before_return": "on a GPU node: the attempt's manifest (files, sizes, sha256) is made; the service has "
                            "not received it",
    "attempt.promoted": "on the service: a remote attempt's work/ is renamed to the job's; job.yaml still says "
                        "running (a restart runs the job again: the promoted attempt counts)",
    "preview.written": "a finished job's output/preview.png is whole (renamed into place); job.yaml does not "
                       "name it yet",
}

_target, _, _nth = (os.environ.get(ENV) or "").partition("@")
_passes = 0
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """Kill this process here if the tests asked for ``name``; otherwise (always, in production) nothing."""
    if not _target:
        return
    if name not in POINTS:
        raise ValueError(f"crash point {name!r} is not in crashpoints.POINTS")
    if name != _target:
        return
    global _passes
    with _lock:
        _passes += 1
        if _passes < int(_nth or 1):
            return
    os.kill(os.getpid(), signal.SIGKILL)


DELAY_ENV = "POSTBOX_DELAY_AT"
#: Steps a test may slow down, to see what goes on meanwhile (issue 10: a slow SEG).
DELAYS = {"seg": "writing a job's SEG, in its thread, before it starts"}
_delays = dict(item.partition("=")[::2] for item in (os.environ.get(DELAY_ENV) or "").split(",") if item)


def delay_point(name: str) -> None:
    """Wait here if the tests asked (``POSTBOX_DELAY_AT=seg=2.5``); otherwise (always, in production) nothing."""
    if not _delays:
        return
    if name not in DELAYS:
        raise ValueError(f"delay point {name!r} is not in crashpoints.DELAYS")
    if name in _delays:
        threading.Event().wait(float(_delays[name]))  # the test's slow step itself
