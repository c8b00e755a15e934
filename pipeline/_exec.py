"""``python -m pipeline._exec ARGV...``: run a command-line algorithm that dies with its worker.

The worker starts command-line algorithms through this shim, which asks Linux to kill it when its parent
(the worker) dies and then becomes the command itself (exec keeps that request), so a worker killed with
SIGKILL leaves no algorithm writing into a job that the next worker runs again.
"""

from __future__ import annotations

import os
import sys

from ._child import _PR_SET_PDEATHSIG


def main(argv: list[str]) -> int:
    parent = int(os.environ.pop("POSTBOX_PARENT_PID", os.getppid()))
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the command outlives a killed worker, as any subprocess would
    if os.getppid() != parent:
        return 70  # the worker died before we got here
    if not argv:
        print("usage: python -m pipeline._exec COMMAND [ARGS...]", file=sys.stderr)
        return 2
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"cannot start {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
