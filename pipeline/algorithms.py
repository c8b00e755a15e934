"""The algorithm registry (the only global mutable state) and the checks that settings fit an algorithm."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .config import AlgorithmConfig, Config
from .errors import InvalidInput, UnknownAlgorithm

F = TypeVar("F", bound=Callable[..., Any])

# Filled by @app.register in a PlatiPy-style service.py; read when the config is loaded.
_REGISTRY: dict[str, AlgorithmConfig] = {}


def register(name: str, default_settings: Mapping[str, Any] | None = None, **options: Any) -> Callable[[F], F]:
    """Register ``fn(data_objects, working_dir, settings) -> [DataObject]`` under ``name`` (PlatiPy's decorator).

    ``options`` are the other keys of an algorithm entry in config.yaml (``max_parallel``, ``timeout``,
    ``outputs``, ``structures``).
    """

    def decorate(fn: F) -> F:
        module = fn.__module__
        source = getattr(sys.modules.get(module), "__file__", None)
        if module == "__main__":
            if source is None:
                raise ValueError(f"algorithm '{name}': register it from a file, not an interactive session")
            # The child process imports the file under its own name, so its __main__ block does not run.
            module = Path(source).stem
        search_path = str(Path(source).resolve().parent) if source else ""
        _REGISTRY[name] = AlgorithmConfig(
            name=name,
            function=f"{module}:{fn.__name__}",
            default_settings=dict(default_settings or {}),
            search_path=search_path,
            **options,
        )
        return fn

    return decorate


def registered() -> tuple[AlgorithmConfig, ...]:
    """The algorithms added with ``register``, in the order they were added."""
    return tuple(_REGISTRY.values())


def resolve(config: Config, name: str | None) -> AlgorithmConfig:
    """The algorithm to run for a job that asked for ``name`` (None: the default)."""
    alg = config.algorithm(name or config.default_algorithm)
    if alg is None:
        raise UnknownAlgorithm(str(name), tuple(a.name for a in config.algorithms))
    return alg


def merge_settings(alg: AlgorithmConfig, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The algorithm's defaults updated by ``settings``; refuses keys or types the defaults do not have."""
    merged = dict(alg.default_settings)
    for key, value in (settings or {}).items():
        if key not in alg.default_settings:
            known = ", ".join(sorted(alg.default_settings)) or "none"
            raise InvalidInput(f"setting '{key}' is not a setting of algorithm '{alg.name}' (known: {known})")
        default = alg.default_settings[key]
        if default is not None and not _same_kind(default, value):
            raise InvalidInput(
                f"setting '{key}' of algorithm '{alg.name}' must be {type(default).__name__}, "
                f"not {type(value).__name__} ({value!r})"
            )
        merged[key] = value
    return merged


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))
