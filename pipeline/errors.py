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
