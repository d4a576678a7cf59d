"""Shared pieces of the lip-sync serving system: the avatar package format, config,
generated protocol stubs and the Python client."""

__version__ = "0.1.0"
