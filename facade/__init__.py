"""Postbox's outer layer: the command line, the PlatiPy-compatible HTTP API (``app``, ``server``) and its client."""

__all__: list[str] = []
