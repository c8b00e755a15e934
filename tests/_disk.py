"""A real full disk for the tests: a small tmpfs, and a filler file that takes its space (issue 8, defect 5)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MB = 1 << 20


class Disk:
    """A small tmpfs mounted for one test, and a filler file that takes its space."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.filler = root / "filler"

    def free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fill(self, keep: int = 0) -> None:
        """Write zeros until ENOSPC, then give back ``keep`` bytes (to the page) by truncating."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            chunk = bytes(MB)
            while True:
                try:
                    os.write(fd, chunk)  # a short write near the end; the next one meets ENOSPC
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
            if keep:
                os.ftruncate(fd, max(0, os.fstat(fd).st_size - keep))
        finally:
            os.close(fd)
        assert self.free() < keep + MB, f"the disk is not full: {self.free()} bytes free"

    def empty(self) -> None:
        self.filler.unlink()


@contextmanager
def tmpfs(root: Path, size_mb: int = 40) -> Iterator[Disk]:
    """Mount a tmpfs of ``size_mb`` at ``root`` (made here) for the block; unmounted after it, lazily if busy."""
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(root)], check=True)
    try:
        yield Disk(root)
    finally:
        if subprocess.run(["umount", str(root)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(root)], check=True)
