"""Postbox's outer layer: the command line (and, from the HTTP issue on, the HTTP app and client)."""

__all__: list[str] = []
