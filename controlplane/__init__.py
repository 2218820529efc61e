"""The compensating-actions control plane: server, store and CLI."""

__version__ = "0.1.0"
