"""The one exception hierarchy of Postbox; each door translates it at its own edge."""

from __future__ import annotations


class PostboxError(Exception):
    """Base of every error Postbox raises on purpose."""


class ConfigError(PostboxError):
    """A key of config.yaml is missing, unknown or wrong; names the key and the problem."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config key '{key}': {problem}")
        self.key = key
        self.problem = problem

    def __reduce__(self):  # keep fields across process boundaries
        return (type(self), (self.key, self.problem))


class InvalidInput(PostboxError):
    """An input refused at a door: unsafe name, too large, unparsable, incomplete series."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.reason,))


class UnknownAlgorithm(PostboxError):
    """An algorithm name that config.yaml and the registry do not know."""

    def __init__(self, name: str, known: tuple[str, ...] = ()) -> None:
        hint = f"; known: {', '.join(known)}" if known else ""
        super().__init__(f"unknown algorithm '{name}'{hint}")
        self.name = name
        self.known = known

    def __reduce__(self):
        return (type(self), (self.name, self.known))


class ClaimLost(PostboxError):
    """A job vanished or changed hands between claim and finish."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id}: claim lost (job moved or locked elsewhere)")
        self.job_id = job_id

    def __reduce__(self):
        return (type(self), (self.job_id,))


class AlgorithmFailed(PostboxError):
    """An algorithm raised, timed out, died or returned bad output; the reason says which."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id}: {reason}")
        self.job_id = job_id
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.job_id, self.reason))


class DamagedManifest(PostboxError):
    """A job's job.yaml is not valid YAML or not a Postbox manifest; the job is set aside, never run."""

    def __init__(self, job_id: str, problem: str) -> None:
        super().__init__(f"job {job_id}: job.yaml is damaged ({problem})")
        self.job_id = job_id
        self.problem = problem

    def __reduce__(self):
        return (type(self), (self.job_id, self.problem))


class DiskFull(PostboxError):
    """No space is left on the filesystem of the inbox; work waits until there is (never counts an attempt)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"no space left on the inbox's filesystem ({what})")
        self.what = what

    def __reduce__(self):
        return (type(self), (self.what,))


class IndexDamaged(PostboxError):
    """An index file that the job folders cannot rebuild (API keys, datasets...) is damaged; it is left as it is."""

    def __init__(self, file: str, holds: str, problem: str) -> None:
        super().__init__(f"index file {file} is damaged ({problem}); it holds {holds}, which the job folders "
                         f"cannot rebuild, so it is left as it is: restore it from a backup, or run "
                         f"'postbox manage initdb --repair' to move it aside and start it afresh, losing {holds}")
        self.file = file
        self.holds = holds
        self.problem = problem

    def __reduce__(self):
        return (type(self), (self.file, self.holds, self.problem))
