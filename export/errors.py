"""Errors of the exporter."""

from par_deploy.errors import ParError


class ExportError(ParError, RuntimeError):
    """An exporter failed, or produced a graph that does not match its signature or the eager model."""
