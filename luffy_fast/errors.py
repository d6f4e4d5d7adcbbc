"""Errors a user can cause, shared by the modules that raise them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key at fault."""
